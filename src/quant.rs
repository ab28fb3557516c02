//! Compact slot storage, element by element: 8-bit block-wise quantization with
//! dynamic code maps (after bitsandbytes, Dettmers et al. 2022), and the rounding of
//! bf16 slots. `shaders/rmsprop.wgsl` mirrors every function here name for name, and
//! reads the same tables ([`CodeMap::gpu_table`]), so both backends store the same bits
//! for the same f32 values.
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
    /// For [`encode_int8_fast`]: the sorted index of each magnitude `y` from 2^-27 to
    /// 1, keyed by its top 20 bits (buckets narrower than any gap between thresholds);
    /// then 3 zero bytes, so that a 4-byte load at any key stays inside.
    guesses: Vec<u8>,
}

/// The keys of [`CodeMap::guesses`]: the top 20 bits of 2^-27 and of 1.0.
pub(crate) const GUESS_LOW: u32 = 0x3200_0000 >> 12;
pub(crate) const GUESS_HIGH: u32 = 0x3f80_0000 >> 12;
/// Keys of the guess table (read by the x86-64 vectorized encoder).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const GUESS_KEYS: usize = (GUESS_HIGH - GUESS_LOW) as usize + 1;
/// Words of one map's guesses in [`CodeMap::gpu_table`].
pub const GUESS_WORDS: usize = (GUESS_HIGH - GUESS_LOW) as usize / 4 + 1;

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
        };
        map.guesses = (GUESS_LOW..=GUESS_HIGH)
            .map(|b| (u32::from(encode_int8(f32::from_bits(b << 12), 1.0, &map)) ^ flip) as u8)
            .chain([0; 3])
            .collect();
        map
    }

    /// The guess table: [`GUESS_KEYS`] sorted indices, then 3 zero bytes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn guess_table(&self) -> &[u8] {
        &self.guesses
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
    /// bits), then the unsigned and the signed guesses ([`GUESS_WORDS`] each, four per
    /// word, little end first).
    pub(crate) fn gpu_table() -> Vec<u32> {
        let (u, s) = (CodeMap::unsigned(), CodeMap::signed());
        let floats = [u.values, s.values, u.thresholds, s.thresholds].concat();
        let mut words: Vec<u32> = floats.iter().map(|x| x.to_bits()).collect();
        for map in [u, s] {
            let mut guesses = map.guesses.clone();
            guesses.resize(4 * GUESS_WORDS, 0);
            words.extend(
                guesses
                    .chunks(4)
                    .map(|g| u32::from_le_bytes([g[0], g[1], g[2], g[3]])),
            );
        }
        words
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

/// [`encode_int8`] of a finite `x` in a block whose scale `m` is not 0, faster and
/// the same byte: `scaled` holds the block's products `m * thresholds[c]`, the ones
/// `encode_int8` compares with. The sorted index of `|x| / m` (`inverse` is `1 / m`)
/// is guessed from a table keyed by its top 20 bits (at most one threshold per key),
/// two independent comparisons around the guess settle it, and a check that the
/// comparisons hold there falls back to walking when they do not.
#[inline(always)]
pub(crate) fn encode_scaled(x: f32, inverse: f32, scaled: &[f32; 256], map: &CodeMap) -> u8 {
    if !x.is_finite() {
        return encode_int8(x, 1.0, map);
    }
    let key = ((x.abs() * inverse).to_bits() >> 12).clamp(GUESS_LOW, GUESS_HIGH) - GUESS_LOW;
    let guess = u32::from(map.guesses[key as usize]);
    let around = match (x < 0.0, map.flip != 0) {
        (false, _) => guess,
        // the signed map is symmetric
        (true, true) => map.max_finite - guess,
        // nothing negative in the unsigned map: its nearest value is 0
        (true, false) => 0,
    };
    // the thresholds past the last finite value are infinite: no step passes it
    let base = around.saturating_sub(1) as u8;
    let mut index = u32::from(base)
        + u32::from(x >= scaled[usize::from(base)])
        + u32::from(x >= scaled[usize::from(base) + 1]);
    if x >= scaled[index as usize] || (index > 0 && x < scaled[index as usize - 1]) {
        while x >= scaled[index as usize] {
            index += 1;
        }
        while index > 0 && x < scaled[index as usize - 1] {
            index -= 1;
        }
    }
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
    encode_blocks_with(values, codes, absmax, block, map, |_, _, _, _| false)
}

/// [`encode_blocks`], with `guessed` trying each block of nonzero scale first: it gets
/// the block's values, its codes, `1 / absmax` and the scaled thresholds, writes the
/// bytes [`encode_scaled`] would and returns true, or returns false (then the block is
/// encoded element by element). `cpu::isa` passes a vectorized one.
#[inline(always)]
pub(crate) fn encode_blocks_with(
    values: &[f32],
    codes: &mut [u8],
    absmax: &mut [f32],
    block: usize,
    map: &CodeMap,
    mut guessed: impl FnMut(&[f32], &mut [u8], f32, &[f32; 256]) -> bool,
) {
    for ((v, c), a) in values
        .chunks(block)
        .zip(codes.chunks_mut(block))
        .zip(absmax.iter_mut())
    {
        let m = block_absmax(v);
        *a = m;
        if m == 0.0 {
            // no finite value but 0: zeros, and the specials as they are
            for (x, code) in v.iter().zip(c.iter_mut()) {
                *code = encode_int8(*x, m, map);
            }
            continue;
        }
        // the block's thresholds, the same products encode_int8 compares with
        let scaled: [f32; 256] = std::array::from_fn(|k| m * map.thresholds[k]);
        let inverse = 1.0 / m;
        if guessed(v, c, inverse, &scaled) {
            continue;
        }
        for (x, code) in v.iter().zip(c.iter_mut()) {
            *code = encode_scaled(*x, inverse, &scaled, map);
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

    /// `x` encoded by `encode_blocks` in a block whose largest magnitude is `absmax`.
    fn fast(x: f32, absmax: f32, map: &CodeMap) -> u8 {
        let mut codes = [0u8; 2];
        encode_blocks(&[x, absmax], &mut codes, &mut [0.0], 256, map);
        codes[0]
    }

    #[test]
    fn the_fast_encoding_is_the_encoding() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
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
