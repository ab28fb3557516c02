//! Stochastic rounding of 16-bit parameters (`Precision::with_stochastic_rounding`):
//! unbiased over many steps (each draw is one of the two neighbours, unbiased over
//! many draws: `math.rs`' unit tests), the same for a seed run to run and on both
//! backends (within one unit of the type, where their f32 math differs), and on a
//! small learning rate it trains where round-to-nearest stalls.

mod common;

use common::Rng;
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, Precision, RmsProp, RmsPropConfig, Variable,
};

const N: usize = 4096;

/// All parameters start at 1.0 and chase 0.5 with a learning rate whose steps are
/// below half a bf16 unit at 1.0: round-to-nearest never moves them; stochastic
/// rounding follows the f32 run on average.
fn toy(precision: Precision, backend: Backend, gpu: &GpuOptions, steps: usize) -> Vec<f32> {
    let var = Variable::new("w", &[N], vec![1.0; N]).unwrap();
    let config = RmsPropConfig::default().with_learning_rate(2e-4);
    let mut opt = RmsProp::with_precision(config, vec![var], backend, gpu, precision).unwrap();
    for _ in 0..steps {
        let p = opt.variable(0).unwrap();
        let g: Vec<f32> = p.iter().map(|&x| 2.0 * (x - 0.5)).collect();
        opt.apply_gradients(&[Some(&g[..])]).unwrap();
    }
    opt.variable(0).unwrap()
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
}

fn beats_nearest(backend: Backend, gpu: &GpuOptions) {
    let steps = 150;
    let full = toy(Precision::default(), backend, gpu, steps);
    let nearest = toy(
        Precision::default().with_params(Dtype::Bf16),
        backend,
        gpu,
        steps,
    );
    let stochastic = toy(
        Precision::default()
            .with_params(Dtype::Bf16)
            .with_stochastic_rounding(7),
        backend,
        gpu,
        steps,
    );
    let moved = 1.0 - mean(&full);
    assert!(moved > 0.02, "{backend:?}: the f32 run moved {moved} only");
    assert!(
        nearest.iter().all(|&x| x == 1.0),
        "{backend:?}: round-to-nearest moved"
    );
    // the mean rounding error over 150 steps of 4096 parameters is a small part of
    // the distance travelled
    let error = (mean(&stochastic) - mean(&full)).abs();
    assert!(
        error < 0.05 * moved,
        "{backend:?}: stochastic mean {} vs f32 {} ({error})",
        mean(&stochastic),
        mean(&full)
    );
    let loss = |v: &[f32]| v.iter().map(|&x| f64::from((x - 0.5).powi(2))).sum::<f64>();
    assert!(
        loss(&stochastic) < 0.9 * loss(&nearest),
        "{backend:?}: stochastic does not beat nearest"
    );
}

#[test]
fn cpu_stochastic_rounding_trains_where_nearest_stalls() {
    beats_nearest(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn gpu_stochastic_rounding_trains_where_nearest_stalls() {
    let Some(ctx) = common::gpu() else { return };
    beats_nearest(Backend::Gpu, &common::on(&ctx));
}

fn run(seed: u64, dtype: Dtype, backend: Backend, gpu: &GpuOptions) -> Vec<f32> {
    let mut rng = Rng(3);
    let vars = vec![
        Variable::new("a", &[1000], rng.vec(1000)).unwrap(),
        Variable::new("b", &[37], rng.vec(37)).unwrap(),
    ];
    let config = RmsPropConfig::default()
        .with_learning_rate(1e-3)
        .with_momentum(0.5)
        .with_weight_decay(0.01)
        .with_use_ema(true)
        .with_ema_overwrite_frequency(3);
    let precision = Precision::default()
        .with_params(dtype)
        .with_stochastic_rounding(seed);
    let mut opt = RmsProp::with_precision(config, vars, backend, gpu, precision).unwrap();
    for _ in 0..6 {
        let g = [rng.vec(1000), rng.vec(37)];
        opt.apply_gradients(&[Some(&g[0][..]), Some(&g[1][..])])
            .unwrap();
    }
    opt.variables().unwrap().concat()
}

#[test]
fn a_seed_gives_the_same_run_and_seeds_differ() {
    let ctx = common::gpu();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let cpu = run(1, dtype, Backend::Cpu, &GpuOptions::default());
        assert_eq!(cpu, run(1, dtype, Backend::Cpu, &GpuOptions::default()));
        assert_ne!(cpu, run(2, dtype, Backend::Cpu, &GpuOptions::default()));
        if let Some(ctx) = &ctx {
            let gpu = run(1, dtype, Backend::Gpu, &common::on(ctx));
            assert_eq!(gpu, run(1, dtype, Backend::Gpu, &common::on(ctx)));
            let unit = |y: f32| {
                if dtype == Dtype::Bf16 {
                    y.abs() / 64.0
                } else {
                    (y.abs() / 512.0).max(1e-7)
                }
            };
            let same = gpu.iter().zip(&cpu).filter(|(a, b)| a == b).count();
            assert!(
                same * 10 >= 9 * cpu.len(),
                "{dtype}: only {same} of {} equal across backends",
                cpu.len()
            );
            for (a, b) in gpu.iter().zip(&cpu) {
                assert!((a - b).abs() <= unit(*b), "{dtype}: gpu {a} vs cpu {b}");
            }
        }
    }
}

#[test]
fn a_seed_without_16_bit_parameters_is_refused() {
    let var = Variable::new("w", &[2], vec![1.0, 2.0]).unwrap();
    let precision = Precision::default().with_stochastic_rounding(5);
    assert!(matches!(
        RmsProp::with_precision(RmsPropConfig::default(), vec![var], Backend::Cpu, &GpuOptions::default(), precision),
        Err(Error::InvalidConfig { field, .. }) if field == "stochastic_rounding"
    ));
}
