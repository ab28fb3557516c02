//! Public API behaviour on every backend: bad input is refused with a typed error and
//! leaves variables, slots and counters as they were; device-resident gradients and
//! user buffers work; ndarray helpers; backend selection.

mod common;

use fused_rmsprop::gpu::{UserBuffers, ARENA_USAGES};
use fused_rmsprop::{
    Backend, BackendKind, Dtype, Error, GpuOptions, LossScaleConfig, LossScaleOptimizer, Optimizer,
    RmsProp, RmsPropConfig, Slot, Variable, VariableSpec,
};

fn model() -> Vec<Variable> {
    vec![
        Variable::new("w", &[2, 3], vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0]).unwrap(),
        Variable::new("b", &[3], vec![0.5, 0.25, -0.5]).unwrap(),
    ]
}

fn config() -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(0.1)
        .with_momentum(0.5)
        .with_centered(true)
        .with_use_ema(true)
}

/// Variables, each slot (if kept), and the raw step counter.
type Snapshot = (Vec<Vec<f32>>, Vec<Option<Vec<Vec<f32>>>>, u64);

/// Everything observable about an optimizer's state.
fn snapshot(opt: &RmsProp) -> Snapshot {
    let slots = [
        Slot::Velocity,
        Slot::Momentum,
        Slot::AverageGradient,
        Slot::Ema,
    ]
    .into_iter()
    .map(|s| opt.slot(s).unwrap())
    .collect();
    (opt.variables().unwrap(), slots, opt.raw_iterations())
}

fn refused_steps_leave_state_alone(mut opt: RmsProp) {
    let g = vec![0.3f32; 6];
    opt.apply_gradients(&[Some(&g), Some(&[1.0, 2.0, 3.0])])
        .unwrap();
    let before = snapshot(&opt);
    let e = opt
        .apply_gradients(&[Some(&g[..5]), Some(&[1.0, 2.0, 3.0])])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::GradientLength {
                ref name,
                expected: 6,
                found: 5
            } if name == "w"
        ),
        "{e:?}"
    );
    let e = opt.apply_gradients(&[Some(&g)]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::CountMismatch {
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let e = opt.apply_gradients(&[Some(&g), None, None]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::CountMismatch {
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(matches!(
        opt.apply_gradients(&[None, None]).unwrap_err(),
        Error::NoGradients
    ));
    assert!(matches!(
        opt.set_variable(1, &[1.0]),
        Err(Error::ValueLength { .. })
    ));
    assert!(matches!(
        opt.set_variable(7, &[1.0]).unwrap_err(),
        Error::NoSuchVariable(7)
    ));
    assert_eq!(snapshot(&opt), before, "a refused step changed the state");
    // and the optimizer still works afterwards
    opt.apply_gradients(&[None, Some(&[1.0, 2.0, 3.0])])
        .unwrap();
    assert_eq!(opt.raw_iterations(), 2);
    assert_eq!(
        opt.variables().unwrap()[0],
        before.0[0],
        "w had no gradient"
    );
    assert_ne!(opt.variables().unwrap()[1], before.0[1]);
}

#[test]
fn refused_steps_leave_state_alone_on_cpu() {
    refused_steps_leave_state_alone(
        RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap(),
    );
}

#[test]
fn refused_steps_leave_state_alone_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    let opt = RmsProp::with_options(config(), model(), Backend::Gpu, &common::on(&ctx)).unwrap();
    assert_eq!(opt.backend(), BackendKind::Gpu);
    refused_steps_leave_state_alone(opt);
}

#[test]
fn invalid_config_and_values_are_refused_at_build() {
    let bad = RmsPropConfig::default()
        .with_clipnorm(1.0)
        .with_global_clipnorm(1.0);
    assert!(matches!(
        RmsProp::with_backend(bad, model(), Backend::Cpu),
        Err(Error::ConflictingClipping(_))
    ));
    let short = Variable {
        spec: VariableSpec::new("x", &[4]),
        values: vec![1.0],
    };
    assert!(matches!(
        RmsProp::with_backend(RmsPropConfig::default(), vec![short], Backend::Cpu),
        Err(Error::ValueLength {
            expected: 4,
            found: 1,
            ..
        })
    ));
}

#[test]
fn jit_compile_false_selects_cpu() {
    let c = RmsPropConfig::default().with_jit_compile(false);
    let opt = RmsProp::new(c, model()).unwrap();
    assert_eq!(opt.backend(), BackendKind::Cpu);
}

#[test]
fn auto_refuses_software_adapters_unless_allowed() {
    let Some(ctx) = common::gpu() else { return };
    if !ctx.is_software() {
        eprintln!("hardware adapter: Auto uses it, nothing to refuse");
        return;
    }
    let no = GpuOptions {
        allow_software: Some(false),
        ..GpuOptions::default()
    };
    let opt = RmsProp::with_options(config(), model(), Backend::Auto, &no).unwrap();
    assert_eq!(opt.backend(), BackendKind::Cpu);
    let yes = GpuOptions {
        allow_software: Some(true),
        ..GpuOptions::default()
    };
    let opt = RmsProp::with_options(config(), model(), Backend::Auto, &yes).unwrap();
    assert_eq!(opt.backend(), BackendKind::Gpu);
}

#[test]
fn ndarray_gradients_and_variables() {
    let mut opt = RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap();
    let g = ndarray::ArrayD::<f32>::from_elem(vec![2, 3], 0.5);
    // a non-contiguous view works too
    let gt = ndarray::Array2::<f32>::from_elem((3, 2), 0.5);
    opt.apply_gradients_arrays(&[Some(g.view()), None]).unwrap();
    opt.apply_gradients_arrays(&[Some(gt.t().into_dyn()), None])
        .unwrap();
    let w = opt.variable_array(0).unwrap();
    assert_eq!(w.shape(), &[2, 3]);
    assert!(w[[0, 0]] < 1.0);
}

#[test]
fn device_gradients_in_user_buffers_match_host_steps() {
    let Some(ctx) = common::gpu() else { return };
    let specs: Vec<VariableSpec> = model().iter().map(|v| v.spec.clone()).collect();
    // the arena sits past some data of the user's own, at an aligned offset
    let offset = 2 * u64::from(ctx.device.limits().min_storage_buffer_offset_alignment);
    let size = UserBuffers::required_size(&ctx, &specs, Dtype::F32).unwrap();
    let ranges = UserBuffers::tensor_byte_ranges(&ctx, &specs, Dtype::F32).unwrap();
    assert_eq!(ranges[0], 0..24);
    // offsets are aligned for 16-bit gradient buffers too: twice the alignment in f32
    let min_align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment);
    let align = (2 * min_align).max(32);
    let ranges_16 = UserBuffers::tensor_byte_ranges(&ctx, &specs, Dtype::Bf16).unwrap();
    assert_eq!(ranges_16[1], align / 2..align / 2 + 6);
    assert!(ranges_16[1].start.is_multiple_of(min_align));
    assert_eq!(
        ranges[1],
        align..align + 12,
        "the bias starts on the next aligned offset"
    );
    assert!(size >= ranges[1].end && size.is_multiple_of(16));
    let make = |label| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: offset + size,
            usage: ARENA_USAGES,
            mapped_at_creation: false,
        })
    };
    let buffers = UserBuffers {
        params: make("user params"),
        grads: make("user grads"),
        offset,
    };
    for (v, r) in model().iter().zip(&ranges) {
        ctx.queue.write_buffer(
            &buffers.params,
            offset + r.start,
            bytemuck::cast_slice(&v.values),
        );
    }
    let gpu = GpuOptions {
        buffers: Some(buffers.clone()),
        ..common::on(&ctx)
    };
    let mut dev = RmsProp::with_specs(config(), specs, Backend::Gpu, &gpu).unwrap();
    let mut host = RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap();
    let mut rng = common::Rng(5);
    for step in 0..4 {
        let (gw, gb) = (rng.vec(6), rng.vec(3));
        // "your kernel" writes the gradients into your buffer
        for (g, r) in [&gw, &gb].into_iter().zip(&ranges) {
            ctx.queue
                .write_buffer(&buffers.grads, offset + r.start, bytemuck::cast_slice(g));
        }
        let present = [true, step != 2];
        dev.apply_device_gradients(&present).unwrap();
        host.apply_gradients(&[Some(&gw), present[1].then_some(&gb[..])])
            .unwrap();
    }
    let a = dev.variables().unwrap();
    let b = host.variables().unwrap();
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(common::trace::values_match(*x, *y), "{x} vs {y}");
    }
    // the parameters live in the user's buffer, where the views say
    let gpu = dev.gpu().unwrap();
    assert_eq!(gpu.param_buffers()[0], &buffers.params);
    let view = gpu.param_view(1).unwrap();
    assert_eq!((view.offset, view.size), (offset + ranges[1].start, 12));
    assert!(matches!(
        dev.apply_device_gradients(&[false, false]).unwrap_err(),
        Error::NoGradients
    ));
}

#[test]
fn user_buffers_too_small_misaligned_or_wrong_usage_are_refused() {
    let Some(ctx) = common::gpu() else { return };
    let specs = vec![VariableSpec::new("w", &[100])];
    let buf = |size, usage| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment);
    let cases = [
        (40, ARENA_USAGES, 0, "40 bytes, the model needs"),
        (400, wgpu::BufferUsages::STORAGE, 0, "needs usages"),
        (
            4096,
            ARENA_USAGES,
            2,
            "not a multiple of min_storage_buffer_offset_alignment",
        ),
        (400 + align, ARENA_USAGES, align, "the model needs"),
    ];
    for (size, usage, offset, why) in cases {
        let gpu = GpuOptions {
            buffers: Some(UserBuffers {
                params: buf(size, usage),
                grads: buf(4096, ARENA_USAGES),
                offset,
            }),
            ..common::on(&ctx)
        };
        let e = RmsProp::with_specs(RmsPropConfig::default(), specs.clone(), Backend::Gpu, &gpu)
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidBuffer { ref name, ref reason } if name == "params" && reason.contains(why)),
            "{e:?}"
        );
    }
}

#[test]
fn missing_gradient_keeps_slots_but_ema_moves() {
    let c = RmsPropConfig::default()
        .with_learning_rate(0.1)
        .with_use_ema(true)
        .with_ema_momentum(0.5);
    let mut opt = RmsProp::with_backend(c, model(), Backend::Cpu).unwrap();
    opt.apply_gradients(&[Some(&[1.0; 6]), Some(&[1.0; 3])])
        .unwrap();
    let vel = opt.slot(Slot::Velocity).unwrap().unwrap();
    let ema = opt.slot(Slot::Ema).unwrap().unwrap();
    opt.apply_gradients(&[Some(&[1.0; 6]), None]).unwrap();
    let vel2 = opt.slot(Slot::Velocity).unwrap().unwrap();
    let ema2 = opt.slot(Slot::Ema).unwrap().unwrap();
    assert_eq!(vel[1], vel2[1], "no gradient: velocity unchanged");
    assert_ne!(vel[0], vel2[0]);
    // Keras updates the EMA of every variable each step: b's EMA moves toward b
    let b = opt.variable(1).unwrap();
    for j in 0..3 {
        let expected = 0.5 * ema[1][j] + 0.5 * b[j];
        assert_eq!(ema2[1][j], expected);
    }
}

fn slots_round_trip(mut opt: RmsProp) {
    opt.set_slot(Slot::Velocity, 1, &[1.0, 2.0, 3.0]).unwrap();
    opt.set_slot(Slot::Momentum, 0, &[0.5; 6]).unwrap();
    assert_eq!(
        opt.slot(Slot::Velocity).unwrap().unwrap()[1],
        vec![1.0, 2.0, 3.0]
    );
    assert_eq!(opt.slot(Slot::Momentum).unwrap().unwrap()[0], vec![0.5; 6]);
    assert!(matches!(
        opt.set_slot(Slot::Accumulator, 0, &[0.0; 6]),
        Err(Error::SlotNotKept(Slot::Accumulator))
    ));
    assert!(matches!(
        opt.set_slot(Slot::Velocity, 0, &[0.0; 2]),
        Err(Error::ValueLength { .. })
    ));
}

#[test]
fn slots_can_be_written_and_read_on_cpu() {
    slots_round_trip(RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap());
}

#[test]
fn slots_can_be_written_and_read_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    slots_round_trip(
        RmsProp::with_options(config(), model(), Backend::Gpu, &common::on(&ctx)).unwrap(),
    );
}

#[test]
fn a_lost_device_gives_errors_not_panics() {
    // Our own device, so destroying it cannot disturb other tests.
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    for guard in [false, true] {
        let Some(own) = fused_rmsprop::GpuContext::new(true).ok() else {
            return;
        };
        let gpu = GpuOptions {
            context: Some(own.clone()),
            ..GpuOptions::default()
        };
        let mut opt = RmsProp::with_options(config(), model(), Backend::Gpu, &gpu).unwrap();
        opt.set_non_finite_guard(guard).unwrap();
        opt.apply_gradients(&[Some(&[0.1; 6]), None]).unwrap();
        opt.apply_gradients(&[Some(&[0.1; 6]), None]).unwrap();
        opt.synchronize().unwrap();
        // with the guard, a counter readback is in flight when the device goes
        opt.apply_gradients(&[Some(&[0.1; 6]), None]).unwrap();
        own.device.destroy();
        // every later call returns an error (a step may be accepted before the loss is seen)
        let _ = opt.apply_gradients(&[Some(&[0.1; 6]), None]);
        assert!(
            matches!(opt.variables(), Err(Error::Gpu(_))),
            "guard {guard}"
        );
        assert!(
            matches!(
                opt.apply_gradients(&[Some(&[0.1; 6]), None]),
                Err(Error::Gpu(_))
            ),
            "guard {guard}"
        );
        assert!(opt.synchronize().is_err(), "guard {guard}");
        // counters stay readable without a panic: with the guard, the last ones read
        // back (2 after the synchronize); without, the host's count of accepted steps
        let raw = opt.raw_iterations();
        if guard {
            assert!((2..=3).contains(&raw), "guard: {raw}");
        } else {
            assert!((3..=4).contains(&raw), "{raw}");
        }
        assert_eq!(opt.skipped_steps().skipped, 0);
    }
}

/// Training code may move the optimizer to another thread or share it behind a lock.
#[test]
fn the_optimizer_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RmsProp>();
    send_sync::<fused_rmsprop::Error>();
}

#[test]
fn a_model_of_only_empty_tensors_steps_on_both_backends() {
    let vars = || {
        vec![
            Variable::new("e", &[0, 4], vec![]).unwrap(),
            Variable::new("f", &[0], vec![]).unwrap(),
        ]
    };
    let c = config()
        .with_global_clipnorm(1.0)
        .with_gradient_accumulation_steps(2);
    let mut cpu = RmsProp::with_backend(c.clone(), vars(), Backend::Cpu).unwrap();
    cpu.apply_gradients(&[Some(&[]), None]).unwrap();
    assert_eq!(cpu.variables().unwrap(), vec![Vec::<f32>::new(), vec![]]);
    let Some(ctx) = common::gpu() else { return };
    let mut gpu = RmsProp::with_options(c, vars(), Backend::Gpu, &common::on(&ctx)).unwrap();
    gpu.apply_gradients(&[Some(&[]), None]).unwrap();
    assert_eq!(gpu.variables().unwrap(), vec![Vec::<f32>::new(), vec![]]);
    assert_eq!(gpu.raw_iterations(), 1);
}

/// Device-resident gradients need the GPU backend: the CPU path refuses them by name
/// and changes nothing.
#[test]
fn device_gradients_on_the_cpu_backend_are_refused() {
    let mut opt = RmsProp::with_backend(config(), model(), Backend::Cpu).unwrap();
    opt.apply_gradients(&[Some(&[0.3; 6]), None]).unwrap();
    let before = snapshot(&opt);
    let e = opt.apply_device_gradients(&[true, true]).unwrap_err();
    assert!(
        matches!(e, Error::NeedsGpuBackend("apply_device_gradients")),
        "{e:?}"
    );
    assert_eq!(snapshot(&opt), before);
    assert!(opt.gpu().is_none());
}

/// The CPU level is a CPU setting: a GPU optimizer has none and refuses one by name.
#[test]
fn a_gpu_optimizer_has_no_cpu_level() {
    let Some(ctx) = common::gpu() else { return };
    let mut opt =
        RmsProp::with_options(config(), model(), Backend::Gpu, &common::on(&ctx)).unwrap();
    assert_eq!(opt.cpu_level(), None);
    assert!(matches!(
        opt.set_cpu_level(fused_rmsprop::CpuLevel::Baseline),
        Err(Error::NeedsCpuBackend("set_cpu_level"))
    ));
}

/// Steps `opt` through the shared surface only, and returns what it reads back.
fn through_the_surface(opt: &mut impl Optimizer, scale: f32) -> Snapshot {
    assert_eq!(opt.specs().len(), 2);
    opt.exclude_from_weight_decay(&["w"]);
    opt.exclude_from_weight_decay(&["b"]);
    assert_eq!(opt.excluded(), ["w", "b"], "exclusions add");
    for k in 0..4 {
        let g: Vec<Vec<f32>> = opt
            .variables()
            .unwrap()
            .iter()
            .map(|v| v.iter().map(|x| scale * (x + k as f32)).collect())
            .collect();
        opt.apply_gradients(&[Some(&g[0]), (k % 2 == 0).then_some(&g[1][..])])
            .unwrap();
    }
    opt.finalize_variable_values().unwrap();
    let vars = opt.variables().unwrap();
    assert_eq!(opt.variable(1).unwrap(), vars[1]);
    assert!(matches!(opt.variable(2), Err(Error::NoSuchVariable(2))));
    let slots = Slot::ALL.iter().map(|&s| opt.slot(s).unwrap()).collect();
    (vars, slots, opt.iterations())
}

/// `RmsProp` and `LossScaleOptimizer` (a power-of-two scale divides exactly) give the
/// same outcome through the `Optimizer` trait (`ShardedRmsProp`'s is checked under MPI).
#[test]
fn every_optimizer_shares_one_surface() {
    let config = config().with_weight_decay(0.1);
    let mut plain = RmsProp::with_backend(config.clone(), model(), Backend::Cpu).unwrap();
    let a = through_the_surface(&mut plain, 1.0);
    let inner = RmsProp::with_backend(config, model(), Backend::Cpu).unwrap();
    let scaling = LossScaleConfig {
        initial_scale: 64.0,
        ..LossScaleConfig::default()
    };
    let mut scaled = LossScaleOptimizer::new(inner, scaling).unwrap();
    let b = through_the_surface(&mut scaled, 64.0);
    assert_eq!(a, b);
    assert_eq!(a.2, 4);
}
