//! The opt-in non-finite guard: a guarded run over a gradient stream with NaN and
//! infinite steps ends exactly where an unguarded run over the finite steps alone ends
//! (variables, every slot, the counters), on both backends, for configs whose numbers
//! depend on the step counter (a schedule, accumulation, the EMA and its overwrite).

mod common;

use std::sync::Arc;

use common::trace::values_match;
use fused_rmsprop::{
    Backend, BackendKind, GpuOptions, KerasSchedule, LearningRate, LearningRateSchedule,
    PiecewiseConstantDecay, RmsProp, RmsPropConfig, SkippedSteps, Slot, Variable,
};

/// A schedule that changes every step, so a plan for the wrong counter shows.
#[derive(Debug)]
struct Sawtooth;

impl LearningRateSchedule for Sawtooth {
    fn learning_rate(&self, step: u64) -> f64 {
        0.01 * (1 + step % 5) as f64
    }
}

fn configs() -> Vec<(&'static str, RmsPropConfig)> {
    let sawtooth = LearningRate::Custom(Arc::new(Sawtooth));
    vec![
        (
            "plain with a schedule",
            RmsPropConfig::default().with_learning_rate(sawtooth.clone()),
        ),
        (
            "accumulation, EMA overwrite, centered momentum, global_clipnorm",
            RmsPropConfig::default()
                .with_learning_rate(sawtooth.clone())
                .with_gradient_accumulation_steps(3)
                .with_use_ema(true)
                .with_ema_momentum(0.8)
                .with_ema_overwrite_frequency(2)
                .with_centered(true)
                .with_momentum(0.5)
                .with_global_clipnorm(0.7),
        ),
        (
            "clipnorm, weight decay, loss scale",
            RmsPropConfig::default()
                .with_learning_rate(sawtooth)
                .with_clipnorm(0.3)
                .with_weight_decay(0.01)
                .with_loss_scale_factor(4.0),
        ),
    ]
}

fn model() -> Vec<Variable> {
    let mut rng = common::Rng(5);
    vec![
        Variable::new("w", &[40, 70], rng.vec(2800)).unwrap(),
        Variable::new("b", &[70], rng.vec(70)).unwrap(),
        Variable::new("s", &[], vec![0.5]).unwrap(),
    ]
}

/// One step of the stream: gradients (`None` for a missing one) and whether the step
/// holds a non-finite value.
type Step = (Vec<Option<Vec<f32>>>, bool);

/// 40 steps; about one in three holds a NaN or an infinity in one variable, and some
/// miss a gradient.
fn stream() -> Vec<Step> {
    let mut rng = common::Rng(17);
    let sizes: Vec<usize> = model().iter().map(|v| v.values.len()).collect();
    (0..40)
        .map(|_| {
            let mut grads: Vec<Option<Vec<f32>>> =
                sizes.iter().map(|&n| Some(rng.vec(n))).collect();
            if rng.below(5) == 0 {
                grads[1] = None;
            }
            let bad = rng.below(3) == 0;
            if bad {
                let v = rng.below(3) as usize;
                let g = grads[v].get_or_insert_with(|| vec![0.0; sizes[v]]);
                let at = rng.below(g.len() as u64) as usize;
                g[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3) as usize];
            }
            (grads, bad)
        })
        .collect()
}

fn apply(opt: &mut RmsProp, grads: &[Option<Vec<f32>>]) {
    let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| g.as_deref()).collect();
    opt.apply_gradients(&refs).unwrap();
}

/// Variables, then every slot, flat.
fn state(opt: &RmsProp) -> Vec<(String, Vec<f32>)> {
    let mut out = vec![("variables".to_string(), opt.variables().unwrap().concat())];
    for name in Slot::ALL {
        if let Some(slot) = opt.slot(name).unwrap() {
            out.push((name.keras_name().to_string(), slot.concat()));
        }
    }
    out
}

fn guarded_equals_finite_only(backend: Backend, gpu: &GpuOptions) {
    let steps = stream();
    let bad = steps.iter().filter(|s| s.1).count() as u64;
    assert!(bad >= 5, "the stream needs non-finite steps, has {bad}");
    for (what, config) in configs() {
        let mut guarded = RmsProp::with_options(config.clone(), model(), backend, gpu).unwrap();
        assert!(
            !guarded.non_finite_guard(),
            "the guard must be off by default"
        );
        guarded.set_non_finite_guard(true).unwrap();
        let mut reference = RmsProp::with_options(config, model(), backend, gpu).unwrap();
        let mut seen_in_flight = 0;
        for (grads, is_bad) in &steps {
            apply(&mut guarded, grads);
            if !is_bad {
                apply(&mut reference, grads);
            }
            // never waits; counts only what is known
            let report = guarded.skipped_steps();
            assert!(report.skipped <= bad, "{what}: {report:?}");
            seen_in_flight = seen_in_flight.max(report.in_flight);
        }
        guarded.synchronize().unwrap();
        assert_eq!(
            guarded.skipped_steps(),
            SkippedSteps {
                skipped: bad,
                in_flight: 0
            },
            "{what}"
        );
        assert_eq!(
            guarded.raw_iterations(),
            reference.raw_iterations(),
            "{what}"
        );
        assert_eq!(guarded.iterations(), reference.iterations(), "{what}");
        assert_eq!(
            guarded.current_learning_rate(),
            reference.current_learning_rate()
        );
        let (g, r) = (state(&guarded), state(&reference));
        assert_eq!(g.len(), r.len());
        for ((name, a), (_, b)) in g.iter().zip(&r) {
            assert!(a.iter().all(|x| x.is_finite()), "{what}: {name} not finite");
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}: {name} differs from the finite-only run");
        }
        eprintln!("{backend:?} {what}: {bad} skipped, at most {seen_in_flight} steps in flight");
    }
}

#[test]
fn guard_on_cpu_skips_exactly_the_non_finite_steps() {
    guarded_equals_finite_only(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn guard_on_gpu_skips_exactly_the_non_finite_steps() {
    let Some(ctx) = common::gpu() else { return };
    guarded_equals_finite_only(Backend::Gpu, &common::on(&ctx));
}

/// Turning the guard off hands the counters back; steps then follow Keras again (NaN
/// flows in); a checkpoint carries the skip count.
fn toggle_and_checkpoint(backend: Backend, gpu: &GpuOptions) {
    // a schedule with a Keras serialization, for the checkpoint's config
    let schedule = KerasSchedule::PiecewiseConstant(PiecewiseConstantDecay {
        boundaries: (1..30).map(f64::from).collect(),
        values: (0..30).map(|i| 0.01 + 0.001 * f64::from(i % 4)).collect(),
        name: "PiecewiseConstant".into(),
    });
    let config = configs().remove(1).1.with_learning_rate(schedule);
    let steps = stream();
    let mut opt = RmsProp::with_options(config.clone(), model(), backend, gpu).unwrap();
    opt.set_non_finite_guard(true).unwrap();
    for (grads, _) in &steps[..20] {
        apply(&mut opt, grads);
    }
    let bad = steps[..20].iter().filter(|s| s.1).count() as u64;
    let applied = 20 - bad;
    assert_eq!(opt.raw_iterations(), applied);

    let dir = std::env::temp_dir().join(format!("guard-{}-{:?}", std::process::id(), backend));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    opt.save_checkpoint(&path).unwrap();
    let mut resumed = RmsProp::with_options(config, model(), backend, gpu).unwrap();
    resumed.set_non_finite_guard(true).unwrap();
    resumed.restore_checkpoint(&path).unwrap();
    assert_eq!(resumed.raw_iterations(), applied);
    assert_eq!(resumed.skipped_steps().skipped, bad);
    for (grads, _) in &steps[20..] {
        apply(&mut opt, grads);
        apply(&mut resumed, grads);
    }
    assert_eq!(state(&opt), state(&resumed), "resume after skipped steps");
    assert_eq!(resumed.skipped_steps(), opt.skipped_steps());

    opt.set_non_finite_guard(false).unwrap();
    assert!(!opt.non_finite_guard());
    let total_bad = steps.iter().filter(|s| s.1).count() as u64;
    assert_eq!(opt.raw_iterations(), 40 - total_bad);
    assert_eq!(opt.skipped_steps().skipped, total_bad);
    // unguarded again: a NaN gradient is applied (Keras' behaviour) and counted as a step
    let (mut grads, _) = steps[0].clone();
    grads[2] = Some(vec![f32::NAN]);
    apply(&mut opt, &grads);
    assert_eq!(opt.raw_iterations(), 41 - total_bad);
    // the first step of an accumulation cycle only accumulates: the NaN sits there
    let acc = opt.slot(Slot::Accumulator).unwrap().unwrap();
    assert!(
        acc[2][0].is_nan() || opt.variable(2).unwrap()[0].is_nan(),
        "{backend:?}: NaN did not flow in without the guard"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn guard_toggle_and_checkpoint_on_cpu() {
    toggle_and_checkpoint(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn guard_toggle_and_checkpoint_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    toggle_and_checkpoint(Backend::Gpu, &common::on(&ctx));
}

/// Device-resident gradients written by the user's own queue writes, NaN and infinity
/// among them: the result matches the CPU path run on the finite steps. (A full plan
/// window is tested in `gpu::engine`'s unit tests.)
#[test]
fn guard_with_device_gradients_written_by_the_user() {
    let Some(ctx) = common::gpu() else { return };
    const N: usize = 1 << 20;
    const STEPS: usize = 150;
    let config = RmsPropConfig::default()
        .with_learning_rate(LearningRate::Custom(Arc::new(Sawtooth)))
        .with_momentum(0.9);
    let mut rng = common::Rng(3);
    let start = rng.vec(N);
    let grad = rng.vec(N);
    let var = || vec![Variable::new("w", &[N], start.clone()).unwrap()];
    let mut gpu =
        RmsProp::with_options(config.clone(), var(), Backend::Gpu, &common::on(&ctx)).unwrap();
    assert_eq!(gpu.backend(), BackendKind::Gpu);
    gpu.set_non_finite_guard(true).unwrap();
    let mut cpu = RmsProp::with_backend(config, var(), Backend::Cpu).unwrap();
    let engine = gpu.gpu().unwrap();
    let buffer = engine.gradient_buffers()[0].clone();
    ctx.queue
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&grad));
    let mut bad = 0;
    let mut most_in_flight = 0;
    for step in 0..STEPS {
        let is_bad = step % 4 == 1;
        let at = (step * 7919) % N;
        if is_bad {
            let v = if step % 8 == 1 {
                f32::NAN
            } else {
                f32::INFINITY
            };
            ctx.queue
                .write_buffer(&buffer, (at * 4) as u64, bytemuck::bytes_of(&v));
            bad += 1;
        }
        gpu.apply_device_gradients(&[true]).unwrap();
        if is_bad {
            ctx.queue
                .write_buffer(&buffer, (at * 4) as u64, bytemuck::bytes_of(&grad[at]));
        } else {
            cpu.apply_gradients(&[Some(&grad)]).unwrap();
        }
        most_in_flight = most_in_flight.max(gpu.skipped_steps().in_flight);
    }
    assert!(
        most_in_flight <= 64,
        "more steps in flight ({most_in_flight}) than the plan window holds"
    );
    gpu.synchronize().unwrap();
    assert_eq!(gpu.skipped_steps().skipped, bad);
    assert_eq!(gpu.raw_iterations(), (STEPS - bad as usize) as u64);
    eprintln!("device gradients: {bad} skipped, at most {most_in_flight} steps in flight");
    let (g, c) = (gpu.variable(0).unwrap(), cpu.variable(0).unwrap());
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!(values_match(*a, *b), "element {i}: gpu {a} vs cpu {b}");
    }
    // a gradient that is NaN everywhere: every invocation flags it; still one skip
    let velocity = gpu.slot(Slot::Velocity).unwrap();
    ctx.queue
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&vec![f32::NAN; N]));
    gpu.apply_device_gradients(&[true]).unwrap();
    gpu.synchronize().unwrap();
    assert_eq!(gpu.skipped_steps().skipped, bad + 1);
    assert_eq!(gpu.variable(0).unwrap(), g);
    assert_eq!(gpu.slot(Slot::Velocity).unwrap(), velocity);
}

/// A finite gradient whose square overflows f32 is not a non-finite gradient: the guard
/// applies the step, exactly as an unguarded run does (with clipnorm its norm is
/// infinite, so Keras scales it to zero; the step still counts).
fn huge_finite_gradient_is_applied(backend: Backend, gpu: &GpuOptions) {
    let config = RmsPropConfig::default()
        .with_learning_rate(0.1)
        .with_clipnorm(1.0);
    let run = |guard: bool| {
        let var = Variable::new("w", &[3], vec![1.0, 2.0, 3.0]).unwrap();
        let mut opt = RmsProp::with_options(config.clone(), vec![var], backend, gpu).unwrap();
        opt.set_non_finite_guard(guard).unwrap();
        opt.apply_gradients(&[Some(&[1e20, 1.0, -3e38][..])])
            .unwrap();
        opt.apply_gradients(&[Some(&[0.5, 1.0, -1.0][..])]).unwrap();
        opt.synchronize().unwrap();
        (
            opt.raw_iterations(),
            opt.skipped_steps().skipped,
            state(&opt),
        )
    };
    let (guarded, plain) = (run(true), run(false));
    assert_eq!((guarded.0, guarded.1), (2, 0), "{backend:?}");
    assert_eq!(guarded.2, plain.2, "{backend:?}");
}

#[test]
fn huge_finite_gradient_is_applied_on_cpu() {
    huge_finite_gradient_is_applied(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn huge_finite_gradient_is_applied_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    huge_finite_gradient_is_applied(Backend::Gpu, &common::on(&ctx));
}
