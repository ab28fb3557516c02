//! Learning rates: a constant, Keras' built-in schedules with their exact formulas,
//! and a trait for your own.
//!
//! Schedules are evaluated at the optimizer's raw step counter (before the division
//! by `gradient_accumulation_steps`), as Keras does. Formulas are computed in `f64`
//! and rounded to `f32` once; Keras computes them in `float32`, a difference far
//! below the conformance tolerance.

use std::f64::consts::PI;
use std::fmt::Debug;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::json::{float, int_or_float, Fields};

/// A user-defined learning-rate schedule.
///
/// ```
/// use fused_rmsprop::LearningRateSchedule;
/// #[derive(Debug)]
/// struct Halving;
/// impl LearningRateSchedule for Halving {
///     fn learning_rate(&self, step: u64) -> f64 { 0.1 * 0.5f64.powi(step as i32 / 100) }
/// }
/// assert_eq!(Halving.learning_rate(150), 0.05);
/// ```
pub trait LearningRateSchedule: Send + Sync + Debug {
    /// The learning rate at raw step `step` (0 for the first step).
    fn learning_rate(&self, step: u64) -> f64;
    /// The Keras serialization (`{"module", "class_name", "config", "registered_name"}`),
    /// if this schedule has one; `None` makes `to_keras_json` refuse the config.
    fn keras_config(&self) -> Option<Value> {
        None
    }
}

/// `keras.optimizers.schedules.ExponentialDecay`: `lr0 * rate^(step / decay_steps)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExponentialDecay {
    /// `initial_learning_rate`.
    pub initial_learning_rate: f64,
    /// `decay_steps` (> 0).
    pub decay_steps: f64,
    /// `decay_rate`.
    pub decay_rate: f64,
    /// Floor the exponent.
    pub staircase: bool,
    /// Keras name, default `"ExponentialDecay"`.
    pub name: String,
}

/// `keras.optimizers.schedules.PiecewiseConstantDecay`: `values[i]` on the i-th interval,
/// intervals closed on the right (`step <= boundaries[0]` gives `values[0]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PiecewiseConstantDecay {
    /// `boundaries`, increasing.
    pub boundaries: Vec<f64>,
    /// `values`, one more than boundaries.
    pub values: Vec<f64>,
    /// Keras name, default `"PiecewiseConstant"`.
    pub name: String,
}

/// `keras.optimizers.schedules.PolynomialDecay`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolynomialDecay {
    /// `initial_learning_rate`.
    pub initial_learning_rate: f64,
    /// `decay_steps` (> 0).
    pub decay_steps: f64,
    /// `end_learning_rate`, default 0.0001.
    pub end_learning_rate: f64,
    /// `power`, default 1.
    pub power: f64,
    /// Restart after `decay_steps` with a longer period.
    pub cycle: bool,
    /// Keras name, default `"PolynomialDecay"`.
    pub name: String,
}

/// `keras.optimizers.schedules.InverseTimeDecay`: `lr0 / (1 + rate * step / decay_steps)`.
#[derive(Debug, Clone, PartialEq)]
pub struct InverseTimeDecay {
    /// `initial_learning_rate`.
    pub initial_learning_rate: f64,
    /// `decay_steps` (> 0).
    pub decay_steps: f64,
    /// `decay_rate`.
    pub decay_rate: f64,
    /// Floor `step / decay_steps`.
    pub staircase: bool,
    /// Keras name, default `"InverseTimeDecay"`.
    pub name: String,
}

/// `keras.optimizers.schedules.CosineDecay`, with optional linear warmup.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineDecay {
    /// `initial_learning_rate` (the warmup start when warming up).
    pub initial_learning_rate: f64,
    /// `decay_steps` (> 0).
    pub decay_steps: f64,
    /// `alpha`: the floor as a fraction, default 0.
    pub alpha: f64,
    /// Keras name, default `"CosineDecay"`.
    pub name: String,
    /// `warmup_target`: `None` disables warmup.
    pub warmup_target: Option<f64>,
    /// `warmup_steps`, default 0.
    pub warmup_steps: f64,
}

/// `keras.optimizers.schedules.CosineDecayRestarts` (SGDR).
#[derive(Debug, Clone, PartialEq)]
pub struct CosineDecayRestarts {
    /// `initial_learning_rate`.
    pub initial_learning_rate: f64,
    /// `first_decay_steps` (> 0).
    pub first_decay_steps: f64,
    /// `t_mul`, default 2.
    pub t_mul: f64,
    /// `m_mul`, default 1.
    pub m_mul: f64,
    /// `alpha`, default 0.
    pub alpha: f64,
    /// Keras name, default `"SGDRDecay"`.
    pub name: String,
}

impl ExponentialDecay {
    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        let mut p = step / self.decay_steps;
        if self.staircase {
            p = p.floor();
        }
        self.initial_learning_rate * self.decay_rate.powf(p)
    }
}

impl PiecewiseConstantDecay {
    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        for (b, v) in self.boundaries.iter().zip(&self.values) {
            if step <= *b {
                return *v;
            }
        }
        self.values.last().copied().unwrap_or(0.0)
    }
}

impl PolynomialDecay {
    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        let mut decay_steps = self.decay_steps;
        let mut step = step;
        if self.cycle {
            let multiplier = if step == 0.0 {
                1.0
            } else {
                (step / decay_steps).ceil()
            };
            decay_steps *= multiplier;
        } else {
            step = step.min(decay_steps);
        }
        let p = step / decay_steps;
        (self.initial_learning_rate - self.end_learning_rate) * (1.0 - p).powf(self.power)
            + self.end_learning_rate
    }
}

impl InverseTimeDecay {
    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        let mut p = step / self.decay_steps;
        if self.staircase {
            p = p.floor();
        }
        self.initial_learning_rate / (1.0 + self.decay_rate * p)
    }
}

impl CosineDecay {
    fn decay(&self, step: f64, from: f64) -> f64 {
        let completed = step / self.decay_steps;
        let cosine = 0.5 * (1.0 + (PI * completed).cos());
        from * ((1.0 - self.alpha) * cosine + self.alpha)
    }

    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        match self.warmup_target {
            None => self.decay(step.min(self.decay_steps), self.initial_learning_rate),
            Some(target) => {
                let step = step.min(self.decay_steps + self.warmup_steps);
                if step < self.warmup_steps {
                    let completed = step / self.warmup_steps;
                    (target - self.initial_learning_rate) * completed + self.initial_learning_rate
                } else {
                    self.decay(step - self.warmup_steps, target)
                }
            }
        }
    }
}

impl CosineDecayRestarts {
    /// Keras formula.
    pub fn at(&self, step: f64) -> f64 {
        let mut completed = step / self.first_decay_steps;
        let t_mul = self.t_mul;
        let i_restart;
        if t_mul == 1.0 {
            i_restart = completed.floor();
            completed -= i_restart;
        } else {
            i_restart = ((1.0 - completed * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
            let sum_r = (1.0 - t_mul.powf(i_restart)) / (1.0 - t_mul);
            completed = (completed - sum_r) / t_mul.powf(i_restart);
        }
        let m_fac = self.m_mul.powf(i_restart);
        let cosine = 0.5 * m_fac * (1.0 + (PI * completed).cos());
        self.initial_learning_rate * ((1.0 - self.alpha) * cosine + self.alpha)
    }
}

/// One of Keras' built-in schedules.
#[derive(Debug, Clone, PartialEq)]
pub enum KerasSchedule {
    /// `ExponentialDecay`.
    Exponential(ExponentialDecay),
    /// `PiecewiseConstantDecay`.
    PiecewiseConstant(PiecewiseConstantDecay),
    /// `PolynomialDecay`.
    Polynomial(PolynomialDecay),
    /// `InverseTimeDecay`.
    InverseTime(InverseTimeDecay),
    /// `CosineDecay`.
    Cosine(CosineDecay),
    /// `CosineDecayRestarts`.
    CosineRestarts(CosineDecayRestarts),
}

const SCHEDULE_MODULE: &str = "keras.optimizers.schedules";

/// The fields `ExponentialDecay` and `InverseTimeDecay` share, in Keras' order.
struct RateDecay {
    initial_learning_rate: f64,
    decay_steps: f64,
    decay_rate: f64,
    staircase: bool,
    name: String,
}

impl RateDecay {
    const KEYS: [&'static str; 5] = [
        "initial_learning_rate",
        "decay_steps",
        "decay_rate",
        "staircase",
        "name",
    ];

    fn read(cfg: &Value, default_name: &str) -> Result<Self> {
        let f = Fields::new(cfg, "learning_rate.config", &Self::KEYS)?;
        Ok(RateDecay {
            initial_learning_rate: f.req_f64("initial_learning_rate")?,
            decay_steps: f.req_f64("decay_steps")?,
            decay_rate: f.req_f64("decay_rate")?,
            staircase: f.bool_or("staircase", false)?,
            name: f.string_or("name", default_name)?,
        })
    }

    fn write(
        initial: f64,
        decay_steps: f64,
        decay_rate: f64,
        staircase: bool,
        name: &str,
    ) -> Value {
        json!({
            "initial_learning_rate": float(initial),
            "decay_steps": int_or_float(decay_steps),
            "decay_rate": float(decay_rate),
            "staircase": staircase,
            "name": name,
        })
    }
}

impl KerasSchedule {
    /// The learning rate at raw step `step`.
    pub fn at(&self, step: u64) -> f64 {
        let s = step as f64;
        match self {
            KerasSchedule::Exponential(x) => x.at(s),
            KerasSchedule::PiecewiseConstant(x) => x.at(s),
            KerasSchedule::Polynomial(x) => x.at(s),
            KerasSchedule::InverseTime(x) => x.at(s),
            KerasSchedule::Cosine(x) => x.at(s),
            KerasSchedule::CosineRestarts(x) => x.at(s),
        }
    }

    /// Keras' class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            KerasSchedule::Exponential(_) => "ExponentialDecay",
            KerasSchedule::PiecewiseConstant(_) => "PiecewiseConstantDecay",
            KerasSchedule::Polynomial(_) => "PolynomialDecay",
            KerasSchedule::InverseTime(_) => "InverseTimeDecay",
            KerasSchedule::Cosine(_) => "CosineDecay",
            KerasSchedule::CosineRestarts(_) => "CosineDecayRestarts",
        }
    }

    /// Checks the arguments Keras would refuse (or that would divide by zero).
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(
                    &format!("learning_rate.config.{field}"),
                    format!("must be > 0, got {v}"),
                ))
            }
        };
        match self {
            KerasSchedule::Exponential(x) => positive("decay_steps", x.decay_steps),
            KerasSchedule::Polynomial(x) => positive("decay_steps", x.decay_steps),
            KerasSchedule::InverseTime(x) => positive("decay_steps", x.decay_steps),
            KerasSchedule::Cosine(x) => {
                positive("decay_steps", x.decay_steps)?;
                if x.warmup_steps < 0.0 || !x.warmup_steps.is_finite() {
                    return Err(Error::invalid(
                        "learning_rate.config.warmup_steps",
                        format!("must be >= 0, got {}", x.warmup_steps),
                    ));
                }
                Ok(())
            }
            KerasSchedule::CosineRestarts(x) => positive("first_decay_steps", x.first_decay_steps),
            KerasSchedule::PiecewiseConstant(x) => {
                if x.values.len() != x.boundaries.len() + 1 {
                    return Err(Error::invalid(
                        "learning_rate.config.values",
                        format!(
                            "must have one more element than `boundaries` ({} boundaries, {} values)",
                            x.boundaries.len(),
                            x.values.len()
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Reads Keras' serialization: `{"module", "class_name", "config", "registered_name"}`.
    pub fn from_keras_json(v: &Value) -> Result<Self> {
        let outer = Fields::new(
            v,
            "learning_rate",
            &["module", "class_name", "config", "registered_name"],
        )?;
        let class = outer.string_or("class_name", "")?;
        if class.is_empty() {
            return Err(Error::MissingKey("learning_rate.class_name".into()));
        }
        let cfg = outer
            .value("config")
            .ok_or_else(|| Error::MissingKey("learning_rate.config".into()))?;
        let ctx = "learning_rate.config";
        let schedule = match class.as_str() {
            "ExponentialDecay" => {
                let d = RateDecay::read(cfg, "ExponentialDecay")?;
                KerasSchedule::Exponential(ExponentialDecay {
                    initial_learning_rate: d.initial_learning_rate,
                    decay_steps: d.decay_steps,
                    decay_rate: d.decay_rate,
                    staircase: d.staircase,
                    name: d.name,
                })
            }
            "PiecewiseConstantDecay" => {
                let f = Fields::new(cfg, ctx, &["boundaries", "values", "name"])?;
                KerasSchedule::PiecewiseConstant(PiecewiseConstantDecay {
                    boundaries: f.req_f64_list("boundaries")?,
                    values: f.req_f64_list("values")?,
                    name: f.string_or("name", "PiecewiseConstant")?,
                })
            }
            "PolynomialDecay" => {
                let f = Fields::new(
                    cfg,
                    ctx,
                    &[
                        "initial_learning_rate",
                        "decay_steps",
                        "end_learning_rate",
                        "power",
                        "cycle",
                        "name",
                    ],
                )?;
                KerasSchedule::Polynomial(PolynomialDecay {
                    initial_learning_rate: f.req_f64("initial_learning_rate")?,
                    decay_steps: f.req_f64("decay_steps")?,
                    end_learning_rate: f.f64_or("end_learning_rate", 0.0001)?,
                    power: f.f64_or("power", 1.0)?,
                    cycle: f.bool_or("cycle", false)?,
                    name: f.string_or("name", "PolynomialDecay")?,
                })
            }
            "InverseTimeDecay" => {
                let d = RateDecay::read(cfg, "InverseTimeDecay")?;
                KerasSchedule::InverseTime(InverseTimeDecay {
                    initial_learning_rate: d.initial_learning_rate,
                    decay_steps: d.decay_steps,
                    decay_rate: d.decay_rate,
                    staircase: d.staircase,
                    name: d.name,
                })
            }
            "CosineDecay" => {
                let f = Fields::new(
                    cfg,
                    ctx,
                    &[
                        "initial_learning_rate",
                        "decay_steps",
                        "alpha",
                        "name",
                        "warmup_target",
                        "warmup_steps",
                    ],
                )?;
                KerasSchedule::Cosine(CosineDecay {
                    initial_learning_rate: f.req_f64("initial_learning_rate")?,
                    decay_steps: f.req_f64("decay_steps")?,
                    alpha: f.f64_or("alpha", 0.0)?,
                    name: f.string_or("name", "CosineDecay")?,
                    warmup_target: f.opt_f64("warmup_target")?,
                    warmup_steps: f.f64_or("warmup_steps", 0.0)?,
                })
            }
            "CosineDecayRestarts" => {
                let f = Fields::new(
                    cfg,
                    ctx,
                    &[
                        "initial_learning_rate",
                        "first_decay_steps",
                        "t_mul",
                        "m_mul",
                        "alpha",
                        "name",
                    ],
                )?;
                KerasSchedule::CosineRestarts(CosineDecayRestarts {
                    initial_learning_rate: f.req_f64("initial_learning_rate")?,
                    first_decay_steps: f.req_f64("first_decay_steps")?,
                    t_mul: f.f64_or("t_mul", 2.0)?,
                    m_mul: f.f64_or("m_mul", 1.0)?,
                    alpha: f.f64_or("alpha", 0.0)?,
                    name: f.string_or("name", "SGDRDecay")?,
                })
            }
            other => return Err(Error::UnknownSchedule(other.to_string())),
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// Writes Keras' serialization, keys in Keras' order.
    pub fn to_keras_json(&self) -> Value {
        let config = match self {
            KerasSchedule::Exponential(x) => RateDecay::write(
                x.initial_learning_rate,
                x.decay_steps,
                x.decay_rate,
                x.staircase,
                &x.name,
            ),
            KerasSchedule::PiecewiseConstant(x) => json!({
                "boundaries": x.boundaries.iter().map(|b| int_or_float(*b)).collect::<Vec<_>>(),
                "values": x.values.iter().map(|v| float(*v)).collect::<Vec<_>>(),
                "name": x.name,
            }),
            KerasSchedule::Polynomial(x) => json!({
                "initial_learning_rate": float(x.initial_learning_rate),
                "decay_steps": int_or_float(x.decay_steps),
                "end_learning_rate": float(x.end_learning_rate),
                "power": float(x.power),
                "cycle": x.cycle,
                "name": x.name,
            }),
            KerasSchedule::InverseTime(x) => RateDecay::write(
                x.initial_learning_rate,
                x.decay_steps,
                x.decay_rate,
                x.staircase,
                &x.name,
            ),
            KerasSchedule::Cosine(x) => json!({
                "initial_learning_rate": float(x.initial_learning_rate),
                "decay_steps": int_or_float(x.decay_steps),
                "alpha": float(x.alpha),
                "name": x.name,
                "warmup_target": x.warmup_target.map_or(Value::Null, float),
                "warmup_steps": int_or_float(x.warmup_steps),
            }),
            KerasSchedule::CosineRestarts(x) => json!({
                "initial_learning_rate": float(x.initial_learning_rate),
                "first_decay_steps": int_or_float(x.first_decay_steps),
                "t_mul": float(x.t_mul),
                "m_mul": float(x.m_mul),
                "alpha": float(x.alpha),
                "name": x.name,
            }),
        };
        json!({
            "module": SCHEDULE_MODULE,
            "class_name": self.class_name(),
            "config": config,
            "registered_name": Value::Null,
        })
    }
}

impl LearningRateSchedule for KerasSchedule {
    fn learning_rate(&self, step: u64) -> f64 {
        self.at(step)
    }
    fn keras_config(&self) -> Option<Value> {
        Some(self.to_keras_json())
    }
}

/// Keras' `learning_rate` argument: a float or a schedule.
#[derive(Debug, Clone)]
pub enum LearningRate {
    /// A fixed learning rate (Keras stores it as a float32 variable).
    Constant(f64),
    /// One of Keras' built-in schedules.
    Keras(KerasSchedule),
    /// Your own schedule.
    Custom(Arc<dyn LearningRateSchedule>),
}

impl PartialEq for LearningRate {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (LearningRate::Constant(a), LearningRate::Constant(b)) => a == b,
            (LearningRate::Keras(a), LearningRate::Keras(b)) => a == b,
            (LearningRate::Custom(a), LearningRate::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl LearningRate {
    /// The learning rate at raw step `step`, rounded to f32 as the kernels use it.
    pub fn at(&self, step: u64) -> f32 {
        self.at_f64(step) as f32
    }

    /// The learning rate at raw step `step` before its rounding to f32 (a param group's
    /// multiplier scales this).
    pub(crate) fn at_f64(&self, step: u64) -> f64 {
        match self {
            LearningRate::Constant(x) => *x,
            LearningRate::Keras(s) => s.at(step),
            LearningRate::Custom(s) => s.learning_rate(step),
        }
    }

    /// Reads a learning rate from JSON: a number, or a serialized Keras schedule
    /// (`field` names it in errors).
    pub(crate) fn from_json(v: &Value, field: &str) -> Result<Self> {
        match v {
            Value::Number(n) => Ok(LearningRate::Constant(n.as_f64().unwrap_or(f64::NAN))),
            s @ Value::Object(_) => Ok(LearningRate::Keras(KerasSchedule::from_keras_json(s)?)),
            other => Err(Error::WrongType {
                field: field.into(),
                expected: "a number or a serialized schedule",
                found: crate::json::describe(other),
            }),
        }
    }

    /// The JSON [`LearningRate::from_json`] reads: a float as given, a schedule as Keras
    /// serializes it; a custom schedule without a Keras serialization is refused
    /// (`field` names it).
    pub(crate) fn to_json(&self, field: &str) -> Result<Value> {
        match self {
            LearningRate::Constant(x) => Ok(float(*x)),
            LearningRate::Keras(s) => Ok(s.to_keras_json()),
            LearningRate::Custom(s) => s.keras_config().ok_or_else(|| {
                Error::invalid(field, "this custom schedule has no Keras serialization")
            }),
        }
    }
}

impl From<f64> for LearningRate {
    fn from(x: f64) -> Self {
        LearningRate::Constant(x)
    }
}

impl From<KerasSchedule> for LearningRate {
    fn from(s: KerasSchedule) -> Self {
        LearningRate::Keras(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 + 1e-9 * b.abs(), "{a} vs {b}");
    }

    #[test]
    fn exponential_decay_formula() {
        let mut s = ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 2.0,
            decay_rate: 0.5,
            staircase: false,
            name: "ExponentialDecay".into(),
        };
        // 0.1 * 0.5^(3/2)
        close(s.at(3.0), 0.1 * 0.5f64.powf(1.5));
        s.staircase = true;
        close(s.at(3.0), 0.05);
    }

    #[test]
    fn piecewise_constant_intervals_closed_on_the_right() {
        let s = PiecewiseConstantDecay {
            boundaries: vec![2.0, 4.0],
            values: vec![0.1, 0.05, 0.01],
            name: "PiecewiseConstant".into(),
        };
        assert_eq!(
            [0.0, 2.0, 3.0, 4.0, 5.0].map(|t| s.at(t)),
            [0.1, 0.1, 0.05, 0.05, 0.01]
        );
    }

    #[test]
    fn polynomial_decay_with_and_without_cycle() {
        let mut s = PolynomialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 4.0,
            end_learning_rate: 0.01,
            power: 2.0,
            cycle: false,
            name: "PolynomialDecay".into(),
        };
        // (0.1 - 0.01) * (1 - 1/4)^2 + 0.01
        close(s.at(1.0), 0.09 * 0.75f64.powi(2) + 0.01);
        close(s.at(10.0), 0.01);
        s.cycle = true;
        // step 6: decay_steps becomes 8; (1 - 6/8)^2
        close(s.at(6.0), 0.09 * 0.25f64.powi(2) + 0.01);
        close(s.at(0.0), 0.1);
    }

    #[test]
    fn inverse_time_decay_formula() {
        let mut s = InverseTimeDecay {
            initial_learning_rate: 0.1,
            decay_steps: 2.0,
            decay_rate: 0.5,
            staircase: false,
            name: "InverseTimeDecay".into(),
        };
        close(s.at(3.0), 0.1 / (1.0 + 0.5 * 1.5));
        s.staircase = true;
        close(s.at(3.0), 0.1 / 1.5);
    }

    #[test]
    fn cosine_decay_with_warmup() {
        let s = CosineDecay {
            initial_learning_rate: 0.01,
            decay_steps: 4.0,
            alpha: 0.1,
            name: "CosineDecay".into(),
            warmup_target: Some(0.1),
            warmup_steps: 2.0,
        };
        // warmup: linear from 0.01 to 0.1 over 2 steps
        close(s.at(1.0), 0.055);
        // decay from the target: step 3 is 1 step into a 4-step cosine
        let cos = 0.5 * (1.0 + (PI * 0.25).cos());
        close(s.at(3.0), 0.1 * (0.9 * cos + 0.1));
        // clamped at the end
        close(s.at(100.0), 0.1 * 0.1);
        let plain = CosineDecay {
            warmup_target: None,
            warmup_steps: 0.0,
            ..s
        };
        close(plain.at(2.0), 0.01 * (0.9 * 0.5 + 0.1));
    }

    #[test]
    fn cosine_restarts_periods_grow() {
        let s = CosineDecayRestarts {
            initial_learning_rate: 0.1,
            first_decay_steps: 2.0,
            t_mul: 2.0,
            m_mul: 0.5,
            alpha: 0.1,
            name: "SGDRDecay".into(),
        };
        // step 2 starts the second period (length 4) at half the peak
        close(s.at(2.0), 0.1 * (0.9 * 0.5 + 0.1));
        // step 4 is half-way through the second period
        let cos = 0.5 * 0.5 * (1.0 + (PI * 0.5).cos());
        close(s.at(4.0), 0.1 * (0.9 * cos + 0.1));
        let flat = CosineDecayRestarts { t_mul: 1.0, ..s };
        // t_mul = 1: step 3 is half-way through the second period of length 2
        close(
            flat.at(3.0),
            0.1 * (0.9 * (0.25 * (1.0 + (PI * 0.5).cos())) + 0.1),
        );
    }

    #[test]
    fn unknown_schedule_class_is_refused() {
        let v = json!({"module": "keras.optimizers.schedules", "class_name": "Nope", "config": {}, "registered_name": null});
        assert!(matches!(
            KerasSchedule::from_keras_json(&v),
            Err(Error::UnknownSchedule(ref c)) if c == "Nope"
        ));
    }

    #[test]
    fn piecewise_values_must_fill_boundaries() {
        let v = json!({"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [1], "values": [0.1]}});
        assert!(matches!(
            KerasSchedule::from_keras_json(&v),
            Err(Error::InvalidConfig { field, .. }) if field == "learning_rate.config.values"
        ));
    }

    #[test]
    fn zero_decay_steps_refused() {
        let v = json!({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}});
        assert!(matches!(
            KerasSchedule::from_keras_json(&v),
            Err(Error::InvalidConfig { field, .. }) if field == "learning_rate.config.decay_steps"
        ));
    }
}
