//! Benchmark workloads shared by `benches/step_throughput.rs` and
//! `examples/throughput.rs` (both include this file as a `#[path]` module; it is not
//! part of the library): named variants, synthetic models, the memory-traffic floor,
//! and same-run copy baselines.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use fused_rmsprop::{GpuContext, RmsPropConfig, Variable, VariableSpec};
use rayon::prelude::*;

/// Elements per piece of the parallel copy: the CPU path's chunk size (128 KiB).
const COPY_CHUNK_LEN: usize = 1 << 15;

/// A benchmark variant: `plain`, `momentum`, `centered` or `centered-momentum`,
/// optionally with `+clip` (global_clipnorm) and/or `+ema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchVariant {
    /// Centered.
    pub centered: bool,
    /// Momentum > 0.
    pub momentum: bool,
    /// global_clipnorm set (adds the norm reduction).
    pub clip: bool,
    /// use_ema.
    pub ema: bool,
}

impl BenchVariant {
    /// The four base variants.
    pub const BASES: [&'static str; 4] = ["plain", "momentum", "centered", "centered-momentum"];

    /// Parses `plain`, `momentum+clip`, `centered-momentum+ema+clip`, ...
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut parts = name.split('+');
        let base = parts.next().unwrap_or("");
        let (centered, momentum) = match base {
            "plain" => (false, false),
            "momentum" => (false, true),
            "centered" => (true, false),
            "centered-momentum" => (true, true),
            other => {
                return Err(format!(
                    "unknown variant base `{other}` (plain, momentum, centered, centered-momentum)"
                ))
            }
        };
        let mut v = BenchVariant {
            centered,
            momentum,
            clip: false,
            ema: false,
        };
        for p in parts {
            match p {
                "clip" => v.clip = true,
                "ema" => v.ema = true,
                other => return Err(format!("unknown variant modifier `+{other}` (+clip, +ema)")),
            }
        }
        Ok(v)
    }

    /// The canonical name.
    pub fn name(&self) -> String {
        let mut s = match (self.centered, self.momentum) {
            (false, false) => "plain",
            (false, true) => "momentum",
            (true, false) => "centered",
            (true, true) => "centered-momentum",
        }
        .to_string();
        if self.clip {
            s.push_str("+clip");
        }
        if self.ema {
            s.push_str("+ema");
        }
        s
    }

    /// The optimizer config for this variant.
    pub fn config(&self) -> RmsPropConfig {
        let mut c = RmsPropConfig::default()
            .with_learning_rate(1e-3)
            .with_centered(self.centered)
            .with_use_ema(self.ema);
        if self.momentum {
            c = c.with_momentum(0.9);
        }
        if self.clip {
            c = c.with_global_clipnorm(1.0);
        }
        c
    }

    /// Minimum bytes moved per parameter per step in f32: read gradient, read and write
    /// parameter and velocity (20 B); +8 B for each of momentum and average_gradient;
    /// +4 B for the norm pass re-reading the gradient; +8 B for the EMA.
    pub fn bytes_per_param(&self) -> u64 {
        20 + 8 * (self.momentum as u64 + self.centered as u64)
            + 4 * self.clip as u64
            + 8 * self.ema as u64
    }
}

/// A model of `params` parameters in `tensors` tensors of near-equal size.
pub fn synthetic_model(params: usize, tensors: usize) -> Vec<Variable> {
    let tensors = tensors.clamp(1, params.max(1));
    let base = params / tensors;
    let extra = params % tensors;
    (0..tensors)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let values = (0..n).map(|j| ((j % 97) as f32 - 48.0) * 0.01).collect();
            Variable {
                spec: VariableSpec::new(format!("layer{i}/kernel"), &[n]),
                values,
            }
        })
        .collect()
}

/// Gradients for a model (deterministic, non-zero).
pub fn synthetic_gradients(model: &[Variable]) -> Vec<Vec<f32>> {
    model
        .iter()
        .map(|v| {
            (0..v.values.len())
                .map(|j| ((j % 31) as f32 - 15.0) * 0.003)
                .collect()
        })
        .collect()
}

/// Median of `samples` timings of `run(reps)`, divided by `reps`.
pub fn median_time(samples: usize, reps: usize, mut run: impl FnMut(usize)) -> Duration {
    let mut times: Vec<Duration> = (0..samples.max(1))
        .map(|_| {
            let t = Instant::now();
            run(reps);
            t.elapsed() / reps.max(1) as u32
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Parallel memcpy of `src` into `dst` over rayon's threads, in the CPU path's chunk size.
pub fn parallel_copy(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(COPY_CHUNK_LEN)
        .zip(src.par_chunks(COPY_CHUNK_LEN))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// The GPU's same-run reference: a `copy_buffer_to_buffer` of half of `bytes`
/// between two device buffers (each byte read once and written once).
#[derive(Debug)]
pub struct GpuCopy {
    src: wgpu::Buffer,
    dst: wgpu::Buffer,
    size: u64,
}

impl GpuCopy {
    /// Allocates the two buffers on `ctx`.
    pub fn new(ctx: &GpuContext, bytes: u64) -> Self {
        let size = (bytes / 2).div_ceil(4).max(1) * 4;
        let make = |label| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        GpuCopy {
            src: make("copy src"),
            dst: make("copy dst"),
            size,
        }
    }

    /// Records and submits one copy (does not wait).
    pub fn submit(&self, ctx: &GpuContext) {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.src, 0, &self.dst, 0, self.size);
        ctx.queue.submit([enc.finish()]);
    }
}
