//! The structure of a config: which code runs (as opposed to which numbers it runs
//! with, see `plan`). A [`Variant`] keys the CPU's monomorphized loops and the GPU's
//! pipeline cache (WGSL `override` constants), and says which [`Slot`]s exist.

use crate::config::{Clipping, RmsPropConfig};
use crate::dtype::Dtype;
use crate::math::kernel;
pub(crate) use crate::slot::Slot;
use crate::state::StateDtype;

/// How gradients are clipped, without the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClipKind {
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
    pub(crate) fn needs_norm(self) -> bool {
        matches!(self, ClipKind::Norm | ClipKind::GlobalNorm)
    }

    /// The WGSL `CLIP_KIND` override value.
    pub(crate) fn code(self) -> u32 {
        match self {
            ClipKind::None => 0,
            ClipKind::Norm => 1,
            ClipKind::GlobalNorm => 2,
            ClipKind::Value => 3,
        }
    }
}

/// The options that change the code path: a small hashable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    /// `centered`.
    pub centered: bool,
    /// `momentum > 0`.
    pub momentum: bool,
    /// optax's `nesterov` (with momentum).
    pub nesterov: bool,
    /// Weight decay added to the gradient (every dialect but Keras, when
    /// `weight_decay` is set).
    pub coupled_decay: bool,
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
    /// The gradients' element type (set from [`crate::Precision`], never by a config).
    pub gradients: Dtype,
    /// How the parameters are stored (from [`crate::Precision`]).
    pub params: Dtype,
    /// 16-bit parameters rounded stochastically (from [`crate::Precision`]).
    pub stochastic_rounding: bool,
    /// bf16 parameters with remainders making them exact f32 masters.
    pub param_remainders: bool,
    /// The 16-bit copy of the parameters the update writes, if any (from
    /// [`crate::Precision`]).
    pub param_copy: Option<Dtype>,
    /// Keras' dynamic loss scaling (`LossScaleOptimizer`): set by
    /// [`crate::LossScaleOptimizer`], never by a config.
    pub loss_scaling: bool,
    /// The slot format of tensors over the size threshold (`config.state`), block size
    /// included.
    pub state: StateDtype,
    /// bf16 slots rounded stochastically.
    pub state_stochastic: bool,
    /// Param groups: the GPU reads each tensor's group (without, it never does).
    pub param_groups: bool,
}

impl Variant {
    /// The variant a config needs (guard off).
    pub(crate) fn of(config: &RmsPropConfig) -> Self {
        Variant {
            centered: config.centered,
            momentum: config.uses_momentum(),
            nesterov: config.nesterov && config.uses_momentum(),
            coupled_decay: config.dialect.coupled_decay() && config.any_weight_decay(),
            ema: config.use_ema,
            accumulate: config.gradient_accumulation_steps.is_some(),
            weight_decay: config.any_weight_decay(),
            clip: match config.clipping() {
                Clipping::None => ClipKind::None,
                Clipping::Norm(_) => ClipKind::Norm,
                Clipping::GlobalNorm(_) => ClipKind::GlobalNorm,
                Clipping::Value(_) => ClipKind::Value,
            },
            guard: false,
            gradients: Dtype::F32,
            loss_scaling: false,
            param_copy: None,
            params: Dtype::F32,
            stochastic_rounding: false,
            param_remainders: false,
            state: config.state.dtype,
            param_groups: !config.param_groups.is_empty(),
            state_stochastic: config.state.stochastic_rounding.is_some(),
        }
    }

    /// The [`kernel`] flags of the update: the const word the CPU loops are
    /// instantiated for, and (through `math::KERNEL_FLAGS`) the shader's boolean
    /// overrides.
    pub(crate) fn kernel(&self) -> u32 {
        [
            (self.centered, kernel::CENTERED),
            (self.momentum, kernel::MOMENTUM),
            (self.nesterov, kernel::NESTEROV),
            (self.ema, kernel::EMA),
            (self.accumulate, kernel::ACCUMULATE),
            (self.coupled_decay, kernel::COUPLED_DECAY),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |k, (_, flag)| k | flag)
    }

    /// [`Variant::kernel`], checked: nesterov only with momentum (a config's
    /// `nesterov` without momentum has no effect, so it never gets here).
    pub(crate) fn checked_kernel(&self) -> u32 {
        let k = self.kernel();
        debug_assert!(kernel::is_valid(k), "kernel flags {k:#x}");
        k
    }

    /// True when a step with a non-finite gradient is skipped (the non-finite guard, or
    /// loss scaling): the step is decided after a scan of the gradients, on the device
    /// on the GPU path.
    pub(crate) fn skips_non_finite(&self) -> bool {
        self.guard || self.loss_scaling
    }

    /// The type every assignment to a parameter rounds to: `params`, or f32 with
    /// remainders (the master is exact).
    pub(crate) fn param_rounding(&self) -> Dtype {
        if self.param_remainders {
            Dtype::F32
        } else {
            self.params
        }
    }

    /// `math::STORE_*`: how the CPU loops store parameters.
    pub(crate) fn param_storage(&self) -> u32 {
        self.param_rounding().code() + if self.stochastic_rounding { 2 } else { 0 }
    }

    /// The WGSL `PARAM_DTYPE`: f32, bf16, f16, or 3 for bf16 with remainders.
    pub(crate) fn param_dtype_code(&self) -> u32 {
        if self.param_remainders {
            3
        } else {
            self.params.code()
        }
    }

    /// True when this variant keeps `slot`.
    pub(crate) fn keeps(&self, slot: Slot) -> bool {
        match slot {
            Slot::Velocity => true,
            Slot::Momentum => self.momentum,
            Slot::AverageGradient => self.centered,
            Slot::Ema => self.ema,
            Slot::Accumulator => self.accumulate,
        }
    }

    /// The slots kept, in arena order.
    pub(crate) fn slots(&self) -> Vec<Slot> {
        Slot::ALL.into_iter().filter(|&s| self.keeps(s)).collect()
    }

    /// Position of `slot` among the kept slots (its run in the GPU slot buffer).
    pub(crate) fn slot_index(&self, slot: Slot) -> Option<usize> {
        self.slots().iter().position(|&s| s == slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_config_in_arena_order() {
        let c = RmsPropConfig::default()
            .with_centered(true)
            .with_gradient_accumulation_steps(2);
        let v = Variant::of(&c);
        assert_eq!(
            v.slots(),
            [Slot::Velocity, Slot::AverageGradient, Slot::Accumulator]
        );
        assert_eq!(v.slot_index(Slot::Accumulator), Some(2));
        assert_eq!(v.slot_index(Slot::Momentum), None);
        for s in Slot::ALL {
            assert_eq!(Slot::from_keras_name(s.keras_name()), Some(s));
        }
        assert_eq!(Slot::from_keras_name("velocity_hat"), None);
    }
}
