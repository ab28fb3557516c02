//! The GPU driver: one step is a uniform write (plus the tensor flags when they change)
//! and one submission of at most `2 * segments + 1` dispatches; nothing is read back
//! inside a step. With the non-finite guard, the step also copies 32 bytes of counters
//! into a staging buffer that is mapped in the background.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{BackendKind, Engine, Gradients, LossScaling, Role, Staged};
use crate::config::RmsPropConfig;
use crate::counters::SkippedSteps;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::gpu::arena::{ArenaModel, GpuArena, Target};
use crate::gpu::binding::{TensorView, UserBuffers};
use crate::gpu::context::{software_allowed_by_env, GpuContext};
use crate::gpu::nonfinite::GpuCounters;
use crate::gpu::pipelines::{pipelines_for, Pipelines};
use crate::gpu::readback::Reads;
use crate::gpu::shader::{StepUniform, FLAG_DECAY, FLAG_FROZEN, FLAG_HAS_GRADIENT, PLAN_WINDOW};
use crate::groups::TensorTable;
use crate::math::{ClipFactors, GroupScalars, StepScalars};
use crate::plan::{plan_groups, plan_step};
use crate::state::{StateDtype, StateStorage};
use crate::state_layout::RawSlot;
use crate::variable::VariableSpec;
use crate::variant::{Slot, Variant};

/// How to find and use a GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Use this context (your own device, see [`GpuContext::from_device`]) instead of
    /// creating one.
    pub context: Option<GpuContext>,
    /// Let [`crate::Backend::Auto`] use a software adapter. `None`: the
    /// `FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER` environment variable decides.
    pub allow_software: Option<bool>,
    /// Cap on elements per arena segment (normally the device's binding limit decides);
    /// lets tests exercise the split arena on small models.
    pub max_segment_len: Option<usize>,
    /// Your own parameter and gradient buffers (used with [`GpuOptions::context`]).
    pub buffers: Option<UserBuffers>,
}

/// A model's parameters, gradients and slots on a GPU, as
/// [`RmsProp::gpu`](crate::RmsProp::gpu) shows them to training code that keeps its
/// gradients on the device: write them into [`GpuEngine::gradient_buffers`] with your
/// own kernels or copies, then call
/// [`RmsProp::apply_device_gradients`](crate::RmsProp::apply_device_gradients).
#[derive(Debug)]
pub struct GpuEngine {
    ctx: GpuContext,
    variant: Variant,
    pipelines: Arc<Pipelines>,
    arena: GpuArena,
    max_groups: u32,
    /// The step and skip counters (behind a mutex so that `&self` readers can take the
    /// guard's readbacks that arrived).
    counters: Mutex<GpuCounters>,
    /// Stochastic rounding's seed, mixed (written into every plan).
    rounding_seed: u32,
    /// Clip factors given from outside (`Engine::set_external_clips`).
    external_clips: Option<Vec<ClipFactors>>,
    /// The parameters changed outside a step since the 16-bit copy was last rewritten
    /// (rewritten before the next step, view or readback: one pass for many writes).
    copy_stale: AtomicBool,
}

fn poisoned() -> Error {
    Error::Gpu("step counters poisoned by a panic on another thread".into())
}

/// A 2D grid covering `n` workgroups within the per-dimension limit.
fn grid(n: usize, max: u32) -> (u32, u32) {
    let max = max.max(1) as usize;
    let x = n.clamp(1, max);
    (x as u32, n.div_ceil(x) as u32)
}

impl GpuEngine {
    /// Builds the arena and pipelines. `required` is true for [`crate::Backend::Gpu`]
    /// (any adapter, software included) and false for `Auto`.
    pub(crate) fn new(
        options: &GpuOptions,
        specs: &[VariableSpec],
        variant: Variant,
        state: &StateStorage,
        required: bool,
        group_count: usize,
    ) -> Result<Self> {
        let allow_software = || {
            options
                .allow_software
                .unwrap_or_else(software_allowed_by_env)
        };
        let ctx = match &options.context {
            Some(c) => c.clone(),
            #[cfg(not(target_arch = "wasm32"))]
            None => GpuContext::new(required || allow_software())?,
            // a browser creates devices through promises: the caller awaits one
            #[cfg(target_arch = "wasm32")]
            None => {
                return Err(Error::NoAdapter(
                    "in a browser, create the device with GpuContext::new_async and pass it as GpuOptions::context".into(),
                ))
            }
        };
        if !required && ctx.is_software() && !allow_software() {
            return Err(Error::NoAdapter(format!(
                "{} is a software adapter, not allowed for Auto",
                ctx.adapter_name()
            )));
        }
        let pipelines = pipelines_for(&ctx, &variant)?;
        let model = ArenaModel {
            specs,
            variant,
            storage: state,
            group_count,
        };
        let arena = GpuArena::new(
            &ctx,
            &pipelines,
            model,
            options.max_segment_len,
            options.buffers.clone(),
        )?;
        let max_groups = ctx.device.limits().max_compute_workgroups_per_dimension;
        Ok(GpuEngine {
            ctx,
            variant,
            pipelines,
            arena,
            max_groups,
            counters: Mutex::default(),
            rounding_seed: 0,
            external_clips: None,
            // user parameter buffers hold values the copy has not seen
            copy_stale: AtomicBool::new(variant.param_copy.is_some()),
        })
    }

    /// The context (device and queue).
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> String {
        self.ctx.adapter_name()
    }

    /// Number of arena segments: one set of buffers each (one unless the model exceeds
    /// one storage binding).
    pub fn segment_count(&self) -> usize {
        self.arena.segments.len()
    }

    /// Gradient buffers, one per segment.
    pub fn gradient_buffers(&self) -> Vec<&wgpu::Buffer> {
        self.arena.segments.iter().map(|s| &s.grads).collect()
    }

    /// Parameter buffers, one per segment.
    pub fn param_buffers(&self) -> Vec<&wgpu::Buffer> {
        self.arena.segments.iter().map(|s| &s.params).collect()
    }

    /// The elements of variable `i` in the arena (padding excluded), `None` when there is
    /// no such variable. Its start is a multiple of the device's storage-binding
    /// alignment, in elements.
    pub fn tensor_range(&self, i: usize) -> Option<Range<usize>> {
        self.arena.layout.tensor(i).ok().map(|t| t.range())
    }

    /// Variable `i`'s parameters as a binding range (read them in your forward pass).
    /// [`Error::NoSuchVariable`], or [`Error::NotBindable`] for a variable longer than one
    /// storage binding.
    pub fn param_view(&self, i: usize) -> Result<TensorView<'_>> {
        self.arena.view(Target::Params, i)
    }

    /// Variable `i`'s gradient as a binding range: write it from your backward pass,
    /// then call [`RmsProp::apply_device_gradients`](crate::RmsProp::apply_device_gradients)
    /// or [`RmsProp::record_device_step`](crate::RmsProp::record_device_step).
    ///
    /// A user shader writes the bias gradient, and the step follows in the same
    /// submission:
    ///
    /// ```
    /// use fused_rmsprop::{Backend, Error, RmsProp, RmsPropConfig, Variable};
    /// # fn main() -> fused_rmsprop::Result<()> {
    /// let vars = vec![Variable::new("w", &[5], vec![1.0; 5])?, Variable::new("b", &[3], vec![0.0; 3])?];
    /// let mut opt = match RmsProp::with_backend(RmsPropConfig::default(), vars, Backend::Gpu) {
    ///     Err(Error::NoAdapter(why)) if std::env::var_os("CI").is_none() => {
    ///         eprintln!("!!!!!! EXAMPLE SKIPPED: no GPU adapter ({why}) !!!!!!");
    ///         return Ok(());
    ///     }
    ///     built => built?,
    /// };
    /// let gpu = opt.gpu().expect("built on the GPU");
    /// let (device, queue) = (gpu.context().device.clone(), gpu.context().queue.clone());
    /// let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
    ///     label: Some("my backward pass"),
    ///     source: wgpu::ShaderSource::Wgsl("
    ///         @group(0) @binding(0) var<storage, read_write> grad: array<f32>;
    ///         @compute @workgroup_size(64)
    ///         fn backward(@builtin(global_invocation_id) id: vec3<u32>) {
    ///             if id.x < arrayLength(&grad) { grad[id.x] = 1.0; }
    ///         }".into()),
    /// });
    /// let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
    ///     label: Some("backward"),
    ///     layout: None,
    ///     module: &module,
    ///     entry_point: Some("backward"),
    ///     compilation_options: Default::default(),
    ///     cache: None,
    /// });
    /// let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
    ///     label: Some("bias gradient"),
    ///     layout: &pipeline.get_bind_group_layout(0),
    ///     entries: &[wgpu::BindGroupEntry {
    ///         binding: 0,
    ///         resource: gpu.gradient_view(1)?.binding().expect("not empty"),
    ///     }],
    /// });
    /// let mut encoder = device.create_command_encoder(&Default::default());
    /// {
    ///     let mut pass = encoder.begin_compute_pass(&Default::default());
    ///     pass.set_pipeline(&pipeline);
    ///     pass.set_bind_group(0, &bind_group, &[]);
    ///     pass.dispatch_workgroups(1, 1, 1);
    /// }
    /// opt.record_device_step(&[false, true], &mut encoder)?; // only the bias has a gradient
    /// queue.submit([encoder.finish()]);
    /// // Keras' first step with gradient 1: -0.001 / sqrt(0.1 + 1e-7)
    /// for b in opt.variable(1)? {
    ///     assert!((b + 0.0031623).abs() < 1e-6, "{b}");
    /// }
    /// assert_eq!(opt.variable(0)?, vec![1.0; 5]);
    /// # Ok(()) }
    /// ```
    pub fn gradient_view(&self, i: usize) -> Result<TensorView<'_>> {
        self.arena.view(Target::Grads, i)
    }

    /// Variable `i`'s parameter remainders (bf16 parameters with
    /// [`Precision::param_remainders`](crate::Precision::param_remainders)), 2 bytes per
    /// element, the size rounded up to a multiple of 4.
    #[cfg(feature = "burn")]
    pub(crate) fn param_remainders_view(&self, i: usize) -> Result<TensorView<'_>> {
        self.arena.view(Target::ParamRemainders, i)
    }

    /// Variable `i`'s 16-bit parameter copy (see
    /// [`Precision::param_copy`](crate::Precision::param_copy)) as a binding range: 2
    /// bytes per element, two per `u32` (the size rounded up to a multiple of 4), for a
    /// forward pass in 16 bits. [`Error::NoParamCopy`] without one.
    pub fn param_copy_view(&self, i: usize) -> Result<TensorView<'_>> {
        let view = self.arena.view(Target::ParamCopy, i)?;
        self.refresh_param_copy()?;
        Ok(view)
    }

    /// Rewrites the 16-bit parameter copy from the parameters (one submission) if
    /// parameters were written since.
    fn refresh_param_copy(&self) -> Result<()> {
        if self.variant.param_copy.is_none() || !self.copy_stale.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.dispatch_per_chunk(&self.pipelines.refresh_param_copy)
    }

    /// One workgroup of `pipeline` per chunk, segment by segment, in its own submission.
    fn dispatch_per_chunk(&self, pipeline: &wgpu::ComputePipeline) -> Result<()> {
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            for s in self.arena.segments.iter().filter(|s| s.chunk_count > 0) {
                pass.set_bind_group(0, &s.bind_group, &[]);
                let (x, y) = grid(s.chunk_count, self.max_groups);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        self.ctx.queue.submit([encoder.finish()]);
        self.ctx.take_error()
    }

    /// Variable `i`'s `slot` as a binding range, for reading (writing it from your own
    /// kernels bypasses the optimizer's checks). [`Error::SlotNotKept`] when the config
    /// keeps no such slot.
    pub fn slot_view(&self, slot: Slot, i: usize) -> Result<TensorView<'_>> {
        self.arena.view(Target::Slot(slot), i)
    }

    /// Workgroups one pass over the arena dispatches: one per chunk of at most 8192
    /// elements of one tensor (spread over a 2D grid beyond the per-dimension limit).
    pub fn workgroups_per_pass(&self) -> usize {
        self.arena.layout.chunks().len()
    }

    fn counters(&self) -> Result<MutexGuard<'_, GpuCounters>> {
        self.counters.lock().map_err(|_| poisoned())
    }

    /// Writes the uniform with the plans of every counter value the next step may see
    /// (queued: it lands before the next submission), and records the dispatches of one
    /// step into `encoder`. Returns the guard's readback buffer, if any.
    fn encode_step(
        &mut self,
        config: &RmsPropConfig,
        present: &[bool],
        table: &TensorTable,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<Option<wgpu::Buffer>> {
        let variant = self.variant;
        let rows: Vec<(u32, u32)> = present
            .iter()
            .enumerate()
            .map(|(t, &p)| {
                let rule = table.rule(t);
                let flag = |on: bool, flag: u32| if on { flag } else { 0 };
                let flags = flag(p, FLAG_HAS_GRADIENT)
                    | flag(rule.decay && variant.weight_decay, FLAG_DECAY)
                    | flag(rule.frozen, FLAG_FROZEN);
                (flags, rule.group)
            })
            .collect();
        self.arena.set_rows(&self.ctx, rows);

        let mut counters = self.counters()?;
        // Without the guard the window is the host's counter alone; with it, every
        // counter the device may have reached.
        let (base, len) = counters.window(&self.ctx)?;
        let mut uniform = StepUniform {
            base_lo: base as u32,
            len: len as u32,
            tensor_count: self.arena.layout.tensors().len() as u32,
            growth_steps: counters.loss_scaling().map_or(0, |ls| ls.growth_steps),
            plans: [StepScalars::default(); PLAN_WINDOW],
        };
        for (k, plan) in uniform.plans[..len].iter_mut().enumerate() {
            *plan = StepScalars {
                rounding_seed: self.rounding_seed,
                ..plan_step(config, base + k as u64)
            };
        }
        self.ctx
            .queue
            .write_buffer(&self.arena.uniform, 0, uniform.used_bytes());
        if !config.param_groups.is_empty() {
            // each plan's row of the group table
            let groups: Vec<GroupScalars> = (0..len)
                .flat_map(|k| plan_groups(config, base + k as u64))
                .collect();
            self.arena.write_groups(&self.ctx, &groups)?;
        }

        // Without the guard the host knows whether this is an update step; with it, the
        // device decides, so the reduction always runs (it also finds non-finite
        // gradients).
        let reduce = variant.skips_non_finite()
            || (variant.clip.needs_norm()
                && uniform.plans[0].is_update_step != 0
                && self.external_clips.is_none());
        if let (Some(clips), true) = (&self.external_clips, variant.clip.needs_norm()) {
            self.arena.write_clips(&self.ctx, clips);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("rmsprop step"),
                timestamp_writes: None,
            });
            let segments = &self.arena.segments;
            // one workgroup per chunk, segment by segment
            let per_chunk = |pass: &mut wgpu::ComputePass<'_>, pipeline| {
                pass.set_pipeline(pipeline);
                for s in segments.iter().filter(|s| s.chunk_count > 0) {
                    pass.set_bind_group(0, &s.bind_group, &[]);
                    let (x, y) = grid(s.chunk_count, self.max_groups);
                    pass.dispatch_workgroups(x, y, 1);
                }
            };
            if reduce {
                per_chunk(&mut pass, &self.pipelines.norm_partials);
                pass.set_pipeline(&self.pipelines.norm_finalize);
                pass.set_bind_group(0, &segments[0].bind_group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            per_chunk(&mut pass, &self.pipelines.update);
        }
        counters.record_readback(&self.ctx, encoder, &self.arena.control)
    }

    /// One step in its own submission.
    fn submit_step(
        &mut self,
        config: &RmsPropConfig,
        present: &[bool],
        table: &TensorTable,
    ) -> Result<()> {
        let mut encoder = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("rmsprop step"),
            });
        let readback = self.encode_step(config, present, table, &mut encoder)?;
        self.ctx.queue.submit([encoder.finish()]);
        self.counters()?.submitted(readback);
        Ok(())
    }

    /// Compute dispatches one update step records with this config: the update per
    /// segment holding elements, plus, when clipping by a norm or guarding, the norm
    /// partials per segment and one finalize.
    pub fn dispatches_per_step(&self) -> usize {
        let busy = self
            .arena
            .segments
            .iter()
            .filter(|s| s.chunk_count > 0)
            .count();
        let with_norm = self.variant.skips_non_finite() || self.variant.clip.needs_norm();
        if with_norm {
            2 * busy + 1
        } else {
            busy
        }
    }

    /// Runs `variant` from the next step: its pipelines, and the device deciding the
    /// steps exactly when the variant skips non-finite steps.
    fn switch_variant(&mut self, variant: Variant) -> Result<()> {
        let pipelines = pipelines_for(&self.ctx, &variant)?;
        let counters = self.counters.get_mut().map_err(|_| poisoned())?;
        match (variant.skips_non_finite(), counters.device_decides()) {
            (true, false) => counters.enable_guard(&self.ctx, &self.arena.control)?,
            (false, true) => counters.disable_guard(&self.ctx)?,
            _ => {}
        }
        self.variant = variant;
        self.pipelines = pipelines;
        Ok(())
    }

    /// Lets steps pile up in flight until the plan window is full (tests of that path).
    #[cfg(test)]
    pub(crate) fn defer_guard_readbacks(&self) {
        if let Ok(mut c) = self.counters() {
            c.defer_readbacks();
        }
    }

    /// Steps in flight as the counters know them (no polling).
    #[cfg(test)]
    pub(crate) fn guard_in_flight(&self) -> u64 {
        self.counters().map_or(0, |c| c.in_flight())
    }
}

impl Engine for GpuEngine {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn variant(&self) -> Variant {
        self.variant
    }

    fn step(
        &mut self,
        config: &RmsPropConfig,
        grads: Gradients<'_>,
        table: &TensorTable,
    ) -> Result<()> {
        self.ctx.take_error()?;
        self.refresh_param_copy()?;
        if let Gradients::Host(host) = grads {
            self.arena.write_gradients(&self.ctx, host)?;
        }
        let present: Vec<bool> = (0..self.arena.layout.tensors().len())
            .map(|i| grads.present(i))
            .collect();
        self.submit_step(config, &present, table)
    }

    fn record_step(
        &mut self,
        config: &RmsPropConfig,
        present: &[bool],
        table: &TensorTable,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        if self.variant.skips_non_finite() {
            return Err(Error::NotWithGuard("record_device_step"));
        }
        self.ctx.take_error()?;
        self.refresh_param_copy()?;
        let readback = self.encode_step(config, present, table, encoder)?;
        // no guard: no readback, and the host-decided step counts as applied
        self.counters()?.submitted(readback);
        Ok(())
    }

    fn finalize(&mut self) -> Result<()> {
        if self.variant.ema
            && (self.variant.params != Dtype::F32 || self.variant.state != StateDtype::F32)
        {
            // each parameter assigned its EMA (rounded, or decoded from compact slots):
            // a kernel, not a copy
            self.dispatch_per_chunk(&self.pipelines.finalize_params)?;
            self.copy_stale.store(true, Ordering::Release);
            self.refresh_param_copy()?;
        } else if self.variant.ema {
            self.arena.copy_ema_to_params(&self.ctx)?;
            self.copy_stale.store(true, Ordering::Release);
            self.refresh_param_copy()?;
        }
        Ok(())
    }

    fn read(&self, role: Role) -> Result<Staged<Vec<Vec<f32>>>> {
        let layout = &self.arena.layout;
        let reads = if let (Role::Slot(slot), false) = (role, self.variant.state == StateDtype::F32)
        {
            let tensors = (0..layout.tensors().len())
                .map(|t| {
                    Ok(self
                        .arena
                        .read_slot_raw(slot, t)?
                        .map(move |raw| Ok(raw.decode(slot))))
                })
                .collect::<Result<Vec<_>>>()?;
            Reads::all(tensors)
        } else {
            let layout = layout.clone();
            self.arena
                .read(role.into(), 0, layout.total())?
                .map(move |flat| Ok(layout.split(&flat)))
        };
        reads.start(&self.ctx)
    }

    fn read_tensor(&self, role: Role, tensor: usize) -> Result<Staged<Vec<f32>>> {
        let t = self.arena.layout.tensor(tensor)?;
        if let (Role::Slot(slot), false) = (role, self.variant.state == StateDtype::F32) {
            let raw = self.arena.read_slot_raw(slot, tensor)?;
            return raw.map(move |raw| Ok(raw.decode(slot))).start(&self.ctx);
        }
        self.arena
            .read(role.into(), t.offset, t.len)?
            .start(&self.ctx)
    }

    fn write_tensor(&mut self, role: Role, tensor: usize, values: &[f32]) -> Result<()> {
        let t = self.arena.layout.tensor(tensor)?;
        match role {
            Role::Slot(slot) if self.variant.state != StateDtype::F32 => {
                let raw = RawSlot::encode(self.arena.slot_dtype(tensor), slot, values);
                self.arena.write_slot_raw(&self.ctx, slot, tensor, &raw)?
            }
            _ => self.arena.write(&self.ctx, role.into(), t.offset, values)?,
        }
        if role == Role::Params {
            self.copy_stale.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn read_param_copy(&self) -> Result<Staged<Vec<Vec<f32>>>> {
        let dtype = self.variant.param_copy.ok_or(Error::NoParamCopy)?;
        self.refresh_param_copy()?;
        let layout = self.arena.layout.clone();
        let bits = self.arena.read_param_copy()?;
        bits.map(move |bits| {
            let values: Vec<f32> = bits.iter().map(|&b| dtype.upcast_bits(b)).collect();
            Ok(layout.split(&values))
        })
        .start(&self.ctx)
    }

    fn read_slots_raw(&self, slot: Slot) -> Result<Staged<Vec<RawSlot>>> {
        let tensors = (0..self.arena.layout.tensors().len())
            .map(|t| self.arena.read_slot_raw(slot, t))
            .collect::<Result<Vec<_>>>()?;
        Reads::all(tensors).start(&self.ctx)
    }

    fn write_slot_raw(&mut self, slot: Slot, tensor: usize, raw: &RawSlot) -> Result<()> {
        self.arena.write_slot_raw(&self.ctx, slot, tensor, raw)
    }

    fn set_external_clips(&mut self, clips: Option<Vec<ClipFactors>>) {
        self.external_clips = clips;
    }

    fn state_bytes(&self) -> u64 {
        let slots = self.variant.slots().len();
        self.arena
            .segments
            .iter()
            .map(|s| s.regions.slot_bytes(slots))
            .sum()
    }

    fn raw_iterations(&self) -> u64 {
        let Ok(mut c) = self.counters() else { return 0 };
        // a lost device keeps the last counter read back (the next step reports it)
        let _ = c.settle_all(&self.ctx);
        c.raw()
    }

    fn skipped_steps(&self) -> SkippedSteps {
        self.counters()
            .map(|mut c| c.report(&self.ctx))
            .unwrap_or_default()
    }

    fn set_counters(&mut self, raw: u64, skipped: u64) -> Result<()> {
        let counters = self.counters.get_mut().map_err(|_| poisoned())?;
        counters.reset(&self.ctx, &self.arena.control, raw, skipped)
    }

    fn set_non_finite_guard(&mut self, enabled: bool) -> Result<()> {
        if enabled == self.variant.guard {
            return Ok(());
        }
        let variant = Variant {
            guard: enabled,
            ..self.variant
        };
        self.switch_variant(variant)
    }

    fn set_rounding_seed(&mut self, seed: u32) {
        self.rounding_seed = seed;
    }

    fn set_loss_scaling(&mut self, scaling: Option<LossScaling>) -> Result<()> {
        let counters = self.counters.get_mut().map_err(|_| poisoned())?;
        counters.set_loss_scaling(&self.ctx, &self.arena.control, scaling)?;
        let variant = Variant {
            loss_scaling: scaling.is_some(),
            ..self.variant
        };
        self.switch_variant(variant)
    }

    fn loss_scaling(&self) -> Option<LossScaling> {
        let mut c = self.counters().ok()?;
        let _ = c.report(&self.ctx); // takes the readbacks that arrived
        c.loss_scaling()
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn synchronize(&self) -> Result<()> {
        self.ctx.wait()?;
        self.counters()?.settle_all(&self.ctx)
    }

    fn synchronize_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            // a readback of the step state is a fence: it arrives after every step
            // submitted before it, and their counter readbacks arrive before it
            for _ in 0..3 {
                Reads::copy(&self.arena.control, 0, 4)
                    .start(&self.ctx)?
                    .get()
                    .await?;
                if self.counters()?.settle_arrived(&self.ctx)? {
                    return Ok(());
                }
            }
            Err(Error::Gpu(
                "non-finite guard: counter readbacks did not arrive after the device went idle"
                    .into(),
            ))
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::PLAN_WINDOW;
    use crate::{
        Backend, GpuContext, GpuOptions, LearningRate, LearningRateSchedule, RmsProp,
        RmsPropConfig, Variable,
    };

    /// A GPU on any adapter; under CI a missing adapter fails the test, elsewhere the
    /// test says loudly that it is skipped.
    fn context() -> Option<GpuContext> {
        match GpuContext::new(true) {
            Ok(c) => Some(c),
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but no GPU: {e}"),
            Err(e) => {
                eprintln!("\n!!!!!! GPU TEST SKIPPED: no GPU adapter ({e}) !!!!!!\n");
                None
            }
        }
    }

    /// Both int8 block reductions (the workgroup's barriers, for hardware GPUs; one
    /// invocation per block, for software adapters) store the same state and
    /// parameters, bit for bit: every structural option, the smallest and largest
    /// blocks, chunks that end inside a block, a step without gradients.
    #[test]
    fn both_int8_block_reductions_store_the_same_bytes() {
        use crate::gpu::pipelines::BlockReduction;
        use crate::{Slot, StateDtype, StateStorage};
        let Some(probe) = context() else { return };
        drop(probe);
        let lens = [20_000usize, 5003, 300];
        let start = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + seed) as f32 * 0.013).sin())
                .collect()
        };
        let everything = RmsPropConfig::default()
            .with_centered(true)
            .with_momentum(0.9)
            .with_use_ema(true)
            .with_gradient_accumulation_steps(2)
            .with_weight_decay(0.01);
        for (config, block) in [
            (RmsPropConfig::default(), 256),
            (everything.clone(), 256),
            (everything, 32),
        ] {
            let config = config.with_state(StateStorage::new(StateDtype::Dynamic8 {
                block_size: block,
            }));
            let run = |blocks: BlockReduction| {
                let ctx = context().expect("an adapter, as above");
                ctx.pipelines.lock().unwrap().blocks = blocks;
                let options = GpuOptions {
                    context: Some(ctx),
                    ..GpuOptions::default()
                };
                let vars: Vec<Variable> = lens
                    .iter()
                    .enumerate()
                    .map(|(t, &n)| Variable::new(format!("v{t}"), &[n], start(n, t)).unwrap())
                    .collect();
                let mut opt =
                    RmsProp::with_options(config.clone(), vars, Backend::Gpu, &options).unwrap();
                for step in 0..5 {
                    let grads: Vec<Vec<f32>> = lens
                        .iter()
                        .map(|&n| {
                            start(n, 100 + step)
                                .iter()
                                .map(|g| 3.0 * g * g * g)
                                .collect()
                        })
                        .collect();
                    let mut refs: Vec<Option<&[f32]>> =
                        grads.iter().map(|g| Some(&g[..])).collect();
                    if step == 3 {
                        refs[0] = None;
                    }
                    opt.apply_gradients(&refs).unwrap();
                }
                let bits = |v: Vec<Vec<f32>>| -> Vec<Vec<u32>> {
                    v.iter()
                        .map(|t| t.iter().map(|x| x.to_bits()).collect())
                        .collect()
                };
                let slots: Vec<Option<Vec<Vec<u32>>>> = Slot::ALL
                    .iter()
                    .map(|&s| opt.slot(s).unwrap().map(bits))
                    .collect();
                (bits(opt.variables().unwrap()), slots)
            };
            let (workgroup, invocation) = (
                run(BlockReduction::Workgroup),
                run(BlockReduction::Invocation),
            );
            assert!(workgroup.1.iter().flatten().count() >= 1, "slots kept");
            assert!(
                workgroup
                    .1
                    .iter()
                    .flatten()
                    .flatten()
                    .flatten()
                    .any(|&b| b != 0),
                "the slots moved"
            );
            let first_gap = |a: &[Vec<u32>], b: &[Vec<u32>]| {
                a.iter().zip(b).enumerate().find_map(|(t, (x, y))| {
                    let j = x.iter().zip(y).position(|(p, q)| p != q)?;
                    let (p, q) = (f32::from_bits(x[j]), f32::from_bits(y[j]));
                    Some(format!(
                        "tensor {t}[{j}]: {p} (workgroup) vs {q} (invocation)"
                    ))
                })
            };
            let gap = first_gap(&workgroup.0, &invocation.0);
            assert!(gap.is_none(), "parameters, block {block}: {gap:?}");
            for (slot, (a, b)) in Slot::ALL.iter().zip(workgroup.1.iter().zip(&invocation.1)) {
                let gap = match (a, b) {
                    (Some(a), Some(b)) => first_gap(a, b),
                    (a, b) => (a.is_some() != b.is_some()).then(|| "kept on one only".into()),
                };
                assert!(gap.is_none(), "{slot}, block {block}: {gap:?}");
            }
        }
    }

    #[derive(Debug)]
    struct Sawtooth;

    impl LearningRateSchedule for Sawtooth {
        fn learning_rate(&self, step: u64) -> f64 {
            0.001 * (1 + step % 7) as f64
        }
    }

    /// With readbacks deferred, steps pile up until the plan window is full; the next
    /// step waits for them, and every step still runs with the plan of the device's
    /// counter: the result equals the CPU path over the finite steps (within the
    /// conformance tolerance, `tests/keras/FORMAT.md`).
    #[test]
    fn a_full_plan_window_waits_and_stays_exact() {
        let Some(ctx) = context() else { return };
        let config = RmsPropConfig::default()
            .with_learning_rate(LearningRate::Custom(Arc::new(Sawtooth)))
            .with_gradient_accumulation_steps(2)
            .with_use_ema(true)
            .with_ema_overwrite_frequency(3);
        let start: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
        let var = || vec![Variable::new("w", &[50, 100], start.clone()).unwrap()];
        let options = GpuOptions {
            context: Some(ctx),
            ..GpuOptions::default()
        };
        let mut gpu = RmsProp::with_options(config.clone(), var(), Backend::Gpu, &options).unwrap();
        gpu.set_non_finite_guard(true).unwrap();
        gpu.gpu().unwrap().defer_guard_readbacks();
        let mut cpu = RmsProp::with_backend(config, var(), Backend::Cpu).unwrap();
        let mut most_in_flight = 0;
        let mut bad = 0;
        for step in 0..3 * PLAN_WINDOW {
            let mut g: Vec<f32> = (0..5000)
                .map(|i| ((i + step) as f32 * 0.11).cos())
                .collect();
            if step % 3 == 2 {
                g[step * 13 % 5000] = f32::NAN;
                bad += 1;
            } else {
                cpu.apply_gradients(&[Some(&g)]).unwrap();
            }
            gpu.apply_gradients(&[Some(&g)]).unwrap();
            most_in_flight = most_in_flight.max(gpu.gpu().unwrap().guard_in_flight());
        }
        assert_eq!(
            most_in_flight, PLAN_WINDOW as u64,
            "the window never filled"
        );
        gpu.synchronize().unwrap();
        assert_eq!(gpu.skipped_steps().skipped, bad);
        assert_eq!(gpu.raw_iterations(), cpu.raw_iterations());
        let (a, b) = (gpu.variable(0).unwrap(), cpu.variable(0).unwrap());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let close = (x - y).abs() as f64 <= 1e-5 + 1e-4 * f64::from(y.abs());
            assert!(close, "element {i}: gpu {x} vs cpu {y}");
        }
    }
}
