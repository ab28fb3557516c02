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
        self.bytes_per_param_with(4)
    }

    /// [`BenchVariant::bytes_per_param`] with gradients of `gradient_bytes` each (2 for
    /// bf16 and f16): the gradient is read once, twice with the norm pass.
    pub fn bytes_per_param_with(&self, gradient_bytes: u64) -> u64 {
        gradient_bytes * (1 + self.clip as u64)
            + 16
            + 8 * (self.momentum as u64 + self.centered as u64)
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

/// A minimal WGSL kernel that copies `array<vec4<f32>>` from one buffer to another: the
/// shader-side reference a fused step is compared with (`shader_ratio`). It copies half
/// of `bytes` (each byte read once and written once), in workgroups of 256 threads
/// moving 8,192 floats each, as the optimizer's kernels do, in bindings of at most
/// `max_storage_buffer_binding_size`.
#[derive(Debug)]
pub struct ShaderCopy {
    pipeline: wgpu::ComputePipeline,
    /// One bind group and its workgroup count per binding-sized piece.
    pieces: Vec<(wgpu::BindGroup, u32, u32)>,
}

const SHADER_COPY: &str = "
// vec4s per workgroup
override PER_GROUP: u32 = 2048u;

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let first = (wid.x + wid.y * nwg.x) * PER_GROUP;
    for (var k = lid; k < PER_GROUP; k += 256u) {
        let i = first + k;
        if i < arrayLength(&dst) {
            dst[i] = src[i];
        }
    }
}
";

impl ShaderCopy {
    /// Builds the kernel and its buffers on `ctx`.
    pub fn new(ctx: &GpuContext, bytes: u64) -> Self {
        let per_group: u32 = 2048; // vec4s: 8,192 floats, the optimizer's chunk
        let device = &ctx.device;
        let size = (bytes / 2).div_ceil(16).max(1) * 16;
        let limits = device.limits();
        let max_piece = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            / 16
            * 16;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("shader copy"),
            source: wgpu::ShaderSource::Wgsl(SHADER_COPY.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("shader copy"),
            layout: None,
            module: &module,
            entry_point: Some("copy"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[("PER_GROUP", f64::from(per_group))],
                ..Default::default()
            },
            cache: None,
        });
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < size {
            let len = (size - at).min(max_piece);
            let make = |label| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: len,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            };
            let (src, dst) = (make("shader copy src"), make("shader copy dst"));
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("shader copy"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: src.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: dst.as_entire_binding(),
                    },
                ],
            });
            let groups = (len / 16).div_ceil(per_group as u64) as usize;
            let max = limits.max_compute_workgroups_per_dimension.max(1) as usize;
            let x = groups.clamp(1, max);
            pieces.push((bind_group, x as u32, groups.div_ceil(x) as u32));
            at += len;
        }
        ShaderCopy { pipeline, pieces }
    }

    /// Records and submits one copy (does not wait).
    pub fn submit(&self, ctx: &GpuContext) {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            for (bind_group, x, y) in &self.pieces {
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(*x, *y, 1);
            }
        }
        ctx.queue.submit([enc.finish()]);
    }
}
