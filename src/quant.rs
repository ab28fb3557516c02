//! Compact slot storage, element by element: 8-bit block-wise quantization with
//! dynamic code maps (after bitsandbytes, Dettmers et al. 2022), and the rounding of
//! bf16 slots. `shaders/rmsprop.wgsl` mirrors the reference coders here
//! ([`encode_int8`], [`decode_int8`], the bf16 rounding) name for name, and reads the
//! same tables ([`CodeMap::gpu_table`]), so both backends store the same bits for the
//! same f32 values. The fast encoders (the shader's table guess, the CPU's
//! [`encode_linear`]) write the reference's bytes, and tests hold them to it.
//!
//! A block of `block_size` elements keeps one f32 `absmax` (the largest finite
//! magnitude in it) and one byte per element: the index of the nearest value of a
//! 256-entry map scaled by `absmax`. The maps are dynamic: decade `i` (values from
//! 10^(i-7) to 10^(i-6) of `absmax`) has twice the entries of decade `i - 1`, so large
//! values keep about 2 decimal digits and small ones still exist.
//!
//! - [`CodeMap::unsigned`] (the velocity, a mean of squares, never negative): 0, 252
//!   values from 1.1e-6 to 0.9965, 1.0; then +inf (254) and NaN (255).
//! - [`CodeMap::signed`] (momentum, average gradient, EMA, accumulator): 0, 127
//!   magnitudes per sign from 1.3e-6 to 1.0, and NaN. An infinite signed element is
//!   stored as NaN: in RMSprop it only arises where the parameter has already become NaN.
//!
//! Non-finite elements are kept element by element and do not enter `absmax`, so a NaN
//! or an infinity never spreads to the rest of its block. Stored codes are the map's
//! sorted indices, XOR 127 for the signed map, so that a zero byte is 0.0 in both
//! (zeroed buffers are zero slots).

use std::sync::OnceLock;

/// One 8-bit code map: 256 values (sorted, then the special codes), and the thresholds
/// between neighbours.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeMap {
    /// Value of each sorted index (specials: +inf or NaN), as a fraction of `absmax`.
    pub values: [f32; 256],
    /// `thresholds[c]`: the midpoint between `values[c]` and `values[c + 1]`; an
    /// element at least `absmax * thresholds[c]` gets an index above `c`.
    pub thresholds: [f32; 256],
    /// The largest sorted index of a finite value.
    pub max_finite: u32,
    /// The stored byte is the sorted index XOR this (127 signed, 0 unsigned).
    pub flip: u32,
    /// Sorted index of +inf (NaN's when the map has no infinity).
    pub inf_index: u32,
    /// Sorted index of NaN.
    pub nan_index: u32,
    /// The shader's first guess (`encode_int8_fast` in `shaders/rmsprop.wgsl`): for
    /// each magnitude `y` from 2^-27 to 1, keyed by its top 20 bits (buckets narrower
    /// than any gap between thresholds), the sorted index of the bucket's least `y`,
    /// plus [`GUESS_CLEAN`] where no threshold lies in the bucket or within
    /// [`CLEAN_MARGIN`] of it; then one zero entry.
    guesses: Vec<u16>,
    /// The CPU encoders' first guess ([`encode_linear`]: no table lookup).
    linear: LinearGuess,
}

/// The keys of [`CodeMap::guesses`]: the top 20 bits of 2^-27 and of 1.0.
pub(crate) const GUESS_LOW: u32 = 0x3200_0000 >> 12;
pub(crate) const GUESS_HIGH: u32 = 0x3f80_0000 >> 12;
/// Words of one map's guesses in [`CodeMap::gpu_table`] (two per word).
pub(crate) const GUESS_WORDS: usize = (GUESS_HIGH - GUESS_LOW) as usize / 2 + 1;
/// The bit of a guess whose bucket is clean: every `y` in it (and within a relative
/// [`CLEAN_MARGIN`] of it) has the guess's index, so the shader takes it with no
/// threshold compared (where the block's scale is within [`SCALE_LIMITS`]).
pub(crate) const GUESS_CLEAN: u16 = 0x100;
/// How far (relative) every threshold stays from a clean bucket: far more than the
/// shader's error in `y = |x| * (1 / absmax)` (division within 2.5 ulp, WGSL's bound,
/// and one rounding) and in `absmax * threshold` (one rounding), both under 2^-21.
pub(crate) const CLEAN_MARGIN: f64 = 1.0 / 262_144.0;

/// Means of `items` equal steps between 0.1 and 1 (bitsandbytes' `create_dynamic_map`:
/// the midpoints of `linspace(0.1, 1, items + 1)`), times `scale`.
fn decade(scale: f64, items: usize) -> impl Iterator<Item = f64> {
    (0..items).map(move |j| {
        let lo = 0.1 + 0.9 * j as f64 / items as f64;
        let hi = 0.1 + 0.9 * (j + 1) as f64 / items as f64;
        scale * (lo + hi) / 2.0
    })
}

impl CodeMap {
    fn build(mut finite: Vec<f64>, flip: u32) -> CodeMap {
        finite.sort_by(f64::total_cmp);
        let max_finite = finite.len() as u32 - 1;
        let mut values = [f32::NAN; 256];
        for (v, x) in values.iter_mut().zip(&finite) {
            *v = *x as f32;
        }
        let mut thresholds = [f32::INFINITY; 256];
        for c in 0..max_finite as usize {
            thresholds[c] = ((f64::from(values[c]) + f64::from(values[c + 1])) / 2.0) as f32;
        }
        let has_inf = finite.len() < 255;
        if has_inf {
            values[finite.len()] = f32::INFINITY;
        }
        let mut map = CodeMap {
            values,
            thresholds,
            max_finite,
            flip,
            inf_index: if has_inf { max_finite + 1 } else { 255 },
            nan_index: 255,
            guesses: Vec::new(),
            linear: LinearGuess::default(),
        };
        map.guesses = (GUESS_LOW..=GUESS_HIGH)
            .map(|b| map.guess_entry(b))
            .chain([0])
            .collect();
        map.linear = LinearGuess::build(&map);
        map
    }

    /// The shader's guess for key `b` (`y`'s top 20 bits; the first key also stands for
    /// every smaller `y`, the last for every larger one): the sorted index of the
    /// bucket's least `y`, and [`GUESS_CLEAN`] when no finite threshold lies within
    /// [`CLEAN_MARGIN`] of the bucket.
    fn guess_entry(&self, b: u32) -> u16 {
        let index = (u32::from(encode_int8(f32::from_bits(b << 12), 1.0, self)) ^ self.flip) as u16;
        let lo = if b == GUESS_LOW {
            0.0
        } else {
            f64::from(f32::from_bits(b << 12))
        };
        let hi = if b == GUESS_HIGH {
            f64::INFINITY
        } else {
            f64::from(f32::from_bits((b + 1) << 12))
        };
        let near = self.thresholds[..self.max_finite as usize]
            .iter()
            .any(|&t| {
                let t = f64::from(t);
                t >= lo * (1.0 - CLEAN_MARGIN) && t <= hi * (1.0 + CLEAN_MARGIN)
            });
        if near {
            index
        } else {
            index | GUESS_CLEAN
        }
    }

    /// The arithmetic first guess ([`LinearGuess`]), as the vectorized encoders read it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn linear_guess(&self) -> &LinearGuess {
        &self.linear
    }

    /// The map of never-negative slots (the velocity).
    pub fn unsigned() -> &'static CodeMap {
        static MAP: OnceLock<CodeMap> = OnceLock::new();
        MAP.get_or_init(|| {
            let mut v = vec![0.0, 1.0];
            for i in 1..7 {
                v.extend(decade(10f64.powi(i - 6), 1 << (i + 1)));
            }
            CodeMap::build(v, 0)
        })
    }

    /// The map of signed slots (momentum, average gradient, EMA, accumulator).
    pub fn signed() -> &'static CodeMap {
        static MAP: OnceLock<CodeMap> = OnceLock::new();
        MAP.get_or_init(|| {
            let mut v = vec![0.0, 1.0, -1.0];
            for i in 1..7 {
                for x in decade(10f64.powi(i - 6), 1 << i) {
                    v.extend([x, -x]);
                }
            }
            CodeMap::build(v, 127)
        })
    }

    /// The map a slot's values use: unsigned for the velocity, signed otherwise.
    pub fn for_slot(slot: crate::Slot) -> &'static CodeMap {
        if slot == crate::Slot::Velocity {
            CodeMap::unsigned()
        } else {
            CodeMap::signed()
        }
    }

    /// The stored byte of 0.0.
    pub(crate) fn zero_code(&self) -> u8 {
        let zero = self.values.iter().position(|&v| v == 0.0).unwrap_or(0) as u32;
        (zero ^ self.flip) as u8
    }

    /// The tables the shader reads, as words in one array: the unsigned values, the
    /// signed values, the unsigned thresholds, the signed thresholds (256 f32 each, as
    /// bits), then the unsigned and the signed guesses ([`GUESS_WORDS`] each, two per
    /// word, low half first).
    pub(crate) fn gpu_table() -> Vec<u32> {
        let (u, s) = (CodeMap::unsigned(), CodeMap::signed());
        let floats = [u.values, s.values, u.thresholds, s.thresholds].concat();
        let mut words: Vec<u32> = floats.iter().map(|x| x.to_bits()).collect();
        for map in [u, s] {
            let mut guesses = map.guesses.clone();
            guesses.resize(2 * GUESS_WORDS, 0);
            words.extend(
                guesses
                    .chunks(2)
                    .map(|g| u32::from(g[0]) | u32::from(g[1]) << 16),
            );
        }
        words
    }
}

/// Regions of [`LinearGuess`] per map (a table of this many entries is one register of
/// AVX2's `vpermps`).
pub(crate) const REGIONS: usize = 8;
/// Entries of each region table of [`LinearGuess`]: the [`REGIONS`] repeated to fill
/// one register of AVX-512's `vpermps` (which reads all 16).
pub(crate) const REGION_LANES: usize = 2 * REGIONS;
/// Binade keys of [`LinearGuess`]: the exponent field of `y`, at least
/// [`BINADE_LOW`], modulo 32 (as AVX-512's two-register permutes read it).
pub(crate) const BINADES: usize = 32;
/// The smallest exponent field a binade key tells apart: every `y` below 2^-31 has key 0.
pub(crate) const BINADE_LOW: u32 = 96;
/// A guess is trusted only this far (in steps of its region) from every threshold.
pub(crate) const STEP_MARGIN: f32 = 1.0 / 4096.0;
/// ... and this far (relative) from its binade's region boundary.
pub(crate) const BOUNDARY_MARGIN: f32 = 1.0 / 262_144.0;

/// The arithmetic first guess of the 8-bit encoder, with no table lookup per element: the
/// sorted index of the map's nearest value to `y = |x| / absmax`.
///
/// The map's non-negative values fall into at most [`REGIONS`] runs of equally spaced
/// values (0; each decade; 1): in a run, `y * slope + offset` is `j` at its `j`-th
/// threshold, so its integer part counts the thresholds below `y`. Which run holds `y`
/// is read from `y`'s binade (its exponent), which holds at most one run boundary.
/// A guess within [`STEP_MARGIN`] of a threshold, or [`BOUNDARY_MARGIN`] of a boundary,
/// is not trusted (the caller encodes that element with [`encode_int8`]); every other
/// one is [`encode_int8`]'s index, whatever the rounding of `y`, of the products
/// `absmax * thresholds[c]` and of `y * slope + offset` (their errors are under 2^-13
/// steps; a test checks the model against every threshold).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LinearGuess {
    /// Steps per unit of `y` in each region (0 in a region of one value).
    pub slope: [f32; REGION_LANES],
    /// `y * slope + offset` is `j` at the region's `j`-th threshold.
    pub offset: [f32; REGION_LANES],
    /// The sorted index of the region's first value.
    pub first: [u32; REGION_LANES],
    /// The region's values, less one.
    pub span: [u32; REGION_LANES],
    /// For each binade key: the region of the binade's smallest values.
    pub binade_region: [u32; BINADES],
    /// For each binade key: the threshold where the next region starts, inside the
    /// binade (+inf where none does).
    pub binade_boundary: [f32; BINADES],
}

impl LinearGuess {
    /// The binade key of a non-negative `y`.
    #[inline(always)]
    pub(crate) fn binade(y: f32) -> usize {
        (y.to_bits().max(BINADE_LOW << 23) >> 23) as usize % BINADES
    }

    /// The sorted index of the value of `map` nearest to a finite `y >= 0`, or `None`
    /// when `y` is too near a threshold to be sure.
    #[inline(always)]
    pub(crate) fn guess(&self, y: f32) -> Option<u32> {
        let key = Self::binade(y);
        let boundary = self.binade_boundary[key];
        if (y - boundary).abs() < boundary * BOUNDARY_MARGIN {
            return None;
        }
        let region = self.binade_region[key] as usize + usize::from(y >= boundary);
        let p = y.mul_add(self.slope[region], self.offset[region]);
        if (p - p.round_ties_even()).abs() < STEP_MARGIN {
            return None;
        }
        Some(self.first[region] + (p.max(0.0) as u32).min(self.span[region]))
    }

    /// The regions and binades of `map`'s non-negative finite values.
    fn build(map: &CodeMap) -> LinearGuess {
        let zero = map.values.iter().position(|&v| v == 0.0).unwrap_or(0);
        let top = map.max_finite as usize;
        let v = |k: usize| f64::from(map.values[k]);
        let equally_spaced = |a: usize, b: usize| {
            let step = (v(b) - v(a)) / (b - a) as f64;
            (a..b).all(|k| ((v(k + 1) - v(k)) - step).abs() <= step * 1e-3)
        };
        // the fewest runs of equally spaced values (one or two values always are)
        let mut fewest = vec![(usize::MAX, 0usize); top + 2];
        fewest[zero] = (0, zero);
        for end in zero + 1..=top + 1 {
            for start in zero..end {
                let runs = fewest[start].0;
                if runs != usize::MAX
                    && runs + 1 < fewest[end].0
                    && (end - start <= 2 || equally_spaced(start, end - 1))
                {
                    fewest[end] = (runs + 1, start);
                }
            }
        }
        let mut starts = Vec::new();
        let mut end = top + 1;
        while end > zero {
            end = fewest[end].1;
            starts.push(end);
        }
        starts.reverse();
        assert!(
            starts.len() <= REGIONS,
            "{} runs in a code map",
            starts.len()
        );
        let mut guess = LinearGuess::default();
        for lane in 0..REGION_LANES {
            let r = lane % REGIONS;
            let a = starts[r.min(starts.len() - 1)];
            let b = starts.get(r + 1).map_or(top, |next| next - 1);
            guess.first[lane] = a as u32;
            guess.span[lane] = (b - a) as u32;
            if b > a {
                let step = (v(b) - v(a)) / (b - a) as f64;
                guess.slope[lane] = (1.0 / step) as f32;
                guess.offset[lane] = (1.0 - f64::from(map.thresholds[a]) / step) as f32;
            } else {
                guess.offset[lane] = 0.5;
            }
        }
        let boundaries: Vec<f32> = starts[1..].iter().map(|&a| map.thresholds[a - 1]).collect();
        for key in 0..BINADES {
            let low = if key == 0 {
                0.0
            } else {
                f32::from_bits((BINADE_LOW + key as u32) << 23)
            };
            let high = f32::from_bits((BINADE_LOW + key as u32 + 1) << 23);
            guess.binade_region[key] = boundaries.iter().filter(|&&b| b <= low).count() as u32;
            let inside: Vec<f32> = boundaries
                .iter()
                .copied()
                .filter(|&b| b > low && b < high)
                .collect();
            assert!(inside.len() <= 1, "two run boundaries in one binade");
            guess.binade_boundary[key] = inside.first().copied().unwrap_or(f32::INFINITY);
        }
        guess
    }
}

/// The largest finite magnitude of `values` (0 when none): a block's scale.
#[inline(always)]
pub fn block_absmax(values: &[f32]) -> f32 {
    values
        .iter()
        .map(|&x| if x.is_finite() { x.abs() } else { 0.0 })
        .fold(0.0f32, f32::max)
}

/// The stored byte of `x` in a block whose scale is `absmax`: the nearest value of
/// `map` (a binary search on the thresholds, scaled by `absmax` with one correctly
/// rounded product each, so every backend picks the same byte); NaN and infinities
/// their special codes; everything 0.0 when `absmax` is 0.
#[inline(always)]
pub fn encode_int8(x: f32, absmax: f32, map: &CodeMap) -> u8 {
    let mut index = 0u32;
    let mut bit = 128u32;
    while bit > 0 {
        let candidate = index | bit;
        let at = candidate.min(map.max_finite).max(1) as usize - 1;
        if candidate <= map.max_finite && x >= absmax * map.thresholds[at] {
            index = candidate;
        }
        bit >>= 1;
    }
    let index = if x.is_nan() {
        map.nan_index
    } else if x.is_infinite() {
        if x > 0.0 {
            map.inf_index
        } else {
            map.nan_index
        }
    } else if absmax == 0.0 {
        return map.zero_code();
    } else {
        index
    };
    (index ^ map.flip) as u8
}

/// The block scales [`encode_linear`] takes: within them the reciprocal of the scale,
/// and every product of the scale and a threshold, are normal f32s.
pub(crate) const SCALE_LIMITS: (f32, f32) = (1.0 / (1u128 << 100) as f32, (1u128 << 100) as f32);

/// [`encode_int8`] of `x` in a block whose scale `absmax` is within [`SCALE_LIMITS`]
/// (`inverse` is its reciprocal), faster and the same byte: the [`LinearGuess`] of
/// `|x| * inverse`, with `x`'s sign; `encode_int8` itself where the guess is not
/// trusted or `x` is not finite.
#[inline(always)]
pub(crate) fn encode_linear(x: f32, absmax: f32, inverse: f32, map: &CodeMap) -> u8 {
    let guess = if x.is_finite() {
        map.linear.guess(x.abs() * inverse)
    } else {
        None
    };
    let Some(guess) = guess else {
        return encode_int8(x, absmax, map);
    };
    let index = match (x < 0.0, map.flip != 0) {
        (false, _) => guess,
        // the signed map is symmetric
        (true, true) => map.max_finite - guess,
        // nothing negative in the unsigned map: its nearest value is 0
        (true, false) => 0,
    };
    (index ^ map.flip) as u8
}

/// The value of the stored byte `code` in a block whose scale is `absmax` (specials as
/// they are).
#[inline(always)]
pub fn decode_int8(code: u8, absmax: f32, map: &CodeMap) -> f32 {
    let v = map.values[(u32::from(code) ^ map.flip) as usize];
    if v.is_finite() {
        v * absmax
    } else {
        v
    }
}

/// Encodes `values` as blocks of `block` elements (the last may be short): each block's
/// [`block_absmax`] into `absmax`, each element's byte into `codes`.
#[inline(always)]
pub fn encode_blocks(
    values: &[f32],
    codes: &mut [u8],
    absmax: &mut [f32],
    block: usize,
    map: &CodeMap,
) {
    encode_blocks_with(
        values,
        codes,
        absmax,
        block,
        map,
        block_absmax,
        |v, c, m, inverse| {
            for (x, code) in v.iter().zip(c.iter_mut()) {
                *code = encode_linear(*x, m, inverse, map);
            }
        },
    )
}

/// [`encode_blocks`] with a block's scale from `scale` (what [`block_absmax`] gives)
/// and its bytes from `linear` (what [`encode_linear`] gives each of its elements:
/// it gets the block's values, its codes, its scale and the reciprocal) where the scale
/// is within [`SCALE_LIMITS`]. `cpu::isa` passes vectorized ones.
#[inline(always)]
pub(crate) fn encode_blocks_with(
    values: &[f32],
    codes: &mut [u8],
    absmax: &mut [f32],
    block: usize,
    map: &CodeMap,
    scale: impl Fn(&[f32]) -> f32,
    mut linear: impl FnMut(&[f32], &mut [u8], f32, f32),
) {
    for ((v, c), a) in values
        .chunks(block)
        .zip(codes.chunks_mut(block))
        .zip(absmax.iter_mut())
    {
        let m = scale(v);
        *a = m;
        if (SCALE_LIMITS.0..=SCALE_LIMITS.1).contains(&m) {
            linear(v, c, m, 1.0 / m);
        } else {
            // no finite value but 0 (zeros, and the specials as they are), or a scale
            // too small or too large for the linear guess
            for (x, code) in v.iter().zip(c.iter_mut()) {
                *code = encode_int8(*x, m, map);
            }
        }
    }
}

/// Decodes blocks of `block` codes into `out` (as many values as `out` holds).
#[inline(always)]
pub fn decode_blocks(codes: &[u8], absmax: &[f32], out: &mut [f32], block: usize, map: &CodeMap) {
    for ((o, c), &a) in out.chunks_mut(block).zip(codes.chunks(block)).zip(absmax) {
        for (x, &code) in o.iter_mut().zip(c) {
            *x = decode_int8(code, a, map);
        }
    }
}

/// The random key of an element's slots in one step: [`crate::math::element_key`] with
/// the state's own seed.
#[inline(always)]
pub fn state_key(s: &crate::math::StepScalars, tensor: u32, element: u32) -> u32 {
    use crate::math::hash32;
    hash32(s.state_seed ^ hash32(s.rounding_step ^ hash32(tensor ^ hash32(element))))
}

/// Random bits for storing slot `slot` of an element with state key `key` (stochastic
/// rounding of bf16 slots).
#[inline(always)]
pub fn slot_bits(key: u32, slot: u32) -> u32 {
    crate::math::assignment_bits(key, 8 + slot)
}

/// The bf16 bits of a slot value: rounded to nearest (ties to even), or stochastically
/// with `bits` when `STOCHASTIC`.
#[inline(always)]
pub fn store_bf16_slot<const STOCHASTIC: bool>(x: f32, bits: u32) -> u16 {
    let r = if STOCHASTIC {
        crate::math::stochastic_bf16(x, bits)
    } else {
        crate::math::round_bf16(x)
    };
    (r.to_bits() >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_dynamic_and_zero_is_byte_zero() {
        for (map, finite, specials) in [
            (CodeMap::unsigned(), 254usize, 2usize),
            (CodeMap::signed(), 255, 1),
        ] {
            assert_eq!(map.max_finite as usize + 1, finite);
            assert_eq!(finite + specials, 256);
            let v = &map.values[..finite];
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(v[finite - 1], 1.0);
            assert_eq!(map.zero_code(), 0);
            assert!(map.values[map.nan_index as usize].is_nan());
            // decades grow: more codes between 0.1 and 1 than between 0.01 and 0.1
            let count = |lo: f32, hi: f32| v.iter().filter(|&&x| x > lo && x <= hi).count();
            assert!(count(0.1, 1.0) > count(0.01, 0.1));
            assert!(count(1e-6, 1e-5) >= 1);
        }
        assert_eq!(CodeMap::unsigned().values[254], f32::INFINITY);
        assert_eq!(CodeMap::signed().values[0], -1.0);
    }

    #[test]
    fn every_code_round_trips_and_encoding_is_nearest() {
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            for absmax in [1.0f32, 3.7, 1e-20, 6e5] {
                for c in 0..=255u8 {
                    let x = decode_int8(c, absmax, map);
                    let back = encode_int8(x, absmax, map);
                    if x.is_nan() {
                        assert!(decode_int8(back, absmax, map).is_nan());
                    } else if x != 0.0 && x.abs() > absmax * 1e-5 {
                        assert_eq!(back, c, "code {c} at {absmax}");
                    }
                }
            }
            // nearest: no other code is closer than the one chosen
            for k in 0..20_000 {
                let x = ((k as f32 * 0.618_034).fract() * 2.0 - 1.0) * 0.9;
                let x = if map.flip == 0 { x.abs() } else { x };
                let code = encode_int8(x, 1.0, map);
                let err = (decode_int8(code, 1.0, map) - x).abs();
                let best = map.values[..=map.max_finite as usize]
                    .iter()
                    .map(|v| (v - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!(err <= best * (1.0 + 1e-6) + 1e-12, "{x}: {err} > {best}");
            }
        }
    }

    /// A clean guess, which the shader takes with no threshold compared, is
    /// `encode_int8`'s index for every `y` in its bucket and near it (the bucket's ends
    /// moved out by 2^-20, where the shader's `y` errs under 2^-21; random `y` inside;
    /// blocks scaled by 1, 3e-7 and 2.5e5; negative `x` mirrored as the shader mirrors
    /// it), for every key of both maps; and most buckets are clean.
    #[test]
    fn a_clean_guess_is_the_encoding_of_its_whole_bucket() {
        let mut next = xorshift(0x5eed_1234);
        let keys = GUESS_HIGH - GUESS_LOW + 1;
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            let mut clean = 0;
            for b in GUESS_LOW..=GUESS_HIGH {
                let entry = map.guesses[(b - GUESS_LOW) as usize];
                if entry & GUESS_CLEAN == 0 {
                    continue;
                }
                clean += 1;
                let index = u32::from(entry & 0xff);
                let (lo, hi) = (f32::from_bits(b << 12), f32::from_bits(((b + 1) << 12) - 1));
                let out = 1.0 - 1.0 / 1_048_576.0;
                let mut ys = vec![lo * out, lo, hi, hi / out];
                ys.extend((0..4).map(|_| f32::from_bits((b << 12) | (next() as u32 & 0xfff))));
                if b == GUESS_LOW {
                    ys.extend([0.0, 1e-30, lo / 2.0]);
                }
                for y in ys {
                    for absmax in [1.0f32, 3.0e-7, 2.5e5] {
                        let x = y * absmax;
                        let sorted = |x: f32| u32::from(encode_int8(x, absmax, map)) ^ map.flip;
                        assert_eq!(sorted(x), index, "key {b:#x}, y {y:e}, absmax {absmax:e}");
                        let mirrored = if map.flip == 0 {
                            0
                        } else {
                            map.max_finite - index
                        };
                        assert_eq!(sorted(-x), mirrored, "key {b:#x}, y {y:e}, -x");
                    }
                }
            }
            assert!(clean * 100 >= keys * 95, "{clean} of {keys} keys clean");
        }
    }

    /// A xorshift generator of 64-bit words from `state`.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// `x` encoded by `encode_blocks` in a block whose largest magnitude is `absmax`.
    fn fast(x: f32, absmax: f32, map: &CodeMap) -> u8 {
        let mut codes = [0u8; 2];
        encode_blocks(&[x, absmax], &mut codes, &mut [0.0], 256, map);
        codes[0]
    }

    #[test]
    fn the_fast_encoding_is_the_encoding() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            for _ in 0..400_000 {
                let r = next();
                let absmax = f32::from_bits(((r >> 32) as u32 & 0x7fff_ffff) % 0x7f80_0000);
                let fraction = (r & 0xffff_ffff) as f32 / u32::MAX as f32;
                // values across the block, its largest, and arbitrary bit patterns
                let x = match r % 5 {
                    0 => absmax,
                    1 => -absmax,
                    2 => f32::from_bits(next() as u32),
                    _ => absmax * (2.0 * fraction - 1.0) * fraction.powi(8),
                };
                let x = if x.is_finite() && x.abs() > absmax {
                    absmax
                } else {
                    x
                };
                assert_eq!(
                    fast(x, absmax, map),
                    encode_int8(x, absmax, map),
                    "{x} in a block of {absmax}"
                );
            }
            // every threshold and its neighbours
            for &t in &map.thresholds[..map.max_finite as usize] {
                for x in [
                    t,
                    f32::from_bits(t.to_bits() + 1),
                    f32::from_bits(t.to_bits().max(1) - 1),
                ] {
                    for absmax in [1.0f32, 0.3, 7e-30, 3e30] {
                        let x = (x * absmax).clamp(-absmax, absmax);
                        assert_eq!(fast(x, absmax, map), encode_int8(x, absmax, map));
                    }
                }
            }
        }
    }

    #[test]
    fn the_linear_model_puts_every_threshold_on_its_step() {
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            let g = map.linear_guess();
            let zero = map.values.iter().position(|&v| v == 0.0).unwrap() as u32;
            assert_eq!(g.first[0], zero);
            let last = REGIONS - 1;
            assert_eq!(
                g.first[last] + g.span[last],
                map.max_finite,
                "the runs reach 1.0"
            );
            for r in 0..REGIONS {
                let (a, span) = (g.first[r] as usize, g.span[r] as usize);
                for j in 1..=span {
                    let p = f64::from(map.thresholds[a + j - 1]) * f64::from(g.slope[r])
                        + f64::from(g.offset[r]);
                    assert!(
                        (p - j as f64).abs() < 1.0 / 32768.0,
                        "region {r}, step {j}: {p}"
                    );
                }
            }
            // a run boundary is never near its binade's edges (only the binade's own
            // boundary is checked for closeness)
            for &b in g.binade_boundary.iter().filter(|b| b.is_finite()) {
                let low = f32::from_bits(b.to_bits() & 0xff80_0000);
                assert!(b / low - 1.0 > 1.0 / 65536.0 && 2.0 - b / low > 1.0 / 65536.0);
            }
        }
    }

    #[test]
    fn a_trusted_linear_guess_is_the_encoding() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            let g = map.linear_guess();
            let index = |y: f32| u32::from(encode_int8(y, 1.0, map)) ^ map.flip;
            // true when the guess is trusted (and then it is the encoding)
            let check = |y: f32| match g.guess(y) {
                Some(i) => {
                    assert_eq!(i, index(y), "y = {y:e}");
                    true
                }
                None => false,
            };
            let tried = 1_000_000;
            let untrusted = (0..tried)
                .filter(|_| {
                    let r = next();
                    let unit = (r >> 40) as f32 / (1u64 << 24) as f32;
                    !check(unit * 10f32.powi(-((r % 9) as i32)))
                })
                .count();
            assert!(
                untrusted < tried / 500,
                "{untrusted} of {tried} guesses untrusted"
            );
            for &t in &map.thresholds[..map.max_finite as usize] {
                for y in [t, t.next_up(), t.next_down(), t.abs(), t.abs().next_up()] {
                    if y >= 0.0 {
                        check(y);
                    }
                }
            }
            for y in [0.0, f32::MIN_POSITIVE, 1e-30, 1.0, 1.0f32.next_up()] {
                assert!(check(y), "{y:e} is no threshold's neighbour");
            }
        }
    }

    #[test]
    fn non_finite_elements_stay_and_leave_the_block_alone() {
        let values = [
            0.5f32,
            f32::NAN,
            -0.25,
            f32::INFINITY,
            1.0,
            f32::NEG_INFINITY,
        ];
        for map in [CodeMap::unsigned(), CodeMap::signed()] {
            let mut codes = [0u8; 6];
            let mut absmax = [0.0f32];
            encode_blocks(&values, &mut codes, &mut absmax, 256, map);
            assert_eq!(absmax[0], 1.0);
            let mut out = [0.0f32; 6];
            decode_blocks(&codes, &absmax, &mut out, 256, map);
            assert!(out[1].is_nan() && out[5].is_nan());
            assert_eq!(out[4], 1.0);
            if map.flip == 0 {
                assert_eq!(out[3], f32::INFINITY);
                assert_eq!(out[2], 0.0); // never negative: the nearest is 0
            } else {
                assert!(out[3].is_nan());
                assert!((out[2] + 0.25).abs() < 0.01);
            }
            assert!((out[0] - 0.5).abs() < 0.01);
        }
        // an all-zero block is zero bytes with scale 0
        let mut codes = [9u8; 4];
        let mut absmax = [7.0f32];
        encode_blocks(&[0.0; 4], &mut codes, &mut absmax, 256, CodeMap::signed());
        assert_eq!((codes, absmax), ([0; 4], [0.0]));
    }
}
