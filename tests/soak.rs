//! Soak: 10,000 steps on a small model on both backends, with the non-finite guard off
//! and on (then one step in 97 carries a NaN). CPU and GPU stay within tolerance of
//! each other, and neither process memory (RSS) nor the number of live GPU buffers
//! (the guard's readback buffers included) grows.

mod common;

use common::trace::values_match;
use fused_rmsprop::{Backend, GpuContext, GpuOptions, RmsProp, RmsPropConfig, Variable};

const STEPS: usize = 10_000;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn config() -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(1e-3)
        .with_momentum(0.5)
        .with_centered(true)
        .with_use_ema(true)
        .with_ema_overwrite_frequency(500)
        .with_global_clipnorm(5.0)
        .with_weight_decay(1e-3)
}

fn model() -> Vec<Variable> {
    let mut rng = common::Rng(99);
    vec![
        Variable::new("a", &[31, 17], rng.vec(527)).unwrap(),
        Variable::new("b", &[17], rng.vec(17)).unwrap(),
        Variable::new("c", &[], vec![2.0]).unwrap(),
    ]
}

/// Runs the soak, checking memory at 1,000 steps and at the end.
fn soak(opt: &mut RmsProp, ctx: Option<&GpuContext>) -> Vec<Vec<f32>> {
    let guard = opt.non_finite_guard();
    let mut rng = common::Rng(7);
    let sizes: Vec<usize> = model().iter().map(|v| v.values.len()).collect();
    let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut baseline = None;
    for step in 0..STEPS {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x = rng.unit();
            }
        }
        if guard && step % 97 == 50 {
            grads[0][step % 527] = f32::NAN;
        }
        let missing = step % 7 == 3;
        let refs: Vec<Option<&[f32]>> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| (!(missing && i == 1)).then_some(g.as_slice()))
            .collect();
        opt.apply_gradients(&refs).unwrap();
        if step % 1000 == 999 {
            // a readback now and then, as training code would do
            assert!(opt.variables().unwrap()[0].iter().all(|x| x.is_finite()));
        }
        if step == 999 {
            baseline = Some((rss_bytes(), ctx.and_then(GpuContext::live_buffers)));
        }
    }
    let end = opt.variables().unwrap();
    if guard {
        opt.synchronize().unwrap();
        let bad = (0..STEPS).filter(|s| s % 97 == 50).count() as u64;
        assert_eq!(opt.skipped_steps().skipped, bad);
        assert_eq!(opt.raw_iterations(), STEPS as u64 - bad);
    }
    let (rss0, buf0) = baseline.unwrap();
    if let (Some(a), Some(b)) = (rss0, rss_bytes()) {
        eprintln!("RSS after 1,000 steps {a} B, after {STEPS}: {b} B");
        assert!(b <= a + (8 << 20), "RSS grew from {a} to {b} bytes");
    }
    if let (Some(a), Some(b)) = (buf0, ctx.and_then(GpuContext::live_buffers)) {
        eprintln!("live GPU buffers after 1,000 steps {a}, after {STEPS}: {b}");
        assert!(b <= a, "live GPU buffers grew from {a} to {b}");
    }
    end
}

fn cpu_and_gpu_agree_without_growth(guard: bool) {
    let mut cpu = RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap();
    cpu.set_non_finite_guard(guard).unwrap();
    let cpu_end = soak(&mut cpu, None);
    let Some(ctx) = common::gpu() else { return };
    let gpu_opts = GpuOptions {
        context: Some(ctx.clone()),
        ..GpuOptions::default()
    };
    assert!(ctx.live_buffers().is_some(), "buffer count unavailable");
    let mut gpu = RmsProp::with_options(config(), model(), Backend::Gpu, &gpu_opts).unwrap();
    gpu.set_non_finite_guard(guard).unwrap();
    let gpu_end = soak(&mut gpu, Some(&ctx));
    let mut worst = 0.0f32;
    for (a, b) in gpu_end.iter().flatten().zip(cpu_end.iter().flatten()) {
        assert!(
            values_match(*a, *b),
            "after {STEPS} steps: gpu {a} vs cpu {b}"
        );
        worst = worst.max((a - b).abs());
    }
    eprintln!("guard {guard}: largest CPU/GPU difference after {STEPS} steps: {worst:e}");
}

/// One test for both runs: RSS is per process, so two soaks running in parallel would
/// see each other's memory.
#[test]
fn ten_thousand_steps_cpu_and_gpu_agree_without_growth_guard_off_and_on() {
    cpu_and_gpu_agree_without_growth(false);
    cpu_and_gpu_agree_without_growth(true);
}
