//! Parameters stored in bf16 or f16 with f32 slots (`Precision::params`): every
//! assignment Keras makes to a variable rounds to the storage type (weight decay, the
//! update, the EMA overwrite, `finalize_variable_values`, `set_variable`). Checked
//! against a scalar reference written here from Keras' formulas (not the crate's
//! math), bit for bit on the CPU path and within one unit of the 16-bit type on the
//! GPU; every Keras trace replays in both storage types on both backends alike.

mod common;

use common::Rng;
use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, Precision, RmsProp, RmsPropConfig, Slot, Variable,
};

fn round(x: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::F32 => x,
    }
}

/// What the reference runs: Keras' RMSprop options it implements.
#[derive(Clone, Copy, Debug)]
struct Options {
    lr: f32,
    rho: f32,
    momentum: f32,
    centered: bool,
    weight_decay: f32,
    /// (ema_momentum, overwrite frequency)
    ema: Option<(f32, u64)>,
}

impl Options {
    fn config(&self) -> RmsPropConfig {
        let mut c = RmsPropConfig::default()
            .with_learning_rate(f64::from(self.lr))
            .with_rho(f64::from(self.rho))
            .with_centered(self.centered);
        if self.momentum > 0.0 {
            c = c.with_momentum(f64::from(self.momentum));
        }
        if self.weight_decay > 0.0 {
            c = c.with_weight_decay(f64::from(self.weight_decay));
        }
        if let Some((m, f)) = self.ema {
            c = c
                .with_use_ema(true)
                .with_ema_momentum(f64::from(m))
                .with_ema_overwrite_frequency(f);
        }
        c
    }
}

/// One tensor through Keras' RMSprop with the parameter stored in `dtype`, written
/// out from Keras' `rmsprop.py` and `base_optimizer.py` (float32, their order of
/// operations); returns the parameters after each step and after finalize.
fn reference(
    o: Options,
    dtype: Dtype,
    start: &[f32],
    grads: &[Vec<f32>],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let one_minus_rho = (1.0 - f64::from(o.rho)) as f32;
    let n = start.len();
    let mut p: Vec<f32> = start.iter().map(|&x| round(x, dtype)).collect();
    let (mut v, mut m, mut a, mut ema) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut after = Vec::new();
    for (iter, g) in grads.iter().enumerate() {
        for i in 0..n {
            if o.weight_decay > 0.0 {
                p[i] = round(p[i] - p[i] * o.weight_decay * o.lr, dtype);
            }
            v[i] = o.rho * v[i] + one_minus_rho * (g[i] * g[i]);
            let denominator = if o.centered {
                a[i] = o.rho * a[i] + one_minus_rho * g[i];
                v[i] - a[i] * a[i] + 1e-7
            } else {
                v[i] + 1e-7
            };
            let increment = (o.lr * g[i]) / denominator.sqrt();
            if o.momentum > 0.0 {
                m[i] = o.momentum * m[i] + increment;
                p[i] = round(p[i] - m[i], dtype);
            } else {
                p[i] = round(p[i] - increment, dtype);
            }
            if let Some((em, freq)) = o.ema {
                let em = if iter == 0 { 0.0 } else { em };
                ema[i] = em * ema[i] + (1.0 - em) * p[i];
                let s = if (iter as u64 + 1).is_multiple_of(freq) {
                    1.0
                } else {
                    0.0
                };
                p[i] = round(ema[i] * s + p[i] * (1.0 - s), dtype);
            }
        }
        after.push(p.clone());
    }
    let finalized = if o.ema.is_some() {
        ema.iter().map(|&e| round(e, dtype)).collect()
    } else {
        p.clone()
    };
    (after, finalized)
}

const OPTIONS: [Options; 4] = [
    Options {
        lr: 0.01,
        rho: 0.9,
        momentum: 0.0,
        centered: false,
        weight_decay: 0.0,
        ema: None,
    },
    Options {
        lr: 0.003,
        rho: 0.8,
        momentum: 0.7,
        centered: true,
        weight_decay: 0.0,
        ema: None,
    },
    Options {
        lr: 0.01,
        rho: 0.9,
        momentum: 0.5,
        centered: false,
        weight_decay: 0.05,
        ema: None,
    },
    Options {
        lr: 0.02,
        rho: 0.85,
        momentum: 0.0,
        centered: true,
        weight_decay: 0.1,
        ema: Some((0.9, 3)),
    },
];

/// Starting values and gradients over many magnitudes, with values near the f16
/// limits (overflow to infinity, subnormals) and bf16/f16 ties.
fn data(n: usize, steps: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = Rng(seed);
    let mut start: Vec<f32> = (0..n)
        .map(|_| rng.unit() * 10f32.powi(rng.below(6) as i32 - 3))
        .collect();
    let specials = [
        65504.0,
        -65000.0,
        3.0e-6,
        -6.0e-8,
        1.0 + 1.0 / 2048.0,
        0.0,
        1.0 / 1024.0,
    ];
    start[..specials.len()].copy_from_slice(&specials);
    let grads = (0..steps)
        .map(|_| (0..n).map(|_| rng.unit()).collect())
        .collect();
    (start, grads)
}

fn one_ulp(x: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Bf16 => x.abs().max(1e-30) / 128.0,
        _ => (x.abs() / 1024.0).max(6.0e-8),
    }
}

fn matches_reference(backend: Backend, gpu: &GpuOptions) {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for (k, o) in OPTIONS.iter().enumerate() {
            let (start, grads) = data(300, 7, 11 + k as u64);
            let (want, want_final) = reference(*o, dtype, &start, &grads);
            let var = Variable::new("w", &[start.len()], start.clone()).unwrap();
            let precision = Precision::default().with_params(dtype);
            let mut opt =
                RmsProp::with_precision(o.config(), vec![var], backend, gpu, precision).unwrap();
            for (step, g) in grads.iter().enumerate() {
                opt.apply_gradients(&[Some(&g[..])]).unwrap();
                let got = opt.variable(0).unwrap();
                for (i, (&x, &y)) in got.iter().zip(&want[step]).enumerate() {
                    // the stored values are 16-bit values
                    assert_eq!(
                        round(x, dtype).to_bits(),
                        x.to_bits(),
                        "{dtype}: {x} is not a {dtype}"
                    );
                    let ok = if backend == Backend::Cpu {
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
                    } else {
                        x == y || (x - y).abs() <= one_ulp(y, dtype) || (x.is_nan() && y.is_nan())
                    };
                    assert!(
                        ok,
                        "{backend:?} {dtype} options {k} step {step} [{i}]: {x:e}, reference {y:e}"
                    );
                }
            }
            opt.finalize_variable_values().unwrap();
            for (&x, &y) in opt.variable(0).unwrap().iter().zip(&want_final) {
                let ok = x.to_bits() == y.to_bits()
                    || (backend == Backend::Gpu && (x - y).abs() <= one_ulp(y, dtype));
                assert!(
                    ok,
                    "{backend:?} {dtype} options {k} finalize: {x:e}, reference {y:e}"
                );
            }
            // slots stay f32: the velocity holds values no 16-bit type does
            let velocity = opt.slot(Slot::Velocity).unwrap().unwrap();
            assert!(
                velocity[0].iter().any(|&x| round(x, dtype) != x),
                "{dtype}: velocity rounded"
            );
        }
    }
}

#[test]
fn cpu_16_bit_parameters_match_the_reference_bit_for_bit() {
    matches_reference(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn gpu_16_bit_parameters_match_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    matches_reference(Backend::Gpu, &common::on(&ctx));
    let split = GpuOptions {
        max_segment_len: Some(128),
        ..common::on(&ctx)
    };
    matches_reference(Backend::Gpu, &split);
}

/// Every Keras trace in both storage types: the CPU and GPU runs agree within one unit
/// of the type, and every variable holds 16-bit values.
#[test]
fn every_trace_replays_with_16_bit_parameters_on_both_backends() {
    let Some(ctx) = common::gpu() else { return };
    for (file, trace) in &common::traces() {
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let precision = Precision::default().with_params(dtype);
            let (_, cpu) = trace
                .replay_with(Backend::Cpu, &GpuOptions::default(), precision)
                .unwrap();
            let (_, gpu) = trace
                .replay_with(Backend::Gpu, &common::on(&ctx), precision)
                .unwrap();
            assert_eq!(cpu.iterations, gpu.iterations);
            for (&x, &y) in gpu
                .variables
                .iter()
                .flatten()
                .zip(cpu.variables.iter().flatten())
            {
                assert_eq!(round(y, dtype).to_bits(), y.to_bits(), "{file} {dtype}");
                let ok = x == y || (x - y).abs() <= one_ulp(y, dtype) || (x.is_nan() && y.is_nan());
                assert!(ok, "{file} {dtype}: gpu {x:e} vs cpu {y:e}");
            }
        }
    }
}

/// `set_variable` rounds; a 16-bit parameter view holds the 16-bit values; a parameter
/// copy of 16-bit parameters is refused; checkpoints keep the storage type.
#[test]
fn writes_views_refusals_and_checkpoints() {
    let values = vec![1.0 + 1.0 / 512.0, 70000.0, 1e-8, -2.5];
    let var = || Variable::new("w", &[4], values.clone()).unwrap();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let precision = Precision::default().with_params(dtype);
        let opt = RmsProp::with_precision(
            RmsPropConfig::default(),
            vec![var()],
            Backend::Cpu,
            &GpuOptions::default(),
            precision,
        )
        .unwrap();
        let want: Vec<f32> = values.iter().map(|&x| round(x, dtype)).collect();
        assert_eq!(opt.variable(0).unwrap(), want);
        assert!(matches!(
            RmsProp::with_precision(RmsPropConfig::default(), vec![var()], Backend::Cpu, &GpuOptions::default(), precision.with_param_copy(Dtype::Bf16)),
            Err(Error::InvalidConfig { field, .. }) if field == "param_copy"
        ));
        let dir =
            std::env::temp_dir().join(format!("fused-rmsprop-pdt-{}-{dtype}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.safetensors");
        opt.save_checkpoint(&path).unwrap();
        let loaded = RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
        assert_eq!(loaded.precision().params, dtype);
        assert_eq!(loaded.variable(0).unwrap(), want);
        let mut plain =
            RmsProp::with_backend(RmsPropConfig::default(), vec![var()], Backend::Cpu).unwrap();
        assert!(matches!(
            plain.restore_checkpoint(&path),
            Err(Error::PrecisionMismatch { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        if let Some(ctx) = common::gpu() {
            let opt = RmsProp::with_precision(
                RmsPropConfig::default(),
                vec![var()],
                Backend::Gpu,
                &common::on(&ctx),
                precision,
            )
            .unwrap();
            assert_eq!(opt.variable(0).unwrap(), want);
            let view = opt.gpu().unwrap().param_view(0).unwrap();
            assert_eq!(view.size, 8, "4 values of 2 bytes");
        }
    }
}
