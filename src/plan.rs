//! Keras' `apply()` control flow reduced to data: the structural variant of a config
//! (what code runs) and the per-step plan (which numbers it runs with).
//!
//! Follows Keras 3's JAX optimizer (`keras/src/backend/jax/optimizer.py`), which
//! produced the conformance traces:
//! - the schedule sees the raw counter; `iterations` is `raw // accumulation_steps`;
//! - with accumulation, a step is an update step when `(raw + 1) % n == 0`; other steps
//!   only add the unscaled gradient to the accumulator;
//! - the EMA is updated every step for every variable (even ones without a gradient),
//!   with momentum 0 while `iterations == 0`; the overwrite runs when
//!   `(iterations + 1) % ema_overwrite_frequency == 0`.

use crate::config::{Clipping, RmsPropConfig};
use crate::math::{StepScalars, STEP_SCALAR_COUNT};

/// How gradients are clipped, without the numbers (a structural option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClipKind {
    /// No clipping.
    None,
    /// Per-tensor L2 norm (`clipnorm`).
    Norm,
    /// Global L2 norm (`global_clipnorm`).
    GlobalNorm,
    /// Element-wise (`clipvalue`).
    Value,
}

impl ClipKind {
    /// True when a norm reduction must run before the update.
    pub fn needs_norm(self) -> bool {
        matches!(self, ClipKind::Norm | ClipKind::GlobalNorm)
    }
}

/// The options that change the code path: a small hashable key for the CPU's
/// monomorphized loops and the GPU's pipeline cache (WGSL `override` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    /// `centered`.
    pub centered: bool,
    /// `momentum > 0`.
    pub momentum: bool,
    /// `use_ema`.
    pub ema: bool,
    /// `gradient_accumulation_steps` set.
    pub accumulate: bool,
    /// `weight_decay` set.
    pub weight_decay: bool,
    /// Which clipping.
    pub clip: ClipKind,
    /// The opt-in non-finite guard (not a Keras option: set by
    /// [`crate::RmsProp::set_non_finite_guard`], never by a config).
    pub guard: bool,
}

impl Variant {
    /// The variant a config needs.
    pub fn of(config: &RmsPropConfig) -> Self {
        Variant {
            centered: config.centered,
            momentum: config.uses_momentum(),
            ema: config.use_ema,
            accumulate: config.gradient_accumulation_steps.is_some(),
            weight_decay: config.weight_decay.is_some(),
            clip: match config.clipping() {
                Clipping::None => ClipKind::None,
                Clipping::Norm(_) => ClipKind::Norm,
                Clipping::GlobalNorm(_) => ClipKind::GlobalNorm,
                Clipping::Value(_) => ClipKind::Value,
            },
            guard: false,
        }
    }

    /// Slots kept per element, in arena order: velocity, then momentum,
    /// average_gradient, EMA and accumulator when used.
    pub fn slot_names(&self) -> Vec<&'static str> {
        let mut names = vec!["velocity"];
        if self.momentum {
            names.push("momentum");
        }
        if self.centered {
            names.push("average_gradient");
        }
        if self.ema {
            names.push("average");
        }
        if self.accumulate {
            names.push("accumulated_gradient");
        }
        names
    }
}

/// Everything a backend needs to run one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPlan {
    /// The per-element scalars.
    pub scalars: StepScalars,
    /// False on an accumulation-only step.
    pub is_update_step: bool,
    /// The clip threshold (`clipnorm` or `global_clipnorm`) as f32, 0 when unused.
    pub clip_norm: f32,
    /// `1 / global_clipnorm` computed in f64 and rounded, as Keras' Python float.
    pub inv_clip_norm: f32,
}

impl StepPlan {
    /// The plan as the kernels read it (`StepScalars` in the WGSL): the scalars, then
    /// `clip_norm`, `inv_clip_norm`, `is_update_step` (as 0/1) and a pad.
    pub fn uniform_words(&self) -> [f32; STEP_SCALAR_COUNT + 4] {
        let mut out = [0.0f32; STEP_SCALAR_COUNT + 4];
        out[..STEP_SCALAR_COUNT].copy_from_slice(&self.scalars.to_array());
        out[STEP_SCALAR_COUNT] = self.clip_norm;
        out[STEP_SCALAR_COUNT + 1] = self.inv_clip_norm;
        out[STEP_SCALAR_COUNT + 2] = if self.is_update_step { 1.0 } else { 0.0 };
        out
    }
}

/// Keras' `optimizer.iterations` for a raw counter.
pub fn iterations(config: &RmsPropConfig, raw: u64) -> u64 {
    match config.gradient_accumulation_steps {
        Some(n) if n > 0 => raw / n,
        _ => raw,
    }
}

/// The plan for the step taken when the raw counter is `raw`.
pub fn plan_step(config: &RmsPropConfig, raw: u64) -> StepPlan {
    let learning_rate = config.learning_rate.at(raw);
    let is_update_step = match config.gradient_accumulation_steps {
        Some(n) if n > 0 => (raw + 1).is_multiple_of(n),
        _ => true,
    };
    let iters = iterations(config, raw);
    let ema_momentum = if iters != 0 {
        config.ema_momentum as f32
    } else {
        0.0
    };
    let (ema_overwrite, ema_overwrite_enabled) = match config.ema_overwrite_frequency {
        Some(f) if config.use_ema && f > 0 => ((iters + 1).is_multiple_of(f) as u8 as f32, 1.0),
        _ => (0.0, 0.0),
    };
    let (clip_norm, clip_value) = match config.clipping() {
        Clipping::Norm(c) | Clipping::GlobalNorm(c) => (c, f32::INFINITY),
        Clipping::Value(v) => (0.0, v),
        Clipping::None => (0.0, f32::INFINITY),
    };
    let inv_clip_norm = match (config.clipping(), config.global_clipnorm) {
        (Clipping::GlobalNorm(_), Some(c)) => (1.0 / c) as f32,
        _ => 0.0,
    };
    StepPlan {
        scalars: StepScalars {
            learning_rate,
            rho: config.rho as f32,
            one_minus_rho: (1.0 - config.rho) as f32,
            epsilon: config.epsilon as f32,
            momentum: config.momentum as f32,
            weight_decay: config.weight_decay.unwrap_or(0.0) as f32,
            loss_scale: config.loss_scale_factor.unwrap_or(1.0) as f32,
            accumulation_steps: config.gradient_accumulation_steps.unwrap_or(1) as f32,
            clip_value,
            ema_momentum,
            ema_overwrite,
            ema_overwrite_enabled,
        },
        is_update_step,
        clip_norm,
        inv_clip_norm,
    }
}

/// Whether variable `name` takes weight decay, given `exclude_from_weight_decay`
/// substrings (Keras searches them as a regular expression; plain names match the same).
pub fn takes_weight_decay(name: &str, excluded: &[String]) -> bool {
    !excluded.iter().any(|s| name.contains(s.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_updates_every_nth_raw_step() {
        let c = RmsPropConfig::default().with_gradient_accumulation_steps(3);
        let updates: Vec<bool> = (0..7).map(|r| plan_step(&c, r).is_update_step).collect();
        assert_eq!(updates, [false, false, true, false, false, true, false]);
        assert_eq!(iterations(&c, 7), 2);
    }

    #[test]
    fn ema_momentum_zero_on_first_iteration_and_overwrite_frequency() {
        let c = RmsPropConfig::default()
            .with_use_ema(true)
            .with_ema_momentum(0.9)
            .with_ema_overwrite_frequency(3);
        assert_eq!(plan_step(&c, 0).scalars.ema_momentum, 0.0);
        assert_eq!(plan_step(&c, 1).scalars.ema_momentum, 0.9f32);
        let ow: Vec<f32> = (0..6)
            .map(|r| plan_step(&c, r).scalars.ema_overwrite)
            .collect();
        assert_eq!(ow, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn exclusion_by_substring() {
        let ex = vec!["bias".to_string()];
        assert!(!takes_weight_decay("layer1/bias", &ex));
        assert!(takes_weight_decay("layer0/kernel", &ex));
    }
}
