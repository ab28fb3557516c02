//! The per-element update math: the one source of truth, and the documented reference.
//!
//! [`update_element`] is the whole step of one element, from the raw gradient to the
//! stored parameter and slots, in Keras 3's order and float32 expression order
//! (`keras/src/optimizers/rmsprop.py`, `base_optimizer.py`), so rounding matches:
//!
//! ```text
//! g         = raw / loss_scale_factor                     unscale_gradient
//! acc       = g + acc                                     accumulate_gradient (accumulation-only step)
//! g         = (g + acc) / accumulation_steps; acc = 0     average_accumulated (update step)
//! g         = clamp(g * numerator / denominator, -clipvalue, clipvalue)    clip_gradient
//! g         = g * sign                                    orient_gradient (-1: PyTorch's maximize)
//! p         = p - p * weight_decay * lr                   decay_weight (Keras: before the update)
//! g         = g + weight_decay * p                        decay_gradient (COUPLED_DECAY: PyTorch, Burn, optax)
//! velocity  = rho * velocity + (1 - rho) * g^2            rmsprop_velocity
//! avg_grad  = rho * avg_grad + (1 - rho) * g              rmsprop_average_gradient (centered)
//! denom     = velocity/c - (avg_grad/c)^2 + epsilon       rmsprop_denominator (else velocity*(1/c) + epsilon;
//!                                                         c: optax's bias correction, else 1)
//! increment = (a * g) / (sqrt(denom) + epsilon_outside)   rmsprop_increment (Keras, optax: a = lr,
//!                                                         outside 0; PyTorch: a = 1, inside 0)
//! momentum  = momentum_coef * momentum + increment        rmsprop_momentum (momentum > 0)
//! p        -= b * (momentum | increment + momentum_coef * momentum | increment)
//!                                                         rmsprop_update (momentum, NESTEROV, none;
//!                                                         b = lr for PyTorch, else 1)
//! ema       = m * ema + (1 - m) * p                       ema_update (m = 0 on the first iteration)
//! p         = ema * s + p * (1 - s)                       ema_overwrite (s in {0, 1})
//! ```
//!
//! That is Keras' formula, and with the step's numbers (`plan`) and two structural flags
//! (`COUPLED_DECAY`, `NESTEROV`) also PyTorch's, Burn's and optax's: every dialect
//! is this one path. Where a dialect's numbers are 1 or 0 (Keras' `update_scale`,
//! `epsilon_outside`, `inverse_bias_correction`, `gradient_sign`), multiplying, dividing or
//! adding them is exact, so Keras' results keep their bits.
//!
//! `shaders/rmsprop.wgsl` mirrors every function here name for name and stage for
//! stage (`update_element`, `effective_gradient`, `rmsprop_element`, ...); the CPU
//! driver calls these functions in its inner loop, and the parity tests
//! (`tests/backend_parity.rs`, the Keras traces on both backends) hold the two
//! together. Options that change the code path are one const word of [`kernel`] flags
//! here and `override` constants there ([`KERNEL_FLAGS`] pairs them), so no element
//! branches on them. Apart from `bytemuck`'s derives
//! (the GPU reads [`StepScalars`] as it is), this module depends on nothing.

use bytemuck::{Pod, Zeroable};

/// The numbers of one step, shared by every element of every tensor.
///
/// The plan the shader reads (`StepScalars` in `shaders/rmsprop.wgsl`, field for field:
/// a test compares the two layouts through naga's reflection).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, Pod, Zeroable)]
pub struct StepScalars {
    /// The learning rate for this step (schedule evaluated at the raw counter), as f32.
    pub learning_rate: f32,
    /// `rho` as f32.
    pub rho: f32,
    /// `1 - rho`, computed in f64 as Python does, then rounded to f32.
    pub one_minus_rho: f32,
    /// `epsilon` as f32.
    pub epsilon: f32,
    /// The momentum coefficient as f32 (used only by momentum variants).
    pub momentum: f32,
    /// `weight_decay` as f32 (used only on tensors that take decay).
    pub weight_decay: f32,
    /// `loss_scale_factor`, or 1 when unset (dividing by 1 is exact).
    pub loss_scale: f32,
    /// `gradient_accumulation_steps` as f32, or 1 when unset.
    pub accumulation_steps: f32,
    /// `clipvalue`, or +infinity when value clipping is off.
    pub clip_value: f32,
    /// The norm threshold (`clipnorm` or `global_clipnorm`) as f32, 0 when unused.
    pub clip_norm: f32,
    /// `1 / global_clipnorm` computed in f64 and rounded, as Keras' Python float.
    pub inv_clip_norm: f32,
    /// EMA momentum for this step: 0 on the first (floored) iteration, else `ema_momentum`.
    pub ema_momentum: f32,
    /// 1 when this step overwrites the variables with their EMA, else 0.
    pub ema_overwrite: f32,
    /// 1 when `ema_overwrite_frequency` is set (the overwrite expression runs every step).
    pub ema_overwrite_enabled: u32,
    /// 0 on an accumulation-only step, else 1.
    pub is_update_step: u32,
    /// How the parameters are stored (`STORE_*`): the CPU loops read it once per chunk
    /// (the GPU has its `PARAM_DTYPE` and `PARAM_ROUNDING` overrides instead).
    pub param_storage: u32,
    /// Stochastic rounding: the seed, mixed to 32 bits (0 otherwise).
    pub rounding_seed: u32,
    /// Stochastic rounding: the raw step counter's low 32 bits.
    pub rounding_step: u32,
    /// Stochastic rounding of bf16 slots: the seed, mixed to 32 bits (0 otherwise).
    pub state_seed: u32,
    /// Multiplies the gradient before the division by the root: the learning rate where
    /// the dialect scales the increment (Keras, optax), else 1.
    pub increment_scale: f32,
    /// Multiplies what is subtracted from the parameter (the increment, or the
    /// momentum buffer): the learning rate where the dialect scales the buffer
    /// (PyTorch, Burn), else 1.
    pub update_scale: f32,
    /// Epsilon added after the square root (PyTorch, Burn, optax's `eps_in_sqrt=False`),
    /// else 0 (then `epsilon` is the one inside the root, and the other is 0).
    pub epsilon_outside: f32,
    /// optax's `bias_correction`: `1 - decay^count`, what the centered moments are
    /// divided by (their difference cancels: the division keeps optax's bits), else 1.
    pub bias_correction: f32,
    /// `1 / (1 - decay^count)`: what the velocity alone is multiplied by (a multiply,
    /// within an ulp of optax's division, where a divide would slow every dialect's
    /// plain loop), else 1.
    pub inverse_bias_correction: f32,
    /// Zero.
    pub _pad0: u32,
    /// Zero.
    pub _pad1: u32,
    /// Zero.
    pub _pad2: u32,
    /// -1 with PyTorch's `maximize`, else 1.
    pub gradient_sign: f32,
}

/// The numbers of one step that a [`ParamGroup`](crate::ParamGroup) may change: the
/// plan computes them per group (`plan::plan_groups`), and [`with_group`] puts them
/// into the step's [`StepScalars`] once per chunk (`GroupScalars` in the shader, field
/// for field; the shader reads it from the group table).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, Pod, Zeroable)]
pub struct GroupScalars {
    /// [`StepScalars::learning_rate`].
    pub learning_rate: f32,
    /// [`StepScalars::rho`].
    pub rho: f32,
    /// [`StepScalars::one_minus_rho`].
    pub one_minus_rho: f32,
    /// [`StepScalars::epsilon`].
    pub epsilon: f32,
    /// [`StepScalars::epsilon_outside`].
    pub epsilon_outside: f32,
    /// [`StepScalars::momentum`].
    pub momentum: f32,
    /// [`StepScalars::weight_decay`].
    pub weight_decay: f32,
    /// [`StepScalars::increment_scale`].
    pub increment_scale: f32,
    /// [`StepScalars::update_scale`].
    pub update_scale: f32,
    /// [`StepScalars::bias_correction`].
    pub bias_correction: f32,
    /// [`StepScalars::inverse_bias_correction`].
    pub inverse_bias_correction: f32,
    /// Zero.
    pub _pad: u32,
}

impl GroupScalars {
    /// The group's fields of a plan.
    pub fn of(s: &StepScalars) -> GroupScalars {
        GroupScalars {
            learning_rate: s.learning_rate,
            rho: s.rho,
            one_minus_rho: s.one_minus_rho,
            epsilon: s.epsilon,
            epsilon_outside: s.epsilon_outside,
            momentum: s.momentum,
            weight_decay: s.weight_decay,
            increment_scale: s.increment_scale,
            update_scale: s.update_scale,
            bias_correction: s.bias_correction,
            inverse_bias_correction: s.inverse_bias_correction,
            _pad: 0,
        }
    }
}

/// The step's numbers for a tensor of group `g`: the step's, with the group's fields.
#[inline(always)]
pub fn with_group(s: &StepScalars, g: &GroupScalars) -> StepScalars {
    StepScalars {
        learning_rate: g.learning_rate,
        rho: g.rho,
        one_minus_rho: g.one_minus_rho,
        epsilon: g.epsilon,
        epsilon_outside: g.epsilon_outside,
        momentum: g.momentum,
        weight_decay: g.weight_decay,
        increment_scale: g.increment_scale,
        update_scale: g.update_scale,
        bias_correction: g.bias_correction,
        inverse_bias_correction: g.inverse_bias_correction,
        ..*s
    }
}

/// The structure of the update as one word of flags (the const parameter `K` of
/// [`update_element`] and the CPU loops): each flag is a WGSL `override` of the same
/// meaning, named in [`KERNEL_FLAGS`], so one table carries a structural option from
/// the config to both backends.
pub mod kernel {
    /// `centered`: the average-gradient slot, and its square under the root.
    pub const CENTERED: u32 = 1 << 0;
    /// A momentum slot (`momentum > 0`; optax's `momentum` set).
    pub const MOMENTUM: u32 = 1 << 1;
    /// optax's `nesterov`: the parameter moves by `increment + momentum * buffer`.
    pub const NESTEROV: u32 = 1 << 2;
    /// `use_ema`: the EMA slot, updated every step.
    pub const EMA: u32 = 1 << 3;
    /// `gradient_accumulation_steps`: the accumulator slot.
    pub const ACCUMULATE: u32 = 1 << 4;
    /// Weight decay as an L2 term of the gradient (`g + weight_decay * p`: PyTorch,
    /// Burn, optax's `add_decayed_weights`), instead of Keras' decoupled decay.
    pub const COUPLED_DECAY: u32 = 1 << 5;
    /// Every flag.
    pub const ALL: u32 = (1 << 6) - 1;

    /// True when `k` has `flag`.
    #[inline(always)]
    pub const fn has(k: u32, flag: u32) -> bool {
        k & flag != 0
    }

    /// True when `k` is a word the kernels are built for (nesterov needs momentum).
    pub const fn is_valid(k: u32) -> bool {
        k & !ALL == 0 && (!has(k, NESTEROV) || has(k, MOMENTUM))
    }
}

/// Each [`kernel`] flag and the boolean WGSL `override` of the same meaning: the one
/// table that takes a structural option to both backends (`gpu::pipelines` sets the
/// overrides from it; a test checks it against the shader's contract).
pub(crate) const KERNEL_FLAGS: [(u32, &str); 6] = [
    (kernel::CENTERED, "CENTERED"),
    (kernel::MOMENTUM, "USE_MOMENTUM"),
    (kernel::NESTEROV, "NESTEROV"),
    (kernel::EMA, "USE_EMA"),
    (kernel::ACCUMULATE, "ACCUMULATE"),
    (kernel::COUPLED_DECAY, "COUPLED_DECAY"),
];

/// Parameters stored as f32 (`STORAGE` of [`store_param`]; `Dtype::code`).
pub const STORE_F32: u8 = 0;
/// Parameters stored as bf16.
pub const STORE_BF16: u8 = 1;
/// Parameters stored as f16.
pub const STORE_F16: u8 = 2;
/// Parameters stored as bf16, rounded stochastically.
pub const STORE_BF16_STOCHASTIC: u8 = 3;
/// Parameters stored as f16, rounded stochastically.
pub const STORE_F16_STOCHASTIC: u8 = 4;

/// A 32-bit integer hash with full avalanche (Wellons' "lowbias32"): the random source
/// of stochastic rounding, counter-based (no state), the same on every backend.
#[inline(always)]
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The random key of one element in one step: from the seed, the step counter, the
/// tensor and the element's index in its tensor, so that it does not depend on the
/// backend or the arena's layout.
#[inline(always)]
pub fn element_key(s: &StepScalars, tensor: u32, element: u32) -> u32 {
    hash32(s.rounding_seed ^ hash32(s.rounding_step ^ hash32(tensor ^ hash32(element))))
}

/// Random bits for assignment `k` of an element whose key is `key` (0 weight decay, 1
/// the update, 2 the EMA overwrite).
#[inline(always)]
pub fn assignment_bits(key: u32, k: u32) -> u32 {
    hash32(key ^ (k + 1).wrapping_mul(0x9e37_79b9))
}

/// `x` rounded to one of the two bf16 values around it, the farther one with the
/// probability of its distance (unbiased): the low 16 bits of `bits` are added to the
/// 16 bits bf16 drops, then dropped. A NaN stays NaN, infinities stay.
#[inline(always)]
pub fn stochastic_bf16(x: f32, bits: u32) -> f32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(bits & 0xffff) & 0xffff_0000;
    f32::from_bits(if x.is_nan() { b | 0x0040_0000 } else { rounded })
}

/// `x` rounded to one of the two f16 values around it, unbiased: in the normal range
/// the 13 bits f16 drops get 13 random bits added; below 2^-14 (f16 subnormals, every
/// multiple of 2^-24) the fraction of `x / 2^-24` is compared with 24 random bits (all
/// exact in f32, so every backend agrees). Beyond 65504 after rounding: infinity.
#[inline(always)]
pub fn stochastic_f16(x: f32, bits: u32) -> f32 {
    let a = x.abs();
    let b = x.to_bits();
    let normal = f32::from_bits(b.wrapping_add(bits & 0x1fff) & 0xffff_e000);
    let scaled = a * 16_777_216.0;
    let floor = scaled.floor();
    let u = (bits >> 8) as f32 * (1.0 / 16_777_216.0);
    let up = if scaled - floor > u { 1.0 } else { 0.0 };
    let subnormal = ((floor + up) * (1.0 / 16_777_216.0)).copysign(x);
    f16_value(x, normal, subnormal)
}

/// The f16 value `x` rounds to, from its two candidates: `subnormal` below 2^-14 (where
/// f16 values are multiples of 2^-24), `normal` above; infinity past 65504, and `x`
/// quieted when it is a NaN.
#[inline(always)]
fn f16_value(x: f32, normal: f32, subnormal: f32) -> f32 {
    let r = if x.abs() < 6.103_515_6e-5 {
        subnormal
    } else {
        normal
    };
    let r = if r.abs() > 65504.0 {
        f32::INFINITY.copysign(x)
    } else {
        r
    };
    if x.is_nan() {
        f32::from_bits(x.to_bits() | 0x0040_0000)
    } else {
        r
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as f32: what a bf16 variable holds
/// after Keras assigns `x` to it (`half::bf16::from_f32`; a NaN stays NaN).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) & 0xffff_0000;
    let nan = x.is_nan();
    f32::from_bits(if nan { b | 0x0040_0000 } else { rounded })
}

/// `x` rounded to the nearest f16 (ties to even), as f32 (`half::f16::from_f32`):
/// beyond 65504 (after rounding) infinity, below 2^-14 a multiple of 2^-24 (an f16
/// subnormal), NaN stays NaN.
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    let b = x.to_bits();
    // normal f16 range: keep 10 bits of significand
    let normal = f32::from_bits((b.wrapping_add(0xfff + ((b >> 13) & 1))) & 0xffff_e000);
    // subnormal f16 range: 0.5 has an ulp of 2^-24, so the addition rounds to it
    let subnormal = ((x.abs() + 0.5) - 0.5).copysign(x);
    f16_value(x, normal, subnormal)
}

/// A value assigned to a parameter stored as `STORAGE` (`STORE_*`): itself, or rounded
/// to the storage type, as Keras' `assign` casts to the variable's dtype: to nearest
/// (ties to even), or stochastically with the random `bits`. Every assignment of the
/// update goes through it: weight decay, the RMSprop step, the EMA overwrite.
#[inline(always)]
pub fn store_param<const STORAGE: u8>(x: f32, bits: u32) -> f32 {
    match STORAGE {
        STORE_BF16 => round_bf16(x),
        STORE_F16 => round_f16(x),
        STORE_BF16_STOCHASTIC => stochastic_bf16(x, bits),
        STORE_F16_STOCHASTIC => stochastic_f16(x, bits),
        _ => x,
    }
}

/// The random bits of assignment `k` when `STORAGE` rounds stochastically (else 0,
/// and nothing is hashed).
#[inline(always)]
pub fn rounding_bits<const STORAGE: u8>(key: u32, k: u32) -> u32 {
    if STORAGE >= STORE_BF16_STOCHASTIC {
        assignment_bits(key, k)
    } else {
        0
    }
}

/// The clip applied to one tensor's gradient in one step: `g * numerator / denominator`,
/// computed from the norm reduction (see [`clipnorm_factors`], [`global_clipnorm_factors`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct ClipFactors {
    /// Multiplies the gradient first.
    pub numerator: f32,
    /// Divides the product.
    pub denominator: f32,
}

impl ClipFactors {
    /// No clipping: multiplying and dividing by 1 is exact.
    pub const NONE: ClipFactors = ClipFactors {
        numerator: 1.0,
        denominator: 1.0,
    };
}

/// What one element's step does, the same for every element of a tensor in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The tensor has no gradient this step: only its EMA moves (as in Keras).
    NoGradient = 0,
    /// An accumulation-only step: the unscaled gradient is added to the accumulator.
    Accumulate = 1,
    /// An update step.
    Update = 2,
    /// The tensor is frozen ([`ParamGroup::frozen`](crate::ParamGroup)): nothing moves.
    Frozen = 3,
}

impl Phase {
    /// The phase of a tensor with or without a gradient in the step `s`.
    #[inline(always)]
    pub fn of(has_gradient: bool, frozen: bool, s: &StepScalars) -> Phase {
        if frozen {
            Phase::Frozen
        } else if !has_gradient {
            Phase::NoGradient
        } else if s.is_update_step == 0 {
            Phase::Accumulate
        } else {
            Phase::Update
        }
    }
}

/// The per-tensor inputs of one step: its [`Phase`], whether it takes weight decay
/// (`exclude_from_weight_decay`), and its clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorStep {
    /// What the step does to this tensor.
    pub phase: Phase,
    /// True when weight decay applies to this tensor.
    pub decay: bool,
    /// This tensor's clip ([`ClipFactors::NONE`] without norm clipping).
    pub clip: ClipFactors,
}

/// One element: its parameter and every slot (unused slots are ignored and stay 0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ElementState {
    /// The parameter.
    pub param: f32,
    /// `velocity` (mean square), always used.
    pub velocity: f32,
    /// `momentum`, when momentum > 0.
    pub momentum: f32,
    /// `average_gradient`, when centered.
    pub average_gradient: f32,
    /// The EMA of the parameter, with `use_ema`.
    pub ema: f32,
    /// The gradient accumulator, with `gradient_accumulation_steps`.
    pub accumulator: f32,
}

/// `jnp.maximum` / `jnp.minimum` propagate NaN; Rust's `f32::max` does not.
#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

#[inline(always)]
fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

/// Keras `_clip_by_norm` for one tensor: `g * clipnorm / max(l2norm, clipnorm)`, where
/// `l2norm = sqrt(sum_sq)` when `sum_sq > 0` and `sum_sq` otherwise (the two-tap trick,
/// so a NaN sum stays NaN).
pub fn clipnorm_factors(sum_sq: f32, clipnorm: f32) -> ClipFactors {
    let l2norm = if sum_sq > 0.0 { sum_sq.sqrt() } else { sum_sq };
    ClipFactors {
        numerator: clipnorm,
        denominator: nan_max(l2norm, clipnorm),
    }
}

/// Keras `clip_by_global_norm`: `scale = clip * min(1 / norm, 1 / clip) + (norm - norm)`,
/// NaN for a non-finite norm. `inv_clip` is `1 / clip` computed in f64 (a Python float)
/// and rounded to f32.
#[allow(clippy::eq_op)] // `norm - norm` is Keras' way to turn a non-finite norm into NaN
pub fn global_clipnorm_factors(total_sum_sq: f32, clip: f32, inv_clip: f32) -> ClipFactors {
    let use_norm = total_sum_sq.sqrt();
    let scale_for_finite = clip * nan_min(1.0 / use_norm, inv_clip);
    ClipFactors {
        numerator: scale_for_finite + (use_norm - use_norm),
        denominator: 1.0,
    }
}

/// Loss-scale unscaling: `raw / loss_scale`.
#[inline(always)]
pub fn unscale_gradient(raw: f32, s: &StepScalars) -> f32 {
    raw / s.loss_scale
}

/// Gradient accumulation on an accumulation-only step: `g + accumulator` (Keras' order).
#[inline(always)]
pub fn accumulate_gradient(gradient: f32, accumulator: f32) -> f32 {
    gradient + accumulator
}

/// On an update step with accumulation: `(g + accumulator) / steps`.
#[inline(always)]
pub fn average_accumulated(gradient: f32, accumulator: f32, s: &StepScalars) -> f32 {
    (gradient + accumulator) / s.accumulation_steps
}

/// The gradient an update step works with, before clipping: unscaled and, with
/// accumulation (`ACCUMULATE`), averaged with the accumulator. The norm passes square
/// exactly this.
#[inline(always)]
pub fn effective_gradient<const ACCUMULATE: bool>(
    raw: f32,
    accumulator: f32,
    s: &StepScalars,
) -> f32 {
    let g = unscale_gradient(raw, s);
    if ACCUMULATE {
        average_accumulated(g, accumulator, s)
    } else {
        g
    }
}

/// Clipping: `clamp(g * numerator / denominator, -clipvalue, clipvalue)`; NaN stays NaN.
#[inline(always)]
pub fn clip_gradient(gradient: f32, clip: ClipFactors, s: &StepScalars) -> f32 {
    let g = (gradient * clip.numerator) / clip.denominator;
    // `clamp` returns NaN for NaN input, as `jnp.clip` does; bounds are never NaN.
    g.clamp(-s.clip_value, s.clip_value)
}

/// PyTorch's `maximize`: `g * sign` (`-g` when maximizing; times 1 is exact).
#[inline(always)]
pub fn orient_gradient(gradient: f32, s: &StepScalars) -> f32 {
    gradient * s.gradient_sign
}

/// Decoupled weight decay: `p - p * weight_decay * lr`.
#[inline(always)]
pub fn decay_weight(param: f32, s: &StepScalars) -> f32 {
    param - param * s.weight_decay * s.learning_rate
}

/// Weight decay as an L2 term of the gradient (PyTorch's `grad.add(param, alpha=wd)`,
/// optax's `add_decayed_weights`): `g + weight_decay * p`.
#[inline(always)]
pub fn decay_gradient(gradient: f32, param: f32, s: &StepScalars) -> f32 {
    gradient + s.weight_decay * param
}

/// The velocity (mean square) update: `rho * v + (1 - rho) * g^2`.
#[inline(always)]
pub fn rmsprop_velocity(velocity: f32, gradient: f32, s: &StepScalars) -> f32 {
    s.rho * velocity + s.one_minus_rho * (gradient * gradient)
}

/// The centered mean-gradient update: `rho * a + (1 - rho) * g`.
#[inline(always)]
pub fn rmsprop_average_gradient(average: f32, gradient: f32, s: &StepScalars) -> f32 {
    s.rho * average + s.one_minus_rho * gradient
}

/// The denominator under the root: `v - a^2 + eps` (centered, each moment divided
/// by the bias correction) or `v + eps` (the velocity times its inverse); both are 1
/// without optax's bias correction, and dividing or multiplying by 1 is exact.
#[inline(always)]
pub fn rmsprop_denominator<const K: u32>(velocity: f32, average: f32, s: &StepScalars) -> f32 {
    if kernel::has(K, kernel::CENTERED) {
        let velocity = velocity / s.bias_correction;
        let average = average / s.bias_correction;
        velocity - average * average + s.epsilon
    } else {
        velocity * s.inverse_bias_correction + s.epsilon
    }
}

/// The increment: `(scale * g) / (sqrt(denominator) + epsilon_outside)`: Keras' and
/// optax's `lr * g / sqrt(v + eps)` (the outside epsilon 0), PyTorch's
/// `g / (sqrt(v) + eps)` (the scale 1, the inside epsilon 0). Adding 0 and
/// multiplying by 1 are exact, so each dialect gets its own expression's bits.
#[inline(always)]
pub fn rmsprop_increment(gradient: f32, denominator: f32, s: &StepScalars) -> f32 {
    (s.increment_scale * gradient) / (denominator.sqrt() + s.epsilon_outside)
}

/// The momentum trace: `momentum_coef * m + increment`.
#[inline(always)]
pub fn rmsprop_momentum(momentum: f32, increment: f32, s: &StepScalars) -> f32 {
    s.momentum * momentum + increment
}

/// What the parameter moves by: the momentum buffer, or with nesterov (optax's
/// `trace(nesterov=True)`) `increment + momentum_coef * buffer`, or the increment
/// without momentum; times `update_scale` (PyTorch's `lr * buf`; 1 elsewhere).
#[inline(always)]
pub fn rmsprop_update<const K: u32>(momentum: f32, increment: f32, s: &StepScalars) -> f32 {
    let moved = if kernel::has(K, kernel::NESTEROV) {
        increment + s.momentum * momentum
    } else if kernel::has(K, kernel::MOMENTUM) {
        momentum
    } else {
        increment
    };
    moved * s.update_scale
}

/// EMA of a variable: `m * ema + (1 - m) * p`.
#[inline(always)]
pub fn ema_update(ema: f32, param: f32, s: &StepScalars) -> f32 {
    s.ema_momentum * ema + (1.0 - s.ema_momentum) * param
}

/// EMA overwrite as Keras' JAX backend writes it: `ema * s + p * (1 - s)`, so a
/// non-finite value on either side reaches the result.
#[inline(always)]
pub fn ema_overwrite(param: f32, ema: f32, s: &StepScalars) -> f32 {
    ema * s.ema_overwrite + param * (1.0 - s.ema_overwrite)
}

/// The RMSprop stages of one element whose gradient is already clipped and decayed
/// (and whose parameter is): velocity, average gradient (centered), increment,
/// momentum, and the new parameter.
#[inline(always)]
pub fn rmsprop_element<const K: u32, const STORAGE: u8>(
    mut e: ElementState,
    gradient: f32,
    s: &StepScalars,
    key: u32,
) -> ElementState {
    let bits = rounding_bits::<STORAGE>(key, 1);
    e.velocity = rmsprop_velocity(e.velocity, gradient, s);
    if kernel::has(K, kernel::CENTERED) {
        e.average_gradient = rmsprop_average_gradient(e.average_gradient, gradient, s);
    }
    let denominator = rmsprop_denominator::<K>(e.velocity, e.average_gradient, s);
    let increment = rmsprop_increment(gradient, denominator, s);
    if kernel::has(K, kernel::MOMENTUM) {
        e.momentum = rmsprop_momentum(e.momentum, increment, s);
    }
    e.param = store_param::<STORAGE>(
        e.param - rmsprop_update::<K>(e.momentum, increment, s),
        bits,
    );
    e
}

/// The whole step of one element, from its raw gradient to its new parameter and
/// slots, in Keras' order: unscale, accumulate (or average the accumulation), clip,
/// decay, RMSprop, EMA and overwrite. `raw_gradient` is ignored in
/// [`Phase::NoGradient`].
///
/// The const parameters are the structural options: `K` the [`kernel`] flags
/// (centered, momentum, nesterov, EMA, accumulation, coupled decay), and how the
/// parameters are stored ([`store_param`]); `key` is the element's [`element_key`] when
/// they are rounded stochastically (ignored otherwise).
///
/// Keras' docstring example (var = 10, grad = var, lr = 0.1 gives 9.683772) is the
/// unit test `keras_docstring_example`.
#[inline(always)]
pub fn update_element<const K: u32, const STORAGE: u8>(
    raw_gradient: f32,
    mut e: ElementState,
    t: &TensorStep,
    s: &StepScalars,
    key: u32,
) -> ElementState {
    match t.phase {
        Phase::Frozen => return e,
        Phase::NoGradient => {}
        Phase::Accumulate => {
            e.accumulator = accumulate_gradient(unscale_gradient(raw_gradient, s), e.accumulator);
        }
        Phase::Update => {
            let accumulate = kernel::has(K, kernel::ACCUMULATE);
            let g = if accumulate {
                effective_gradient::<true>(raw_gradient, e.accumulator, s)
            } else {
                effective_gradient::<false>(raw_gradient, e.accumulator, s)
            };
            if accumulate {
                e.accumulator = 0.0;
            }
            let mut g = orient_gradient(clip_gradient(g, t.clip, s), s);
            if t.decay && kernel::has(K, kernel::COUPLED_DECAY) {
                g = decay_gradient(g, e.param, s);
            } else if t.decay {
                let bits = rounding_bits::<STORAGE>(key, 0);
                e.param = store_param::<STORAGE>(decay_weight(e.param, s), bits);
            }
            e = rmsprop_element::<K, STORAGE>(e, g, s, key);
        }
    }
    if kernel::has(K, kernel::EMA) {
        e.ema = ema_update(e.ema, e.param, s);
        if s.ema_overwrite_enabled != 0 {
            let bits = rounding_bits::<STORAGE>(key, 2);
            e.param = store_param::<STORAGE>(ema_overwrite(e.param, e.ema, s), bits);
        }
    }
    e
}

/// The dynamic loss scale of Keras' `LossScaleOptimizer` and its count of finite steps
/// since the scale last changed (`dynamic_scale`, `step_counter`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleState {
    /// The scale the next step's gradients are divided by.
    pub scale: f32,
    /// Finite steps in a row since the scale last changed.
    pub counter: u32,
}

/// Keras' rule after a step (`LossScaleOptimizer`): a step with a non-finite gradient
/// is skipped and halves the scale; a finite one (applied, its gradients divided by the
/// scale *before* this update) counts, and the `growth_steps`-th finite step in a row
/// doubles the scale. The counter restarts whenever the scale changes.
pub fn next_loss_scale(state: LossScaleState, finite: bool, growth_steps: u32) -> LossScaleState {
    if !finite {
        LossScaleState {
            scale: state.scale / 2.0,
            counter: 0,
        }
    } else if state.counter == growth_steps.wrapping_sub(1) {
        LossScaleState {
            scale: state.scale * 2.0,
            counter: 0,
        }
    } else {
        LossScaleState {
            scale: state.scale,
            counter: state.counter + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars() -> StepScalars {
        StepScalars {
            learning_rate: 0.1,
            rho: 0.9,
            one_minus_rho: (1.0f64 - 0.9) as f32,
            epsilon: 1e-7,
            loss_scale: 1.0,
            accumulation_steps: 1.0,
            clip_value: f32::INFINITY,
            is_update_step: 1,
            increment_scale: 0.1,
            update_scale: 1.0,
            bias_correction: 1.0,
            inverse_bias_correction: 1.0,
            gradient_sign: 1.0,
            ..StepScalars::default()
        }
    }

    /// Every Keras option on: centered, momentum, EMA, accumulation.
    const ALL_KERAS: u32 = kernel::CENTERED | kernel::MOMENTUM | kernel::EMA | kernel::ACCUMULATE;

    fn param(p: f32) -> ElementState {
        ElementState {
            param: p,
            ..ElementState::default()
        }
    }

    #[test]
    fn keras_doc_example_one_step() {
        // Keras' docstring: var = 10, loss = var^2 / 2, lr = 0.1: one step gives 9.683772.
        let s = scalars();
        let p = rmsprop_element::<0, 0>(param(10.0), 10.0, &s, 0).param;
        // closed form: 10 - 0.1 * 10 / sqrt(0.1 * 100 + 1e-7)
        let expected = 10.0 - 0.1 * 10.0 / (0.1f64 * 100.0 + 1e-7).sqrt();
        assert!((p as f64 - expected).abs() < 1e-5, "{p} vs {expected}");
        assert!((p - 9.683772).abs() < 1e-5);
    }

    #[test]
    fn centered_with_zero_mean_equals_plain() {
        let s = scalars();
        // with a zero gradient mean kept at zero, centered == plain
        let p1 = rmsprop_element::<{ kernel::CENTERED }, 0>(param(1.0), 0.0, &s, 0).param;
        let p2 = rmsprop_element::<0, 0>(param(1.0), 0.0, &s, 0).param;
        assert_eq!(p1, p2);
    }

    #[test]
    fn clip_value_keeps_nan_and_bounds() {
        let mut s = scalars();
        s.clip_value = 0.5;
        assert_eq!(clip_gradient(3.0, ClipFactors::NONE, &s), 0.5);
        assert_eq!(clip_gradient(-3.0, ClipFactors::NONE, &s), -0.5);
        assert!(clip_gradient(f32::NAN, ClipFactors::NONE, &s).is_nan());
    }

    #[test]
    fn clip_factors_follow_keras() {
        // norm 5 > clip 1: g * 1 / 5
        let f = clipnorm_factors(25.0, 1.0);
        assert_eq!(f.denominator, 5.0);
        // zero norm: denominator is the clip itself
        assert_eq!(clipnorm_factors(0.0, 2.0).denominator, 2.0);
        assert!(clipnorm_factors(f32::NAN, 2.0).denominator.is_nan());
        // global: finite norm below clip gives clip * (1/clip)
        let g = global_clipnorm_factors(0.25, 1.0, 1.0);
        assert_eq!(g.numerator, 1.0);
        let g = global_clipnorm_factors(16.0, 1.0, 1.0);
        assert_eq!(g.numerator, 0.25);
        assert!(global_clipnorm_factors(f32::INFINITY, 1.0, 1.0)
            .numerator
            .is_nan());
    }

    #[test]
    fn ema_overwrite_lets_nan_through_like_jax() {
        let mut s = scalars();
        s.ema_overwrite = 0.0;
        assert!(ema_overwrite(1.0, f32::NAN, &s).is_nan());
        s.ema_overwrite = 1.0;
        assert_eq!(ema_overwrite(1.0, 2.0, &s), 2.0);
    }

    /// The stage order, written out by hand for one element with every option on.
    #[test]
    fn update_element_runs_the_stages_in_keras_order() {
        let s = StepScalars {
            momentum: 0.5,
            weight_decay: 0.1,
            loss_scale: 4.0,
            accumulation_steps: 2.0,
            clip_value: 0.3,
            ema_momentum: 0.9,
            ema_overwrite: 1.0,
            ema_overwrite_enabled: 1,
            ..scalars()
        };
        let t = TensorStep {
            phase: Phase::Update,
            decay: true,
            clip: ClipFactors {
                numerator: 0.5,
                denominator: 2.0,
            },
        };
        let start = ElementState {
            param: 2.0,
            velocity: 0.25,
            momentum: 0.125,
            average_gradient: 0.0625,
            ema: 1.5,
            accumulator: 0.75,
        };
        let e = update_element::<ALL_KERAS, 0>(6.0, start, &t, &s, 0);
        let g = ((6.0f32 / 4.0 + 0.75) / 2.0 * 0.5 / 2.0).clamp(-0.3, 0.3);
        let p = 2.0 - 2.0 * 0.1 * 0.1;
        let v = 0.9 * 0.25 + s.one_minus_rho * (g * g);
        let a = 0.9 * 0.0625 + s.one_minus_rho * g;
        let m = 0.5 * 0.125 + (0.1 * g) / (v - a * a + 1e-7).sqrt();
        let ema = 0.9 * 1.5 + (1.0 - 0.9) * (p - m);
        assert_eq!(e.accumulator, 0.0);
        assert_eq!((e.velocity, e.average_gradient, e.momentum), (v, a, m));
        assert_eq!(e.ema, ema);
        assert_eq!(e.param, ema * 1.0 + (p - m) * 0.0);
        // an accumulation-only step only adds to the accumulator (and moves the EMA)
        let acc = TensorStep {
            phase: Phase::Accumulate,
            ..t
        };
        let e = update_element::<ALL_KERAS, 0>(6.0, start, &acc, &s, 0);
        assert_eq!(e.accumulator, 6.0 / 4.0 + 0.75);
        assert_eq!((e.velocity, e.momentum), (start.velocity, start.momentum));
        assert_eq!(e.ema, 0.9 * 1.5 + (1.0 - 0.9) * 2.0);
        // no gradient: only the EMA
        let none = TensorStep {
            phase: Phase::NoGradient,
            ..t
        };
        let e = update_element::<ALL_KERAS, 0>(f32::NAN, start, &none, &s, 0);
        assert_eq!(e.accumulator, start.accumulator);
        assert_eq!(e.ema, 0.9 * 1.5 + (1.0 - 0.9) * 2.0);
    }

    #[test]
    fn each_draw_is_a_neighbour_and_the_mean_error_vanishes() {
        use crate::dtype::Dtype;
        let draws = 200_000u32;
        let cases: [(Dtype, f32); 8] = [
            (Dtype::Bf16, 1.0 + 1.0 / 300.0),
            (Dtype::Bf16, -3.3e-3),
            (Dtype::Bf16, 12345.678),
            (Dtype::F16, 1.0 + 1.0 / 3000.0),
            (Dtype::F16, -0.1),
            (Dtype::F16, 3.0e-6),
            (Dtype::F16, -7.7e-8),
            (Dtype::F16, 60010.3),
        ];
        for (dtype, x) in cases {
            let round = |bits| match dtype {
                Dtype::Bf16 => stochastic_bf16(x, bits),
                _ => stochastic_f16(x, bits),
            };
            let nearest = match dtype {
                Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
                _ => half::f16::from_f32(x).to_f32(),
            };
            let (lo, hi) = {
                // the neighbours: round toward zero and away from it
                let mut seen = std::collections::BTreeSet::new();
                for k in 0..2000 {
                    seen.insert(round(hash32(k)).to_bits());
                }
                let v: Vec<f32> = seen.into_iter().map(f32::from_bits).collect();
                assert!(v.len() <= 2, "{dtype} {x}: more than two results {v:?}");
                let (a, b) = (v[0], v[v.len() - 1]);
                (a.min(b), a.max(b))
            };
            assert!(lo <= x && x <= hi, "{dtype} {x}: {lo} .. {hi}");
            assert!(nearest == lo || nearest == hi);
            let step = f64::from(hi - lo);
            let mean_error: f64 = (0..draws)
                .map(|k| f64::from(round(hash32(k ^ 0x5bd1_e995))) - f64::from(x))
                .sum::<f64>()
                / f64::from(draws);
            // a two-point distribution: standard deviation at most step / 2
            let sigma = step / 2.0 / f64::from(draws).sqrt();
            assert!(
                mean_error.abs() <= 5.0 * sigma,
                "{dtype} {x}: mean error {mean_error:e}, 5 sigma {:e}",
                5.0 * sigma
            );
            let nearest_error = f64::from(nearest) - f64::from(x);
            assert!(
                nearest_error.abs() > 20.0 * sigma,
                "{dtype} {x}: the case does not separate the two"
            );
        }
    }

    #[test]
    fn next_loss_scale_is_keras_rule() {
        let s = |scale, counter| LossScaleState { scale, counter };
        assert_eq!(next_loss_scale(s(8.0, 5), false, 3), s(4.0, 0));
        assert_eq!(next_loss_scale(s(8.0, 0), true, 3), s(8.0, 1));
        assert_eq!(next_loss_scale(s(8.0, 2), true, 3), s(16.0, 0));
        assert_eq!(next_loss_scale(s(8.0, 0), true, 1), s(16.0, 0));
    }

    proptest::proptest! {
        #[test]
        fn clipped_gradients_never_exceed_the_clip(
            grads in proptest::collection::vec(proptest::collection::vec(-1e4f32..1e4, 0..50), 1..5),
            clip in 0.01f32..10.0,
        ) {
            let s = StepScalars {
                learning_rate: 0.1, rho: 0.9, one_minus_rho: 0.1, epsilon: 1e-7, momentum: 0.0,
                weight_decay: 0.0, loss_scale: 1.0, accumulation_steps: 1.0, clip_value: clip,
                ema_momentum: 0.0, ema_overwrite: 0.0, ema_overwrite_enabled: 0, is_update_step: 1,
                ..StepScalars::default()
            };
            let tol = 1.0 + 1e-5;
            // clipvalue
            for g in grads.iter().flatten() {
                proptest::prop_assert!(clip_gradient(*g, ClipFactors::NONE, &s).abs() <= clip);
            }
            let open = StepScalars { clip_value: f32::INFINITY, ..s };
            // clipnorm, per tensor
            for g in &grads {
                let ss: f32 = g.iter().map(|x| x * x).sum();
                let f = clipnorm_factors(ss, clip);
                let norm: f64 = g.iter().map(|x| (clip_gradient(*x, f, &open) as f64).powi(2)).sum::<f64>().sqrt();
                proptest::prop_assert!(norm <= clip as f64 * tol, "norm {} > clip {}", norm, clip);
            }
            // global_clipnorm, across tensors
            let total: f32 = grads.iter().flatten().map(|x| x * x).sum();
            let f = global_clipnorm_factors(total, clip, (1.0 / clip as f64) as f32);
            let norm: f64 = grads.iter().flatten().map(|x| (clip_gradient(*x, f, &open) as f64).powi(2)).sum::<f64>().sqrt();
            proptest::prop_assert!(norm <= clip as f64 * tol, "global norm {} > clip {}", norm, clip);
        }
    }

    #[test]
    fn keras_docstring_example() {
        // the same step through the whole element update
        let t = TensorStep {
            phase: Phase::Update,
            decay: false,
            clip: ClipFactors::NONE,
        };
        let e = update_element::<0, 0>(10.0, param(10.0), &t, &scalars(), 0);
        assert!((e.param - 9.683772).abs() < 1e-5);
    }
}
