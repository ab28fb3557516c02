//! The GPU side of the non-finite guard: the device keeps the step counter and the
//! skip count (`GuardState` in the shader); each step ends with a copy of them into a
//! small staging buffer, mapped asynchronously, and the host reads whichever copies
//! have arrived, without waiting, to keep its [`Ledger`] current.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::pipelines::PLAN_WINDOW;
use crate::guard::{Ledger, SkippedSteps};

/// Words of `GuardState` in the shader.
pub(crate) const GUARD_WORDS: usize = 8;

/// Bytes of `GuardState`.
pub(crate) const GUARD_BYTES: u64 = (GUARD_WORDS * 4) as u64;

/// `GuardState` as the host writes and reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GuardWords {
    raw: u64,
    skipped: u64,
    fault: bool,
}

impl GuardWords {
    fn to_words(self) -> [u32; GUARD_WORDS] {
        [
            self.raw as u32,
            (self.raw >> 32) as u32,
            self.skipped as u32,
            (self.skipped >> 32) as u32,
            0,
            0,
            0,
            self.fault as u32,
        ]
    }

    fn from_words(w: &[u32]) -> Option<Self> {
        let w: &[u32; GUARD_WORDS] = w.try_into().ok()?;
        Some(GuardWords {
            raw: u64::from(w[0]) | u64::from(w[1]) << 32,
            skipped: u64::from(w[2]) | u64::from(w[3]) << 32,
            fault: w[7] != 0,
        })
    }
}

/// A readback of the counters after one submission, mapping in the background.
#[derive(Debug)]
struct Readback {
    buffer: wgpu::Buffer,
    submission: u64,
    mapped: mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

/// The host's view of the device-side guard counters.
#[derive(Debug)]
pub(crate) struct DeviceGuard {
    ledger: Ledger,
    idle: Vec<wgpu::Buffer>,
    in_flight: VecDeque<Readback>,
    /// A sticky error (lost device, a counter outside the plan window): every later
    /// step returns it.
    failed: Option<String>,
    /// Read arrived readbacks at every step (always, except in tests that fill the
    /// plan window on purpose).
    eager: bool,
}

impl DeviceGuard {
    /// Sets the device counters to `raw` and `skipped` (queued before any later step).
    pub fn start(ctx: &GpuContext, state: &wgpu::Buffer, raw: u64, skipped: u64) -> Self {
        let words = GuardWords {
            raw,
            skipped,
            fault: false,
        }
        .to_words();
        ctx.queue
            .write_buffer(state, 0, bytemuck::cast_slice(&words));
        DeviceGuard {
            ledger: Ledger::new(raw, skipped),
            idle: Vec::new(),
            in_flight: VecDeque::new(),
            failed: None,
            eager: true,
        }
    }

    /// Stops reading readbacks at each step, so that steps pile up in flight until the
    /// plan window is full (tests of that path).
    #[cfg(test)]
    pub fn defer_readbacks(&mut self) {
        self.eager = false;
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(Error::Gpu(e.clone())),
            None => Ok(()),
        }
    }

    /// The counter values the next step may see, `(first, count)`: reads the readbacks
    /// that arrived, and waits for the device only when `PLAN_WINDOW` steps are in flight.
    pub fn window(&mut self, ctx: &GpuContext) -> Result<(u64, usize)> {
        if self.eager {
            self.harvest(ctx, false)?;
        }
        if self.ledger.window().1 > PLAN_WINDOW {
            self.harvest(ctx, true)?;
        }
        self.check()?;
        Ok(self.ledger.window())
    }

    /// Records the copy of the counters at the end of a step; returns the staging
    /// buffer to pass to [`DeviceGuard::submitted`] after the submit.
    pub fn record_readback(
        &mut self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        state: &wgpu::Buffer,
    ) -> Result<wgpu::Buffer> {
        let buffer = match self.idle.pop() {
            Some(b) => b,
            None => ctx.scoped("allocating a guard readback buffer", || {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("guard readback"),
                    size: GUARD_BYTES,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })?,
        };
        encoder.copy_buffer_to_buffer(state, 0, &buffer, 0, GUARD_BYTES);
        Ok(buffer)
    }

    /// Starts mapping `buffer` once the step that fills it is submitted.
    pub fn submitted(&mut self, buffer: wgpu::Buffer) {
        let submission = self.ledger.submit();
        let (tx, mapped) = mpsc::channel();
        buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.in_flight.push_back(Readback {
            buffer,
            submission,
            mapped,
        });
    }

    /// Reads the readbacks that have arrived, in order; with `wait`, waits for all.
    pub fn harvest(&mut self, ctx: &GpuContext, wait: bool) -> Result<()> {
        if self.in_flight.is_empty() {
            return self.check();
        }
        let polled = if wait {
            ctx.device.poll(wgpu::PollType::wait_indefinitely())
        } else {
            ctx.device.poll(wgpu::PollType::Poll)
        };
        // a device that cannot be polled will not fire the callbacks: do not wait on them
        let wait = wait && polled.is_ok();
        if let Err(e) = polled {
            self.failed
                .get_or_insert(format!("non-finite guard: waiting for the device: {e}"));
        }
        while let Some(front) = self.in_flight.front() {
            let arrived = if wait {
                // another thread polling the device may be the one firing the callback
                front
                    .mapped
                    .recv_timeout(Duration::from_secs(120))
                    .map_err(|e| e.to_string())
            } else {
                match front.mapped.try_recv() {
                    Ok(r) => Ok(r),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(e) => Err(e.to_string()),
                }
            };
            let Some(readback) = self.in_flight.pop_front() else {
                break;
            };
            match arrived {
                Ok(Ok(())) => self.read(readback)?,
                Ok(Err(e)) => self.fail(format!("non-finite guard: mapping a readback: {e}"))?,
                Err(e) => self.fail(format!("non-finite guard: readback lost: {e}"))?,
            }
        }
        self.check()
    }

    fn fail(&mut self, why: String) -> Result<()> {
        self.failed.get_or_insert(why);
        self.check()
    }

    fn read(&mut self, readback: Readback) -> Result<()> {
        let words = {
            let view =
                readback.buffer.slice(..).get_mapped_range().map_err(|e| {
                    Error::Gpu(format!("non-finite guard: reading a readback: {e}"))
                })?;
            GuardWords::from_words(bytemuck::cast_slice(&view))
        };
        readback.buffer.unmap();
        self.idle.push(readback.buffer);
        let Some(words) = words else {
            return self.fail("non-finite guard: readback of the wrong size".into());
        };
        if words.fault {
            return self.fail(
                "non-finite guard: the device step counter left the host's plan window (a bug in fused-rmsprop); the step was skipped".into(),
            );
        }
        self.ledger
            .settle(readback.submission, words.raw, words.skipped);
        Ok(())
    }

    /// The counts known now, after reading the readbacks that arrived (never waits).
    pub fn report(&mut self, ctx: &GpuContext) -> SkippedSteps {
        let _ = self.harvest(ctx, false);
        self.ledger.report()
    }

    /// Waits for every step in flight and returns the exact `(raw, skipped)` counters.
    pub fn settle_all(&mut self, ctx: &GpuContext) -> Result<(u64, u64)> {
        self.harvest(ctx, true)?;
        Ok((self.ledger.raw(), self.ledger.skipped()))
    }

    /// Steps in flight by the ledger (no polling).
    #[cfg(test)]
    pub fn in_flight(&self) -> u64 {
        self.ledger.in_flight()
    }

    /// The counters as last read back (may lag the device).
    pub fn last_known(&self) -> (u64, u64) {
        (self.ledger.raw(), self.ledger.skipped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_words_round_trip_64_bit_counters() {
        let w = GuardWords {
            raw: (7u64 << 32) | 5,
            skipped: u64::from(u32::MAX) + 1,
            fault: true,
        };
        assert_eq!(GuardWords::from_words(&w.to_words()), Some(w));
        assert_eq!(GuardWords::from_words(&[0; 3]), None);
    }
}
