//! The GPU driver: one step is a uniform write (plus the tensor flags when they change)
//! and one submission of at most `2 * segments + 1` dispatches; nothing is read back
//! inside a step. With the non-finite guard, the step also copies 32 bytes of counters
//! into a staging buffer that is mapped in the background.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::gpu::arena::{GpuArena, Segment, UserBuffers};
use crate::gpu::context::{software_allowed_by_env, GpuContext};
use crate::gpu::guard::DeviceGuard;
use crate::gpu::pipelines::{pipelines_for, Pipelines, PLAN_WORDS, UNIFORM_HEADER_WORDS};
use crate::guard::SkippedSteps;
use crate::layout::{Layout, VariableSpec};
use crate::plan::{StepPlan, Variant};

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

/// Parameters and slots of a model on a GPU, and the pipelines that step them.
#[derive(Debug)]
pub struct GpuEngine {
    ctx: GpuContext,
    pipelines: Arc<Pipelines>,
    arena: GpuArena,
    max_groups: u32,
    /// The non-finite guard's host-side view, when the guard is on (behind a mutex so
    /// that `&self` readers can take the readbacks that arrived).
    guard: Mutex<Option<DeviceGuard>>,
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
    pub fn new(
        options: &GpuOptions,
        specs: &[VariableSpec],
        variant: Variant,
        required: bool,
    ) -> Result<Self> {
        let ctx = match &options.context {
            Some(c) => c.clone(),
            None => {
                let allow = required
                    || options
                        .allow_software
                        .unwrap_or_else(software_allowed_by_env);
                GpuContext::new(allow)?
            }
        };
        if !required
            && ctx.is_software()
            && !options
                .allow_software
                .unwrap_or_else(software_allowed_by_env)
        {
            return Err(Error::NoAdapter(format!(
                "{} is a software adapter, not allowed for Auto",
                ctx.adapter_name()
            )));
        }
        let pipelines = pipelines_for(&ctx, &variant)?;
        let arena = GpuArena::new(
            &ctx,
            &pipelines,
            specs,
            variant,
            options.max_segment_len,
            options.buffers.clone(),
        )?;
        let max_groups = ctx.device.limits().max_compute_workgroups_per_dimension;
        Ok(GpuEngine {
            ctx,
            pipelines,
            arena,
            max_groups,
            guard: Mutex::new(None),
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

    /// The arena layout (offsets of each variable in the parameter and gradient buffers).
    pub fn layout(&self) -> &Layout {
        self.arena.layout()
    }

    /// The arena's segments with their buffers: write gradients into `grads` with your
    /// own kernels or copies, then call [`crate::RmsProp::apply_device_gradients`].
    pub fn segments(&self) -> &[Segment] {
        self.arena.segments()
    }

    /// Gradient buffers, one per segment.
    pub fn gradient_buffers(&self) -> Vec<&wgpu::Buffer> {
        self.arena.segments().iter().map(|s| &s.grads).collect()
    }

    /// Parameter buffers, one per segment.
    pub fn param_buffers(&self) -> Vec<&wgpu::Buffer> {
        self.arena.segments().iter().map(|s| &s.params).collect()
    }

    /// A step whose gradients come from host memory: staged into the gradient buffers,
    /// then [`GpuEngine::step_device`].
    pub(crate) fn step_host(
        &mut self,
        plan_at: &dyn Fn(u64) -> StepPlan,
        raw: u64,
        grads: &[Option<&[f32]>],
        decay: &[bool],
    ) -> Result<()> {
        self.ctx.take_error()?;
        self.arena.write_gradients(&self.ctx, grads)?;
        let present: Vec<bool> = grads.iter().map(Option::is_some).collect();
        self.step_device(plan_at, raw, &present, decay)
    }

    /// A step on the gradients already in the gradient buffers: writes the uniform (and
    /// the tensor flags if they changed), records the dispatches, submits once.
    ///
    /// `plan_at(counter)` is the plan for a step counter. Without the guard the step
    /// runs `plan_at(raw)`; with it, the counter lives on the device and the uniform
    /// holds the plans of every counter the device may have reached.
    pub(crate) fn step_device(
        &mut self,
        plan_at: &dyn Fn(u64) -> StepPlan,
        raw: u64,
        present: &[bool],
        decay: &[bool],
    ) -> Result<()> {
        self.ctx.take_error()?;
        let variant = self.arena.variant;
        let flags: Vec<u32> = present
            .iter()
            .zip(decay)
            .map(|(&p, &d)| p as u32 | ((d && variant.weight_decay) as u32) << 1)
            .collect();
        self.arena.set_flags(&self.ctx, flags);

        let mut guard_lock = lock(&self.guard)?;
        let (base, len) = match guard_lock.as_mut() {
            Some(g) => g.window(&self.ctx)?,
            None => (raw, 1),
        };
        let plans: Vec<StepPlan> = (0..len as u64).map(|k| plan_at(base + k)).collect();
        let tensor_count = self.arena.layout.tensors().len() as u32;
        let mut words: Vec<u32> = vec![base as u32, len as u32, tensor_count, 0];
        for plan in &plans {
            let plan_words: [u32; PLAN_WORDS] = bytemuck::cast(plan.uniform_words());
            words.extend_from_slice(&plan_words);
        }
        debug_assert_eq!(words.len(), UNIFORM_HEADER_WORDS + len * PLAN_WORDS);
        self.ctx
            .queue
            .write_buffer(&self.arena.uniform, 0, bytemuck::cast_slice(&words));

        // Without the guard the host knows whether this is an update step; with it,
        // the device decides, so the reduction always runs (it also finds non-finite
        // gradients).
        let guarded = guard_lock.is_some();
        let reduce = guarded || (variant.clip.needs_norm() && plans[0].is_update_step);
        let mut encoder = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("rmsprop step"),
            });
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
        let readback = match guard_lock.as_mut() {
            Some(g) => Some(g.record_readback(&self.ctx, &mut encoder, &self.arena.guard_state)?),
            None => None,
        };
        self.ctx.queue.submit([encoder.finish()]);
        if let (Some(g), Some(buffer)) = (guard_lock.as_mut(), readback) {
            g.submitted(buffer);
        }
        Ok(())
    }

    /// Turns the non-finite guard on, with the device counters starting at `raw` and
    /// `skipped`.
    pub(crate) fn enable_guard(&mut self, raw: u64, skipped: u64) -> Result<()> {
        let guarded = Variant {
            guard: true,
            ..self.arena.variant
        };
        let pipelines = pipelines_for(&self.ctx, &guarded)?;
        let mut slot = lock(&self.guard)?;
        if slot.is_none() {
            *slot = Some(DeviceGuard::start(
                &self.ctx,
                &self.arena.guard_state,
                raw,
                skipped,
            ));
            self.pipelines = pipelines;
        }
        Ok(())
    }

    /// Turns the guard off after the steps in flight; returns the final `(raw, skipped)`
    /// counters, or `None` when it was off.
    pub(crate) fn disable_guard(&mut self) -> Result<Option<(u64, u64)>> {
        let counters = self.guard_counters()?;
        if counters.is_some() {
            self.pipelines = pipelines_for(&self.ctx, &self.arena.variant)?;
            *lock(&self.guard)? = None;
        }
        Ok(counters)
    }

    /// The guard's exact `(raw, skipped)` counters after waiting for the steps in
    /// flight; `None` when the guard is off.
    pub(crate) fn guard_counters(&self) -> Result<Option<(u64, u64)>> {
        let mut slot = lock(&self.guard)?;
        slot.as_mut().map(|g| g.settle_all(&self.ctx)).transpose()
    }

    /// The guard's counters as last read back, without waiting or failing (for when
    /// the device is gone); `None` when the guard is off.
    pub(crate) fn guard_last_known(&self) -> Option<(u64, u64)> {
        let slot = lock(&self.guard).ok()?;
        slot.as_ref().map(DeviceGuard::last_known)
    }

    /// The guard's report without waiting; `None` when the guard is off.
    pub(crate) fn guard_report(&self) -> Option<SkippedSteps> {
        let mut slot = lock(&self.guard).ok()?;
        slot.as_mut().map(|g| g.report(&self.ctx))
    }

    /// See [`DeviceGuard::defer_readbacks`].
    #[cfg(test)]
    pub(crate) fn defer_guard_readbacks(&self) {
        if let Ok(mut slot) = lock(&self.guard) {
            if let Some(g) = slot.as_mut() {
                g.defer_readbacks();
            }
        }
    }

    /// Steps in flight as the guard's ledger counts them (no polling).
    #[cfg(test)]
    pub(crate) fn guard_in_flight(&self) -> u64 {
        lock(&self.guard)
            .ok()
            .and_then(|slot| slot.as_ref().map(|g| g.in_flight()))
            .unwrap_or(0)
    }

    /// Sets the guard's device counters (e.g. on restoring a checkpoint), after the
    /// steps in flight. Does nothing when the guard is off.
    pub(crate) fn reset_guard(&mut self, raw: u64, skipped: u64) -> Result<()> {
        let mut slot = lock(&self.guard)?;
        if let Some(g) = slot.as_mut() {
            g.settle_all(&self.ctx)?;
            *g = DeviceGuard::start(&self.ctx, &self.arena.guard_state, raw, skipped);
        }
        Ok(())
    }

    /// Waits for every submitted step; reports a lost device or a captured error. With
    /// the guard on, also reads every counter readback, so that
    /// [`crate::RmsProp::skipped_steps`] is exact afterwards.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.wait()?;
        self.guard_counters().map(|_| ())
    }

    /// `finalize_variable_values`: copies the EMA into the parameters (no-op without EMA).
    pub(crate) fn finalize(&mut self) -> Result<()> {
        if self.arena.variant.ema {
            self.arena.copy_ema_to_params(&self.ctx)?;
        }
        Ok(())
    }

    /// Reads back a whole arena by role: `params`, `grads`, or a slot name.
    pub fn read_arena(&self, role: &str) -> Result<Vec<f32>> {
        self.arena
            .read(&self.ctx, role, 0, self.arena.layout.total())
    }

    fn tensor(&self, i: usize) -> Result<crate::layout::TensorEntry> {
        self.arena
            .layout
            .tensors()
            .get(i)
            .copied()
            .ok_or(Error::NoSuchVariable(i))
    }

    /// Reads back one tensor of `role`.
    pub fn read_tensor(&self, role: &str, tensor: usize) -> Result<Vec<f32>> {
        let t = self.tensor(tensor)?;
        self.arena.read(&self.ctx, role, t.offset, t.len)
    }

    /// Uploads one tensor of `role` (`params` or a slot name).
    pub fn write_tensor(&self, role: &str, tensor: usize, values: &[f32]) -> Result<()> {
        let t = self.tensor(tensor)?;
        if values.len() != t.len {
            return Err(Error::CountMismatch {
                what: "values",
                expected: t.len,
                found: values.len(),
            });
        }
        self.arena.write(&self.ctx, role, t.offset, values)
    }
}

fn lock(guard: &Mutex<Option<DeviceGuard>>) -> Result<MutexGuard<'_, Option<DeviceGuard>>> {
    guard
        .lock()
        .map_err(|_| Error::Gpu("non-finite guard state poisoned".into()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::gpu::pipelines::PLAN_WINDOW;
    use crate::trace::values_match;
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

    #[derive(Debug)]
    struct Sawtooth;

    impl LearningRateSchedule for Sawtooth {
        fn learning_rate(&self, step: u64) -> f64 {
            0.001 * (1 + step % 7) as f64
        }
    }

    /// With readbacks deferred, steps pile up until the plan window is full; the next
    /// step waits for them, and every step still runs with the plan of the device's
    /// counter: the result equals the CPU path over the finite steps.
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
            assert!(values_match(*x, *y), "element {i}: gpu {x} vs cpu {y}");
        }
    }
}
