//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod trace;

use std::path::PathBuf;

use fused_rmsprop::{Backend, GpuContext, GpuOptions, RmsPropConfig};
use trace::Trace;

/// `tests/keras/traces`: the Keras traces recorded by `tests/keras/record_traces.py`.
/// Panics (fails the test) when the folder is missing or empty: conformance is never
/// skipped.
pub fn trace_paths() -> Vec<PathBuf> {
    paths_in("traces")
}

fn paths_in(folder: &str) -> Vec<PathBuf> {
    paths_under("tests/keras", folder)
}

/// The traces of another dialect (`torch`, `optax`), recorded by
/// `tests/dialects/record_traces.py`.
pub fn dialect_trace_paths(dialect: &str) -> Vec<PathBuf> {
    paths_under("tests/dialects", dialect)
}

/// [`dialect_trace_paths`], parsed.
pub fn dialect_traces(dialect: &str) -> Vec<(String, Trace)> {
    parse_all(dialect_trace_paths(dialect))
}

fn paths_under(root: &str, folder: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(root)
        .join(folder);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("conformance traces missing at {}: {e}", dir.display()));
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no traces in {}", dir.display());
    paths
}

fn parse_all(paths: Vec<PathBuf>) -> Vec<(String, Trace)> {
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let t = Trace::from_json_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), t)
        })
        .collect()
}

/// Every trace, parsed.
pub fn traces() -> Vec<(String, Trace)> {
    parse_all(trace_paths())
}

/// Every `tests/keras/loss_scale` trace (RMSprop inside Keras' `LossScaleOptimizer`),
/// parsed.
pub fn loss_scale_traces() -> Vec<(String, Trace)> {
    parse_all(paths_in("loss_scale"))
}

/// A GPU context on any adapter (software included), shared by a test. Without an
/// adapter: under CI (the `CI` variable set) the test fails; elsewhere it says so
/// loudly on stderr and returns `None`.
pub fn gpu() -> Option<GpuContext> {
    match GpuContext::new(true) {
        Ok(ctx) => {
            eprintln!("GPU tests run on: {}", ctx.adapter_name());
            Some(ctx)
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but no GPU adapter is available: {e}");
            }
            eprintln!("\n!!!!!! GPU TEST SKIPPED: no GPU adapter ({e}) !!!!!!\n");
            None
        }
    }
}

/// The backends a test runs on both: the CPU, and the GPU on `ctx` when there is one.
pub fn backends(ctx: Option<&GpuContext>) -> Vec<(Backend, GpuOptions)> {
    let mut backends = vec![(Backend::Cpu, GpuOptions::default())];
    backends.extend(ctx.map(|ctx| (Backend::Gpu, on(ctx))));
    backends
}

/// Options that run on `ctx`.
pub fn on(ctx: &GpuContext) -> GpuOptions {
    GpuOptions {
        context: Some(ctx.clone()),
        ..GpuOptions::default()
    }
}

/// Deterministic pseudo-random numbers (xorshift), no dependency needed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

/// Config number `k` of the 128 structural combinations (centered, momentum, the clip
/// kind, EMA with overwrite, accumulation, weight decay with loss scale), with numbers
/// that exercise each stage.
pub fn combo(k: usize) -> RmsPropConfig {
    let mut c = RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_rho(0.8)
        .with_centered(k & 1 != 0);
    if k & 2 != 0 {
        c = c.with_momentum(0.7);
    }
    c = match (k >> 2) & 3 {
        1 => c.with_clipnorm(0.5),
        2 => c.with_global_clipnorm(0.8),
        3 => c.with_clipvalue(0.1),
        _ => c,
    };
    if k & 16 != 0 {
        c = c
            .with_use_ema(true)
            .with_ema_momentum(0.9)
            .with_ema_overwrite_frequency(2);
    }
    if k & 32 != 0 {
        c = c.with_gradient_accumulation_steps(2);
    }
    if k & 64 != 0 {
        c = c.with_weight_decay(0.05).with_loss_scale_factor(4.0);
    }
    c
}

/// `size` bytes of `buffer` from `offset`, read back (waits for the GPU).
pub fn read_bytes(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Vec<u8> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    ctx.queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let bytes = staging.slice(..).get_mapped_range().unwrap().to_vec();
    bytes
}
