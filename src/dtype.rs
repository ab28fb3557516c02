//! Element types a step takes gradients in: [`Dtype`] names them, [`GradientElement`]
//! is the Rust type of each (`f32`, [`half::bf16`], [`half::f16`]), and `GradSlice` is
//! one tensor's gradient in any of them. A 16-bit gradient is upcast exactly to f32
//! before the update: the step is the f32 step of the upcast values.

use half::{bf16, f16};

/// An element type: `f32`, `bf16` (bfloat16) or `f16` (IEEE half precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// bfloat16: f32's exponent, 8 bits of significand.
    Bf16,
    /// IEEE binary16.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// `"f32"`, `"bf16"` or `"f16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// `x` rounded to this 16-bit type (to nearest, ties to even), as its bits (f32: the
    /// bits of bf16, unused).
    pub(crate) fn half_bits(self, x: f32) -> u16 {
        match self {
            Dtype::F16 => f16::from_f32(x).to_bits(),
            Dtype::F32 | Dtype::Bf16 => bf16_bits(x),
        }
    }

    /// 16 bits of this type, as f32 (exact).
    #[inline(always)]
    pub(crate) fn upcast_bits(self, bits: u16) -> f32 {
        match self {
            Dtype::F16 => f16::from_bits(bits).to_f32(),
            Dtype::F32 | Dtype::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }

    /// The WGSL `GRADIENT_DTYPE` (and `PARAM_DTYPE`, `PARAM_COPY`) override value, and
    /// `math::STORE_*`.
    pub(crate) fn code(self) -> u32 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            other => Err(format!("unknown dtype `{other}` (f32, bf16 or f16)")),
        }
    }
}

/// The element types an optimizer takes its inputs in (its parameters and slots stay
/// f32). Build one with [`Precision::default`] (everything f32) and the `with_`
/// methods; pass it to [`RmsProp::with_precision`](crate::RmsProp::with_precision).
///
/// ```
/// use fused_rmsprop::{half::bf16, Backend, Dtype, GpuOptions, Precision, RmsProp, RmsPropConfig, Variable};
/// let var = Variable::new("x", &[2], vec![1.0, -1.0]).unwrap();
/// let precision = Precision::default().with_gradients(Dtype::Bf16);
/// let mut opt = RmsProp::with_precision(
///     RmsPropConfig::default(), vec![var], Backend::Cpu, &GpuOptions::default(), precision,
/// ).unwrap();
/// let g = [bf16::from_f32(0.5), bf16::from_f32(-0.25)];
/// opt.apply_typed_gradients(&[Some(&g[..])]).unwrap();
/// // f32 gradients are refused now: the optimizer takes bf16
/// assert!(opt.apply_gradients(&[Some(&[0.5, -0.25][..])]).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Precision {
    /// The gradients' element type, on the host and in the GPU's gradient buffers.
    pub gradients: Dtype,
    /// How the parameters are stored: `F32`, or `Bf16` / `F16` (with f32 slots): every
    /// assignment Keras makes to a variable (weight decay, the update, the EMA
    /// overwrite, `finalize_variable_values`, and yours: `set_variable`) rounds to it,
    /// to nearest, ties to even.
    pub params: Dtype,
    /// With `params` bf16: keep beside each bf16 parameter a 16-bit remainder, so that
    /// the two together are exactly an f32 master weight (apex's
    /// `store_param_remainders`): the update is the f32 one, and the bf16 halves, the
    /// master rounded to nearest (exact ties toward zero), are the model's weights for a
    /// forward pass (`param_view`), at no memory beyond them (2 + 2 bytes per
    /// parameter). On the CPU path the parameters stay one f32 array.
    pub param_remainders: bool,
    /// Round the 16-bit parameters stochastically instead of to nearest, from this seed:
    /// each assignment picks one of the two values around the exact result, the farther
    /// one with the probability of its distance (unbiased), from a hash of (seed, step,
    /// tensor, element), so a run is the same for a seed on every backend.
    /// `finalize_variable_values` and `set_variable` still round to nearest.
    pub stochastic_rounding: Option<u64>,
    /// A 16-bit copy of the (f32) parameters, `Bf16` or `F16`, rounded to nearest
    /// (ties to even) from the parameters by every step in the same pass, for a forward
    /// pass in 16 bits; `None`: no copy.
    pub param_copy: Option<Dtype>,
}

impl Precision {
    /// With gradients in `dtype`.
    pub fn with_gradients(self, dtype: Dtype) -> Self {
        Precision {
            gradients: dtype,
            ..self
        }
    }

    /// With the parameters stored in `dtype`.
    pub fn with_params(self, dtype: Dtype) -> Self {
        Precision {
            params: dtype,
            ..self
        }
    }

    /// With bf16 parameters plus remainders that make them exact f32 master weights
    /// (sets `params` to bf16).
    pub fn with_param_remainders(self) -> Self {
        Precision {
            params: Dtype::Bf16,
            param_remainders: true,
            ..self
        }
    }

    /// With the 16-bit parameters rounded stochastically from `seed`.
    pub fn with_stochastic_rounding(self, seed: u64) -> Self {
        Precision {
            stochastic_rounding: Some(seed),
            ..self
        }
    }

    /// The seed mixed to the 32 bits the kernels hash with (0 without stochastic
    /// rounding).
    pub(crate) fn rounding_seed(&self) -> u32 {
        let seed = self.stochastic_rounding.unwrap_or(0);
        crate::math::hash32(seed as u32 ^ crate::math::hash32((seed >> 32) as u32 ^ 0x85eb_ca6b))
    }

    /// With a 16-bit copy of the parameters in `dtype` (`Bf16` or `F16`).
    pub fn with_param_copy(self, dtype: Dtype) -> Self {
        Precision {
            param_copy: Some(dtype),
            ..self
        }
    }

    /// Refuses a parameter copy that is not 16-bit.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.param_copy == Some(Dtype::F32) {
            return Err(crate::Error::invalid(
                "param_copy",
                "a copy of the f32 parameters must be bf16 or f16",
            ));
        }
        if self.stochastic_rounding.is_some() && self.params == Dtype::F32 {
            return Err(crate::Error::invalid(
                "stochastic_rounding",
                "needs 16-bit parameters (Precision::params bf16 or f16): f32 parameters are not rounded",
            ));
        }
        if self.param_remainders
            && (self.params != Dtype::Bf16 || self.stochastic_rounding.is_some())
        {
            return Err(crate::Error::invalid(
                "param_remainders",
                "remainders complete bf16 parameters to exact f32 masters: they need bf16 parameters and no stochastic rounding",
            ));
        }
        if self.param_copy.is_some() && self.params != Dtype::F32 {
            return Err(crate::Error::invalid(
                "param_copy",
                format!(
                    "a copy needs f32 parameters: {} parameters are their own 16-bit copy",
                    self.params
                ),
            ));
        }
        Ok(())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A Rust type gradients can arrive in: `f32`, [`half::bf16`] or [`half::f16`] (the
/// crate re-exports [`half`]). Sealed.
pub trait GradientElement: sealed::Sealed + bytemuck::Pod + Send + Sync {
    /// Its [`Dtype`].
    const DTYPE: Dtype;

    #[doc(hidden)]
    fn slice(values: &[Self]) -> GradSlice<'_>;
}

impl GradientElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn slice(values: &[Self]) -> GradSlice<'_> {
        GradSlice::F32(values)
    }
}

impl GradientElement for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn slice(values: &[Self]) -> GradSlice<'_> {
        GradSlice::Bf16(values)
    }
}

impl GradientElement for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn slice(values: &[Self]) -> GradSlice<'_> {
        GradSlice::F16(values)
    }
}

/// One tensor's gradient (or a piece of it) in its own element type.
#[derive(Debug, Clone, Copy)]
#[doc(hidden)]
pub enum GradSlice<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
    /// f16 values.
    F16(&'a [f16]),
}

impl Default for GradSlice<'_> {
    fn default() -> Self {
        GradSlice::F32(&[])
    }
}

impl<'a> GradSlice<'a> {
    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            GradSlice::F32(g) => g.len(),
            GradSlice::Bf16(g) => g.len(),
            GradSlice::F16(g) => g.len(),
        }
    }

    /// Its element type.
    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            GradSlice::F32(_) => Dtype::F32,
            GradSlice::Bf16(_) => Dtype::Bf16,
            GradSlice::F16(_) => Dtype::F16,
        }
    }

    /// Elements `range`.
    pub(crate) fn range(&self, range: std::ops::Range<usize>) -> GradSlice<'a> {
        match *self {
            GradSlice::F32(g) => GradSlice::F32(&g[range]),
            GradSlice::Bf16(g) => GradSlice::Bf16(&g[range]),
            GradSlice::F16(g) => GradSlice::F16(&g[range]),
        }
    }

    /// The values as stored (native byte order, what a GPU buffer of this dtype holds).
    pub(crate) fn bytes(&self) -> &'a [u8] {
        match *self {
            GradSlice::F32(g) => bytemuck::cast_slice(g),
            GradSlice::Bf16(g) => bytemuck::cast_slice(g),
            GradSlice::F16(g) => bytemuck::cast_slice(g),
        }
    }

    /// Runs `f` on the values as f32: an f32 slice as it is, a 16-bit one upcast
    /// (exactly; NaN stays NaN, quieted as `half` does) into `buffer`.
    pub(crate) fn with_f32<R>(&self, buffer: &mut Vec<f32>, f: impl FnOnce(&[f32]) -> R) -> R {
        use half::slice::HalfFloatSliceExt;
        let n = self.len();
        let upcast = |buffer: &mut Vec<f32>| {
            buffer.clear();
            buffer.resize(n, 0.0);
        };
        match *self {
            GradSlice::F32(g) => f(g),
            GradSlice::Bf16(g) => {
                upcast(buffer);
                g.convert_to_f32_slice(buffer);
                f(buffer)
            }
            GradSlice::F16(g) => {
                upcast(buffer);
                g.convert_to_f32_slice(buffer);
                f(buffer)
            }
        }
    }
}

/// An f32 master weight split exactly into a bf16 weight (rounded to nearest, exact
/// ties toward zero) and a 16-bit remainder: `bits = (bf16 << 16) + remainder - 0x7fff`
/// (the WGSL `write_param` for `PARAM_DTYPE` 3 does the same). A NaN gives a quiet bf16
/// NaN and a remainder that keeps it a NaN.
pub(crate) fn split_master(x: f32) -> (u16, u16) {
    let b = x.to_bits();
    if x.is_nan() {
        return (((b >> 16) | 0x40) as u16, 0x7fff);
    }
    let hi = b.wrapping_add(0x7fff) >> 16;
    let rem = b.wrapping_sub(hi << 16).wrapping_add(0x7fff) & 0xffff;
    (hi as u16, rem as u16)
}

/// The f32 master weight of a bf16 weight and its remainder ([`split_master`]).
pub(crate) fn combine_master(hi: u16, rem: u16) -> f32 {
    f32::from_bits(
        (u32::from(hi) << 16)
            .wrapping_add(u32::from(rem))
            .wrapping_sub(0x7fff),
    )
}

/// A 16-bit copy of f32 values (the CPU's parameter copy).
#[derive(Debug, Clone)]
pub(crate) enum HalfVec {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A piece of a [`HalfVec`].
pub(crate) enum HalfSliceMut<'a> {
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl HalfVec {
    /// `n` zeros of `dtype` (`None` for f32: it is no 16-bit type).
    pub(crate) fn zeros(dtype: Dtype, n: usize) -> Option<Self> {
        match dtype {
            Dtype::F32 => None,
            Dtype::Bf16 => Some(HalfVec::Bf16(vec![bf16::ZERO; n])),
            Dtype::F16 => Some(HalfVec::F16(vec![f16::ZERO; n])),
        }
    }

    /// Elements `range`.
    pub(crate) fn slice_mut(&mut self, range: std::ops::Range<usize>) -> HalfSliceMut<'_> {
        match self {
            HalfVec::Bf16(v) => HalfSliceMut::Bf16(&mut v[range]),
            HalfVec::F16(v) => HalfSliceMut::F16(&mut v[range]),
        }
    }

    /// Elements `range`, upcast (exactly) to f32.
    pub(crate) fn range_to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            HalfVec::Bf16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            HalfVec::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Cuts the copy into consecutive pieces of `lens`.
    pub(crate) fn split<'a>(
        &'a mut self,
        lens: impl Iterator<Item = usize>,
    ) -> Vec<HalfSliceMut<'a>> {
        fn cut<T>(mut rest: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
            lens.map(|n| {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                head
            })
            .collect()
        }
        match self {
            HalfVec::Bf16(v) => cut(v, lens).into_iter().map(HalfSliceMut::Bf16).collect(),
            HalfVec::F16(v) => cut(v, lens).into_iter().map(HalfSliceMut::F16).collect(),
        }
    }
}

/// `x` as bf16 bits, rounded to nearest, ties to even: the bits of
/// `half::bf16::from_f32(x)` (a NaN keeps its top bits and gets the quiet bit), written
/// without a branch so that the loop over a chunk vectorizes (`half` converts bf16 one
/// value at a time).
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

impl HalfSliceMut<'_> {
    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            HalfSliceMut::Bf16(c) => c.len(),
            HalfSliceMut::F16(c) => c.len(),
        }
    }

    /// The values, upcast (exactly), into `out` (resized to fit).
    pub(crate) fn upcast_into(&self, out: &mut Vec<f32>) {
        use half::slice::HalfFloatSliceExt;
        out.clear();
        out.resize(self.len(), 0.0);
        match self {
            HalfSliceMut::Bf16(c) => c.convert_to_f32_slice(out),
            HalfSliceMut::F16(c) => c.convert_to_f32_slice(out),
        }
    }

    /// Rounds `values` (as many as the slice holds) to nearest, ties to even, into it.
    pub(crate) fn round_from(self, values: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            HalfSliceMut::Bf16(c) => {
                for (c, &x) in c.iter_mut().zip(values) {
                    *c = bf16::from_bits(bf16_bits(x));
                }
            }
            HalfSliceMut::F16(c) => c.convert_from_f32_slice(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 16-bit pattern upcasts to the f32 `half` gives, NaN quieted, and the
    /// upcast is exact (it rounds back to the same bits).
    #[test]
    fn upcast_is_exact_for_every_pattern() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let b: Vec<bf16> = all.iter().map(|&x| bf16::from_bits(x)).collect();
        let h: Vec<f16> = all.iter().map(|&x| f16::from_bits(x)).collect();
        let mut buf = Vec::new();
        GradSlice::Bf16(&b).with_f32(&mut buf, |f| {
            for (x, y) in b.iter().zip(f) {
                assert_eq!(x.is_nan(), y.is_nan());
                if !x.is_nan() {
                    assert_eq!(bf16::from_f32(*y).to_bits(), x.to_bits());
                }
            }
        });
        GradSlice::F16(&h).with_f32(&mut buf, |f| {
            for (x, y) in h.iter().zip(f) {
                assert_eq!(x.is_nan(), y.is_nan());
                if !x.is_nan() {
                    assert_eq!(f16::from_f32(*y).to_bits(), x.to_bits());
                    assert_eq!(y.to_bits(), x.to_f32().to_bits());
                }
            }
        });
    }

    /// `specials` and a million xorshift bit patterns.
    fn patterns(specials: &[u32]) -> Vec<u32> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut patterns = specials.to_vec();
        patterns.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN].map(f32::to_bits));
        for _ in 0..1_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            patterns.push(state as u32);
        }
        patterns
    }

    /// The branch-free bf16 rounding gives `half`'s bits, on every exponent, ties, the
    /// edges of overflow, infinities and NaN; so do `math::round_bf16` and
    /// `math::round_f16` (f16: overflow, subnormals, ties).
    #[test]
    fn roundings_are_halfs() {
        let edges = [
            0x7f7f_ffff,
            0x7f7f_8000,
            0x7f7f_7fff,
            0x3f80_8000,
            0x3f81_8000,
            0x0000_8000,
            0x8000_8001,
            0x477f_f000,
            0x477f_efff,
            0x3880_0000,
            0x387f_ffff,
            0x3380_0000,
            0x3300_0001,
            0x3f80_1000,
            0x3f80_3000,
        ];
        for b in patterns(&edges) {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{b:#010x}");
            let same = |a: f32, h: f32| a.to_bits() == h.to_bits() || (a.is_nan() && h.is_nan());
            assert!(
                same(crate::math::round_bf16(x), bf16::from_f32(x).to_f32()),
                "bf16 {b:#010x}"
            );
            assert!(
                same(crate::math::round_f16(x), f16::from_f32(x).to_f32()),
                "f16 {b:#010x}"
            );
        }
    }

    /// Split and combined, every non-NaN f32 comes back exactly, and the bf16 half is
    /// the nearest bf16 (ties toward zero).
    #[test]
    fn master_split_is_exact() {
        let edges = [0, 0x8000_0000, 0x7f7f_ffff, 0x3f80_8000, 0x3f81_8000, 1];
        for b in patterns(&edges) {
            let x = f32::from_bits(b);
            let (hi, rem) = split_master(x);
            let back = combine_master(hi, rem);
            if x.is_nan() {
                assert!(back.is_nan() && bf16::from_bits(hi).is_nan(), "{b:#010x}");
                continue;
            }
            assert_eq!(back.to_bits(), b, "{b:#010x}");
            let low = b & 0xffff;
            let nearest = bf16::from_f32(x).to_bits();
            if low != 0x8000 {
                assert_eq!(hi, nearest, "{b:#010x}");
            } else {
                assert_eq!(hi, (b >> 16) as u16, "ties toward zero: {b:#010x}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for d in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            assert_eq!(d.as_str().parse::<Dtype>(), Ok(d));
        }
        assert!("f64".parse::<Dtype>().is_err());
    }
}
