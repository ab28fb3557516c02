//! Keras' `apply()` control flow reduced to numbers: the [`StepScalars`] of the step
//! taken at a given raw step counter.
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
use crate::groups::ParamGroup;
use crate::math::{
    clipnorm_factors, global_clipnorm_factors, ClipFactors, GroupScalars, StepScalars,
};
use crate::variant::ClipKind;

/// Keras' `optimizer.iterations` for a raw counter.
pub(crate) fn iterations(config: &RmsPropConfig, raw: u64) -> u64 {
    match config.gradient_accumulation_steps {
        Some(n) if n > 0 => raw / n,
        _ => raw,
    }
}

/// Per-tensor clip factors from per-tensor sums of squared effective gradients:
/// `clipnorm` per tensor, or `global_clipnorm` from their total.
pub(crate) fn clip_factors(clip: ClipKind, sums: &[f64], s: &StepScalars) -> Vec<ClipFactors> {
    match clip {
        ClipKind::Norm => sums
            .iter()
            .map(|&ss| clipnorm_factors(ss as f32, s.clip_norm))
            .collect(),
        _ => {
            let total: f64 = sums.iter().sum();
            let f = global_clipnorm_factors(total as f32, s.clip_norm, s.inv_clip_norm);
            vec![f; sums.len()]
        }
    }
}

/// The numbers a [`ParamGroup`] may change, as the plan reads them.
struct Hyper {
    learning_rate: f32,
    rho: f64,
    epsilon: f64,
    momentum: f64,
    weight_decay: Option<f64>,
}

impl Hyper {
    /// The config's own numbers at raw step `raw`.
    fn of(config: &RmsPropConfig, raw: u64) -> Hyper {
        Hyper {
            learning_rate: config.learning_rate.at(raw),
            rho: config.rho,
            epsilon: config.epsilon,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
        }
    }

    /// `group`'s numbers at raw step `raw` (the config's where it sets none).
    fn of_group(config: &RmsPropConfig, group: &ParamGroup, raw: u64) -> Hyper {
        let learning_rate = match (&group.learning_rate, group.learning_rate_multiplier) {
            (Some(own), _) => own.at(raw),
            (None, Some(m)) => (config.learning_rate.at_f64(raw) * m) as f32,
            (None, None) => config.learning_rate.at(raw),
        };
        Hyper {
            learning_rate,
            rho: group.rho.unwrap_or(config.rho),
            epsilon: group.epsilon.unwrap_or(config.epsilon),
            momentum: group.momentum.unwrap_or(config.momentum),
            weight_decay: group.weight_decay_or(config.weight_decay),
        }
    }
}

/// The numbers of the step taken when the raw counter is `raw`.
pub(crate) fn plan_step(config: &RmsPropConfig, raw: u64) -> StepScalars {
    plan_with(config, raw, Hyper::of(config, raw))
}

/// Each param group's numbers for the step taken when the raw counter is `raw`
/// (`param_groups` order: group `g` of the tensor table is entry `g - 1`).
pub(crate) fn plan_groups(config: &RmsPropConfig, raw: u64) -> Vec<GroupScalars> {
    config
        .param_groups
        .iter()
        .map(|g| GroupScalars::of(&plan_with(config, raw, Hyper::of_group(config, g, raw))))
        .collect()
}

fn plan_with(config: &RmsPropConfig, raw: u64, hyper: Hyper) -> StepScalars {
    let learning_rate = hyper.learning_rate;
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
        Some(f) if config.use_ema && f > 0 => ((iters + 1).is_multiple_of(f) as u8 as f32, 1),
        _ => (0.0, 0),
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
    let epsilon = hyper.epsilon as f32;
    let (epsilon, epsilon_outside) = if config.eps_in_sqrt {
        (epsilon, 0.0)
    } else {
        (0.0, epsilon)
    };
    let (increment_scale, update_scale) = if config.dialect.scales_update() {
        (1.0, learning_rate)
    } else {
        (learning_rate, 1.0)
    };
    let bias = bias_correction(config, hyper.rho, iters);
    StepScalars {
        learning_rate,
        rho: hyper.rho as f32,
        one_minus_rho: (1.0 - hyper.rho) as f32,
        epsilon,
        momentum: hyper.momentum as f32,
        weight_decay: hyper.weight_decay.unwrap_or(0.0) as f32,
        loss_scale: config.loss_scale_factor.unwrap_or(1.0) as f32,
        accumulation_steps: config.gradient_accumulation_steps.unwrap_or(1) as f32,
        clip_value,
        clip_norm,
        inv_clip_norm,
        ema_momentum,
        ema_overwrite,
        ema_overwrite_enabled,
        is_update_step: is_update_step as u32,
        param_storage: 0,
        rounding_seed: 0,
        rounding_step: raw as u32,
        state_seed: config.state.rounding_seed(),
        increment_scale,
        update_scale,
        epsilon_outside,
        bias_correction: bias,
        inverse_bias_correction: 1.0 / bias,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
        gradient_sign: if config.maximize { -1.0 } else { 1.0 },
    }
}

/// optax's bias correction after `iterations` updates: the moments are divided by
/// `1 - decay^count` (count = iterations + 1, its `safe_increment`ed int32 count,
/// computed in f32 as JAX does); exactly 1 without it.
fn bias_correction(config: &RmsPropConfig, rho: f64, iterations: u64) -> f32 {
    if !config.bias_correction {
        return 1.0;
    }
    let count = (iterations + 1).min(i32::MAX as u64) as f32;
    1.0 - (rho as f32).powf(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_updates_every_nth_raw_step() {
        let c = RmsPropConfig::default().with_gradient_accumulation_steps(3);
        let updates: Vec<u32> = (0..7).map(|r| plan_step(&c, r).is_update_step).collect();
        assert_eq!(updates, [0, 0, 1, 0, 0, 1, 0]);
        assert_eq!(iterations(&c, 7), 2);
    }

    #[test]
    fn ema_momentum_zero_on_first_iteration_and_overwrite_frequency() {
        let c = RmsPropConfig::default()
            .with_use_ema(true)
            .with_ema_momentum(0.9)
            .with_ema_overwrite_frequency(3);
        assert_eq!(plan_step(&c, 0).ema_momentum, 0.0);
        assert_eq!(plan_step(&c, 1).ema_momentum, 0.9f32);
        let ow: Vec<f32> = (0..6).map(|r| plan_step(&c, r).ema_overwrite).collect();
        assert_eq!(ow, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn a_group_changes_only_its_numbers() {
        use crate::math::with_group;
        let c = RmsPropConfig::torch()
            .with_learning_rate(0.01)
            .with_momentum(0.9)
            .with_param_group(ParamGroup::new(["a"]))
            .with_param_group(
                ParamGroup::new(["b"])
                    .with_learning_rate_multiplier(0.1)
                    .with_rho(0.5)
                    .with_epsilon(1e-3)
                    .with_momentum(0.5)
                    .with_weight_decay(0.25),
            )
            .with_param_group(ParamGroup::new(["c"]).with_learning_rate(0.002));
        let s = plan_step(&c, 4);
        let g = plan_groups(&c, 4);
        // a group that changes nothing is the step's plan, bit for bit
        assert_eq!(with_group(&s, &g[0]), s);
        let b = with_group(&s, &g[1]);
        assert_eq!(
            (b.rho, b.one_minus_rho, b.epsilon_outside),
            (0.5, 0.5, 1e-3)
        );
        assert_eq!((b.momentum, b.weight_decay), (0.5, 0.25));
        assert_eq!(b.update_scale, (0.01f64 * 0.1) as f32); // PyTorch scales the buffer
        assert_eq!(b.learning_rate, b.update_scale);
        assert_eq!(with_group(&s, &g[2]).learning_rate, 0.002f32);
        assert_eq!(GroupScalars::of(&b), g[1]);
    }
}
