//! The async readbacks a browser needs (`variables_async`, `slot_async`,
//! `variable_copies_async`, `synchronize_async`, checkpoint bytes), run natively: they
//! must give exactly what the blocking calls give, on the CPU path and on the GPU path
//! (one arena segment or several), and with device-decided steps in flight.
mod common;

use common::Rng;
use fused_rmsprop::{
    Backend, Dtype, GpuContext, GpuOptions, Precision, RmsProp, RmsPropConfig, Slot, StateDtype,
    StateStorage, Variable,
};
use pollster::block_on;

fn variables(rng: &mut Rng) -> Vec<Variable> {
    [&[64, 33][..], &[7], &[1000], &[3, 5, 9]]
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n = shape.iter().product();
            Variable::new(format!("v{i}"), shape, rng.vec(n)).unwrap()
        })
        .collect()
}

fn config() -> RmsPropConfig {
    let mut c = RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.9);
    c.centered = true;
    c
}

/// Steps `opt` `steps` times with gradients from `rng`.
fn train(opt: &mut RmsProp, rng: &mut Rng, steps: usize) {
    let sizes: Vec<usize> = opt.specs().iter().map(|s| s.len()).collect();
    for _ in 0..steps {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        opt.apply_gradients(&refs).unwrap();
    }
}

/// Every async readback equals its blocking twin.
fn async_reads_match(opt: &RmsProp) {
    let vars = opt.variables().unwrap();
    assert_eq!(block_on(opt.variables_async()).unwrap(), vars);
    for (i, v) in vars.iter().enumerate() {
        assert_eq!(&block_on(opt.variable_async(i)).unwrap(), v);
    }
    for slot in Slot::ALL {
        assert_eq!(
            block_on(opt.slot_async(slot)).unwrap(),
            opt.slot(slot).unwrap()
        );
    }
    assert!(matches!(
        block_on(opt.variable_async(vars.len())),
        Err(fused_rmsprop::Error::NoSuchVariable(_))
    ));
}

fn backends() -> Vec<(&'static str, Backend, GpuOptions)> {
    let mut out = vec![("cpu", Backend::Cpu, GpuOptions::default())];
    if let Some(ctx) = common::gpu() {
        out.push(("gpu", Backend::Gpu, common::on(&ctx)));
        // segments of at most 1,024 elements: every readback gathers pieces
        out.push((
            "gpu, split arena",
            Backend::Gpu,
            GpuOptions {
                max_segment_len: Some(1024),
                ..common::on(&ctx)
            },
        ));
    }
    out
}

#[test]
fn async_readbacks_equal_the_blocking_ones() {
    for (name, backend, gpu) in backends() {
        for state in [StateDtype::F32, StateDtype::DYNAMIC8] {
            let mut rng = Rng(11);
            let config = config().with_state(StateStorage::new(state).with_min_size(64));
            let mut opt = RmsProp::with_options(config, variables(&mut rng), backend, &gpu)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            train(&mut opt, &mut rng, 5);
            async_reads_match(&opt);
        }
    }
}

#[test]
fn async_parameter_copy_equals_the_blocking_one() {
    for (name, backend, gpu) in backends() {
        let mut rng = Rng(5);
        let precision = Precision::default().with_param_copy(Dtype::Bf16);
        let mut opt =
            RmsProp::with_precision(config(), variables(&mut rng), backend, &gpu, precision)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        train(&mut opt, &mut rng, 3);
        let copies = block_on(opt.variable_copies_async()).unwrap();
        assert_eq!(copies, opt.variable_copies().unwrap(), "{name}");
        assert_ne!(
            copies,
            opt.variables().unwrap(),
            "{name}: the copy is rounded"
        );
    }
}

#[test]
fn synchronize_async_settles_device_decided_steps() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(3);
    let mut opt = RmsProp::with_options(
        config(),
        variables(&mut rng),
        Backend::Gpu,
        &common::on(&ctx),
    )
    .unwrap();
    opt.set_non_finite_guard(true).unwrap();
    let sizes: Vec<usize> = opt.specs().iter().map(|s| s.len()).collect();
    // more steps than the plan window, every third one non-finite
    for step in 0..70 {
        let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
        if step % 3 == 0 {
            grads[1][2] = f32::NAN;
        }
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        opt.apply_gradients(&refs).unwrap();
    }
    block_on(opt.synchronize_async()).unwrap();
    let skipped = opt.skipped_steps();
    assert_eq!(skipped.in_flight, 0, "{skipped:?}");
    assert_eq!(skipped.skipped, 24);
    assert_eq!(opt.iterations(), 46);
}

#[test]
fn checkpoint_bytes_round_trip() {
    for (name, backend, gpu) in backends() {
        let mut rng = Rng(21);
        let config = config().with_state(StateStorage::new(StateDtype::Bf16).with_min_size(64));
        let mut opt = RmsProp::with_options(config.clone(), variables(&mut rng), backend, &gpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        train(&mut opt, &mut rng, 4);
        let bytes = block_on(opt.checkpoint_bytes_async()).unwrap();

        let mut other =
            RmsProp::with_options(config, variables(&mut Rng(99)), backend, &gpu).unwrap();
        let before = other.variables().unwrap();
        // a truncated checkpoint is refused and changes nothing
        let err = other
            .restore_checkpoint_bytes(&bytes[..bytes.len() / 2])
            .unwrap_err();
        assert!(
            matches!(err, fused_rmsprop::Error::Checkpoint { .. }),
            "{name}: {err}"
        );
        assert_eq!(other.variables().unwrap(), before, "{name}");

        other.restore_checkpoint_bytes(&bytes).unwrap();
        assert_eq!(other.iterations(), 4, "{name}");
        assert_eq!(
            other.variables().unwrap(),
            opt.variables().unwrap(),
            "{name}"
        );
        for slot in Slot::ALL {
            assert_eq!(other.slot(slot).unwrap(), opt.slot(slot).unwrap(), "{name}");
        }
        // the same state stepped on: the same again
        let mut a = Rng(8);
        let mut b = Rng(8);
        train(&mut opt, &mut a, 2);
        train(&mut other, &mut b, 2);
        assert_eq!(
            other.variables().unwrap(),
            opt.variables().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn new_async_finds_the_same_adapter() {
    let Some(ctx) = common::gpu() else { return };
    let other = block_on(GpuContext::new_async(true)).unwrap();
    assert_eq!(other.adapter_name(), ctx.adapter_name());
}

/// The futures can move between threads (a native async runtime's worker pool): this
/// test is checked by the compiler, and then awaits them.
#[test]
fn async_readbacks_are_send() {
    fn send<F: std::future::Future + Send>(f: F) -> F {
        f
    }
    let mut rng = Rng(2);
    let opt = RmsProp::with_options(
        config(),
        variables(&mut rng),
        Backend::Cpu,
        &GpuOptions::default(),
    )
    .unwrap();
    let vars = block_on(send(opt.variables_async())).unwrap();
    assert_eq!(block_on(send(opt.variable_async(0))).unwrap(), vars[0]);
    assert!(block_on(send(opt.slot_async(Slot::Velocity)))
        .unwrap()
        .is_some());
    block_on(send(opt.synchronize_async())).unwrap();
    assert!(!block_on(send(opt.checkpoint_bytes_async()))
        .unwrap()
        .is_empty());
}
