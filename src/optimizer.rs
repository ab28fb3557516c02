//! `RmsProp`: the public optimizer. Validates input, keeps the config and the
//! weight-decay exclusions, and hands each step to its backend's [`Engine`], which owns
//! the variables, the slots and the counters.

use ndarray::ArrayViewD;
#[cfg(not(target_arch = "wasm32"))]
use ndarray::{ArrayD, IxDyn};

use crate::backend::{Backend, BackendKind, Engine, Gradients, LossScaling, Role};
use crate::config::RmsPropConfig;
use crate::counters::SkippedSteps;
use crate::cpu::CpuEngine;
use crate::cpu_level::CpuLevel;
use crate::dtype::{GradSlice, GradientElement, Precision};
use crate::error::{Error, Result};
use crate::gpu::{GpuEngine, GpuOptions};
use crate::groups::{check_names, TensorTable};
use crate::plan::iterations;
use crate::schedule::LearningRate;
use crate::state_layout::RawSlot;
use crate::variable::{check_gradients, check_len, Variable, VariableSpec};
use crate::variant::{Slot, Variant};

/// Builds the engine `backend` asks for (`Auto` falls back to the CPU, and says so).
fn open_engine(
    backend: Backend,
    specs: &[VariableSpec],
    variant: Variant,
    gpu: &GpuOptions,
    config: &RmsPropConfig,
) -> Result<Box<dyn Engine>> {
    let state = &config.state;
    let groups = config.param_groups.len();
    Ok(match backend {
        Backend::Cpu => Box::new(CpuEngine::new(specs, variant, state)?),
        Backend::Gpu => Box::new(GpuEngine::new(gpu, specs, variant, state, true, groups)?),
        Backend::Auto => match GpuEngine::new(gpu, specs, variant, state, false, groups) {
            Ok(e) => {
                log::info!("fused-rmsprop: backend auto -> gpu ({})", e.adapter_name());
                Box::new(e)
            }
            Err(err) => {
                log::info!("fused-rmsprop: backend auto -> cpu ({err})");
                Box::new(CpuEngine::new(specs, variant, state)?)
            }
        },
    })
}

/// Keras 3's `RMSprop`, exact to its float32 semantics, on the CPU or a GPU.
///
/// The optimizer owns the variables: build it with their starting values, call
/// [`apply_gradients`](RmsProp::apply_gradients) each step (a `None` gradient skips
/// that variable, as in Keras), and read the values back.
///
/// ```
/// use fused_rmsprop::{Backend, RmsProp, RmsPropConfig, Variable};
/// let config = RmsPropConfig::default().with_learning_rate(0.1);
/// let var = Variable::new("x", &[], vec![10.0]).unwrap();
/// let mut opt = RmsProp::with_backend(config, vec![var], Backend::Cpu).unwrap();
/// opt.apply_gradients(&[Some(&[10.0][..])]).unwrap(); // d(x^2/2)/dx = x
/// let x = opt.variable(0).unwrap()[0];
/// assert!((x - 9.683772).abs() < 1e-5); // Keras' documented result
/// assert_eq!(opt.iterations(), 1);
/// ```
#[derive(Debug)]
pub struct RmsProp {
    config: RmsPropConfig,
    precision: Precision,
    specs: Vec<VariableSpec>,
    excluded: Vec<String>,
    /// Per variable: its group, weight decay and whether it is frozen (from the
    /// config's groups and `excluded`).
    table: TensorTable,
    engine: Box<dyn Engine>,
}

impl RmsProp {
    /// Builds the optimizer on the backend `config.jit_compile` asks for
    /// (`true`: [`Backend::Auto`], `false`: [`Backend::Cpu`]).
    pub fn new(config: RmsPropConfig, variables: Vec<Variable>) -> Result<Self> {
        let backend = if config.jit_compile {
            Backend::Auto
        } else {
            Backend::Cpu
        };
        Self::with_backend(config, variables, backend)
    }

    /// Builds the optimizer on `backend` with default [`GpuOptions`].
    pub fn with_backend(
        config: RmsPropConfig,
        variables: Vec<Variable>,
        backend: Backend,
    ) -> Result<Self> {
        Self::with_options(config, variables, backend, &GpuOptions::default())
    }

    /// Builds the optimizer on `backend`; `gpu` says how to find or use a GPU.
    pub fn with_options(
        config: RmsPropConfig,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        Self::with_precision(config, variables, backend, gpu, Precision::default())
    }

    /// [`with_options`](RmsProp::with_options) taking inputs in the element types of
    /// `precision` (gradients in bf16, say; see [`Precision`]).
    pub fn with_precision(
        config: RmsPropConfig,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> Result<Self> {
        for v in &variables {
            check_len(&v.spec, v.values.len())?;
        }
        let specs = variables.iter().map(|v| v.spec.clone()).collect();
        let mut opt = Self::with_specs_and_precision(config, specs, backend, gpu, precision)?;
        for (i, v) in variables.iter().enumerate() {
            opt.set_variable(i, &v.values)?;
        }
        Ok(opt)
    }

    /// Builds the optimizer for variables given by name and shape only: their values
    /// start at zero, or, with [`GpuOptions::buffers`], are whatever your parameter
    /// buffer holds (nothing is uploaded).
    pub fn with_specs(
        config: RmsPropConfig,
        specs: Vec<VariableSpec>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        Self::with_specs_and_precision(config, specs, backend, gpu, Precision::default())
    }

    /// [`with_specs`](RmsProp::with_specs) taking inputs in the element types of
    /// `precision` (your own gradient buffers in bf16, say: [`GpuOptions::buffers`]
    /// follow [`Precision`]).
    pub fn with_specs_and_precision(
        config: RmsPropConfig,
        specs: Vec<VariableSpec>,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> Result<Self> {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        check_names(&config.param_groups, &names)?;
        Self::build(config, specs, backend, gpu, precision)
    }

    /// A shard of a model (`ShardedRmsProp`): its variables are pieces of some of the
    /// model's, so a param group may name variables it does not hold.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn for_shard(
        config: RmsPropConfig,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        let specs = variables.iter().map(|v| v.spec.clone()).collect();
        let mut opt = Self::build(config, specs, backend, gpu, Precision::default())?;
        for (i, v) in variables.iter().enumerate() {
            opt.set_variable(i, &v.values)?;
        }
        Ok(opt)
    }

    /// The optimizer for `specs`, their values zero (the param groups' names unchecked).
    pub(crate) fn build(
        config: RmsPropConfig,
        specs: Vec<VariableSpec>,
        backend: Backend,
        gpu: &GpuOptions,
        precision: Precision,
    ) -> Result<Self> {
        config.validate()?;
        precision.validate()?;
        let variant = Variant {
            gradients: precision.gradients,
            param_copy: precision.param_copy,
            params: precision.params,
            stochastic_rounding: precision.stochastic_rounding.is_some(),
            param_remainders: precision.param_remainders,
            ..Variant::of(&config)
        };
        let backend = if backend == Backend::Auto && !config.jit_compile {
            Backend::Cpu
        } else {
            backend
        };
        let mut engine = open_engine(backend, &specs, variant, gpu, &config)?;
        engine.set_rounding_seed(precision.rounding_seed());
        if config.initial_scale != 0.0 {
            // optax's `initial_scale`: the velocity starts there, not at 0
            for (i, spec) in specs.iter().enumerate() {
                let start = vec![config.initial_scale as f32; spec.len()];
                engine.write_tensor(Role::Slot(Slot::Velocity), i, &start)?;
            }
        }
        let mut opt = RmsProp {
            config,
            precision,
            specs,
            excluded: Vec::new(),
            table: TensorTable::default(),
            engine,
        };
        opt.set_exclusions(Vec::new());
        Ok(opt)
    }

    /// Turns loss scaling on from a state, or off (for [`crate::LossScaleOptimizer`]).
    pub(crate) fn set_loss_scaling(&mut self, scaling: Option<LossScaling>) -> Result<()> {
        self.engine.set_loss_scaling(scaling)
    }

    /// Loss scaling and its state as known now; `None` without it.
    pub(crate) fn loss_scaling(&self) -> Option<LossScaling> {
        self.engine.loss_scaling()
    }

    /// The config.
    pub fn config(&self) -> &RmsPropConfig {
        &self.config
    }

    /// The element types the optimizer takes its inputs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The variables' names and shapes.
    pub fn specs(&self) -> &[VariableSpec] {
        &self.specs
    }

    /// The backend this optimizer runs on.
    pub fn backend(&self) -> BackendKind {
        self.engine.kind()
    }

    /// The instruction-set level the CPU path's loops run at (see [`CpuLevel`]); `None`
    /// on a GPU.
    pub fn cpu_level(&self) -> Option<CpuLevel> {
        self.engine.cpu_level()
    }

    /// Runs the CPU path's loops at `level`, e.g. a lower one to reproduce a result from
    /// another machine (every level gives the same bits). [`Error::CpuLevelUnsupported`]
    /// when this processor lacks it, [`Error::NeedsCpuBackend`] on a GPU.
    pub fn set_cpu_level(&mut self, level: CpuLevel) -> Result<()> {
        self.engine.set_cpu_level(level)
    }

    /// The GPU engine, for device-resident use (buffers, gradients written by your own
    /// kernels); `None` on the CPU path.
    pub fn gpu(&self) -> Option<&GpuEngine> {
        self.engine.as_any().downcast_ref()
    }

    /// Keras' `exclude_from_weight_decay(var_names=...)`: variables whose name contains
    /// any of these substrings get no weight decay.
    pub fn exclude_from_weight_decay<S: AsRef<str>>(&mut self, var_names: &[S]) {
        let mut all = std::mem::take(&mut self.excluded);
        all.extend(var_names.iter().map(|s| s.as_ref().to_string()));
        self.set_exclusions(all);
    }

    /// The weight-decay exclusion substrings.
    pub fn excluded(&self) -> &[String] {
        &self.excluded
    }

    pub(crate) fn set_exclusions(&mut self, excluded: Vec<String>) {
        self.excluded = excluded;
        let names: Vec<&str> = self.specs.iter().map(|s| s.name.as_str()).collect();
        self.table = TensorTable::resolve(
            self.config.weight_decay,
            &self.config.param_groups,
            &names,
            &self.excluded,
        );
    }

    /// Which tensors take part in a step on device gradients (`present`, not frozen).
    fn unfrozen_flags(&self, present: &[bool]) -> Vec<bool> {
        present
            .iter()
            .enumerate()
            .map(|(t, &p)| self.table.present(t, p))
            .collect()
    }

    /// Sets the step counter and the guard's skip count (restoring a checkpoint).
    pub(crate) fn set_counters(&mut self, raw: u64, skipped: u64) -> Result<()> {
        self.engine.set_counters(raw, skipped)
    }

    /// Keras' `optimizer.iterations`: applied updates (raw steps divided by
    /// `gradient_accumulation_steps`, floored).
    ///
    /// With the non-finite guard on a GPU, the device keeps the counter: this waits for
    /// the steps in flight (use [`skipped_steps`](RmsProp::skipped_steps) in a hot loop);
    /// in a browser, which cannot wait, it is the count as last read back: exact after
    /// [`RmsProp::synchronize_async`].
    pub fn iterations(&self) -> u64 {
        iterations(&self.config, self.raw_iterations())
    }

    /// Steps taken, accumulation-only steps included (Keras' `_iterations`); the
    /// learning-rate schedule is evaluated at this counter. Steps skipped by the
    /// non-finite guard do not count. Waits for the GPU as
    /// [`iterations`](RmsProp::iterations) does; should the device be lost, returns the
    /// last counter read back (and the next step returns the error).
    pub fn raw_iterations(&self) -> u64 {
        self.engine.raw_iterations()
    }

    /// The learning rate the next step will use.
    pub fn current_learning_rate(&self) -> f32 {
        self.config.learning_rate.at(self.raw_iterations())
    }

    /// Sets the learning rate of the next steps, as Keras' `optimizer.learning_rate = x`
    /// (a param group's multiplier scales it; a group with its own learning rate keeps
    /// that). Refused ([`Error::InvalidConfig`]) where the config would be.
    ///
    /// ```
    /// use fused_rmsprop::{Backend, RmsProp, RmsPropConfig, Variable};
    /// let var = Variable::new("w", &[1], vec![1.0]).unwrap();
    /// let mut opt = RmsProp::with_backend(RmsPropConfig::default(), vec![var], Backend::Cpu).unwrap();
    /// opt.set_learning_rate(0.5).unwrap();
    /// assert_eq!(opt.current_learning_rate(), 0.5);
    /// assert!(opt.set_learning_rate(f64::NAN).is_err());
    /// ```
    pub fn set_learning_rate(&mut self, learning_rate: impl Into<LearningRate>) -> Result<()> {
        let mut config = self.config.clone();
        config.learning_rate = learning_rate.into();
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// The config's learning rate and param groups' own (`groups`: index and rate,
    /// `None` for the config's) in one change, checked whole before any is set: Burn's
    /// per-group learning rates.
    #[cfg(feature = "burn")]
    pub(crate) fn set_learning_rates(
        &mut self,
        base: LearningRate,
        groups: &[(usize, Option<LearningRate>)],
    ) -> Result<()> {
        let mut config = self.config.clone();
        config.learning_rate = base;
        for (k, rate) in groups {
            let group = config.param_groups.get_mut(*k).ok_or_else(|| {
                Error::invalid("param_groups", format!("there is no param group {k}"))
            })?;
            group.learning_rate = rate.clone();
        }
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Turns the opt-in non-finite guard on or off (off by default, which is Keras'
    /// behaviour: NaN and infinity flow into the variables).
    ///
    /// With the guard on, a step in which any present gradient (divided by
    /// `loss_scale_factor`) is NaN or infinite is skipped whole: variables, slots, the
    /// EMA, the accumulators and the step counter stay as they were, and
    /// [`skipped_steps`](RmsProp::skipped_steps) counts it. On a GPU the check runs on
    /// the device inside the step, with no readback that stalls it.
    ///
    /// ```
    /// use fused_rmsprop::{Backend, RmsProp, RmsPropConfig, Variable};
    /// let var = Variable::new("w", &[2], vec![1.0, 2.0]).unwrap();
    /// let mut opt = RmsProp::with_backend(RmsPropConfig::default(), vec![var], Backend::Cpu).unwrap();
    /// opt.set_non_finite_guard(true).unwrap();
    /// opt.apply_gradients(&[Some(&[0.5, f32::NAN][..])]).unwrap(); // skipped
    /// assert_eq!(opt.variable(0).unwrap(), vec![1.0, 2.0]);
    /// assert_eq!((opt.iterations(), opt.skipped_steps().skipped), (0, 1));
    /// ```
    pub fn set_non_finite_guard(&mut self, enabled: bool) -> Result<()> {
        self.engine.set_non_finite_guard(enabled)
    }

    /// True while the non-finite guard is on.
    pub fn non_finite_guard(&self) -> bool {
        self.engine.variant().guard
    }

    /// Steps the non-finite guard has skipped. Never waits for the GPU: it reads the
    /// counter readbacks that have arrived, and says how many steps are still in
    /// flight; call [`synchronize`](RmsProp::synchronize) first for an exact count.
    pub fn skipped_steps(&self) -> SkippedSteps {
        self.engine.skipped_steps()
    }

    /// Waits for every step submitted to the GPU (a no-op on the CPU path); reports a
    /// lost device or a GPU error. With the non-finite guard on, the skip count is exact
    /// afterwards. Native only: in a browser, await [`RmsProp::synchronize_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn synchronize(&self) -> Result<()> {
        self.engine.synchronize()
    }

    /// [`RmsProp::synchronize`] without blocking the thread: a browser's way (its GPU
    /// answers through promises). With the non-finite guard or loss scaling on, a
    /// browser must await it at least once every 64 steps; a step that would have to
    /// wait is refused with [`Error::WouldBlock`].
    pub async fn synchronize_async(&self) -> Result<()> {
        self.engine.synchronize_async().await
    }

    /// Checks a step's gradients: one per variable, of the optimizer's gradient dtype,
    /// right lengths, at least one present.
    fn check_gradients<T: GradientElement>(&self, grads: &[Option<&[T]>]) -> Result<()> {
        self.check_gradient_dtype(T::DTYPE)?;
        check_gradients(&self.specs, grads)
    }

    /// Refuses gradients of another dtype than [`Precision::gradients`].
    fn check_gradient_dtype(&self, found: crate::dtype::Dtype) -> Result<()> {
        let expected = self.precision.gradients;
        if found != expected {
            return Err(Error::GradientDtype { expected, found });
        }
        Ok(())
    }

    /// One step of Keras' `apply_gradients`: `grads[i]` is variable `i`'s gradient, or
    /// `None` to leave that variable and its slots alone this step (its EMA still moves,
    /// as in Keras). Bad input is refused before anything changes, gradients in another
    /// dtype than [`Precision::gradients`] too ([`Error::GradientDtype`]).
    pub fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        self.apply_typed_gradients(grads)
    }

    /// [`apply_gradients`](RmsProp::apply_gradients) with gradients in any
    /// [`GradientElement`] type (`f32`, [`half::bf16`], [`half::f16`]), which must be the
    /// optimizer's [`Precision::gradients`]. The step is exactly the f32 step of the
    /// gradients upcast to f32.
    pub fn apply_typed_gradients<T: GradientElement>(
        &mut self,
        grads: &[Option<&[T]>],
    ) -> Result<()> {
        // refused in this type even when no gradient is present
        self.check_gradient_dtype(T::DTYPE)?;
        let slices: Vec<Option<GradSlice<'_>>> = grads.iter().map(|g| g.map(T::slice)).collect();
        self.apply_grad_slices(&slices)
    }

    /// [`apply_typed_gradients`](RmsProp::apply_typed_gradients) with each gradient's
    /// element type known at run time (a Burn tensor's): each must be the optimizer's
    /// [`Precision::gradients`].
    pub(crate) fn apply_grad_slices(&mut self, grads: &[Option<GradSlice<'_>>]) -> Result<()> {
        for g in grads.iter().flatten() {
            self.check_gradient_dtype(g.dtype())?;
        }
        crate::variable::check_gradient_lens(
            &self.specs,
            grads.iter().map(|g| g.map(|g| g.len())),
        )?;
        let slices = self.table.unfrozen(grads.iter().copied());
        self.engine
            .step(&self.config, Gradients::Host(&slices), &self.table)
    }

    /// A step of a shard of a model (`ShardedRmsProp`): as
    /// [`apply_gradients`](RmsProp::apply_gradients), but a step where none of this
    /// shard's pieces has a gradient still runs (another shard's variables have one:
    /// the counters, and the EMA, move on as in one process).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn apply_shard_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        match self.check_gradients(grads) {
            Ok(()) | Err(Error::NoGradients) => {}
            Err(e) => return Err(e),
        }
        let slices = self.table.unfrozen(grads.iter().map(|g| g.map(f32::slice)));
        self.engine
            .step(&self.config, Gradients::Host(&slices), &self.table)
    }

    /// [`apply_gradients`](RmsProp::apply_gradients) with `ndarray` gradients, taken in
    /// row-major order; each must have its variable's number of elements.
    pub fn apply_gradients_arrays(&mut self, grads: &[Option<ArrayViewD<'_, f32>>]) -> Result<()> {
        use std::borrow::Cow;
        let owned: Vec<Option<Cow<'_, [f32]>>> = grads
            .iter()
            .map(|g| {
                g.as_ref().map(|a| match a.as_slice() {
                    Some(s) => Cow::Borrowed(s),
                    None => Cow::Owned(a.iter().copied().collect()),
                })
            })
            .collect();
        let slices: Vec<Option<&[f32]>> = owned.iter().map(|g| g.as_deref()).collect();
        self.apply_gradients(&slices)
    }

    /// Runs [`apply_gradients`](RmsProp::apply_gradients) on a GPU whose gradients are
    /// already in its gradient buffers (written by your own kernels into
    /// [`GpuEngine::gradient_view`]s, or copied); `present[i]` says whether variable `i`
    /// has a gradient this step.
    /// [`Error::NeedsGpuBackend`] on the CPU path.
    pub fn apply_device_gradients(&mut self, present: &[bool]) -> Result<()> {
        self.check_device_gradients("apply_device_gradients", present)?;
        let present = self.unfrozen_flags(present);
        self.engine
            .step(&self.config, Gradients::Device(&present), &self.table)
    }

    /// [`apply_device_gradients`](RmsProp::apply_device_gradients) recorded into your own
    /// command encoder, after your forward and backward passes, so that a whole training
    /// step is one submission. Submit `encoder` before recording the next step (the step's
    /// plan is a queued uniform write that lands at the next submission). Refused
    /// ([`Error::NotWithGuard`]) while the non-finite guard is on, and
    /// ([`Error::NeedsGpuBackend`]) on the CPU path.
    pub fn record_device_step(
        &mut self,
        present: &[bool],
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        self.check_device_gradients("record_device_step", present)?;
        let present = self.unfrozen_flags(present);
        self.engine
            .record_step(&self.config, &present, &self.table, encoder)
    }

    fn check_device_gradients(&self, what: &'static str, present: &[bool]) -> Result<()> {
        if self.engine.kind() != BackendKind::Gpu {
            return Err(Error::NeedsGpuBackend(what));
        }
        if present.len() != self.specs.len() {
            return Err(Error::CountMismatch {
                what: "gradient flags",
                expected: self.specs.len(),
                found: present.len(),
            });
        }
        if !present.iter().any(|&p| p) {
            return Err(Error::NoGradients);
        }
        Ok(())
    }

    /// Keras' `finalize_variable_values`: with `use_ema`, copies the moving averages
    /// into the variables; otherwise does nothing.
    pub fn finalize_variable_values(&mut self) -> Result<()> {
        self.engine.finalize()
    }

    fn index(&self, i: usize) -> Result<&VariableSpec> {
        self.specs.get(i).ok_or(Error::NoSuchVariable(i))
    }

    /// Variable `i`'s values, flat (a GPU path reads them back, waiting for it; in a
    /// browser, await [`RmsProp::variable_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn variable(&self, i: usize) -> Result<Vec<f32>> {
        self.index(i)?;
        self.engine.read_tensor(Role::Params, i)?.wait()
    }

    /// [`RmsProp::variable`], awaiting the GPU's readback instead of blocking.
    pub async fn variable_async(&self, i: usize) -> Result<Vec<f32>> {
        self.index(i)?;
        self.engine.read_tensor(Role::Params, i)?.get().await
    }

    /// Variable `i` as an `ndarray` array of its shape (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn variable_array(&self, i: usize) -> Result<ArrayD<f32>> {
        let spec = self.index(i)?;
        let values = self.variable(i)?;
        let found = values.len();
        ArrayD::from_shape_vec(IxDyn(&spec.shape), values).map_err(|_| Error::ValueLength {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            expected: spec.len(),
            found,
        })
    }

    /// Every variable's values, flat, in order (one readback on the GPU path, waited
    /// for; in a browser, await [`RmsProp::variables_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn variables(&self) -> Result<Vec<Vec<f32>>> {
        self.engine.read(Role::Params)?.wait()
    }

    /// [`RmsProp::variables`], awaiting the GPU's readback instead of blocking.
    pub async fn variables_async(&self) -> Result<Vec<Vec<f32>>> {
        self.engine.read(Role::Params)?.get().await
    }

    /// A slot of every variable (one `Vec` per variable, in order); `None` when this
    /// config keeps no such slot. Native only; in a browser, await
    /// [`RmsProp::slot_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        if !self.engine.variant().keeps(slot) {
            return Ok(None);
        }
        Ok(Some(self.engine.read(Role::Slot(slot))?.wait()?))
    }

    /// [`RmsProp::slot`], awaiting the GPU's readback instead of blocking.
    pub async fn slot_async(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        if !self.engine.variant().keeps(slot) {
            return Ok(None);
        }
        Ok(Some(self.engine.read(Role::Slot(slot))?.get().await?))
    }

    /// Replaces `slot` of variable `i` (e.g. to restore a checkpoint).
    /// [`Error::SlotNotKept`] when this config keeps no such slot.
    pub fn set_slot(&mut self, slot: Slot, i: usize, values: &[f32]) -> Result<()> {
        check_len(self.index(i)?, values.len())?;
        if !self.engine.variant().keeps(slot) {
            return Err(Error::SlotNotKept(slot));
        }
        self.engine.write_tensor(Role::Slot(slot), i, values)
    }

    /// Clip factors per variable for the next update step, computed outside (a sharded
    /// optimizer's norms span ranks); `None`: this optimizer's own.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn set_external_clips(&mut self, clips: Option<Vec<crate::math::ClipFactors>>) {
        self.engine.set_external_clips(clips);
    }

    /// Every variable's `slot` as it is stored (checkpoints keep it so), in one
    /// readback.
    pub(crate) async fn slots_raw_async(&self, slot: Slot) -> Result<Vec<RawSlot>> {
        self.engine.read_slots_raw(slot)?.get().await
    }

    /// Replaces variable `i`'s `slot` with `raw`, as stored (format and length checked).
    pub(crate) fn set_slot_raw(&mut self, slot: Slot, i: usize, raw: &RawSlot) -> Result<()> {
        self.index(i)?;
        self.engine.write_slot_raw(slot, i, raw)
    }

    /// Bytes of memory the slots take on this backend (padding, and int8 blocks'
    /// scales, included): 12 per parameter for centered RMSprop with momentum in f32
    /// state, about 3.05 in int8 ([`crate::StateStorage`]).
    pub fn state_bytes(&self) -> u64 {
        self.engine.state_bytes()
    }

    /// The 16-bit parameter copy of every variable (see [`Precision::param_copy`]), its
    /// values upcast to f32 (exactly), in order; [`Error::NoParamCopy`] without one.
    /// Native only; in a browser, await [`RmsProp::variable_copies_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn variable_copies(&self) -> Result<Vec<Vec<f32>>> {
        self.engine.read_param_copy()?.wait()
    }

    /// [`RmsProp::variable_copies`], awaiting the GPU's readback instead of blocking.
    pub async fn variable_copies_async(&self) -> Result<Vec<Vec<f32>>> {
        self.engine.read_param_copy()?.get().await
    }

    /// Replaces variable `i`'s values (slots are left as they are).
    pub fn set_variable(&mut self, i: usize, values: &[f32]) -> Result<()> {
        check_len(self.index(i)?, values.len())?;
        self.engine.write_tensor(Role::Params, i, values)
    }
}
