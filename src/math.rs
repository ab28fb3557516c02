//! The per-element update math: the one source of truth.
//!
//! Every function here is mirrored, name for name, by `shaders/rmsprop.wgsl`;
//! the CPU driver calls these functions in its inner loop and the tests use them as
//! the oracle. Each follows Keras 3's expression order in `float32`
//! (`keras/src/optimizers/rmsprop.py`, `base_optimizer.py`), so rounding matches:
//!
//! ```text
//! g         = raw / loss_scale_factor                     (unscale)
//! g         = (g + accumulator) / accumulation_steps      (on an update step)
//! g         = clamp(g * clip_numerator / clip_denominator, -clipvalue, clipvalue)
//! p         = p - p * weight_decay * lr                   (decoupled decay, before the update)
//! velocity  = rho * velocity + (1 - rho) * g^2
//! avg_grad  = rho * avg_grad + (1 - rho) * g              (centered)
//! denom     = velocity - avg_grad^2 + epsilon             (centered; else velocity + epsilon)
//! increment = lr * g / sqrt(denom)                        (epsilon inside the root, unlike PyTorch)
//! momentum  = momentum_coef * momentum + increment;  p -= momentum   (momentum > 0)
//! p        -= increment                                              (otherwise)
//! ema       = m * ema + (1 - m) * p                       (m = 0 on the first iteration)
//! p         = ema * s + p * (1 - s)                       (EMA overwrite, s in {0, 1})
//! ```
//!
//! This module imports nothing: it is plain `f32` arithmetic.

/// Number of `f32` fields in [`StepScalars`]; the WGSL uniform `StepUniform` has the same.
pub const STEP_SCALAR_COUNT: usize = 12;

/// Per-step values shared by every element of every tensor.
///
/// Mirrored field for field by `StepUniform` in `shaders/rmsprop.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// EMA momentum for this step: 0 on the first (floored) iteration, else `ema_momentum`.
    pub ema_momentum: f32,
    /// 1 when this step overwrites the variables with their EMA, else 0.
    pub ema_overwrite: f32,
    /// 1 when `ema_overwrite_frequency` is set (the overwrite expression runs every step).
    pub ema_overwrite_enabled: f32,
}

impl StepScalars {
    /// The fields in WGSL uniform order.
    pub fn to_array(&self) -> [f32; STEP_SCALAR_COUNT] {
        [
            self.learning_rate,
            self.rho,
            self.one_minus_rho,
            self.epsilon,
            self.momentum,
            self.weight_decay,
            self.loss_scale,
            self.accumulation_steps,
            self.clip_value,
            self.ema_momentum,
            self.ema_overwrite,
            self.ema_overwrite_enabled,
        ]
    }
}

/// The clip applied to one tensor's gradient in one step: `g * numerator / denominator`,
/// computed from the norm reduction (see [`clipnorm_factors`], [`global_clipnorm_factors`]).
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// Gradient accumulation on a non-update step: `g + accumulator` (Keras' order).
#[inline(always)]
pub fn accumulate_gradient(gradient: f32, accumulator: f32) -> f32 {
    gradient + accumulator
}

/// On an update step: `(g + accumulator) / steps`.
#[inline(always)]
pub fn average_accumulated(gradient: f32, accumulator: f32, s: &StepScalars) -> f32 {
    (gradient + accumulator) / s.accumulation_steps
}

/// Clipping: `clamp(g * numerator / denominator, -clipvalue, clipvalue)`; NaN stays NaN.
#[inline(always)]
pub fn clip_gradient(gradient: f32, clip: ClipFactors, s: &StepScalars) -> f32 {
    let g = (gradient * clip.numerator) / clip.denominator;
    // `clamp` returns NaN for NaN input, as `jnp.clip` does; bounds are never NaN.
    g.clamp(-s.clip_value, s.clip_value)
}

/// Decoupled weight decay: `p - p * weight_decay * lr`.
#[inline(always)]
pub fn decay_weight(param: f32, s: &StepScalars) -> f32 {
    param - param * s.weight_decay * s.learning_rate
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

/// The denominator under the root: `v - a^2 + eps` (centered) or `v + eps`.
#[inline(always)]
pub fn rmsprop_denominator(velocity: f32, average: f32, centered: bool, s: &StepScalars) -> f32 {
    if centered {
        velocity - average * average + s.epsilon
    } else {
        velocity + s.epsilon
    }
}

/// The step: `lr * g / sqrt(denominator)`.
#[inline(always)]
pub fn rmsprop_increment(gradient: f32, denominator: f32, s: &StepScalars) -> f32 {
    (s.learning_rate * gradient) / denominator.sqrt()
}

/// The momentum trace: `momentum_coef * m + increment`.
#[inline(always)]
pub fn rmsprop_momentum(momentum: f32, increment: f32, s: &StepScalars) -> f32 {
    s.momentum * momentum + increment
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

/// The slots of one element, by Keras name; unused ones are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ElementSlots {
    /// `velocity` (mean square), always used.
    pub velocity: f32,
    /// `momentum`, when momentum > 0.
    pub momentum: f32,
    /// `average_gradient`, when centered.
    pub average_gradient: f32,
}

/// One RMSprop update of one element with an already clipped gradient, after weight
/// decay: returns the new parameter and updates the slots.
#[inline(always)]
pub fn rmsprop_element(
    param: f32,
    gradient: f32,
    slots: &mut ElementSlots,
    centered: bool,
    use_momentum: bool,
    s: &StepScalars,
) -> f32 {
    slots.velocity = rmsprop_velocity(slots.velocity, gradient, s);
    if centered {
        slots.average_gradient = rmsprop_average_gradient(slots.average_gradient, gradient, s);
    }
    let denominator = rmsprop_denominator(slots.velocity, slots.average_gradient, centered, s);
    let increment = rmsprop_increment(gradient, denominator, s);
    if use_momentum {
        slots.momentum = rmsprop_momentum(slots.momentum, increment, s);
        param - slots.momentum
    } else {
        param - increment
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
            momentum: 0.0,
            weight_decay: 0.0,
            loss_scale: 1.0,
            accumulation_steps: 1.0,
            clip_value: f32::INFINITY,
            ema_momentum: 0.0,
            ema_overwrite: 0.0,
            ema_overwrite_enabled: 0.0,
        }
    }

    #[test]
    fn keras_doc_example_one_step() {
        // Keras' docstring: var = 10, loss = var^2 / 2, lr = 0.1: one step gives 9.683772.
        let s = scalars();
        let mut slots = ElementSlots::default();
        let p = rmsprop_element(10.0, 10.0, &mut slots, false, false, &s);
        // closed form: 10 - 0.1 * 10 / sqrt(0.1 * 100 + 1e-7)
        let expected = 10.0 - 0.1 * 10.0 / (0.1f64 * 100.0 + 1e-7).sqrt();
        assert!((p as f64 - expected).abs() < 1e-5, "{p} vs {expected}");
        assert!((p - 9.683772).abs() < 1e-5);
    }

    #[test]
    fn centered_with_zero_mean_equals_plain() {
        let s = scalars();
        let mut a = ElementSlots::default();
        let mut b = ElementSlots::default();
        // with a zero gradient mean kept at zero, centered == plain
        let p1 = rmsprop_element(1.0, 0.0, &mut a, true, false, &s);
        let p2 = rmsprop_element(1.0, 0.0, &mut b, false, false, &s);
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
}
