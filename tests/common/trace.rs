//! Traces (`rmsprop-trace/1`, see `tests/keras/FORMAT.md`; Keras', and PyTorch's and
//! optax's in `tests/dialects/`): parse, replay on any
//! backend, and compare with FORMAT.md's tolerance. Test and example support, not part
//! of the library: `tests/` use it as `common::trace`, `examples/replay.rs` through a
//! `#[path]` module.
#![allow(dead_code)]

use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, BackendKind, Dtype, GpuOptions, GradientElement, LossScaleConfig, LossScaleOptimizer,
    Precision, RmsProp, RmsPropConfig, Variable,
};
use serde_json::Value;

/// The only format this harness reads.
pub const TRACE_FORMAT: &str = "rmsprop-trace/1";

/// Why a trace could not be read or replayed.
#[derive(Debug)]
pub enum TraceError {
    /// The file is not a well-formed trace.
    Invalid(String),
    /// The optimizer refused the trace's config, variables or gradients, or failed.
    Optimizer(fused_rmsprop::Error),
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceError::Invalid(why) => write!(f, "invalid trace: {why}"),
            TraceError::Optimizer(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TraceError {}

impl From<fused_rmsprop::Error> for TraceError {
    fn from(e: fused_rmsprop::Error) -> Self {
        TraceError::Optimizer(e)
    }
}

/// A recorded Keras run.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The trace's name.
    pub name: String,
    /// The optimizer config.
    pub config: RmsPropConfig,
    /// Starting variables.
    pub variables: Vec<Variable>,
    /// Per step, per variable: a gradient or `None`.
    pub steps: Vec<Vec<Option<Vec<f32>>>>,
    /// `exclude_from_weight_decay(var_names=...)`.
    pub exclude_from_weight_decay: Vec<String>,
    /// Whether `finalize_variable_values` ran after the last step.
    pub finalize: bool,
    /// Keras' results, if recorded.
    pub expected: Option<Outcome>,
    /// `LossScaleOptimizer` around the RMSprop (`loss_scale/` traces).
    pub loss_scale_optimizer: Option<LossScaleConfig>,
}

/// Variables and iteration count after a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The variables, flat, in order.
    pub variables: Vec<Vec<f32>>,
    /// `optimizer.iterations`.
    pub iterations: u64,
    /// The dynamic loss scale after the last step (loss-scaled runs only).
    pub loss_scale: Option<f32>,
    /// The 16-bit parameter copy, upcast, when the replay kept one.
    pub param_copy: Option<Vec<Vec<f32>>>,
}

fn bad(msg: impl Into<String>) -> TraceError {
    TraceError::Invalid(msg.into())
}

/// Decodes a trace float: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn decode_float(v: &Value) -> Option<f32> {
    match v {
        Value::Number(n) => n.as_f64().map(|x| x as f32),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f32::NAN),
            "Infinity" => Some(f32::INFINITY),
            "-Infinity" => Some(f32::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// Encodes a float as a trace value: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn encode_float(x: f32) -> Value {
    if x.is_nan() {
        Value::from("NaN")
    } else if x == f32::INFINITY {
        Value::from("Infinity")
    } else if x == f32::NEG_INFINITY {
        Value::from("-Infinity")
    } else {
        serde_json::Number::from_f64(f64::from(x)).map_or(Value::Null, Value::Number)
    }
}

fn floats(v: &Value, what: &str) -> Result<Vec<f32>, TraceError> {
    let items = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be a list of numbers")))?;
    items
        .iter()
        .map(|x| decode_float(x).ok_or_else(|| bad(format!("{what} holds a non-number: {x}"))))
        .collect()
}

fn shape(v: &Value, what: &str) -> Result<Vec<usize>, TraceError> {
    let items = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be a list of sizes")))?;
    items
        .iter()
        .map(|x| {
            x.as_u64()
                .filter(|&n| n <= 1 << 40)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(format!("{what} holds a bad size: {x}")))
        })
        .collect()
}

impl Trace {
    /// Parses a trace from JSON text; every malformation is an error.
    pub fn from_json_str(text: &str) -> Result<Self, TraceError> {
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Parses a trace from a JSON value.
    pub fn from_json(v: &Value) -> Result<Self, TraceError> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("a trace must be a JSON object"))?;
        match obj.get("format").and_then(Value::as_str) {
            Some(TRACE_FORMAT) => {}
            other => {
                return Err(bad(format!(
                    "format must be \"{TRACE_FORMAT}\", got {other:?}"
                )))
            }
        }
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // any dialect's JSON: Keras' get_config(), or {"dialect": "torch", ...}
        let config =
            RmsPropConfig::from_json(obj.get("config").ok_or_else(|| bad("no `config`"))?)?;
        let vars = obj
            .get("variables")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`variables` must be a list"))?;
        let mut variables = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            let what = format!("variables[{i}]");
            let vname = var
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{what}.name must be a string")))?;
            let s = shape(
                var.get("shape").unwrap_or(&Value::Null),
                &format!("{what}.shape"),
            )?;
            let values = floats(
                var.get("value").unwrap_or(&Value::Null),
                &format!("{what}.value"),
            )?;
            variables.push(Variable::new(vname, &s, values)?);
        }
        let raw_steps = obj
            .get("steps")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`steps` must be a list"))?;
        let mut steps = Vec::with_capacity(raw_steps.len());
        for (k, step) in raw_steps.iter().enumerate() {
            let grads = step
                .as_array()
                .ok_or_else(|| bad(format!("steps[{k}] must be a list")))?;
            if grads.len() != variables.len() {
                return Err(bad(format!(
                    "steps[{k}] has {} gradients for {} variables",
                    grads.len(),
                    variables.len()
                )));
            }
            let mut row = Vec::with_capacity(grads.len());
            for (g, var) in grads.iter().zip(&variables) {
                if g.is_null() {
                    row.push(None);
                    continue;
                }
                let g = floats(g, &format!("steps[{k}] gradient"))?;
                if g.len() != var.values.len() {
                    return Err(bad(format!(
                        "steps[{k}]: gradient for `{}` has {} values, the variable has {}",
                        var.spec.name,
                        g.len(),
                        var.values.len()
                    )));
                }
                row.push(Some(g));
            }
            steps.push(row);
        }
        let exclude_from_weight_decay = match obj.get("exclude_from_weight_decay") {
            None | Some(Value::Null) => Vec::new(),
            Some(e) => e
                .get("var_names")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("exclude_from_weight_decay.var_names must be a list"))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("exclude_from_weight_decay.var_names must hold strings"))
                })
                .collect::<Result<_, _>>()?,
        };
        let finalize = match obj.get("finalize") {
            None | Some(Value::Null) => false,
            Some(f) => f
                .as_bool()
                .ok_or_else(|| bad("`finalize` must be a boolean"))?,
        };
        let expected = match obj.get("expected") {
            None | Some(Value::Null) => None,
            Some(e) => {
                let vars = e
                    .get("variables")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("expected.variables must be a list"))?;
                if vars.len() != variables.len() {
                    return Err(bad("expected.variables must have one entry per variable"));
                }
                let values = vars
                    .iter()
                    .zip(&variables)
                    .map(|(v, var)| {
                        let f = floats(v, "expected.variables")?;
                        if f.len() != var.values.len() {
                            return Err(bad(format!(
                                "expected.variables: `{}` has {} values, the variable has {}",
                                var.spec.name,
                                f.len(),
                                var.values.len()
                            )));
                        }
                        Ok(f)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let iterations = e
                    .get("iterations")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("expected.iterations must be a non-negative integer"))?;
                let loss_scale = match e.get("loss_scale") {
                    None | Some(Value::Null) => None,
                    Some(x) => Some(
                        decode_float(x)
                            .ok_or_else(|| bad("expected.loss_scale must be a number"))?,
                    ),
                };
                Some(Outcome {
                    variables: values,
                    iterations,
                    loss_scale,
                    param_copy: None,
                })
            }
        };
        let loss_scale_optimizer = match obj.get("loss_scale_optimizer") {
            None | Some(Value::Null) => None,
            Some(l) => {
                let initial_scale = l
                    .get("initial_scale")
                    .and_then(decode_float)
                    .ok_or_else(|| bad("loss_scale_optimizer.initial_scale must be a number"))?;
                let steps = l
                    .get("dynamic_growth_steps")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad("loss_scale_optimizer.dynamic_growth_steps must be a count")
                    })?;
                Some(LossScaleConfig {
                    initial_scale,
                    dynamic_growth_steps: steps,
                })
            }
        };
        Ok(Trace {
            loss_scale_optimizer,
            name,
            config,
            variables,
            steps,
            exclude_from_weight_decay,
            finalize,
            expected,
        })
    }

    /// Replays the trace on `backend`; returns what ran and the outcome.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn replay(
        &self,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> fused_rmsprop::Result<(BackendKind, Outcome)> {
        self.replay_in(backend, gpu, Dtype::F32)
    }

    /// The trace with every gradient rounded to `dtype` (nearest, ties to even) and
    /// kept as f32: what a replay in `dtype` must equal.
    pub fn rounded(&self, dtype: Dtype) -> Trace {
        let round = |x: f32| match dtype {
            Dtype::F32 => x,
            Dtype::Bf16 => bf16::from_f32(x).to_f32(),
            Dtype::F16 => f16::from_f32(x).to_f32(),
        };
        let mut t = self.clone();
        for step in &mut t.steps {
            for g in step.iter_mut().flatten() {
                g.iter_mut().for_each(|x| *x = round(*x));
            }
        }
        t
    }

    /// Replays the trace with its gradients rounded to `dtype` (nearest, ties to even)
    /// and fed in it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn replay_in(
        &self,
        backend: Backend,
        gpu: &GpuOptions,
        gradients: Dtype,
    ) -> fused_rmsprop::Result<(BackendKind, Outcome)> {
        self.replay_with(backend, gpu, Precision::default().with_gradients(gradients))
    }

    /// Replays the trace with the element types of `precision`: gradients rounded to
    /// its gradient dtype and fed in it; the parameter copy, if any, in the outcome.
    /// Blocks on the GPU's readbacks (native).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn replay_with(
        &self,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> fused_rmsprop::Result<(BackendKind, Outcome)> {
        pollster::block_on(self.replay_async(backend, gpu, precision))
    }

    /// [`Trace::replay_with`] awaiting the GPU instead of blocking (what a browser
    /// runs): with steps the device decides (loss scaling), it awaits them after each
    /// step, so that no step has to wait.
    pub async fn replay_async(
        &self,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> fused_rmsprop::Result<(BackendKind, Outcome)> {
        let gradients = precision.gradients;
        let mut opt = RmsProp::with_precision(
            self.config.clone(),
            self.variables.clone(),
            backend,
            gpu,
            precision,
        )?;
        opt.exclude_from_weight_decay(&self.exclude_from_weight_decay);
        let mut opt = match self.loss_scale_optimizer {
            Some(l) => Stepper::Scaled(LossScaleOptimizer::new(opt, l)?),
            None => Stepper::Plain(opt),
        };
        fn feed<T: GradientElement>(
            opt: &mut Stepper,
            step: &[Option<Vec<f32>>],
            convert: impl Fn(f32) -> T,
        ) -> fused_rmsprop::Result<()> {
            let owned: Vec<Option<Vec<T>>> = step
                .iter()
                .map(|g| g.as_ref().map(|g| g.iter().map(|&x| convert(x)).collect()))
                .collect();
            let grads: Vec<Option<&[T]>> = owned.iter().map(|g| g.as_deref()).collect();
            opt.apply_typed_gradients(&grads)
        }
        for step in &self.steps {
            match gradients {
                Dtype::Bf16 => feed(&mut opt, step, bf16::from_f32)?,
                Dtype::F16 => feed(&mut opt, step, f16::from_f32)?,
                Dtype::F32 => feed(&mut opt, step, |x| x)?,
            }
            if let Stepper::Scaled(o) = &opt {
                o.inner().synchronize_async().await?;
            }
        }
        let (inner, loss_scale) = match &mut opt {
            Stepper::Plain(o) => (o, None),
            Stepper::Scaled(o) => {
                o.inner().synchronize_async().await?;
                let scale = o.loss_scale();
                (o.inner_mut(), Some(scale))
            }
        };
        if self.finalize {
            inner.finalize_variable_values()?;
        }
        Ok((
            inner.backend(),
            Outcome {
                variables: inner.variables_async().await?,
                iterations: inner.iterations(),
                loss_scale,
                param_copy: match precision.param_copy {
                    Some(_) => Some(inner.variable_copies_async().await?),
                    None => None,
                },
            },
        ))
    }
}

#[cfg(feature = "mpi")]
impl Trace {
    /// Replays the trace data-parallel over `comm`'s ranks with sharded state
    /// (`ShardedRmsProp`, every rank feeding the trace's gradients), on `backend`.
    pub fn replay_sharded<C: fused_rmsprop::mpi::traits::Communicator>(
        &self,
        comm: &C,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> fused_rmsprop::Result<Outcome> {
        let mut opt = self.sharded(comm, backend, gpu)?;
        self.feed_sharded(&mut opt, &self.steps)?;
        self.outcome_sharded(&mut opt)
    }

    /// The sharded optimizer of this trace, before any step.
    pub fn sharded<C: fused_rmsprop::mpi::traits::Communicator>(
        &self,
        comm: &C,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> fused_rmsprop::Result<fused_rmsprop::ShardedRmsProp> {
        use fused_rmsprop::ShardedRmsProp;
        let (config, vars) = (self.config.clone(), self.variables.clone());
        let mut opt = match self.loss_scale_optimizer {
            Some(l) => ShardedRmsProp::with_loss_scaling(comm, config, l, vars, backend, gpu)?,
            None => ShardedRmsProp::new(comm, config, vars, backend, gpu)?,
        };
        opt.exclude_from_weight_decay(&self.exclude_from_weight_decay);
        Ok(opt)
    }

    /// Feeds `steps` of gradients.
    pub fn feed_sharded(
        &self,
        opt: &mut fused_rmsprop::ShardedRmsProp,
        steps: &[Vec<Option<Vec<f32>>>],
    ) -> fused_rmsprop::Result<()> {
        for step in steps {
            let grads: Vec<Option<&[f32]>> = step.iter().map(|g| g.as_deref()).collect();
            opt.apply_gradients(&grads)?;
        }
        Ok(())
    }

    /// Finalizes (when the trace does) and reads the outcome.
    pub fn outcome_sharded(
        &self,
        opt: &mut fused_rmsprop::ShardedRmsProp,
    ) -> fused_rmsprop::Result<Outcome> {
        if self.finalize {
            opt.finalize_variable_values()?;
        }
        Ok(Outcome {
            variables: opt.model().to_vec(),
            iterations: opt.iterations(),
            loss_scale: opt.loss_scale(),
            param_copy: None,
        })
    }
}

/// The optimizer a replay steps: the RMSprop, or the loss-scale wrapper around it.
enum Stepper {
    Plain(RmsProp),
    Scaled(LossScaleOptimizer),
}

impl Stepper {
    fn apply_typed_gradients<T: GradientElement>(
        &mut self,
        grads: &[Option<&[T]>],
    ) -> fused_rmsprop::Result<()> {
        match self {
            Stepper::Plain(o) => o.apply_typed_gradients(grads),
            Stepper::Scaled(o) => o.apply_typed_gradients(grads),
        }
    }
}

/// FORMAT.md's rule: `|a - e| <= 1e-5 + 1e-4 * |e|`, or both NaN, or the same infinity.
pub fn values_match(actual: f32, expected: f32) -> bool {
    if expected.is_nan() || actual.is_nan() {
        return expected.is_nan() && actual.is_nan();
    }
    if expected.is_infinite() || actual.is_infinite() {
        return actual == expected;
    }
    let (a, e) = (actual as f64, expected as f64);
    (a - e).abs() <= 1e-5 + 1e-4 * e.abs()
}

/// The first mismatch between two outcomes, described, or `None` when they match.
pub fn first_mismatch(actual: &Outcome, expected: &Outcome) -> Option<String> {
    if actual.iterations != expected.iterations {
        return Some(format!(
            "iterations: got {}, expected {}",
            actual.iterations, expected.iterations
        ));
    }
    if let (Some(a), Some(e)) = (actual.loss_scale, expected.loss_scale) {
        if a != e {
            return Some(format!("loss_scale: got {a}, expected {e}"));
        }
    }
    if actual.loss_scale.is_some() != expected.loss_scale.is_some() {
        return Some("a loss scale on one side only".into());
    }
    if actual.variables.len() != expected.variables.len() {
        return Some("different number of variables".into());
    }
    for (i, (a, e)) in actual.variables.iter().zip(&expected.variables).enumerate() {
        if a.len() != e.len() {
            return Some(format!(
                "variable {i}: {} values, expected {}",
                a.len(),
                e.len()
            ));
        }
        for (j, (&x, &y)) in a.iter().zip(e).enumerate() {
            if !values_match(x, y) {
                return Some(format!("variable {i}[{j}]: got {x}, expected {y}"));
            }
        }
    }
    None
}

/// The replay example's output object: `{"backend", "variables", "iterations"}` (and
/// `"loss_scale"` for a loss-scaled trace, `"param_copy"` with a parameter copy), with
/// non-finite values as `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn outcome_json(backend: BackendKind, outcome: &Outcome) -> Value {
    let vars: Vec<Value> = outcome
        .variables
        .iter()
        .map(|v| Value::Array(v.iter().map(|&x| encode_float(x)).collect()))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("backend".into(), Value::from(backend.as_str()));
    m.insert("variables".into(), Value::Array(vars));
    m.insert("iterations".into(), Value::from(outcome.iterations));
    if let Some(scale) = outcome.loss_scale {
        m.insert("loss_scale".into(), encode_float(scale));
    }
    if let Some(copy) = &outcome.param_copy {
        let copy: Vec<Value> = copy
            .iter()
            .map(|v| Value::Array(v.iter().map(|&x| encode_float(x)).collect()))
            .collect();
        m.insert("param_copy".into(), Value::Array(copy));
    }
    Value::Object(m)
}
