//! Run-time dispatch of the CPU loops to an instruction-set level: the only `unsafe` in
//! the crate.
//!
//! Each loop of `kernels` is `#[inline(always)]`, so the `#[target_feature]` functions
//! below compile one clone of it per level (the baseline clone is the kernel itself).
//! Calling a `#[target_feature]` function is `unsafe` because running AVX2 or AVX-512
//! instructions on a processor without them is undefined behaviour.
//!
//! **Why it is sound:** the clones are called only through the dispatchers here, and
//! only with an [`Isa`], whose one constructor ([`Isa::new`]) checks at run time, with
//! `is_x86_feature_detected!`, every feature the clone enables. Nothing else about the
//! clones is unsafe: they are the same safe Rust as the kernels, except one measured
//! win: the int8 encoder at AVX-512 and AVX2 (`x86::encode_guessed_avx512`,
//! `encode_guessed_avx2`: 2.2x and 1.8x on an int8 step, BENCHMARKS.md), written with
//! intrinsics because LLVM does not vectorize its table lookups; their loads, stores
//! and gathers stay inside the slices and tables they are given (their SAFETY comments
//! say how), and a test holds their bytes to `quant::encode_scaled`'s.
//!
//! The levels and their detection are in [`crate::cpu_level`]; hand-written rather than
//! the `multiversion` crate because a user must be able to force a lower level
//! (`FUSED_RMSPROP_CPU_LEVEL`, [`crate::RmsProp::set_cpu_level`]), which `multiversion`'s
//! automatic selection does not offer.

use std::sync::OnceLock;

use super::kernels::{self, ChunkJob, SlotElement};
use super::slots::{SlotKeys, SlotPiece};
use crate::cpu_level::CpuLevel;
use crate::math::StepScalars;
use crate::slot::Slot;

/// The environment variable that caps the process's default level.
pub(crate) const LEVEL_ENV: &str = "FUSED_RMSPROP_CPU_LEVEL";

/// A level this processor supports: the proof the dispatchers rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Isa(CpuLevel);

impl Isa {
    /// `level`, if this processor supports it.
    pub(crate) fn new(level: CpuLevel) -> Option<Isa> {
        level.is_supported().then_some(Isa(level))
    }

    /// The level every new CPU engine starts at: the best one, or a lower one asked for
    /// by `FUSED_RMSPROP_CPU_LEVEL`; chosen and logged (at debug level) once.
    pub(crate) fn process_default() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = CpuLevel::best();
            let level = match std::env::var(LEVEL_ENV) {
                Err(_) => best,
                Ok(asked) => match asked.parse::<CpuLevel>() {
                    Ok(asked) if asked <= best => asked,
                    Ok(asked) => {
                        log::warn!("fused-rmsprop: {LEVEL_ENV}={asked} is not supported here; using {best}");
                        best
                    }
                    Err(e) => {
                        log::warn!("fused-rmsprop: {LEVEL_ENV}: {e}; using {best}");
                        best
                    }
                },
            };
            log::debug!("fused-rmsprop: CPU loops run at {level} (best supported: {best})");
            Isa::new(level).unwrap_or(Isa(CpuLevel::Baseline))
        })
    }

    /// The level.
    pub(crate) fn level(self) -> CpuLevel {
        self.0
    }
}

/// [`kernels::run_chunk`] at `isa`'s level.
pub(crate) fn run_chunk<const K: u32, E: SlotElement>(
    isa: Isa,
    job: ChunkJob<'_, E>,
    s: &StepScalars,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::run_chunk_avx512::<K, E>(job, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::run_chunk_avx2::<K, E>(job, s) },
        _ => kernels::run_chunk::<K, E>(job, s),
    }
}

/// [`SlotPiece::decode`] at `isa`'s level: the 8-bit and bf16 decoders vectorize there
/// as the loops do (the same values at every level).
pub(crate) fn decode_piece(
    isa: Isa,
    piece: &SlotPiece<'_>,
    slot: Slot,
    block: usize,
    out: &mut Vec<f32>,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::decode_piece_avx512(piece, slot, block, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::decode_piece_avx2(piece, slot, block, out) },
        _ => piece.decode(slot, block, out),
    }
}

/// [`SlotPiece::store`] at `isa`'s level (the same bytes at every level).
pub(crate) fn store_piece(
    isa: Isa,
    piece: SlotPiece<'_>,
    slot: Slot,
    values: &[f32],
    block: usize,
    keys: Option<SlotKeys<'_>>,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::store_piece_avx512(piece, slot, values, block, keys) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::store_piece_avx2(piece, slot, values, block, keys) },
        _ => piece.store(slot, values, block, keys),
    }
}

/// [`kernels::sum_of_squares`] at `isa`'s level.
pub(crate) fn sum_of_squares<const A: bool>(
    isa: Isa,
    g: &[f32],
    acc: &[f32],
    s: &StepScalars,
) -> f64 {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::sum_of_squares_avx512::<A>(g, acc, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::sum_of_squares_avx2::<A>(g, acc, s) },
        _ => kernels::sum_of_squares::<A>(g, acc, s),
    }
}

/// [`kernels::any_non_finite`] at `isa`'s level.
pub(crate) fn any_non_finite(isa: Isa, chunk: &[f32], s: &StepScalars) -> bool {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::any_non_finite_avx512(chunk, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::any_non_finite_avx2(chunk, s) },
        _ => kernels::any_non_finite(chunk, s),
    }
}

/// The x86-64 clones: the kernels compiled with AVX2 + FMA, and with AVX-512.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::kernels::{self, ChunkJob, SlotElement};
    use crate::cpu::slots::{SlotKeys, SlotPiece};
    use crate::math::StepScalars;
    use crate::quant::{
        encode_blocks_with, encode_scaled, CodeMap, GUESS_HIGH, GUESS_KEYS, GUESS_LOW,
    };
    use crate::slot::Slot;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn decode_piece_avx2(
        piece: &SlotPiece<'_>,
        slot: Slot,
        block: usize,
        out: &mut Vec<f32>,
    ) {
        piece.decode(slot, block, out)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn decode_piece_avx512(
        piece: &SlotPiece<'_>,
        slot: Slot,
        block: usize,
        out: &mut Vec<f32>,
    ) {
        piece.decode(slot, block, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn store_piece_avx2(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        block: usize,
        keys: Option<SlotKeys<'_>>,
    ) {
        store_int8_with(
            piece,
            slot,
            values,
            block,
            keys,
            |v, c, inverse, scaled, map| encode_guessed_avx2(v, c, inverse, scaled, map),
        )
    }

    /// Stores `piece` as `SlotPiece::store` does, an 8-bit one through `encode` (one
    /// level's vectorized first guess): the body both levels' `#[target_feature]`
    /// functions share, inlined into each so that `encode` runs at that level.
    #[inline(always)]
    fn store_int8_with(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        block: usize,
        keys: Option<SlotKeys<'_>>,
        encode: impl Fn(&[f32], &mut [u8], f32, &[f32; 256], &CodeMap) -> bool,
    ) {
        match piece {
            SlotPiece::Int8 { codes, absmax } => {
                let map = CodeMap::for_slot(slot);
                encode_blocks_with(
                    values,
                    codes,
                    absmax,
                    block,
                    map,
                    |v, c, inverse, scaled| encode(v, c, inverse, scaled, map),
                )
            }
            other => other.store(slot, values, block, keys),
        }
    }

    /// [`encode_guessed_avx512`] for 8 elements at a time with AVX2's gathers.
    #[target_feature(enable = "avx2,fma")]
    fn encode_guessed_avx2(
        values: &[f32],
        codes: &mut [u8],
        inverse: f32,
        scaled: &[f32; 256],
        map: &CodeMap,
    ) -> bool {
        use std::arch::x86_64::*;
        let guesses = map.guess_table();
        let n = values.len().min(codes.len());
        if guesses.len() < GUESS_KEYS + 3 {
            return false;
        }
        let whole = n / 8 * 8;
        // SAFETY: as in `encode_guessed_avx512`: loads and stores inside
        // `values[..whole]` and `codes[..whole]` (the codes through a local array), the
        // guess gathers at keys clamped to `0 ..= GUESS_KEYS - 1` (4 bytes each, inside
        // the table's padding), the threshold gathers at indices clamped to `0 ..= 255`.
        // The features are this function's own.
        let settled = unsafe {
            let inv = _mm256_set1_ps(inverse);
            let zero = _mm256_setzero_ps();
            let infinity = _mm256_set1_ps(f32::INFINITY);
            let magnitude = _mm256_set1_epi32(0x7fff_ffff);
            let low = _mm256_set1_epi32(GUESS_LOW as i32);
            let high = _mm256_set1_epi32(GUESS_HIGH as i32);
            let one = _mm256_set1_epi32(1);
            let byte = _mm256_set1_epi32(0xff);
            let last = _mm256_set1_epi32(255);
            let none = _mm256_setzero_si256();
            let flip = _mm256_set1_epi32(map.flip as i32);
            let max_finite = _mm256_set1_epi32(map.max_finite as i32);
            let mut bad = _mm256_setzero_si256();
            let mut stored = [0u32; 8];
            for i in (0..whole).step_by(8) {
                let x = _mm256_loadu_ps(values.as_ptr().add(i));
                let ax = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), magnitude));
                let y = _mm256_castps_si256(_mm256_mul_ps(ax, inv));
                let key = _mm256_sub_epi32(
                    _mm256_min_epu32(_mm256_max_epu32(_mm256_srli_epi32::<12>(y), low), high),
                    low,
                );
                let guess = _mm256_and_si256(
                    _mm256_i32gather_epi32::<1>(guesses.as_ptr().cast(), key),
                    byte,
                );
                let mirrored = if map.flip != 0 {
                    _mm256_sub_epi32(max_finite, guess)
                } else {
                    none
                };
                let negative = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, zero));
                let around = _mm256_blendv_epi8(guess, mirrored, negative);
                let base =
                    _mm256_and_si256(_mm256_sub_epi32(_mm256_max_epu32(around, one), one), byte);
                let next = _mm256_add_epi32(base, one);
                let s0 = _mm256_i32gather_ps::<4>(scaled.as_ptr(), base);
                let s1 = _mm256_i32gather_ps::<4>(scaled.as_ptr(), _mm256_min_epu32(next, last));
                // a true comparison is all ones (-1): subtracting it adds 1
                let ge0 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, s0));
                let ge1 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, s1));
                let index = _mm256_sub_epi32(_mm256_sub_epi32(base, ge0), ge1);
                let at = _mm256_i32gather_ps::<4>(scaled.as_ptr(), _mm256_min_epu32(index, last));
                let before = _mm256_i32gather_ps::<4>(
                    scaled.as_ptr(),
                    _mm256_sub_epi32(_mm256_max_epu32(index, one), one),
                );
                let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, at));
                let below = _mm256_and_si256(
                    _mm256_cmpgt_epi32(index, none),
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, before)),
                );
                let finite = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(ax, infinity));
                let out_of_range = _mm256_or_si256(
                    _mm256_cmpgt_epi32(next, last),
                    _mm256_cmpgt_epi32(index, last),
                );
                bad = _mm256_or_si256(
                    bad,
                    _mm256_or_si256(
                        _mm256_or_si256(above, below),
                        _mm256_or_si256(
                            out_of_range,
                            _mm256_andnot_si256(finite, _mm256_set1_epi32(-1)),
                        ),
                    ),
                );
                _mm256_storeu_si256(stored.as_mut_ptr().cast(), _mm256_xor_si256(index, flip));
                for (code, &word) in codes[i..i + 8].iter_mut().zip(&stored) {
                    *code = word as u8;
                }
            }
            _mm256_testz_si256(bad, bad) == 1
        };
        for i in whole..n {
            codes[i] = encode_scaled(values[i], inverse, scaled, map);
        }
        settled
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn store_piece_avx512(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        block: usize,
        keys: Option<SlotKeys<'_>>,
    ) {
        store_int8_with(
            piece,
            slot,
            values,
            block,
            keys,
            |v, c, inverse, scaled, map| encode_guessed_avx512(v, c, inverse, scaled, map),
        )
    }

    /// `quant::encode_scaled`'s first answer for 16 elements at a time: the guess
    /// table's index (a gather), the two comparisons around it (two gathers of the
    /// scaled thresholds), and the check `encode_scaled` makes before it trusts them.
    /// Writes every byte of `codes` and returns true when every element is finite and
    /// passes the check (then the bytes are `encode_scaled`'s); false otherwise (the
    /// caller encodes the block element by element).
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    fn encode_guessed_avx512(
        values: &[f32],
        codes: &mut [u8],
        inverse: f32,
        scaled: &[f32; 256],
        map: &CodeMap,
    ) -> bool {
        use std::arch::x86_64::*;
        let guesses = map.guess_table();
        let n = values.len().min(codes.len());
        if guesses.len() < GUESS_KEYS + 3 {
            return false;
        }
        let whole = n / 16 * 16;
        let mut settled = true;
        // SAFETY: every load and store is inside `values[..whole]` and
        // `codes[..whole]`; the guess gathers read 4 bytes at keys clamped to
        // `0 ..= GUESS_KEYS - 1`, inside the table and its 3 padding bytes (checked
        // above); the threshold gathers read at indices clamped to `0 ..= 255`, inside
        // `scaled`. The features are this function's own.
        unsafe {
            let inv = _mm512_set1_ps(inverse);
            let zero = _mm512_setzero_ps();
            let infinity = _mm512_set1_ps(f32::INFINITY);
            let magnitude = _mm512_set1_epi32(0x7fff_ffff);
            let low = _mm512_set1_epi32(GUESS_LOW as i32);
            let high = _mm512_set1_epi32(GUESS_HIGH as i32);
            let one = _mm512_set1_epi32(1);
            let byte = _mm512_set1_epi32(0xff);
            let last = _mm512_set1_epi32(255);
            let none = _mm512_setzero_si512();
            let flip = _mm512_set1_epi32(map.flip as i32);
            let max_finite = _mm512_set1_epi32(map.max_finite as i32);
            let mut bad: __mmask16 = 0;
            for i in (0..whole).step_by(16) {
                let x = _mm512_loadu_ps(values.as_ptr().add(i));
                let ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude));
                let y = _mm512_castps_si512(_mm512_mul_ps(ax, inv));
                let key = _mm512_sub_epi32(
                    _mm512_min_epu32(_mm512_max_epu32(_mm512_srli_epi32::<12>(y), low), high),
                    low,
                );
                let guess = _mm512_and_si512(
                    _mm512_i32gather_epi32::<1>(key, guesses.as_ptr().cast()),
                    byte,
                );
                // below 0: the guess mirrored in the signed map, 0 in the unsigned one
                let mirrored = if map.flip != 0 {
                    _mm512_sub_epi32(max_finite, guess)
                } else {
                    none
                };
                let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, zero);
                let around = _mm512_mask_blend_epi32(negative, guess, mirrored);
                let base =
                    _mm512_and_si512(_mm512_sub_epi32(_mm512_max_epu32(around, one), one), byte);
                let next = _mm512_add_epi32(base, one);
                let s0 = _mm512_i32gather_ps::<4>(base, scaled.as_ptr());
                let s1 = _mm512_i32gather_ps::<4>(_mm512_min_epu32(next, last), scaled.as_ptr());
                let index =
                    _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, s0), base, one);
                let index = _mm512_mask_add_epi32(
                    index,
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, s1),
                    index,
                    one,
                );
                // encode_scaled's check: x >= scaled[index], or index > 0 and x < scaled[index - 1]
                let at = _mm512_i32gather_ps::<4>(_mm512_min_epu32(index, last), scaled.as_ptr());
                let before = _mm512_i32gather_ps::<4>(
                    _mm512_sub_epi32(_mm512_max_epu32(index, one), one),
                    scaled.as_ptr(),
                );
                let above = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, at);
                let below = _mm512_cmpgt_epu32_mask(index, none)
                    & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, before);
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ax, infinity);
                let out_of_range =
                    _mm512_cmpgt_epu32_mask(next, last) | _mm512_cmpgt_epu32_mask(index, last);
                bad |= above | below | out_of_range | !finite;
                let stored = _mm512_cvtepi32_epi8(_mm512_xor_si512(index, flip));
                _mm_storeu_si128(codes.as_mut_ptr().add(i).cast(), stored);
            }
            settled &= bad == 0;
        }
        for i in whole..n {
            codes[i] = encode_scaled(values[i], inverse, scaled, map);
        }
        settled
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn run_chunk_avx2<const K: u32, E: SlotElement>(
        job: ChunkJob<'_, E>,
        s: &StepScalars,
    ) {
        kernels::run_chunk::<K, E>(job, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn run_chunk_avx512<const K: u32, E: SlotElement>(
        job: ChunkJob<'_, E>,
        s: &StepScalars,
    ) {
        kernels::run_chunk::<K, E>(job, s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_of_squares_avx2<const A: bool>(
        g: &[f32],
        acc: &[f32],
        s: &StepScalars,
    ) -> f64 {
        kernels::sum_of_squares::<A>(g, acc, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn sum_of_squares_avx512<const A: bool>(
        g: &[f32],
        acc: &[f32],
        s: &StepScalars,
    ) -> f64 {
        kernels::sum_of_squares::<A>(g, acc, s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn any_non_finite_avx2(chunk: &[f32], s: &StepScalars) -> bool {
        kernels::any_non_finite(chunk, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn any_non_finite_avx512(chunk: &[f32], s: &StepScalars) -> bool {
        kernels::any_non_finite(chunk, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{encode_blocks, CodeMap};

    /// Values that exercise every branch of the 8-bit encoder: each code's value and
    /// each threshold's product (and their neighbouring floats) at a block's scale, both
    /// signs, zeros, subnormals, the specials, and random values over many decades.
    fn hard_values(map: &CodeMap, scale: f32, seed: u64) -> Vec<f32> {
        let mut v = vec![scale, 0.0, -0.0, f32::MIN_POSITIVE / 4.0, -1e-30];
        for k in 0..256 {
            for base in [scale * map.values[k], scale * map.thresholds[k]] {
                if base.is_finite() {
                    v.extend([
                        base,
                        base.next_up(),
                        base.next_down(),
                        -base,
                        -base.next_up(),
                    ]);
                }
            }
        }
        let mut x = seed;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unit = (x >> 40) as f32 / (1u64 << 24) as f32;
            let decade = ((x >> 8) % 9) as i32;
            let sign = if x & 1 == 0 { 1.0 } else { -1.0 };
            v.push(sign * scale * unit * 10f32.powi(-decade));
        }
        v.retain(|x| x.abs() <= scale); // the block's scale stays `scale`
        v
    }

    /// The AVX-512 encoder writes the reference encoder's bytes and scales, for both
    /// maps, several block sizes, lengths that are not multiples of 16, and blocks with
    /// NaN or infinities (encoded element by element).
    #[test]
    fn the_vectorized_int8_encoder_writes_the_reference_bytes() {
        let isas: Vec<Isa> = [CpuLevel::Avx2, CpuLevel::Avx512]
            .into_iter()
            .filter_map(Isa::new)
            .collect();
        if isas.len() < 2 {
            eprintln!(
                "!!!!!! only {isas:?} of AVX2 and AVX-512 here: the other vectorized encoder is not tested !!!!!!"
            );
        }
        for isa in isas {
            for slot in [Slot::Velocity, Slot::Momentum] {
                let map = CodeMap::for_slot(slot);
                for (seed, scale) in [(1u64, 1.0f32), (2, 3.7e-3), (3, 6.1e4)] {
                    let mut values = hard_values(map, scale, seed);
                    if slot == Slot::Velocity {
                        values.iter_mut().for_each(|x| *x = x.abs());
                    }
                    for block in [32usize, 64, 256] {
                        for specials in [false, true] {
                            let mut values = values.clone();
                            values.truncate(values.len() / block * block + 7);
                            // every block's scale is `scale`: its thresholds are the products above
                            for b in (0..values.len()).step_by(block) {
                                values[b] = scale;
                            }
                            if specials {
                                for (i, s) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
                                    .iter()
                                    .enumerate()
                                {
                                    let at = (i * 977 + 1) % values.len();
                                    values[at] = *s;
                                }
                            }
                            let blocks = values.len().div_ceil(block);
                            let (mut codes, mut absmax) =
                                (vec![0u8; values.len()], vec![0f32; blocks]);
                            encode_blocks(&values, &mut codes, &mut absmax, block, map);
                            let (mut fast, mut fast_absmax) =
                                (vec![0u8; values.len()], vec![0f32; blocks]);
                            let piece = SlotPiece::Int8 {
                                codes: &mut fast,
                                absmax: &mut fast_absmax,
                            };
                            store_piece(isa, piece, slot, &values, block, None);
                            assert_eq!(
                                absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                fast_absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                            );
                            if let Some(i) = (0..codes.len()).find(|&i| codes[i] != fast[i]) {
                                panic!(
                                "{isa:?}: {slot:?}, block {block}, scale {scale}: element {i} ({}) is {} here, {} in the reference",
                                values[i], fast[i], codes[i]
                            );
                            }
                        }
                    }
                }
            }
        }
    }
}
