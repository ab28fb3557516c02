//! Keras' `LossScaleOptimizer` around RMSprop: the recorded Keras traces (variables,
//! iterations, final scale) on both backends and in every gradient dtype; the scale's
//! rule against a host model over long random runs with device-side decisions; the
//! `get_config()` JSON both ways; refusals.

mod common;

use common::trace::first_mismatch;
use common::Rng;
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, LossScaleConfig, LossScaleOptimizer, LossScaleState,
    RmsProp, RmsPropConfig, Variable,
};

#[test]
fn loss_scale_traces_match_keras_on_both_backends_in_every_gradient_dtype() {
    let ctx = common::gpu();
    let traces = common::loss_scale_traces();
    assert!(traces.len() >= 2, "expected the 2 loss-scale traces");
    let mut failures = Vec::new();
    for (file, trace) in &traces {
        assert!(
            trace.loss_scale_optimizer.is_some(),
            "{file}: not loss-scaled"
        );
        let expected = trace.expected.as_ref().unwrap();
        assert!(
            expected.loss_scale.is_some(),
            "{file}: no expected loss scale"
        );
        let backends = common::backends(ctx.as_ref());
        for (backend, gpu) in &backends {
            let (_, got) = trace.replay(*backend, gpu).unwrap();
            if let Some(m) = first_mismatch(&got, expected) {
                failures.push(format!("{file} {backend:?}: {m}"));
            }
            // 16-bit gradients: the f32 replay of the rounded gradients, bit for bit
            for dtype in [Dtype::Bf16, Dtype::F16] {
                let (_, got) = trace.replay_in(*backend, gpu, dtype).unwrap();
                let (_, want) = trace.rounded(dtype).replay(*backend, gpu).unwrap();
                let same = got.iterations == want.iterations
                    && got.loss_scale == want.loss_scale
                    && got
                        .variables
                        .iter()
                        .flatten()
                        .zip(want.variables.iter().flatten())
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                if !same {
                    failures.push(format!(
                        "{file} {backend:?} {dtype}: differs from the rounded f32 replay"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn model() -> Vec<Variable> {
    let mut rng = Rng(9);
    vec![
        Variable::new("dense/kernel", &[40, 30], rng.vec(1200)).unwrap(),
        Variable::new("dense/bias", &[30], rng.vec(30)).unwrap(),
    ]
}

/// Keras' `LossScaleOptimizer` rule, written from its documentation (the reference the
/// optimizer is held to here): a non-finite step halves the scale, the
/// `growth_steps`-th finite step in a row doubles it, and the count restarts whenever
/// the scale changes.
fn keras_rule(state: LossScaleState, finite: bool, growth_steps: u32) -> LossScaleState {
    match (finite, state.counter + 1 == growth_steps) {
        (false, _) => LossScaleState {
            scale: state.scale / 2.0,
            counter: 0,
        },
        (true, true) => LossScaleState {
            scale: state.scale * 2.0,
            counter: 0,
        },
        (true, false) => LossScaleState {
            counter: state.counter + 1,
            ..state
        },
    }
}

/// Many steps with overflows at random, growth every 3 finite steps: the scale follows
/// Keras' rule step by step (CPU), the GPU (deciding on the device, read back
/// only at the end) ends in the same state, and both backends' variables agree.
fn random_run(backend: Backend, gpu: &GpuOptions) -> (LossScaleState, u64, Vec<Vec<f32>>) {
    let config = RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.5)
        .with_global_clipnorm(1.0);
    let inner = RmsProp::with_options(config, model(), backend, gpu).unwrap();
    let scaling = LossScaleConfig {
        initial_scale: 256.0,
        dynamic_growth_steps: 3,
    };
    let mut opt = LossScaleOptimizer::new(inner, scaling).unwrap();
    let mut rng = Rng(77);
    let mut model_state = LossScaleState {
        scale: 256.0,
        counter: 0,
    };
    let mut applied = 0;
    for step in 0..40 {
        let overflow = rng.below(4) == 0;
        let mut g: Vec<Vec<f32>> = model()
            .iter()
            .map(|v| {
                rng.vec(v.values.len())
                    .iter()
                    .map(|x| x * model_state.scale)
                    .collect()
            })
            .collect();
        if overflow {
            g[step % 2][7] = if step % 3 == 0 {
                f32::NAN
            } else {
                f32::INFINITY
            };
        }
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
        opt.apply_gradients(&refs).unwrap();
        model_state = keras_rule(model_state, !overflow, 3);
        applied += u64::from(!overflow);
        if backend == Backend::Cpu {
            assert_eq!(opt.state(), model_state, "step {step}");
        }
    }
    opt.inner().synchronize().unwrap();
    assert_eq!(opt.state(), model_state, "{backend:?}");
    assert_eq!(opt.iterations(), applied, "{backend:?}");
    assert_eq!(opt.inner().skipped_steps().skipped, 40 - applied);
    (opt.state(), applied, opt.inner().variables().unwrap())
}

#[test]
fn the_scale_follows_keras_rule_on_both_backends() {
    let (cpu_state, cpu_applied, cpu_vars) = random_run(Backend::Cpu, &GpuOptions::default());
    assert!(
        cpu_applied > 20 && cpu_applied < 40,
        "{cpu_applied} steps applied"
    );
    let Some(ctx) = common::gpu() else { return };
    let (gpu_state, gpu_applied, gpu_vars) = random_run(Backend::Gpu, &common::on(&ctx));
    assert_eq!((gpu_state, gpu_applied), (cpu_state, cpu_applied));
    for (a, b) in gpu_vars.iter().flatten().zip(cpu_vars.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "gpu {a} vs cpu {b}");
    }
}

#[test]
fn config_json_both_ways() {
    let inner = RmsPropConfig::default()
        .with_learning_rate(0.02)
        .with_momentum(0.9);
    let scaling = LossScaleConfig {
        initial_scale: 1024.0,
        dynamic_growth_steps: 7,
    };
    let json = scaling.to_keras_json(&inner).unwrap();
    assert_eq!(json["inner_optimizer"]["class_name"], "RMSprop");
    assert_eq!(json["initial_scale"], 1024.0);
    assert_eq!(json["dynamic_growth_steps"], 7);
    let (back, back_inner) = LossScaleConfig::from_keras_json(&json).unwrap();
    assert_eq!(back, scaling);
    assert_eq!(
        back_inner.to_keras_json().unwrap(),
        inner.to_keras_json().unwrap()
    );
    // Keras' own output, as LossScaleOptimizer.get_config() writes it
    let keras = serde_json::json!({
        "name": "loss_scale_optimizer",
        "inner_optimizer": {"module": "keras.optimizers", "class_name": "RMSprop",
            "config": inner.to_keras_json().unwrap(), "registered_name": null},
        "initial_scale": 32768.0,
        "dynamic_growth_steps": 2000
    });
    let (keras_scaling, _) = LossScaleConfig::from_keras_json(&keras).unwrap();
    assert_eq!(keras_scaling, LossScaleConfig::default());
    let opt = LossScaleOptimizer::from_keras_json(
        &json,
        model(),
        Backend::Cpu,
        &GpuOptions::default(),
        Default::default(),
    )
    .unwrap();
    assert_eq!(opt.to_keras_json().unwrap(), json);
    assert_eq!(opt.loss_scale(), 1024.0);
    assert_eq!(opt.scale_loss(0.5), 512.0);
}

#[test]
fn bad_arguments_are_refused() {
    let inner = || RmsProp::with_backend(RmsPropConfig::default(), model(), Backend::Cpu).unwrap();
    for (scale, steps, field) in [
        (0.0, 10, "initial_scale"),
        (f32::NAN, 10, "initial_scale"),
        (f32::INFINITY, 10, "initial_scale"),
        (-2.0, 10, "initial_scale"),
        (8.0, 0, "dynamic_growth_steps"),
    ] {
        let config = LossScaleConfig {
            initial_scale: scale,
            dynamic_growth_steps: steps,
        };
        match LossScaleOptimizer::new(inner(), config) {
            Err(Error::InvalidConfig { field: f, .. }) if f == field => {}
            other => panic!("{scale} {steps}: {other:?}"),
        }
    }
    let scaled_inner = RmsProp::with_backend(
        RmsPropConfig::default().with_loss_scale_factor(8.0),
        model(),
        Backend::Cpu,
    )
    .unwrap();
    assert!(matches!(
        LossScaleOptimizer::new(scaled_inner, LossScaleConfig::default()),
        Err(Error::InvalidConfig { field, .. }) if field == "loss_scale_factor"
    ));
    let inner_json = RmsPropConfig::default().to_keras_json().unwrap();
    for bad in [
        serde_json::json!({"inner_optimizer": inner_json, "initial_scale": 8.0, "extra": 1}),
        serde_json::json!({"inner_optimizer": {"class_name": "Adam", "config": {}}}),
        serde_json::json!({"initial_scale": 8.0}),
        serde_json::json!({"inner_optimizer": inner_json, "dynamic_growth_steps": -3}),
        serde_json::json!({"inner_optimizer": inner_json, "initial_scale": "big"}),
    ] {
        assert!(LossScaleConfig::from_keras_json(&bad).is_err(), "{bad}");
    }
}

#[test]
fn gpu_loss_scaling_refuses_recording_into_a_user_encoder() {
    let Some(ctx) = common::gpu() else { return };
    let inner = RmsProp::with_options(
        RmsPropConfig::default(),
        model(),
        Backend::Gpu,
        &common::on(&ctx),
    )
    .unwrap();
    let mut opt = LossScaleOptimizer::new(inner, LossScaleConfig::default()).unwrap();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    assert!(matches!(
        opt.inner_mut()
            .record_device_step(&[true, true], &mut encoder),
        Err(Error::NotWithGuard(_))
    ));
    // taking the wrapper off gives a plain optimizer that records again
    let mut plain = opt.into_inner().unwrap();
    plain
        .record_device_step(&[true, true], &mut encoder)
        .unwrap();
    ctx.queue.submit([encoder.finish()]);
    plain.synchronize().unwrap();
    assert_eq!(plain.iterations(), 1);
}

/// A loss-scaled run saved mid-way and loaded resumes bit-identically, scale included;
/// checkpoints do not cross between plain and loss-scaled optimizers.
#[test]
fn checkpoints_carry_the_loss_scale() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-lso-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lso.safetensors");
    let scaling = LossScaleConfig {
        initial_scale: 64.0,
        dynamic_growth_steps: 2,
    };
    let build = || {
        let inner = RmsProp::with_backend(RmsPropConfig::default(), model(), Backend::Cpu).unwrap();
        LossScaleOptimizer::new(inner, scaling).unwrap()
    };
    let run = |opt: &mut LossScaleOptimizer, steps: std::ops::Range<usize>| {
        for step in steps {
            let mut rng = Rng(100 + step as u64);
            let mut g: Vec<Vec<f32>> = model().iter().map(|v| rng.vec(v.values.len())).collect();
            if step % 4 == 1 {
                g[0][3] = f32::INFINITY;
            }
            let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
            opt.apply_gradients(&refs).unwrap();
        }
    };
    let mut straight = build();
    run(&mut straight, 0..9);
    let mut first = build();
    run(&mut first, 0..5);
    first.save_checkpoint(&path).unwrap();
    let mut loaded =
        LossScaleOptimizer::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
    assert_eq!(loaded.config(), &scaling);
    assert_eq!(loaded.state(), first.state());
    let mut restored = build();
    restored.restore_checkpoint(&path).unwrap();
    run(&mut loaded, 5..9);
    run(&mut restored, 5..9);
    for opt in [&loaded, &restored] {
        assert_eq!(opt.state(), straight.state());
        assert_eq!(opt.iterations(), straight.iterations());
        let bits = |o: &LossScaleOptimizer| -> Vec<u32> {
            o.inner()
                .variables()
                .unwrap()
                .iter()
                .flatten()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(opt), bits(&straight));
    }
    // a plain optimizer neither loads nor restores it, and is left as it was
    assert!(matches!(
        RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()),
        Err(Error::Checkpoint { .. })
    ));
    let mut plain = RmsProp::with_backend(RmsPropConfig::default(), model(), Backend::Cpu).unwrap();
    let before = plain.variables().unwrap();
    assert!(matches!(
        plain.restore_checkpoint(&path),
        Err(Error::Checkpoint { .. })
    ));
    assert_eq!(plain.variables().unwrap(), before);
    let plain_path = dir.join("plain.safetensors");
    plain.save_checkpoint(&plain_path).unwrap();
    assert!(matches!(
        LossScaleOptimizer::load_checkpoint(&plain_path, Backend::Cpu, &GpuOptions::default()),
        Err(Error::Checkpoint { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
