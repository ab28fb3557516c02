//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod trace;

use std::path::PathBuf;

use fused_rmsprop::{GpuContext, GpuOptions};
use trace::Trace;

/// `tests/keras/traces`: the Keras traces recorded by `tests/keras/record_traces.py`.
/// Panics (fails the test) when the folder is missing or empty: conformance is never
/// skipped.
pub fn trace_paths() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keras/traces");
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

/// Every trace, parsed.
pub fn traces() -> Vec<(String, Trace)> {
    trace_paths()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let t = Trace::from_json_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), t)
        })
        .collect()
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
