//! bf16 parameters with 16-bit remainders (`Precision::with_param_remainders`, apex's
//! `store_param_remainders`): the two halves are exactly an f32 master, so every step
//! is the f32 step bit for bit, while the bf16 halves, bound by `param_view`, are the
//! masters rounded to nearest (exact ties toward zero) for a forward pass, in 2 bytes.

mod common;

use common::Rng;
use fused_rmsprop::half::bf16;
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, Precision, RmsProp, RmsPropConfig, Variable,
};

fn bits(v: &[Vec<f32>]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

#[test]
fn every_trace_is_the_f32_run_bit_for_bit_on_both_backends() {
    let ctx = common::gpu();
    let mut backends = common::backends(ctx.as_ref());
    if let Some(ctx) = &ctx {
        backends.push((
            Backend::Gpu,
            GpuOptions {
                max_segment_len: Some(64),
                ..common::on(ctx)
            },
        ));
    }
    for (file, trace) in &common::traces() {
        for (backend, gpu) in &backends {
            for gradients in [Dtype::F32, Dtype::Bf16] {
                let plain = Precision::default().with_gradients(gradients);
                let (_, want) = trace.replay_with(*backend, gpu, plain).unwrap();
                let (_, got) = trace
                    .replay_with(*backend, gpu, plain.with_param_remainders())
                    .unwrap();
                assert_eq!(got.iterations, want.iterations);
                let same = bits(&got.variables)
                    .iter()
                    .zip(bits(&want.variables))
                    .all(|(&a, b)| {
                        a == b || (f32::from_bits(a).is_nan() && f32::from_bits(b).is_nan())
                    });
                assert!(same, "{file} {backend:?} {gradients}: not the f32 run");
            }
        }
    }
}

/// The bf16 halves in the parameter buffer: the masters rounded to nearest, exact ties
/// toward zero; the buffer holds 2 bytes per parameter.
#[test]
fn gpu_views_hold_the_bf16_weights_in_two_bytes() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    let mut start = rng.vec(1000);
    // an exact tie (low 16 bits 0x8000), the largest finite value, tiny ones
    start[..4].copy_from_slice(&[f32::from_bits(0x3f80_8000), f32::MAX, 1e-40, -0.0]);
    let vars = vec![
        Variable::new("w", &[1000], start).unwrap(),
        Variable::new("b", &[3], vec![0.1, -0.2, 0.3]).unwrap(),
    ];
    let precision = Precision::default().with_param_remainders();
    let config = RmsPropConfig::default()
        .with_learning_rate(1e-3)
        .with_momentum(0.9)
        .with_use_ema(true)
        .with_ema_overwrite_frequency(2);
    let mut opt = RmsProp::with_precision(
        config.clone(),
        vars.clone(),
        Backend::Gpu,
        &common::on(&ctx),
        precision,
    )
    .unwrap();
    let mut reference =
        RmsProp::with_options(config, vars, Backend::Gpu, &common::on(&ctx)).unwrap();
    for _ in 0..3 {
        let g = [rng.vec(1000), rng.vec(3)];
        let refs = [Some(&g[0][..]), Some(&g[1][..])];
        opt.apply_gradients(&refs).unwrap();
        reference.apply_gradients(&refs).unwrap();
    }
    opt.set_variable(1, &[1.5, f32::from_bits(0x4000_8000), -7.0])
        .unwrap();
    reference
        .set_variable(1, &[1.5, f32::from_bits(0x4000_8000), -7.0])
        .unwrap();
    opt.finalize_variable_values().unwrap();
    reference.finalize_variable_values().unwrap();
    let masters = opt.variables().unwrap();
    assert_eq!(bits(&masters), bits(&reference.variables().unwrap()));
    let gpu = opt.gpu().unwrap();
    let total: u64 = gpu.param_buffers().iter().map(|b| b.size()).sum();
    assert!(
        total < 4 * 1100,
        "the parameter buffer takes {total} bytes for 1003 parameters"
    );
    for (i, master) in masters.iter().enumerate() {
        let view = gpu.param_view(i).unwrap();
        assert_eq!(view.size, (2 * master.len() as u64).next_multiple_of(4));
        let words = common::read_bytes(&ctx, view.buffer, view.offset, view.size);
        let halves: Vec<u16> = bytemuck::pod_collect_to_vec(&words);
        for (k, &x) in master.iter().enumerate() {
            let b = x.to_bits();
            let want = (b.wrapping_add(0x7fff) >> 16) as u16;
            assert_eq!(halves[k], want, "tensor {i}[{k}]: master {x:e}");
            if b & 0xffff != 0x8000 {
                assert_eq!(halves[k], bf16::from_f32(x).to_bits(), "nearest");
            }
        }
    }
}

#[test]
fn remainders_need_bf16_parameters_and_checkpoints_keep_them() {
    let var = || vec![Variable::new("w", &[5], vec![1.0, 2.0, 3.0, 4.0, 1e-3]).unwrap()];
    let build = |p: Precision| {
        RmsProp::with_precision(
            RmsPropConfig::default(),
            var(),
            Backend::Cpu,
            &GpuOptions::default(),
            p,
        )
    };
    for bad in [
        Precision::default()
            .with_param_remainders()
            .with_params(Dtype::F16),
        Precision::default()
            .with_param_remainders()
            .with_stochastic_rounding(1),
    ] {
        assert!(
            matches!(build(bad), Err(Error::InvalidConfig { field, .. }) if field == "param_remainders"),
            "{bad:?}"
        );
    }
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    for (backend, gpu) in backends {
        let precision = Precision::default().with_param_remainders();
        let mut opt =
            RmsProp::with_precision(RmsPropConfig::default(), var(), backend, &gpu, precision)
                .unwrap();
        opt.apply_gradients(&[Some(&[0.1, -0.2, 0.3, -0.4, 0.5][..])])
            .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "fused-rmsprop-rem-{}-{backend:?}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.safetensors");
        opt.save_checkpoint(&path).unwrap();
        let loaded = RmsProp::load_checkpoint(&path, backend, &gpu).unwrap();
        assert!(loaded.precision().param_remainders);
        assert_eq!(
            bits(&loaded.variables().unwrap()),
            bits(&opt.variables().unwrap())
        );
        let mut plain = RmsProp::with_precision(
            RmsPropConfig::default(),
            var(),
            backend,
            &gpu,
            Precision::default().with_params(Dtype::Bf16),
        )
        .unwrap();
        assert!(matches!(
            plain.restore_checkpoint(&path),
            Err(Error::Checkpoint { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
