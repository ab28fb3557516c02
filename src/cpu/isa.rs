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
//! win: the int8 coders at AVX-512 and AVX2 (`x86::encode_linear_avx512` and
//! `encode_linear_avx2` with the block scales and decoders beside them: 1.9x on an
//! int8 step over the gather-based encoders before them, themselves 2.2x over scalar
//! code, BENCHMARKS.md), written with intrinsics because LLVM turns their table reads
//! into neither permutes of registers nor 32-bit gathers; their loads, stores, permutes
//! and gathers stay inside the slices and tables they are given (their SAFETY comments
//! say how), and a test holds their bytes to `quant::encode_int8`'s and `decode_int8`'s.
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
pub(crate) fn decode_piece(isa: Isa, piece: &SlotPiece<'_>, slot: Slot, out: &mut Vec<f32>) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::decode_piece_avx512(piece, slot, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::decode_piece_avx2(piece, slot, out) },
        _ => piece.decode(slot, out),
    }
}

/// [`SlotPiece::store`] at `isa`'s level (the same bytes at every level).
pub(crate) fn store_piece(
    isa: Isa,
    piece: SlotPiece<'_>,
    slot: Slot,
    values: &[f32],
    keys: Option<SlotKeys<'_>>,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::store_piece_avx512(piece, slot, values, keys) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::store_piece_avx2(piece, slot, values, keys) },
        _ => piece.store(slot, values, keys),
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
        block_absmax, decode_int8, encode_blocks_with, encode_int8, encode_linear, CodeMap,
        LinearGuess, BINADE_LOW, BOUNDARY_MARGIN, STEP_MARGIN,
    };
    use crate::slot::Slot;
    use crate::state_layout::Coded;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn decode_piece_avx2(piece: &SlotPiece<'_>, slot: Slot, out: &mut Vec<f32>) {
        decode_int8_with(piece, slot, out, |c, a, o, map| {
            decode_block_avx2(c, a, o, map)
        })
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn decode_piece_avx512(piece: &SlotPiece<'_>, slot: Slot, out: &mut Vec<f32>) {
        decode_int8_with(piece, slot, out, |c, a, o, map| {
            decode_block_avx512(c, a, o, map)
        })
    }

    /// Decodes `piece` as `SlotPiece::decode` does, an 8-bit one block by block through
    /// `decode_block` (one level's): the body both levels' `#[target_feature]` functions
    /// share, inlined into each.
    #[inline(always)]
    fn decode_int8_with(
        piece: &SlotPiece<'_>,
        slot: Slot,
        out: &mut Vec<f32>,
        decode_block: impl Fn(&[u8], f32, &mut [f32], &CodeMap),
    ) {
        match piece {
            &SlotPiece::Kept(Coded::Dynamic8 {
                ref codes,
                ref absmax,
                block_size: block,
            }) => {
                let map = CodeMap::for_slot(slot);
                out.clear();
                out.resize(codes.len(), 0.0);
                for ((o, c), &a) in out
                    .chunks_mut(block)
                    .zip(codes.chunks(block))
                    .zip(absmax.iter())
                {
                    decode_block(c, a, o, map);
                }
            }
            other => other.decode(slot, out),
        }
    }

    /// `quant::decode_int8` of a block's codes at AVX2: 8 at a time, one gather from
    /// the map's values each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn decode_block_avx2(codes: &[u8], absmax: f32, out: &mut [f32], map: &CodeMap) {
        use std::arch::x86_64::*;
        let n = codes.len().min(out.len());
        let whole = n / 8 * 8;
        // SAFETY: the loads and stores are inside `codes[..whole]` and `out[..whole]`;
        // the gathers read `map.values` (256 lanes) at a byte XOR a byte, at most 255.
        // The features are this function's own.
        unsafe {
            let scale = _mm256_set1_ps(absmax);
            let flip = _mm256_set1_epi32(map.flip as i32);
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let infinity = _mm256_set1_ps(f32::INFINITY);
            for i in (0..whole).step_by(8) {
                let code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i).cast()));
                let v = _mm256_i32gather_ps::<4>(map.values.as_ptr(), _mm256_xor_si256(code, flip));
                let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, magnitude), infinity);
                let x = _mm256_blendv_ps(v, _mm256_mul_ps(v, scale), finite);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), x);
            }
        }
        for i in whole..n {
            out[i] = decode_int8(codes[i], absmax, map);
        }
    }

    /// `quant::decode_int8` of a block's codes at AVX-512: 16 at a time, one gather
    /// from the map's values each.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    #[inline]
    fn decode_block_avx512(codes: &[u8], absmax: f32, out: &mut [f32], map: &CodeMap) {
        use std::arch::x86_64::*;
        let n = codes.len().min(out.len());
        let whole = n / 16 * 16;
        // SAFETY: the loads and stores are inside `codes[..whole]` and `out[..whole]`;
        // the gathers read `map.values` (256 lanes) at a byte XOR a byte, at most 255.
        // The features are this function's own.
        unsafe {
            let scale = _mm512_set1_ps(absmax);
            let flip = _mm512_set1_epi32(map.flip as i32);
            let magnitude = _mm512_set1_epi32(0x7fff_ffff);
            let infinity = _mm512_set1_ps(f32::INFINITY);
            for i in (0..whole).step_by(16) {
                let code = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i).cast()));
                let v = _mm512_i32gather_ps::<4>(_mm512_xor_si512(code, flip), map.values.as_ptr());
                let magnitude_of_v =
                    _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude));
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(magnitude_of_v, infinity);
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(i),
                    _mm512_mask_mul_ps(v, finite, v, scale),
                );
            }
        }
        for i in whole..n {
            out[i] = decode_int8(codes[i], absmax, map);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn store_piece_avx2(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        keys: Option<SlotKeys<'_>>,
    ) {
        store_int8_with(
            piece,
            slot,
            values,
            keys,
            |v| absmax_avx2(v),
            |v, c, m, inverse, map, t| encode_linear_avx2(v, c, m, inverse, map, t),
        )
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn store_piece_avx512(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        keys: Option<SlotKeys<'_>>,
    ) {
        store_int8_with(
            piece,
            slot,
            values,
            keys,
            |v| absmax_avx512(v),
            |v, c, m, inverse, map, t| encode_linear_avx512(v, c, m, inverse, map, t),
        )
    }

    /// Stores `piece` as `SlotPiece::store` does, an 8-bit one with one level's block
    /// scale (`scale`) and vectorized `encode_linear` (`linear`): the body both levels'
    /// `#[target_feature]` functions share, inlined into each.
    #[inline(always)]
    fn store_int8_with(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        keys: Option<SlotKeys<'_>>,
        scale: impl Fn(&[f32]) -> f32,
        linear: impl Fn(&[f32], &mut [u8], f32, f32, &CodeMap, &LinearGuess),
    ) {
        match piece {
            SlotPiece::Kept(Coded::Dynamic8 {
                codes,
                absmax,
                block_size: block,
            }) => {
                let map = CodeMap::for_slot(slot);
                let guess = map.linear_guess();
                encode_blocks_with(
                    values,
                    codes,
                    absmax,
                    block,
                    map,
                    scale,
                    |v, c, m, inverse| linear(v, c, m, inverse, map, guess),
                )
            }
            other => other.store(slot, values, keys),
        }
    }

    /// `quant::block_absmax` at AVX2: the largest finite magnitude, 8 lanes at a time.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn absmax_avx2(values: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let whole = values.len() / 8 * 8;
        // SAFETY: the loads are inside `values[..whole]`; the features are this
        // function's own.
        let lanes = unsafe {
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let infinity = _mm256_set1_ps(f32::INFINITY);
            let mut max = _mm256_setzero_ps();
            for i in (0..whole).step_by(8) {
                let ax = _mm256_and_ps(_mm256_loadu_ps(values.as_ptr().add(i)), magnitude);
                let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(ax, infinity);
                max = _mm256_max_ps(max, _mm256_and_ps(ax, finite));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), max);
            lanes
        };
        lanes
            .iter()
            .copied()
            .fold(block_absmax(&values[whole..]), f32::max)
    }

    /// `quant::block_absmax` at AVX-512: the largest finite magnitude, 16 lanes at a time.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    #[inline]
    fn absmax_avx512(values: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let whole = values.len() / 16 * 16;
        // SAFETY: the loads are inside `values[..whole]`; the features are this
        // function's own.
        let max = unsafe {
            let magnitude = _mm512_set1_epi32(0x7fff_ffff);
            let infinity = _mm512_set1_ps(f32::INFINITY);
            let mut max = _mm512_setzero_ps();
            for i in (0..whole).step_by(16) {
                let x = _mm512_castps_si512(_mm512_loadu_ps(values.as_ptr().add(i)));
                let ax = _mm512_castsi512_ps(_mm512_and_si512(x, magnitude));
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ax, infinity);
                max = _mm512_mask_max_ps(max, finite, max, ax);
            }
            _mm512_reduce_max_ps(max)
        };
        max.max(block_absmax(&values[whole..]))
    }

    /// `quant::encode_linear` for 8 elements at a time with AVX2: [`encode_linear_avx512`]
    /// with each 32-lane binade table read as four 8-lane permutes and two blends.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn encode_linear_avx2(
        values: &[f32],
        codes: &mut [u8],
        absmax: f32,
        inverse: f32,
        map: &CodeMap,
        t: &LinearGuess,
    ) {
        use std::arch::x86_64::*;
        let n = values.len().min(codes.len());
        let whole = n / 8 * 8;
        // SAFETY: every load and store is inside `values[..whole]`, `codes[..whole]` or
        // the tables (`t`'s arrays of 16 or 32 lanes, read 8 at a time at offsets 0, 8,
        // 16 and 24 at most); each store of codes writes 8 bytes at `codes[i..i + 8]`.
        // The features are this function's own.
        unsafe {
            let inv = _mm256_set1_ps(inverse);
            let zero = _mm256_setzero_ps();
            let infinity = _mm256_set1_ps(f32::INFINITY);
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let exponent_low = _mm256_set1_epi32((BINADE_LOW << 23) as i32);
            let none = _mm256_setzero_si256();
            let step_margin = _mm256_set1_ps(STEP_MARGIN);
            let boundary_margin = _mm256_set1_ps(BOUNDARY_MARGIN);
            let flip = _mm256_set1_epi32(map.flip as i32);
            let max_finite = _mm256_set1_epi32(map.max_finite as i32);
            let quarter = |table: *const f32, q: usize| _mm256_loadu_ps(table.add(8 * q));
            let boundaries = [0, 1, 2, 3].map(|q| quarter(t.binade_boundary.as_ptr(), q));
            let regions = [0, 1, 2, 3].map(|q| quarter(t.binade_region.as_ptr().cast(), q));
            let slope = _mm256_loadu_ps(t.slope.as_ptr());
            let offset = _mm256_loadu_ps(t.offset.as_ptr());
            let first = _mm256_loadu_si256(t.first.as_ptr().cast());
            let span = _mm256_loadu_si256(t.span.as_ptr().cast());
            // lane k of a 32-lane table (k modulo 32): the blends read bits 3 and 4 of k
            // as the sign bits of k shifted left
            let lookup = |table: &[__m256; 4], key: __m256i| {
                let bit3 = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(key));
                let bit4 = _mm256_castsi256_ps(_mm256_slli_epi32::<27>(key));
                let [a, b, c, d] = table.map(|q| _mm256_permutevar8x32_ps(q, key));
                _mm256_blendv_ps(
                    _mm256_blendv_ps(a, b, bit3),
                    _mm256_blendv_ps(c, d, bit3),
                    bit4,
                )
            };
            #[rustfmt::skip]
            let low_bytes = _mm256_setr_epi8(
                0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
            );
            for i in (0..whole).step_by(8) {
                let x = _mm256_loadu_ps(values.as_ptr().add(i));
                let ax = _mm256_and_ps(x, magnitude);
                let y = _mm256_mul_ps(ax, inv);
                let key =
                    _mm256_srli_epi32::<23>(_mm256_max_epi32(_mm256_castps_si256(y), exponent_low));
                let boundary = lookup(&boundaries, key);
                let distance = _mm256_and_ps(_mm256_sub_ps(y, boundary), magnitude);
                let near_boundary =
                    _mm256_cmp_ps::<_CMP_LT_OQ>(distance, _mm256_mul_ps(boundary, boundary_margin));
                let below = _mm256_castps_si256(lookup(&regions, key));
                // a true comparison is all ones (-1): subtracting it adds 1
                let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(y, boundary));
                let region = _mm256_sub_epi32(below, above);
                let p = _mm256_fmadd_ps(
                    y,
                    _mm256_permutevar8x32_ps(slope, region),
                    _mm256_permutevar8x32_ps(offset, region),
                );
                let nearest =
                    _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
                let fraction = _mm256_and_ps(_mm256_sub_ps(p, nearest), magnitude);
                let near_step = _mm256_cmp_ps::<_CMP_LT_OQ>(fraction, step_margin);
                let local = _mm256_min_epi32(
                    _mm256_max_epi32(_mm256_cvttps_epi32(p), none),
                    _mm256_permutevar8x32_epi32(span, region),
                );
                let guess = _mm256_add_epi32(_mm256_permutevar8x32_epi32(first, region), local);
                // below 0: the guess mirrored in the signed map, 0 in the unsigned one
                let negative = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, zero));
                let mirrored = if map.flip != 0 {
                    _mm256_sub_epi32(max_finite, guess)
                } else {
                    none
                };
                let index = _mm256_blendv_epi8(guess, mirrored, negative);
                // each word's low byte: four per 128-bit lane, then the two lanes' four
                let bytes = _mm256_shuffle_epi8(_mm256_xor_si256(index, flip), low_bytes);
                let bytes =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
                _mm_storel_epi64(
                    codes.as_mut_ptr().add(i).cast(),
                    _mm256_castsi256_si128(bytes),
                );
                let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(ax, infinity);
                let untrusted = _mm256_or_ps(
                    _mm256_or_ps(near_boundary, near_step),
                    _mm256_xor_ps(finite, _mm256_castsi256_ps(_mm256_set1_epi32(-1))),
                );
                let mut untrusted = _mm256_movemask_ps(untrusted) as u32;
                while untrusted != 0 {
                    let at = i + untrusted.trailing_zeros() as usize;
                    codes[at] = encode_int8(values[at], absmax, map);
                    untrusted &= untrusted - 1;
                }
            }
        }
        for i in whole..n {
            codes[i] = encode_linear(values[i], absmax, inverse, map);
        }
    }

    /// `quant::encode_linear` for 16 elements at a time: `LinearGuess::guess` mirrored
    /// in intrinsics (no gather: the binade and region tables are permutes of
    /// registers), with the sign as `encode_linear` applies it. Elements whose guess is
    /// not trusted, and non-finite ones, are encoded by `encode_int8` one by one.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    #[inline]
    fn encode_linear_avx512(
        values: &[f32],
        codes: &mut [u8],
        absmax: f32,
        inverse: f32,
        map: &CodeMap,
        t: &LinearGuess,
    ) {
        use std::arch::x86_64::*;
        let n = values.len().min(codes.len());
        let whole = n / 16 * 16;
        // SAFETY: every load and store is inside `values[..whole]`, `codes[..whole]` or
        // the tables (`t`'s arrays of 16 or 32 lanes, read 16 at a time at offsets 0
        // and 16 at most). The features are this function's own.
        unsafe {
            let inv = _mm512_set1_ps(inverse);
            let zero = _mm512_setzero_ps();
            let infinity = _mm512_set1_ps(f32::INFINITY);
            let magnitude = _mm512_set1_epi32(0x7fff_ffff);
            let exponent_low = _mm512_set1_epi32((BINADE_LOW << 23) as i32);
            let one = _mm512_set1_epi32(1);
            let none = _mm512_setzero_si512();
            let step_margin = _mm512_set1_ps(STEP_MARGIN);
            let boundary_margin = _mm512_set1_ps(BOUNDARY_MARGIN);
            let flip = _mm512_set1_epi32(map.flip as i32);
            let max_finite = _mm512_set1_epi32(map.max_finite as i32);
            let boundary_low = _mm512_loadu_ps(t.binade_boundary.as_ptr());
            let boundary_high = _mm512_loadu_ps(t.binade_boundary.as_ptr().add(16));
            let region_low = _mm512_loadu_si512(t.binade_region.as_ptr().cast());
            let region_high = _mm512_loadu_si512(t.binade_region.as_ptr().add(16).cast());
            let slope = _mm512_loadu_ps(t.slope.as_ptr());
            let offset = _mm512_loadu_ps(t.offset.as_ptr());
            let first = _mm512_loadu_si512(t.first.as_ptr().cast());
            let span = _mm512_loadu_si512(t.span.as_ptr().cast());
            for i in (0..whole).step_by(16) {
                let x = _mm512_loadu_ps(values.as_ptr().add(i));
                let ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude));
                let y = _mm512_mul_ps(ax, inv);
                // LinearGuess::binade: the permutes read the key modulo 32
                let key =
                    _mm512_srli_epi32::<23>(_mm512_max_epi32(_mm512_castps_si512(y), exponent_low));
                let boundary = _mm512_permutex2var_ps(boundary_low, key, boundary_high);
                let distance = _mm512_castsi512_ps(_mm512_and_si512(
                    _mm512_castps_si512(_mm512_sub_ps(y, boundary)),
                    magnitude,
                ));
                let near_boundary = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(
                    distance,
                    _mm512_mul_ps(boundary, boundary_margin),
                );
                let below = _mm512_permutex2var_epi32(region_low, key, region_high);
                let above = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, boundary);
                let region = _mm512_mask_add_epi32(below, above, below, one);
                let p = _mm512_fmadd_ps(
                    y,
                    _mm512_permutexvar_ps(region, slope),
                    _mm512_permutexvar_ps(region, offset),
                );
                // p less p rounded to the nearest integer (ties to even)
                let fraction = _mm512_castsi512_ps(_mm512_and_si512(
                    _mm512_castps_si512(_mm512_reduce_ps::<0x08>(p)),
                    magnitude,
                ));
                let near_step = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(fraction, step_margin);
                let local = _mm512_min_epi32(
                    _mm512_max_epi32(_mm512_cvttps_epi32(p), none),
                    _mm512_permutexvar_epi32(region, span),
                );
                let guess = _mm512_add_epi32(_mm512_permutexvar_epi32(region, first), local);
                // below 0: the guess mirrored in the signed map, 0 in the unsigned one
                let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, zero);
                let index = if map.flip != 0 {
                    _mm512_mask_sub_epi32(guess, negative, max_finite, guess)
                } else {
                    _mm512_mask_mov_epi32(guess, negative, none)
                };
                let stored = _mm512_cvtepi32_epi8(_mm512_xor_si512(index, flip));
                _mm_storeu_si128(codes.as_mut_ptr().add(i).cast(), stored);
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ax, infinity);
                let mut untrusted = near_boundary | near_step | !finite;
                while untrusted != 0 {
                    let at = i + untrusted.trailing_zeros() as usize;
                    codes[at] = encode_int8(values[at], absmax, map);
                    untrusted &= untrusted - 1;
                }
            }
        }
        for i in whole..n {
            codes[i] = encode_linear(values[i], absmax, inverse, map);
        }
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
    use crate::quant::{block_absmax, decode_blocks, encode_int8, CodeMap};
    use crate::state_layout::Coded;

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
                // the last three: scales the linear guess leaves to the reference (beyond
                // SCALE_LIMITS), and the smallest it takes
                for (seed, scale) in [
                    (1u64, 1.0f32),
                    (2, 3.7e-3),
                    (3, 6.1e4),
                    (4, 1e-35),
                    (5, 3e35),
                    (6, 1e-40),
                    (7, 1.0 / (1u128 << 100) as f32),
                ] {
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
                            // the reference: each block's scale, each element's byte
                            let absmax: Vec<f32> = values.chunks(block).map(block_absmax).collect();
                            let codes: Vec<u8> = values
                                .iter()
                                .enumerate()
                                .map(|(i, &x)| encode_int8(x, absmax[i / block], map))
                                .collect();
                            let blocks = absmax.len();
                            let (mut fast, mut fast_absmax) =
                                (vec![0u8; values.len()], vec![0f32; blocks]);
                            let piece = SlotPiece::Kept(Coded::Dynamic8 {
                                codes: &mut fast,
                                absmax: &mut fast_absmax,
                                block_size: block,
                            });
                            store_piece(isa, piece, slot, &values, None);
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
                            // and the decoder reads them back as the reference decoder
                            let piece = SlotPiece::Kept(Coded::Dynamic8 {
                                codes: &mut fast,
                                absmax: &mut fast_absmax,
                                block_size: block,
                            });
                            let mut decoded = Vec::new();
                            decode_piece(isa, &piece, slot, &mut decoded);
                            let mut reference = vec![0f32; values.len()];
                            decode_blocks(&codes, &absmax, &mut reference, block, map);
                            assert_eq!(
                                decoded.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                "{isa:?}: {slot:?}, block {block}, scale {scale}"
                            );
                        }
                    }
                }
            }
        }
    }
}
