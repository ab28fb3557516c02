//! Checkpoints: resume is bit-identical on the same backend and within tolerance on
//! the other; bad checkpoints are refused without touching the in-memory state.

mod common;

use common::trace::values_match;
use common::Rng;
use fused_rmsprop::{Backend, Error, GpuOptions, RmsProp, RmsPropConfig, Slot, Variable};

fn config() -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.8)
        .with_centered(true)
        .with_use_ema(true)
        .with_ema_overwrite_frequency(4)
        .with_gradient_accumulation_steps(2)
        .with_weight_decay(0.01)
        .with_global_clipnorm(2.0)
}

fn model() -> Vec<Variable> {
    let mut rng = Rng(3);
    vec![
        Variable::new("dense/kernel", &[7, 5], rng.vec(35)).unwrap(),
        Variable::new("dense/bias", &[5], rng.vec(5)).unwrap(),
        Variable::new("scale", &[], vec![1.5]).unwrap(),
        Variable::new("empty", &[0], vec![]).unwrap(),
    ]
}

fn grads(step: usize) -> Vec<Option<Vec<f32>>> {
    let mut rng = Rng(1000 + step as u64);
    model()
        .iter()
        .enumerate()
        .map(|(i, v)| (i != 1 || !step.is_multiple_of(3)).then(|| rng.vec(v.values.len())))
        .collect()
}

fn run(opt: &mut RmsProp, steps: std::ops::Range<usize>) {
    for s in steps {
        let g = grads(s);
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| g.as_deref()).collect();
        opt.apply_gradients(&refs).unwrap();
    }
}

fn build(backend: Backend, gpu: &GpuOptions) -> RmsProp {
    let mut opt = RmsProp::with_options(config(), model(), backend, gpu).unwrap();
    opt.exclude_from_weight_decay(&["bias"]);
    opt
}

fn state(opt: &RmsProp) -> Vec<Vec<f32>> {
    let mut all = opt.variables().unwrap();
    for s in Slot::ALL {
        all.extend(opt.slot(s).unwrap().unwrap());
    }
    all
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

fn resume_is_bit_identical(backend: Backend, gpu: &GpuOptions) {
    let dir = std::env::temp_dir().join(format!(
        "fused-rmsprop-ckpt-{}-{backend:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    let mut straight = build(backend, gpu);
    run(&mut straight, 0..11);
    let mut first = build(backend, gpu);
    run(&mut first, 0..5);
    first.save_checkpoint(&path).unwrap();
    // resume into a fresh optimizer of the same shape, and from the file alone
    let mut resumed = build(backend, gpu);
    resumed.restore_checkpoint(&path).unwrap();
    let mut loaded = RmsProp::load_checkpoint(&path, backend, gpu).unwrap();
    assert_eq!(loaded.excluded(), ["bias".to_string()]);
    run(&mut resumed, 5..11);
    run(&mut loaded, 5..11);
    assert_eq!(resumed.raw_iterations(), 11);
    assert_eq!(resumed.iterations(), straight.iterations());
    assert_eq!(bits(&state(&resumed)), bits(&state(&straight)));
    assert_eq!(bits(&state(&loaded)), bits(&state(&straight)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_on_cpu_is_bit_identical() {
    resume_is_bit_identical(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn resume_on_gpu_is_bit_identical() {
    let Some(ctx) = common::gpu() else { return };
    resume_is_bit_identical(Backend::Gpu, &common::on(&ctx));
}

#[test]
fn restore_across_backends_within_tolerance() {
    let Some(ctx) = common::gpu() else { return };
    let path = std::env::temp_dir().join(format!(
        "fused-rmsprop-x-{}.safetensors",
        std::process::id()
    ));
    let mut cpu = build(Backend::Cpu, &GpuOptions::default());
    run(&mut cpu, 0..6);
    cpu.save_checkpoint(&path).unwrap();
    let mut gpu = RmsProp::load_checkpoint(&path, Backend::Gpu, &common::on(&ctx)).unwrap();
    run(&mut cpu, 6..12);
    run(&mut gpu, 6..12);
    for (a, b) in state(&gpu)
        .iter()
        .flatten()
        .zip(state(&cpu).iter().flatten())
    {
        assert!(values_match(*a, *b), "{a} vs {b}");
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn bad_checkpoints_are_refused_and_leave_state_alone() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.safetensors");
    let mut saved = build(Backend::Cpu, &GpuOptions::default());
    run(&mut saved, 0..3);
    saved.save_checkpoint(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let mut opt = build(Backend::Cpu, &GpuOptions::default());
    run(&mut opt, 0..7);
    let before = (bits(&state(&opt)), opt.raw_iterations());
    let check = |opt: &mut RmsProp, path: &std::path::Path| {
        let e = opt.restore_checkpoint(path).unwrap_err();
        assert!(
            matches!(e, Error::Checkpoint { .. } | Error::Io { .. }),
            "{e:?}"
        );
        assert_eq!(
            (bits(&state(opt)), opt.raw_iterations()),
            before,
            "state changed by {e}"
        );
    };
    // truncated
    let p = dir.join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    check(&mut opt, &p);
    // corrupt header
    let mut c = bytes.clone();
    for b in c.iter_mut().skip(8).take(40) {
        *b = b'#';
    }
    let p = dir.join("corrupt.safetensors");
    std::fs::write(&p, &c).unwrap();
    check(&mut opt, &p);
    // missing file
    check(&mut opt, &dir.join("nope.safetensors"));
    // other shapes
    let mut other = RmsProp::with_backend(
        config(),
        vec![Variable::new("dense/kernel", &[5, 7], vec![0.0; 35]).unwrap()],
        Backend::Cpu,
    )
    .unwrap();
    run_one(&mut other);
    let p = dir.join("shapes.safetensors");
    other.save_checkpoint(&p).unwrap();
    check(&mut opt, &p);
    // other options (no momentum: a different set of slots too)
    let p = dir.join("options.safetensors");
    RmsProp::with_backend(config().with_momentum(0.0), model(), Backend::Cpu)
        .unwrap()
        .save_checkpoint(&p)
        .unwrap();
    check(&mut opt, &p);
    std::fs::remove_dir_all(&dir).ok();
}

/// A file that cannot be read is an I/O error that keeps the operating system's error.
#[test]
fn io_errors_keep_their_source() {
    let mut opt = build(Backend::Cpu, &GpuOptions::default());
    let missing = std::env::temp_dir().join(format!("fused-rmsprop-none-{}", std::process::id()));
    let e = opt.restore_checkpoint(&missing).unwrap_err();
    let Error::Io {
        ref path,
        ref source,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(path, &missing.display().to_string());
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    let chained = std::error::Error::source(&e).expect("the I/O error is the source");
    assert_eq!(chained.to_string(), source.to_string());
}

fn run_one(opt: &mut RmsProp) {
    opt.apply_gradients(&[Some(&[0.1; 35])]).unwrap();
}

#[test]
fn saving_replaces_the_previous_checkpoint_atomically() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    let mut opt = build(Backend::Cpu, &GpuOptions::default());
    opt.save_checkpoint(&path).unwrap();
    run(&mut opt, 0..2);
    opt.save_checkpoint(&path).unwrap();
    // no temporary file is left behind, and the file is the newer state
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let loaded = RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
    assert_eq!(loaded.raw_iterations(), 2);
    // a save that cannot complete (target is a directory) leaves the old file alone
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    assert!(matches!(
        opt.save_checkpoint(&blocked),
        Err(Error::Io { .. })
    ));
    assert!(blocked.join("x").is_dir());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

/// A checkpoint records the gradient dtype: loading gives an optimizer that takes bf16
/// gradients and resumes bit-identically; restoring into an f32 optimizer is a typed
/// error that changes nothing.
#[test]
fn the_gradient_dtype_is_recorded_and_checked() {
    use fused_rmsprop::half::bf16;
    use fused_rmsprop::{Dtype, Precision};
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-ckpt-dtype-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bf16.safetensors");
    let precision = Precision::default().with_gradients(Dtype::Bf16);
    let build16 = || {
        RmsProp::with_precision(
            config(),
            model(),
            Backend::Cpu,
            &GpuOptions::default(),
            precision,
        )
        .unwrap()
    };
    let run16 = |opt: &mut RmsProp, steps: std::ops::Range<usize>| {
        for s in steps {
            let g: Vec<Option<Vec<bf16>>> = grads(s)
                .into_iter()
                .map(|g| g.map(|g| g.into_iter().map(bf16::from_f32).collect()))
                .collect();
            let refs: Vec<Option<&[bf16]>> = g.iter().map(|g| g.as_deref()).collect();
            opt.apply_typed_gradients(&refs).unwrap();
        }
    };
    let mut straight = build16();
    run16(&mut straight, 0..6);
    let mut first = build16();
    run16(&mut first, 0..3);
    first.save_checkpoint(&path).unwrap();
    let mut loaded = RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
    assert_eq!(loaded.precision().gradients, Dtype::Bf16);
    run16(&mut loaded, 3..6);
    assert_eq!(bits(&state(&loaded)), bits(&state(&straight)));

    let mut f32_opt = build(Backend::Cpu, &GpuOptions::default());
    run(&mut f32_opt, 0..2);
    let before = bits(&state(&f32_opt));
    match f32_opt.restore_checkpoint(&path) {
        Err(Error::PrecisionMismatch {
            checkpoint: Dtype::Bf16,
            optimizer: Dtype::F32,
            ..
        }) => {}
        other => panic!("restoring bf16 gradients into an f32 optimizer gave {other:?}"),
    }
    assert_eq!(bits(&state(&f32_opt)), before);
    assert_eq!(f32_opt.raw_iterations(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The parameter copy's dtype is recorded: a loaded optimizer keeps the copy (rebuilt
/// from the restored parameters), and restoring into an optimizer without one is a
/// typed error that changes nothing.
#[test]
fn the_param_copy_is_recorded_and_checked() {
    use fused_rmsprop::half::f16;
    use fused_rmsprop::{Dtype, Precision};
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-ckpt-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("copy.safetensors");
    let precision = Precision::default().with_param_copy(Dtype::F16);
    let mut opt = RmsProp::with_precision(
        config(),
        model(),
        Backend::Cpu,
        &GpuOptions::default(),
        precision,
    )
    .unwrap();
    run(&mut opt, 0..3);
    opt.save_checkpoint(&path).unwrap();
    let loaded = RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
    assert_eq!(loaded.precision().param_copy, Some(Dtype::F16));
    let want: Vec<Vec<f32>> = loaded
        .variables()
        .unwrap()
        .iter()
        .map(|v| v.iter().map(|&x| f16::from_f32(x).to_f32()).collect())
        .collect();
    assert_eq!(loaded.variable_copies().unwrap(), want);
    let mut plain = build(Backend::Cpu, &GpuOptions::default());
    let before = bits(&state(&plain));
    match plain.restore_checkpoint(&path) {
        Err(Error::PrecisionMismatch {
            checkpoint: Dtype::F16,
            optimizer: Dtype::F32,
            ..
        }) => {}
        other => panic!("restoring a copy into an optimizer without one gave {other:?}"),
    }
    assert_eq!(bits(&state(&plain)), before);
    std::fs::remove_dir_all(&dir).unwrap();
}
