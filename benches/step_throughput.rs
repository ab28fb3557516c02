//! Step throughput per variant, CPU and GPU, for 1M, 16M and 64M parameters and for
//! 10,000 small tensors totalling 16M. Criterion reports bytes/s of the minimum memory
//! traffic (`BenchVariant::bytes_per_param`); each group also times a plain copy of
//! the same bytes, the same-run reference for the ratio.
//!
//! `cargo bench` runs without a GPU (GPU cases print that they were skipped).
//! `FUSED_RMSPROP_BENCH_QUICK=1` keeps only the 16M and many-tensor cases.

#[path = "support/workload.rs"]
mod workload;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fused_rmsprop::{Backend, GpuContext, GpuOptions, RmsProp};
use std::time::Duration;
use workload::{parallel_copy, synthetic_gradients, synthetic_model, BenchVariant, GpuCopy};

fn variants() -> Vec<BenchVariant> {
    let mut out = Vec::new();
    for base in BenchVariant::BASES {
        for suffix in ["", "+clip", "+ema"] {
            if let Ok(v) = BenchVariant::parse(&format!("{base}{suffix}")) {
                out.push(v);
            }
        }
    }
    out
}

fn sizes() -> Vec<(&'static str, usize, usize)> {
    let quick = std::env::var_os("FUSED_RMSPROP_BENCH_QUICK").is_some();
    let mut s = vec![
        ("16M", 16 << 20, 1),
        ("16M/10000-tensors", 16 << 20, 10_000),
    ];
    if !quick {
        s.insert(0, ("1M", 1 << 20, 1));
        s.push(("64M", 64 << 20, 1));
    }
    s
}

/// Few samples, short windows: a 64M step takes tens of milliseconds.
fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

fn bench_cpu(c: &mut Criterion) {
    for (label, params, tensors) in sizes() {
        let mut group = c.benchmark_group(format!("cpu/{label}"));
        configure(&mut group);
        let model = synthetic_model(params, tensors);
        let grads = synthetic_gradients(&model);
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        for v in variants() {
            let bytes = v.bytes_per_param() * params as u64;
            group.throughput(Throughput::Bytes(bytes));
            let Ok(mut opt) = RmsProp::with_backend(v.config(), model.clone(), Backend::Cpu) else {
                continue;
            };
            group.bench_function(BenchmarkId::new(v.name(), params), |b| {
                b.iter(|| opt.apply_gradients(&refs).map(|_| ()))
            });
            drop(opt);
            // the same-run reference: copy half the bytes (each read once and written once)
            let half = (bytes / 8) as usize;
            let src = vec![1.0f32; half];
            let mut dst = vec![0.0f32; half];
            group.bench_function(
                BenchmarkId::new(format!("copy-same-bytes/{}", v.name()), params),
                |b| b.iter(|| parallel_copy(&mut dst, &src)),
            );
        }
        group.finish();
    }
}

fn bench_gpu(c: &mut Criterion) {
    let allow = std::env::var_os("FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER").is_some();
    let ctx = match GpuContext::new(allow) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("GPU benches skipped: {e}");
            return;
        }
    };
    eprintln!("GPU benches on {}", ctx.adapter_name());
    let options = GpuOptions {
        context: Some(ctx.clone()),
        ..Default::default()
    };
    for (label, params, tensors) in sizes() {
        let mut group = c.benchmark_group(format!("gpu/{label}"));
        configure(&mut group);
        let model = synthetic_model(params, tensors);
        let grads = synthetic_gradients(&model);
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        let present = vec![true; model.len()];
        for v in variants() {
            let bytes = v.bytes_per_param() * params as u64;
            group.throughput(Throughput::Bytes(bytes));
            let Ok(mut opt) =
                RmsProp::with_options(v.config(), model.clone(), Backend::Gpu, &options)
            else {
                eprintln!("GPU {} {label}: could not allocate, skipped", v.name());
                continue;
            };
            if opt.apply_gradients(&refs).is_err() {
                continue;
            }
            group.bench_function(BenchmarkId::new(v.name(), params), |b| {
                b.iter(|| {
                    let _ = opt.apply_device_gradients(&present);
                    opt.synchronize()
                })
            });
            drop(opt);
            let baseline = GpuCopy::new(&ctx, bytes);
            group.bench_function(
                BenchmarkId::new(format!("copy-same-bytes/{}", v.name()), params),
                |b| {
                    b.iter(|| {
                        baseline.submit(&ctx);
                        ctx.device.poll(wgpu::PollType::wait_indefinitely())
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
