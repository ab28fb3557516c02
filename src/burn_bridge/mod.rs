//! Burn integration (feature `burn`): [`BurnRmsProp`] steps every parameter of a Burn
//! module in this crate's fused kernels, on Burn's own wgpu device, or on the host
//! through the CPU path for Burn's CPU backends.
//!
//! - `module`: a module's float parameters and gradients taken out and put back, named
//!   by their module paths;
//! - `host`: a step through the host (Burn's CPU backends);
//! - `device`: a step on Burn's wgpu device, in one submission;
//! - `buffers`: the `wgpu::Buffer` behind a tensor of Burn's wgpu backend;
//! - `rates`: Burn's learning rate per parameter as the config's and param groups'.

mod buffers;
mod device;
mod host;
mod module;
mod rates;

use ::burn::backend::ir::TensorId;
use ::burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use ::burn::module::{Module, ParamGroup as BurnParamGroup, ParamId};
use ::burn::optim::GradientsParams;
use ::burn::tensor::{DType, Device};

use crate::backend::Backend;
use crate::config::RmsPropConfig;
use crate::dtype::{Dtype, Precision};
use crate::error::{BurnProblem, Error, Result};
use crate::gpu::{GpuContext, GpuOptions};
use crate::groups::ParamGroup;
use crate::optimizer::RmsProp;
use crate::variable::VariableSpec;

use self::module::{NewValue, Taken};
use self::rates::RateRule;

/// Burn's wgpu device and the handles it runs on (from
/// `Device::wgpu_options().init_with_setup()`), re-exported so that callers name the
/// exact type [`BurnRmsProp::wgpu`] takes.
pub use ::burn::tensor::wgpu::WgpuSetup;

/// RMSprop for a whole Burn module in one fused step: every parameter's update in this
/// crate's kernels, in any [`crate::Dialect`] (Burn's own with [`RmsPropConfig::burn`]).
///
/// On Burn's wgpu backend ([`BurnRmsProp::wgpu`]) the step runs on Burn's own device
/// and queue: the parameters and gradients are copied on the device into the
/// optimizer's arena, stepped, and copied into new tensors of Burn's pool, all in one
/// submission, with no host copy. On any other backend ([`BurnRmsProp::new`], for
/// Burn's ndarray or flex backends) the values go through the host and this crate's
/// CPU path.
///
/// The parameters are the module's float parameters in Burn's visiting order, named by
/// their module paths (`layers.0.weight`): param groups and weight-decay exclusions
/// name them so. The optimizer is built at the first step and keeps its state (and
/// its [checkpoints](RmsProp::save_checkpoint), through [`BurnRmsProp::optimizer`])
/// keyed by those names; Burn's records do not hold it.
///
/// The module's parameters may be f32, bf16 or f16 (all of one type, their gradients
/// too): the optimizer steps them in that type, with f32 state and f32 arithmetic
/// ([`Precision`]; [`BurnRmsProp::with_precision`] adds stochastic rounding, or exact
/// f32 masters behind bf16 parameters).
///
/// ```no_run
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
/// use fused_rmsprop::{BurnRmsProp, RmsPropConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (device, setup) = Device::wgpu_options().init_with_setup()?;
/// let device = device.autodiff();
/// let mut model: Linear = LinearConfig::new(4, 2).init(&device);
/// let mut optim = BurnRmsProp::wgpu(RmsPropConfig::burn(), &device, &setup)?;
/// for _ in 0..10 {
///     let x = Tensor::<2>::ones([8, 4], &device);
///     let loss = model.forward(x).powf_scalar(2.0).mean();
///     let grads = GradientsParams::from_grads(loss.backward(), &model);
///     model = optim.step(0.01, model, grads)?;
/// }
/// # Ok(()) }
/// ```
pub struct BurnRmsProp {
    config: RmsPropConfig,
    /// The 16-bit options; the element types are the module's.
    precision: Precision,
    /// Burn's parameter groups, each with this crate's numbers for it.
    burn_groups: Vec<(BurnParamGroup, ParamGroup)>,
    target: Target,
    bound: Option<Bound>,
}

/// Where the steps run.
// One per optimizer: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// Through the host, on this crate's CPU path.
    Host,
    /// On Burn's wgpu device, shared.
    Wgpu { device: Device, context: GpuContext },
}

/// The optimizer built at the first step, and the parameters it was built for.
struct Bound {
    optimizer: RmsProp,
    params: Vec<(ParamId, String, Vec<usize>)>,
    /// The parameters' (and gradients') element type.
    dtype: DType,
    /// Where each parameter's learning rate comes from.
    rates: Vec<RateRule>,
    /// On Burn's wgpu device: each parameter's value as the last step installed it.
    installed: Vec<Option<TensorId>>,
}

/// A step [`BurnRmsProp::step`] refused: why, and the module, unchanged.
///
/// `?` turns it into its [`Error`].
pub struct Refused<M> {
    /// Why the step was refused.
    pub error: Error,
    /// The module, as it was.
    pub module: M,
}

impl<M> std::fmt::Debug for Refused<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refused")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> std::fmt::Display for Refused<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the step was refused: {}", self.error)
    }
}

impl<M> std::error::Error for Refused<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<M> From<Refused<M>> for Error {
    fn from(refused: Refused<M>) -> Error {
        refused.error
    }
}

impl BurnRmsProp {
    /// Steps modules of any Burn backend through the host, on this crate's CPU path:
    /// the one for Burn's CPU backends (ndarray, flex).
    pub fn new(config: RmsPropConfig) -> Result<Self> {
        config.validate()?;
        Ok(BurnRmsProp {
            config,
            precision: Precision::default(),
            burn_groups: Vec::new(),
            target: Target::Host,
            bound: None,
        })
    }

    /// Steps modules on Burn's wgpu `device`, sharing its wgpu device and queue
    /// (`setup`, as `Device::wgpu_options().init_with_setup()` returns them). The
    /// device needs the limits the kernels need ([`Error::DeviceLimit`] names one it
    /// lacks).
    pub fn wgpu(config: RmsPropConfig, device: &Device, setup: &WgpuSetup) -> Result<Self> {
        config.validate()?;
        let context = GpuContext::from_device(setup.device.clone(), setup.queue.clone())?;
        Ok(BurnRmsProp {
            config,
            precision: Precision::default(),
            burn_groups: Vec::new(),
            target: Target::Wgpu {
                device: device.clone().inner(),
                context,
            },
            bound: None,
        })
    }

    /// Burn's `ModuleOptimizer::with_group`: the parameters Burn's `parameters` group
    /// matches (by id or module path) take `group`'s numbers (its `variables` are
    /// replaced by them). As in Burn, a parameter two groups match takes the last one
    /// added, and a group that matches nothing is no group. Resolved when the optimizer
    /// is built (the first step, or [`BurnRmsProp::bind`]), where a group this crate
    /// refuses (momentum switched off, say) is an [`Error::InvalidConfig`].
    pub fn with_burn_group(mut self, parameters: BurnParamGroup, group: ParamGroup) -> Self {
        self.burn_groups.push((parameters, group));
        self
    }

    /// How 16-bit parameters are stepped: `precision`'s
    /// [`stochastic_rounding`](Precision::stochastic_rounding) or
    /// [`param_remainders`](Precision::param_remainders) (bf16 parameters backed by exact
    /// f32 masters, kept by the optimizer between steps). Its `params` and `gradients`
    /// are not read: they are the module's element type. Checked when the optimizer is
    /// built (an option the module's type cannot take is an [`Error::InvalidConfig`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The optimizer inside, once the first step (or [`BurnRmsProp::bind`]) built it:
    /// its iterations, slots, and checkpoints.
    pub fn optimizer(&self) -> Option<&RmsProp> {
        self.bound.as_ref().map(|b| &b.optimizer)
    }

    /// [`BurnRmsProp::optimizer`], to restore a checkpoint into or change its settings.
    pub fn optimizer_mut(&mut self) -> Option<&mut RmsProp> {
        self.bound.as_mut().map(|b| &mut b.optimizer)
    }

    /// Builds the optimizer for `module`'s parameters without stepping (so that a
    /// checkpoint can be restored before the first step). Refused when it was already
    /// built for other parameters.
    pub fn bind<M: Module>(&mut self, module: &M) -> Result<()> {
        let taken = module::gather(module, &mut GradientsParams::new());
        self.bind_taken(&taken)
    }

    /// Burn's `optimizer.step(lr, module, grads)`: updates every parameter of `module`
    /// that has a gradient in `grads`, with learning rate `lr`, one rate or a rate per
    /// parameter group (Burn's `ModuleLrScheduler::step()`). Burn's base rate replaces
    /// the config's learning rate (the base a param group's multiplier scales); a param
    /// group with no rate of its own takes its parameters' rate (add Burn's group with
    /// [`BurnRmsProp::with_burn_group`], with a default [`ParamGroup`], to give it one).
    /// A parameter whose rate its group cannot give (another than the base rate outside
    /// such a group, or two rates in one group) is refused with
    /// [`BurnProblem::LearningRate`]. A refused step ([`Refused`]) gives the module back
    /// unchanged and changes no state.
    pub fn step<M: Module>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        mut grads: GradientsParams,
    ) -> std::result::Result<M, Refused<M>> {
        let taken = module::gather(&module, &mut grads);
        let new = match self.step_taken(&lr.into(), taken) {
            Ok(new) => new,
            Err(error) => return Err(Refused { error, module }),
        };
        let on_wgpu = matches!(self.target, Target::Wgpu { .. });
        if let (true, Some(bound)) = (on_wgpu, &mut self.bound) {
            for (slot, new) in bound.installed.iter_mut().zip(&new) {
                if let Some(NewValue::Tensor(_, id)) = new {
                    *slot = Some(*id);
                }
            }
        }
        let (module, old) = module::install(module, new, on_wgpu);
        buffers::release(old);
        Ok(module)
    }

    /// Checks the module's parameters (and gradients) and builds the optimizer for
    /// them, or checks they are those it was built for.
    fn bind_taken(&mut self, taken: &[Taken]) -> Result<()> {
        let dtype = self.module_dtype(taken)?;
        for t in taken {
            check_taken(t, dtype, &self.target)?;
        }
        if let Some(bound) = &self.bound {
            return check_same_params(&bound.params, taken);
        }
        let params: Vec<(ParamId, String, Vec<usize>)> = taken
            .iter()
            .map(|t| (t.id, t.name.clone(), t.shape.clone()))
            .collect();
        let specs: Vec<VariableSpec> = params
            .iter()
            .map(|(_, name, shape)| VariableSpec::new(name.clone(), shape))
            .collect();
        let config = self.config_for(&params);
        let element = crate_dtype(dtype).expect("module_dtype keeps the three");
        let precision = Precision {
            params: element,
            gradients: element,
            ..self.precision
        };
        let (backend, gpu) = match &self.target {
            Target::Host => (Backend::Cpu, GpuOptions::default()),
            Target::Wgpu { context, .. } => (
                Backend::Gpu,
                GpuOptions {
                    context: Some(context.clone()),
                    ..GpuOptions::default()
                },
            ),
        };
        let optimizer = RmsProp::with_specs_and_precision(config, specs, backend, &gpu, precision)?;
        let installed = vec![None; params.len()];
        let names: Vec<String> = params.iter().map(|(_, name, _)| name.clone()).collect();
        let rates = rates::rules(optimizer.config(), &names);
        self.bound = Some(Bound {
            optimizer,
            params,
            dtype,
            rates,
            installed,
        });
        Ok(())
    }

    /// The config with Burn's groups resolved over `params` into param groups.
    fn config_for(&self, params: &[(ParamId, String, Vec<usize>)]) -> RmsPropConfig {
        let mut config = self.config.clone();
        for (k, (matcher, group)) in self.burn_groups.iter().enumerate() {
            let later = &self.burn_groups[k + 1..];
            let names: Vec<String> = params
                .iter()
                .filter(|(id, name, _)| {
                    matcher.matches(id, Some(name))
                        && !later.iter().any(|(m, _)| m.matches(id, Some(name)))
                })
                .map(|(_, name, _)| name.clone())
                .collect();
            if !names.is_empty() {
                config.param_groups.push(ParamGroup {
                    variables: names,
                    ..group.clone()
                });
            }
        }
        config
    }

    /// The element type the module's parameters are stepped in: the optimizer's once
    /// built, else the first parameter's (f32, bf16 or f16).
    fn module_dtype(&self, taken: &[Taken]) -> Result<DType> {
        if let Some(bound) = &self.bound {
            return Ok(bound.dtype);
        }
        let Some(first) = taken.first() else {
            return Ok(DType::F32);
        };
        match crate_dtype(first.dtype) {
            Some(_) => Ok(first.dtype),
            None => Err(Error::BurnParam {
                name: first.name.clone(),
                problem: BurnProblem::Dtype {
                    what: "parameter",
                    expected: "f32, bf16 or f16".into(),
                    found: format!("{:?}", first.dtype),
                },
            }),
        }
    }

    fn step_taken(
        &mut self,
        lr: &ModuleLearningRate,
        taken: Vec<Taken>,
    ) -> Result<Vec<Option<NewValue>>> {
        if !taken.iter().any(|t| t.grad.is_some()) {
            return Err(Error::NoGradients);
        }
        self.bind_taken(&taken)?;
        let bound = self.bound.as_mut().expect("bound above");
        let rates::StepRates { base, groups } = rates::this_step(lr, &taken, &bound.rates)?;
        let config = bound.optimizer.config();
        let before = (
            config.learning_rate.clone(),
            groups
                .iter()
                .map(|&(k, _)| (k, config.param_groups[k].learning_rate.clone()))
                .collect::<Vec<_>>(),
        );
        bound.optimizer.set_learning_rates(base.into(), &groups)?;
        // A parameter gets a new value when it has a gradient, or, with the EMA (whose
        // overwrite may rewrite any), always.
        let use_ema = bound.optimizer.config().use_ema;
        let written: Vec<bool> = taken.iter().map(|t| t.grad.is_some() || use_ema).collect();
        let stepped = match &self.target {
            Target::Host => host::step(&mut bound.optimizer, bound.dtype, &written, taken),
            Target::Wgpu { device, context } => device::step(
                &mut bound.optimizer,
                bound.dtype,
                device,
                context,
                &bound.installed,
                &written,
                taken,
            ),
        };
        if stepped.is_err() {
            bound.optimizer.set_learning_rates(before.0, &before.1)?;
        }
        stepped
    }
}

impl RmsPropConfig {
    /// Burn's own `burn::optim::RmsPropConfig`, in Burn's dialect ([`RmsPropConfig::burn`]
    /// with its `alpha`, `momentum`, `epsilon`, `centered`, `weight_decay` and
    /// `grad_clipping`), read from the JSON Burn writes for it: a Burn user keeps the
    /// config they have. Feature `burn`.
    ///
    /// ```
    /// use burn::optim::{decay::WeightDecayConfig, RmsPropConfig as BurnConfig};
    /// use fused_rmsprop::RmsPropConfig;
    /// let theirs = BurnConfig::new()
    ///     .with_alpha(0.9)
    ///     .with_weight_decay(Some(WeightDecayConfig::new(0.01)));
    /// let ours = RmsPropConfig::from_burn_config(&theirs).unwrap();
    /// assert_eq!(ours, RmsPropConfig::burn().with_rho(0.9).with_weight_decay(0.01));
    /// ```
    pub fn from_burn_config(config: &::burn::optim::RmsPropConfig) -> Result<Self> {
        let mut json = serde_json::to_value(config).map_err(|e| Error::Json(e.to_string()))?;
        shortest_f32_decimals(&mut json);
        let map = json
            .as_object_mut()
            .ok_or_else(|| Error::Json("Burn's RmsPropConfig is not a JSON object".into()))?;
        map.insert("dialect".into(), "burn".into());
        RmsPropConfig::from_json(&json)
    }
}

/// Burn keeps its config's numbers in f32, and serde writes them exactly (0.99 as
/// 0.9900000095367432): each becomes the shortest decimal that is the same f32 (0.99),
/// the number the user wrote.
fn shortest_f32_decimals(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|x| x.fract() != 0.0) {
                let shortest: f64 = (x as f32).to_string().parse().unwrap_or(x);
                if let Some(n2) = serde_json::Number::from_f64(shortest) {
                    *n = n2;
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(shortest_f32_decimals),
        serde_json::Value::Object(map) => map.values_mut().for_each(shortest_f32_decimals),
        _ => {}
    }
}

/// The parameters the optimizer was built for against those of the module now (each
/// step: nothing of theirs is copied).
fn check_same_params(built: &[(ParamId, String, Vec<usize>)], now: &[Taken]) -> Result<()> {
    let changed = |name: &str, what: String| Error::BurnParam {
        name: name.to_string(),
        problem: BurnProblem::ModuleChanged(what),
    };
    if built.len() != now.len() {
        return Err(changed(
            "(module)",
            format!(
                "it had {} float parameters, it has {}",
                built.len(),
                now.len()
            ),
        ));
    }
    for ((id, name, shape), t) in built.iter().zip(now) {
        let (id_now, name_now, shape_now) = (&t.id, &t.name, &t.shape);
        if name != name_now || id != id_now {
            return Err(changed(
                name,
                format!("parameter `{name}` ({id}) is now `{name_now}` ({id_now})"),
            ));
        }
        if shape != shape_now {
            return Err(changed(
                name,
                format!("its shape was {shape:?}, it is {shape_now:?}"),
            ));
        }
    }
    Ok(())
}

/// This crate's element type of Burn's `dtype`, for the three it steps.
fn crate_dtype(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::BF16 => Some(Dtype::Bf16),
        DType::F16 => Some(Dtype::F16),
        _ => None,
    }
}

/// One parameter's element types (`expected`, the module's), gradient shape and device.
fn check_taken(t: &Taken, expected: DType, target: &Target) -> Result<()> {
    let refuse = |problem| Error::BurnParam {
        name: t.name.clone(),
        problem,
    };
    let dtype = |what, found: DType| {
        if found == expected {
            Ok(())
        } else {
            Err(refuse(BurnProblem::Dtype {
                what,
                expected: format!("{expected:?} (the module's parameters')"),
                found: format!("{found:?}"),
            }))
        }
    };
    dtype("parameter", t.dtype)?;
    if let Some(g) = &t.grad {
        dtype("gradient", g.dtype)?;
        if g.shape != t.shape {
            return Err(refuse(BurnProblem::GradientShape {
                expected: t.shape.clone(),
                found: g.shape.clone(),
            }));
        }
    }
    if let Target::Wgpu { device, .. } = target {
        let on = |what, found: &Device| {
            if found.clone().inner() == *device {
                Ok(())
            } else {
                Err(refuse(BurnProblem::Device {
                    what,
                    expected: format!("{device:?}"),
                    found: format!("{found:?}"),
                }))
            }
        };
        on("parameter", &t.device)?;
        if let Some(g) = &t.grad {
            on("gradient", &g.device)?;
        }
    }
    Ok(())
}
