//! The GPU engine's step counters, and the GPU side of the opt-in non-finite guard.
//!
//! Without the guard the host decides every step (it applies), so the counters count
//! directly. With it, the device decides: it keeps the step counter and the skip count
//! in [`StepState`], and each step ends with a copy of that state into a small staging
//! buffer, mapped asynchronously; the host reads whichever copies have arrived, without
//! waiting, to settle its [`StepCounters`].
//!
//! Keras' dynamic loss scaling (`LossScaleOptimizer`) is decided the same way: the
//! device keeps the scale and its growth counter in [`StepState`] too (the rule is
//! `math::next_loss_scale`, mirrored in WGSL), and the readbacks bring them back.
//!
//! "Non-finite" is judged on the gradient as the optimizer first sees it: the raw
//! gradient divided by `loss_scale_factor` (with loss scaling, which requires no
//! `loss_scale_factor`, the raw gradient, as Keras checks it). Finite gradients whose norm overflows f32
//! are not caught: they are applied with Keras' result.

use std::collections::VecDeque;

use futures_channel::oneshot;

use crate::backend::LossScaling;
use crate::counters::{SkippedSteps, StepCounters};
use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::shader::{StepState, PLAN_WINDOW};

/// Bytes of [`StepState`].
pub(crate) const STEP_STATE_BYTES: u64 = std::mem::size_of::<StepState>() as u64;

/// A readback of the step state after one submission, mapping in the background.
#[derive(Debug)]
struct Readback {
    buffer: wgpu::Buffer,
    submission: u64,
    mapped: oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

/// The readbacks of device-decided steps (the guard is on).
#[derive(Debug)]
struct Readbacks {
    idle: Vec<wgpu::Buffer>,
    in_flight: VecDeque<Readback>,
    /// A sticky error (lost device, a counter outside the plan window): every later
    /// step returns it.
    failed: Option<String>,
    /// Read arrived readbacks at every step (always, except in tests that fill the
    /// plan window on purpose).
    eager: bool,
}

/// The step and skip counters of a GPU engine.
#[derive(Debug, Default)]
pub(crate) struct GpuCounters {
    counters: StepCounters,
    /// Dynamic loss scaling, when on: its state as of the last settled step.
    loss_scaling: Option<LossScaling>,
    /// `Some` while the non-finite guard or loss scaling is on (the device decides the
    /// steps).
    guard: Option<Readbacks>,
}

impl GpuCounters {
    /// The device starts deciding: its counters are set to the host's (queued before
    /// any later step). Allocates every readback buffer the guard can need at once
    /// (`PLAN_WINDOW` of 48 bytes: no more steps are ever in flight), so steps never
    /// allocate and the number of buffers does not depend on the GPU's timing.
    pub(crate) fn enable_guard(&mut self, ctx: &GpuContext, state: &wgpu::Buffer) -> Result<()> {
        if self.guard.is_some() {
            return Ok(());
        }
        let idle = ctx.scoped("allocating the step-state readback buffers", || {
            (0..PLAN_WINDOW).map(|_| readback_buffer(ctx)).collect()
        })?;
        write_state(ctx, state, &self.counters, self.loss_scaling);
        self.guard = Some(Readbacks {
            idle,
            in_flight: VecDeque::new(),
            failed: None,
            eager: true,
        });
        Ok(())
    }

    /// The host decides again, once the steps in flight have settled.
    pub(crate) fn disable_guard(&mut self, ctx: &GpuContext) -> Result<()> {
        self.settle_all(ctx)?;
        self.guard = None;
        Ok(())
    }

    /// Sets the counters (restoring a checkpoint), after the steps in flight.
    pub(crate) fn reset(
        &mut self,
        ctx: &GpuContext,
        state: &wgpu::Buffer,
        raw: u64,
        skipped: u64,
    ) -> Result<()> {
        self.settle_all(ctx)?;
        self.counters = StepCounters::new(raw, skipped);
        if self.guard.is_some() {
            write_state(ctx, state, &self.counters, self.loss_scaling);
        }
        Ok(())
    }

    /// Sets loss scaling (on from a state, or off), after the steps in flight; with the
    /// device deciding, its state is written there.
    pub(crate) fn set_loss_scaling(
        &mut self,
        ctx: &GpuContext,
        state: &wgpu::Buffer,
        scaling: Option<LossScaling>,
    ) -> Result<()> {
        self.settle_all(ctx)?;
        self.loss_scaling = scaling;
        if self.guard.is_some() {
            write_state(ctx, state, &self.counters, self.loss_scaling);
        }
        Ok(())
    }

    /// Loss scaling as of the last settled step.
    pub(crate) fn loss_scaling(&self) -> Option<LossScaling> {
        self.loss_scaling
    }

    /// True while the device decides the steps.
    pub(crate) fn device_decides(&self) -> bool {
        self.guard.is_some()
    }

    /// Stops reading readbacks at each step, so that steps pile up in flight until the
    /// plan window is full (tests of that path).
    #[cfg(test)]
    pub(crate) fn defer_readbacks(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.eager = false;
        }
    }

    /// The counter values the next step may see, `(first, count)`: reads the readbacks
    /// that arrived, and waits for the device only when `PLAN_WINDOW` steps are in flight.
    pub(crate) fn window(&mut self, ctx: &GpuContext) -> Result<(u64, usize)> {
        if self.guard.as_ref().is_some_and(|g| g.eager) {
            self.harvest(ctx, false)?;
        }
        if self.counters.window().1 > PLAN_WINDOW {
            self.harvest(ctx, true)?;
        }
        self.check()?;
        Ok(self.counters.window())
    }

    /// With the guard, records the copy of the step state at the end of a step and
    /// returns the staging buffer to pass to [`GpuCounters::submitted`].
    pub(crate) fn record_readback(
        &mut self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        state: &wgpu::Buffer,
    ) -> Result<Option<wgpu::Buffer>> {
        let Some(g) = self.guard.as_mut() else {
            return Ok(None);
        };
        // the pool holds one buffer per step that can be in flight; never empty here
        let buffer = match g.idle.pop() {
            Some(b) => b,
            None => ctx.scoped("allocating a step-state readback buffer", || {
                readback_buffer(ctx)
            })?,
        };
        encoder.copy_buffer_to_buffer(state, 0, &buffer, 0, STEP_STATE_BYTES);
        Ok(Some(buffer))
    }

    /// Counts a submitted step: the host-decided one applied; a device-decided one is in
    /// flight until its readback (starting to map now) settles it.
    pub(crate) fn submitted(&mut self, readback: Option<wgpu::Buffer>) {
        let (Some(g), Some(buffer)) = (self.guard.as_mut(), readback) else {
            self.counters.record(true);
            return;
        };
        let submission = self.counters.submit();
        let (tx, mapped) = oneshot::channel();
        buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        g.in_flight.push_back(Readback {
            buffer,
            submission,
            mapped,
        });
    }

    fn check(&self) -> Result<()> {
        match self.guard.as_ref().and_then(|g| g.failed.as_ref()) {
            Some(e) => Err(Error::Gpu(e.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, why: String) -> Result<()> {
        if let Some(g) = self.guard.as_mut() {
            g.failed.get_or_insert(why);
        }
        self.check()
    }

    /// Reads the readbacks that have arrived, in order; with `wait`, waits for all
    /// (natively; a browser cannot block, so there the readbacks still in flight are
    /// [`Error::WouldBlock`]: `synchronize_async` awaits a fence, then
    /// [`GpuCounters::settle_arrived`]).
    fn harvest(&mut self, ctx: &GpuContext, wait: bool) -> Result<()> {
        if self.guard.as_ref().is_none_or(|g| g.in_flight.is_empty()) {
            return self.check();
        }
        let polled = if wait {
            ctx.device.poll(wgpu::PollType::wait_indefinitely())
        } else {
            ctx.device.poll(wgpu::PollType::Poll)
        };
        let must_wait = wait;
        // a device that cannot be polled will not fire the callbacks: do not wait on them
        let wait = wait && polled.is_ok() && cfg!(not(target_arch = "wasm32"));
        if let Err(e) = polled {
            self.fail(format!("non-finite guard: waiting for the device: {e}"))
                .ok();
        }
        while let Some(g) = self.guard.as_mut() {
            let Some(front) = g.in_flight.front_mut() else {
                break;
            };
            let arrived = if wait {
                block_on_map(&mut front.mapped)
            } else {
                match front.mapped.try_recv() {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => break,
                    Err(e) => Err(e.to_string()),
                }
            };
            let Some(readback) = g.in_flight.pop_front() else {
                break;
            };
            match arrived {
                Ok(Ok(())) => self.read(readback)?,
                Ok(Err(e)) => self.fail(format!("non-finite guard: mapping a readback: {e}"))?,
                Err(e) => self.fail(format!("non-finite guard: readback lost: {e}"))?,
            }
        }
        self.check()?;
        let left = self.guard.as_ref().map_or(0, |g| g.in_flight.len());
        if must_wait && left > 0 {
            return Err(Error::WouldBlock(format!(
                "{left} device-decided steps are in flight (the non-finite guard or loss scaling)"
            )));
        }
        Ok(())
    }

    /// Reads the readbacks that have arrived (never waits); true when none is left in
    /// flight, so that the counters are exact.
    pub(crate) fn settle_arrived(&mut self, ctx: &GpuContext) -> Result<bool> {
        self.harvest(ctx, false)?;
        Ok(self.guard.as_ref().is_none_or(|g| g.in_flight.is_empty()))
    }

    fn read(&mut self, readback: Readback) -> Result<()> {
        let state: StepState = {
            let view =
                readback.buffer.slice(..).get_mapped_range().map_err(|e| {
                    Error::Gpu(format!("non-finite guard: reading a readback: {e}"))
                })?;
            bytemuck::pod_read_unaligned(&view)
        };
        readback.buffer.unmap();
        if let Some(g) = self.guard.as_mut() {
            g.idle.push(readback.buffer);
        }
        if state.fault != 0 {
            return self.fail(
                "non-finite guard: the device step counter left the host's plan window (a bug in fused-rmsprop); the step was skipped".into(),
            );
        }
        let newest = self
            .counters
            .settle(readback.submission, state.raw(), state.skipped());
        if let (true, Some(ls)) = (newest, self.loss_scaling.as_mut()) {
            ls.state = state.loss_scale();
        }
        Ok(())
    }

    /// The counts known now, after reading the readbacks that arrived (never waits).
    pub(crate) fn report(&mut self, ctx: &GpuContext) -> SkippedSteps {
        let _ = self.harvest(ctx, false);
        self.counters.report()
    }

    /// Waits for every step in flight; the counters are exact afterwards.
    pub(crate) fn settle_all(&mut self, ctx: &GpuContext) -> Result<()> {
        self.harvest(ctx, true)
    }

    /// The step counter as last known (may lag the device while steps are in flight).
    pub(crate) fn raw(&self) -> u64 {
        self.counters.raw()
    }

    /// Steps in flight (no polling).
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u64 {
        self.counters.in_flight()
    }
}

/// A staging buffer for one copy of the step state.
fn readback_buffer(ctx: &GpuContext) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("step state readback"),
        size: STEP_STATE_BYTES,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Queues a write of `counters` (and the loss scale) into the device's step state.
fn write_state(
    ctx: &GpuContext,
    state: &wgpu::Buffer,
    counters: &StepCounters,
    loss_scaling: Option<LossScaling>,
) {
    let scale = loss_scaling.map_or(
        crate::math::LossScaleState {
            scale: 1.0,
            counter: 0,
        },
        |ls| ls.state,
    );
    let words = StepState::new(counters.raw(), counters.skipped(), scale);
    ctx.queue.write_buffer(state, 0, bytemuck::bytes_of(&words));
}

/// Blocks until a mapping callback has fired (another thread polling the device may be
/// the one firing it); a dropped callback (a lost device) is an error, not a hang.
#[cfg(not(target_arch = "wasm32"))]
fn block_on_map(
    rx: &mut oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
) -> std::result::Result<std::result::Result<(), wgpu::BufferAsyncError>, String> {
    pollster::block_on(rx).map_err(|e| e.to_string())
}

/// A browser never blocks (`harvest` does not ask it to).
#[cfg(target_arch = "wasm32")]
fn block_on_map(
    _rx: &mut oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
) -> std::result::Result<std::result::Result<(), wgpu::BufferAsyncError>, String> {
    Err("a browser cannot wait for a readback".into())
}
