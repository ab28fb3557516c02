//! Keras' `LossScaleOptimizer` around [`RmsProp`]: dynamic loss scaling, decided where
//! the step runs (on the GPU, on the device, with no host sync per step).

use serde_json::{json, Value};

use crate::backend::LossScaling;
use crate::config::RmsPropConfig;
use crate::dtype::{GradientElement, Precision};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::json::{float, Fields};
use crate::math::LossScaleState;
use crate::optimizer::RmsProp;
use crate::variable::Variable;
use crate::Backend;

/// `LossScaleOptimizer`'s arguments: `initial_scale` (Keras' default 2^15) and
/// `dynamic_growth_steps` (2000).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleConfig {
    /// The scale the first step's gradients are divided by (a positive finite float).
    pub initial_scale: f32,
    /// Finite steps in a row after which the scale doubles (at least 1).
    pub dynamic_growth_steps: u32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            initial_scale: 32768.0,
            dynamic_growth_steps: 2000,
        }
    }
}

const KEYS: [&str; 4] = [
    "name",
    "inner_optimizer",
    "initial_scale",
    "dynamic_growth_steps",
];

impl LossScaleConfig {
    /// Refuses a scale that is not positive and finite, and zero growth steps.
    pub fn validate(&self) -> Result<()> {
        if !(self.initial_scale.is_finite() && self.initial_scale > 0.0) {
            return Err(Error::invalid(
                "initial_scale",
                format!("must be positive and finite, got {}", self.initial_scale),
            ));
        }
        if self.dynamic_growth_steps == 0 {
            return Err(Error::invalid("dynamic_growth_steps", "must be at least 1"));
        }
        Ok(())
    }

    /// Keras' `LossScaleOptimizer.get_config()` with `inner` as the inner optimizer
    /// (serialized as `keras.optimizers.RMSprop`).
    pub fn to_keras_json(&self, inner: &RmsPropConfig) -> Result<Value> {
        Ok(json!({
            "name": "loss_scale_optimizer",
            "inner_optimizer": {
                "module": "keras.optimizers",
                "class_name": "RMSprop",
                "config": inner.to_json()?,
                "registered_name": null,
            },
            "initial_scale": float(f64::from(self.initial_scale)),
            "dynamic_growth_steps": self.dynamic_growth_steps,
        }))
    }

    /// Reads a `LossScaleOptimizer.get_config()`: this config and the inner optimizer's
    /// (given serialized, `{"class_name": "RMSprop", "config": {...}}`, or as its bare
    /// config). Unknown keys, another inner class and bad values are typed errors.
    pub fn from_keras_json(v: &Value) -> Result<(LossScaleConfig, RmsPropConfig)> {
        let f = Fields::new(v, "", &KEYS)?;
        let d = LossScaleConfig::default();
        let inner = f
            .value("inner_optimizer")
            .ok_or_else(|| Error::MissingKey("inner_optimizer".into()))?;
        let inner = match inner.get("class_name") {
            None => inner,
            Some(Value::String(c)) if c == "RMSprop" => inner
                .get("config")
                .ok_or_else(|| Error::MissingKey("inner_optimizer.config".into()))?,
            Some(other) => {
                return Err(Error::invalid(
                    "inner_optimizer",
                    format!("must be an RMSprop, got {other}"),
                ))
            }
        };
        let inner = RmsPropConfig::from_json(inner)?;
        let steps = f
            .opt_i64("dynamic_growth_steps")?
            .unwrap_or(i64::from(d.dynamic_growth_steps));
        let config = LossScaleConfig {
            initial_scale: f.f64_or("initial_scale", f64::from(d.initial_scale))? as f32,
            dynamic_growth_steps: u32::try_from(steps).map_err(|_| {
                Error::invalid(
                    "dynamic_growth_steps",
                    format!("must be between 1 and {}, got {steps}", u32::MAX),
                )
            })?,
        };
        config.validate()?;
        Ok((config, inner))
    }
}

/// Keras' `LossScaleOptimizer` wrapping an [`RmsProp`]: each step's gradients arrive
/// multiplied by the loss scale ([`LossScaleOptimizer::scale_loss`] multiplies your
/// loss). A step with a NaN or infinite gradient is skipped (parameters, slots and
/// `iterations` unchanged) and halves the scale; a finite step divides the gradients by
/// the scale, applies them, and doubles the scale after `dynamic_growth_steps` finite
/// steps in a row. On the GPU path the decision and the scale live on the device (no
/// readback per step); [`LossScaleOptimizer::loss_scale`] reads the scale as last
/// reported, never stalling a step.
///
/// ```
/// use fused_rmsprop::{Backend, LossScaleConfig, LossScaleOptimizer, RmsProp, RmsPropConfig, Variable};
/// let var = Variable::new("x", &[2], vec![1.0, 2.0]).unwrap();
/// let inner = RmsProp::with_backend(RmsPropConfig::default(), vec![var], Backend::Cpu).unwrap();
/// let config = LossScaleConfig { initial_scale: 1024.0, dynamic_growth_steps: 2 };
/// let mut opt = LossScaleOptimizer::new(inner, config).unwrap();
/// opt.apply_gradients(&[Some(&[f32::INFINITY, 1.0][..])]).unwrap(); // an overflow: skipped
/// assert_eq!((opt.iterations(), opt.loss_scale()), (0, 512.0));
/// opt.apply_gradients(&[Some(&[512.0, -512.0][..])]).unwrap();
/// opt.apply_gradients(&[Some(&[512.0, -512.0][..])]).unwrap();
/// assert_eq!((opt.iterations(), opt.loss_scale()), (2, 1024.0)); // two finite steps: doubled
/// ```
#[derive(Debug)]
pub struct LossScaleOptimizer {
    inner: RmsProp,
    config: LossScaleConfig,
}

impl LossScaleOptimizer {
    /// Wraps `inner`, starting at `config.initial_scale`. Refused
    /// ([`Error::InvalidConfig`]) when the config is invalid or the inner optimizer has a
    /// `loss_scale_factor` (Keras turns it off; here it must be unset).
    pub fn new(mut inner: RmsProp, config: LossScaleConfig) -> Result<Self> {
        config.validate()?;
        if inner.config().loss_scale_factor.is_some() {
            return Err(Error::invalid(
                "loss_scale_factor",
                "the optimizer inside a LossScaleOptimizer must not set one (Keras disables it: the gradients would be unscaled twice)",
            ));
        }
        inner.set_loss_scaling(Some(LossScaling {
            state: LossScaleState {
                scale: config.initial_scale,
                counter: 0,
            },
            growth_steps: config.dynamic_growth_steps,
            initial_scale: config.initial_scale,
        }))?;
        Ok(LossScaleOptimizer { inner, config })
    }

    /// Builds the inner optimizer and the wrapper from a `LossScaleOptimizer.get_config()`
    /// JSON (see [`LossScaleConfig::from_keras_json`]).
    pub fn from_keras_json(
        config: &Value,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> Result<Self> {
        let (scaling, inner) = LossScaleConfig::from_keras_json(config)?;
        let inner = RmsProp::with_precision(inner, variables, backend, gpu, precision)?;
        Self::new(inner, scaling)
    }

    /// Saves the inner optimizer's state and the loss scale (see
    /// [`RmsProp::save_checkpoint`]; native only: in a browser, await
    /// [`RmsProp::checkpoint_bytes_async`] on [`LossScaleOptimizer::inner`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.inner.save_checkpoint(path)
    }

    /// Restores a checkpoint of a `LossScaleOptimizer` with the same variables, config
    /// and `dynamic_growth_steps`: its variables, slots, counters and loss scale. Any
    /// mismatch is a typed error that changes nothing.
    pub fn restore_checkpoint(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.inner.restore_checkpoint(path)
    }

    /// Builds the optimizer from a checkpoint of a `LossScaleOptimizer` alone, on
    /// `backend` (a plain optimizer's checkpoint is refused).
    pub fn load_checkpoint(
        path: impl AsRef<std::path::Path>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (inner, scaling) = RmsProp::load_parts(path, backend, gpu)?;
        let Some(scaling) = scaling else {
            return Err(Error::Checkpoint {
                path: path.display().to_string(),
                reason: "the checkpoint has no loss scaling: load it with RmsProp::load_checkpoint"
                    .into(),
            });
        };
        let config = LossScaleConfig {
            initial_scale: scaling.initial_scale,
            dynamic_growth_steps: scaling.growth_steps,
        };
        config.validate()?;
        Ok(LossScaleOptimizer { inner, config })
    }

    /// Keras' `get_config()` (see [`LossScaleConfig::to_keras_json`]).
    pub fn to_keras_json(&self) -> Result<Value> {
        self.config.to_keras_json(self.inner.config())
    }

    /// The arguments.
    pub fn config(&self) -> &LossScaleConfig {
        &self.config
    }

    /// The inner optimizer: variables, slots, `iterations`, checkpoints.
    pub fn inner(&self) -> &RmsProp {
        &self.inner
    }

    /// The inner optimizer, mutably; steps applied through it are loss-scaled too.
    pub fn inner_mut(&mut self) -> &mut RmsProp {
        &mut self.inner
    }

    /// The inner optimizer alone, loss scaling off (after the steps in flight).
    pub fn into_inner(mut self) -> Result<RmsProp> {
        self.inner.set_loss_scaling(None)?;
        Ok(self.inner)
    }

    /// The dynamic scale as known now, never waiting: on the GPU path, as of the last
    /// step whose outcome came back (exact after [`RmsProp::synchronize`]).
    pub fn loss_scale(&self) -> f32 {
        self.state().scale
    }

    /// The scale and the count of finite steps since it last changed, as known now.
    pub fn state(&self) -> LossScaleState {
        self.inner
            .loss_scaling()
            .map(|ls| ls.state)
            .unwrap_or(LossScaleState {
                scale: self.config.initial_scale,
                counter: 0,
            })
    }

    /// `loss * scale` (Keras' `scale_loss`), with the scale as known now.
    pub fn scale_loss(&self, loss: f32) -> f32 {
        loss * self.loss_scale()
    }

    /// Applied steps (Keras: the inner optimizer's `iterations`); skipped steps do not
    /// count. Waits for the steps in flight on the GPU path.
    pub fn iterations(&self) -> u64 {
        self.inner.iterations()
    }

    /// One loss-scaled step on host gradients (see [`RmsProp::apply_gradients`]).
    pub fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        self.inner.apply_gradients(grads)
    }

    /// One loss-scaled step on gradients of any [`GradientElement`] type (see
    /// [`RmsProp::apply_typed_gradients`]).
    pub fn apply_typed_gradients<T: GradientElement>(
        &mut self,
        grads: &[Option<&[T]>],
    ) -> Result<()> {
        self.inner.apply_typed_gradients(grads)
    }

    /// One loss-scaled step on gradients already in the GPU's gradient buffers (see
    /// [`RmsProp::apply_device_gradients`]).
    pub fn apply_device_gradients(&mut self, present: &[bool]) -> Result<()> {
        self.inner.apply_device_gradients(present)
    }
}
