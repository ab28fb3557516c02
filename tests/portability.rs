//! The optimizer on devices made the way other programs make them: with WebGPU's
//! default limits (`wgpu::Limits::default()`, what a browser gives) and with the
//! GLES-class `wgpu::Limits::downlevel_defaults()` (4 storage buffers per stage), on
//! whichever backend `WGPU_BACKEND` picks (CI runs this file on Vulkan and on GL). A
//! device below what the kernels need is refused with the limit named.

mod common;

use common::trace::first_mismatch;
use common::Rng;
use fused_rmsprop::{
    Backend, BackendKind, Error, GpuContext, GpuOptions, Precision, RmsProp, RmsPropConfig,
    StateStorage, Variable,
};

/// A device made by this test with `limits` (as a wgpu application makes its own), or
/// `None` without an adapter (failing under CI).
fn device_with(limits: wgpu::Limits) -> Option<(wgpu::Device, wgpu::Queue, String)> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = match pollster::block_on(instance.request_adapter(&Default::default())) {
        Ok(a) => a,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but no GPU adapter is available: {e}");
            }
            eprintln!("\n!!!!!! GPU TEST SKIPPED: no GPU adapter ({e}) !!!!!!\n");
            return None;
        }
    };
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("test device"),
        required_limits: limits,
        ..Default::default()
    }))
    .expect("the adapter gives a device with these limits");
    Some((device, queue, format!("{} ({:?})", info.name, info.backend)))
}

/// Variables `t0`, `t1`, ... holding `start`.
fn model(start: &[Vec<f32>]) -> Vec<Variable> {
    start
        .iter()
        .enumerate()
        .map(|(i, v)| Variable::new(format!("t{i}"), &[v.len()], v.clone()).unwrap())
        .collect()
}

/// `x` (device) within `1e-5 + relative * |y|` of `y` (CPU).
fn close(x: f32, y: f32, relative: f64) -> bool {
    (x - y).abs() as f64 <= 1e-5 + relative * f64::from(y.abs())
}

fn context_with(limits: wgpu::Limits) -> Option<(GpuContext, String)> {
    let (device, queue, name) = device_with(limits)?;
    eprintln!("portability tests run on: {name}");
    Some((GpuContext::from_device(device, queue).unwrap(), name))
}

/// Every f32 Keras trace (and loss-scale trace) matches on a device with the downlevel
/// limits: four storage buffers per stage, 16 KiB uniforms.
#[test]
fn every_keras_trace_matches_under_downlevel_limits() {
    let Some((ctx, name)) = context_with(wgpu::Limits::downlevel_defaults()) else {
        return;
    };
    assert_eq!(ctx.device.limits().max_storage_buffers_per_shader_stage, 4);
    let options = GpuOptions {
        context: Some(ctx),
        ..GpuOptions::default()
    };
    let mut failures = Vec::new();
    let traces = common::traces();
    let loss_scale = common::loss_scale_traces();
    for (file, trace) in traces.iter().chain(&loss_scale) {
        let expected = trace.expected.as_ref().unwrap();
        let (backend, got) = trace.replay(Backend::Gpu, &options).unwrap();
        assert_eq!(backend, BackendKind::Gpu);
        if let Some(m) = first_mismatch(&got, expected) {
            failures.push(format!("{file}: {m}"));
        }
    }
    assert!(
        failures.is_empty(),
        "mismatches on {name} under downlevel limits:\n{}",
        failures.join("\n")
    );
}

/// Every mode of the 128 structural combinations, with mixed precision and compact
/// state, on a device with WebGPU's default limits, agrees with the CPU path.
#[test]
fn every_mode_runs_under_webgpu_default_limits() {
    let Some((ctx, name)) = context_with(wgpu::Limits::default()) else {
        return;
    };
    use fused_rmsprop::{Dtype, StateDtype};
    let modes: Vec<(String, Precision, StateStorage)> = vec![
        ("f32".into(), Precision::default(), StateStorage::default()),
        (
            "bf16 gradients, f16 copy".into(),
            Precision::default()
                .with_gradients(Dtype::Bf16)
                .with_param_copy(Dtype::F16),
            StateStorage::default(),
        ),
        (
            "bf16 params with remainders".into(),
            Precision::default().with_param_remainders(),
            StateStorage::default(),
        ),
        (
            "f16 params, stochastic".into(),
            Precision::default()
                .with_params(Dtype::F16)
                .with_stochastic_rounding(7),
            StateStorage::default(),
        ),
        (
            "int8 state".into(),
            Precision::default(),
            StateStorage::new(StateDtype::DYNAMIC8).with_min_size(64),
        ),
        (
            "bf16 state".into(),
            Precision::default().with_gradients(Dtype::F16),
            StateStorage::new(StateDtype::Bf16).with_min_size(64),
        ),
    ];
    let sizes = [3usize, 700, 129, 4100];
    let mut rng = Rng(11);
    let start: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
    let vars = || model(&start);
    let options = GpuOptions {
        context: Some(ctx),
        ..GpuOptions::default()
    };
    let mut failures = Vec::new();
    for k in (0..128).step_by(9) {
        for (mode, precision, state) in &modes {
            let config = RmsPropConfig {
                state: *state,
                ..common::combo(k)
            };
            let build = |backend, options: &GpuOptions| {
                RmsProp::with_precision(config.clone(), vars(), backend, options, *precision)
                    .unwrap_or_else(|e| panic!("combo {k} {mode}: {e}"))
            };
            let mut gpu = build(Backend::Gpu, &options);
            let mut cpu = build(Backend::Cpu, &GpuOptions::default());
            for step in 0..3 {
                let g: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
                let present: Vec<Option<&[f32]>> = g
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (i + step != 2).then_some(g.as_slice()))
                    .collect();
                let typed = |opt: &mut RmsProp| -> fused_rmsprop::Result<()> {
                    use fused_rmsprop::half::{bf16, f16};
                    match precision.gradients {
                        Dtype::F32 => opt.apply_gradients(&present),
                        Dtype::Bf16 => {
                            let h: Vec<Option<Vec<bf16>>> = present
                                .iter()
                                .map(|g| g.map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect()))
                                .collect();
                            let refs: Vec<Option<&[bf16]>> =
                                h.iter().map(|g| g.as_deref()).collect();
                            opt.apply_typed_gradients(&refs)
                        }
                        Dtype::F16 => {
                            let h: Vec<Option<Vec<f16>>> = present
                                .iter()
                                .map(|g| g.map(|g| g.iter().map(|&x| f16::from_f32(x)).collect()))
                                .collect();
                            let refs: Vec<Option<&[f16]>> =
                                h.iter().map(|g| g.as_deref()).collect();
                            opt.apply_typed_gradients(&refs)
                        }
                    }
                };
                typed(&mut gpu).unwrap();
                typed(&mut cpu).unwrap();
            }
            let (a, b) = (gpu.variables().unwrap(), cpu.variables().unwrap());
            let agree = a
                .iter()
                .flatten()
                .zip(b.iter().flatten())
                .all(|(&x, &y)| (x.is_nan() && y.is_nan()) || close(x, y, 2e-3));
            if !agree {
                failures.push(format!("combo {k}, {mode}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "GPU and CPU differ on {name} under WebGPU's default limits:\n{}",
        failures.join("\n")
    );
}

/// A client written the way a wgpu application is: its own device with WebGPU's
/// default limits, its own shader binding the optimizer's parameter and gradient views
/// (a backward pass of the loss sum((w - target)^2)), the optimizer's step recorded
/// into its own encoder after it, one submission per step. It matches the CPU path fed
/// the same gradients.
#[test]
fn a_wgpu_application_steps_in_its_own_encoder_under_default_limits() {
    let Some((device, queue, name)) = device_with(wgpu::Limits::default()) else {
        return;
    };
    let ctx = GpuContext::from_device(device.clone(), queue.clone()).unwrap();
    let n = 1000;
    let start: Vec<f32> = Rng(5).vec(n);
    let target: Vec<f32> = Rng(6).vec(n);
    let vars = || vec![Variable::new("w", &[n], start.clone()).unwrap()];
    let config = RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.5)
        .with_centered(true);
    let options = GpuOptions {
        context: Some(ctx),
        ..GpuOptions::default()
    };
    let mut opt = RmsProp::with_options(config.clone(), vars(), Backend::Gpu, &options).unwrap();
    let mut cpu = RmsProp::with_backend(config, vars(), Backend::Cpu).unwrap();
    let targets = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("targets"),
        size: 4 * n as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&targets, 0, bytemuck::cast_slice(&target));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("client backward"),
        source: wgpu::ShaderSource::Wgsl(
            "@group(0) @binding(0) var<storage, read> w: array<f32>;
             @group(0) @binding(1) var<storage, read> t: array<f32>;
             @group(0) @binding(2) var<storage, read_write> g: array<f32>;
             @compute @workgroup_size(64)
             fn backward(@builtin(global_invocation_id) id: vec3<u32>) {
                 if id.x < arrayLength(&g) { g[id.x] = 2.0 * (w[id.x] - t[id.x]); }
             }"
            .into(),
        ),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("backward"),
        layout: None,
        module: &module,
        entry_point: Some("backward"),
        compilation_options: Default::default(),
        cache: None,
    });
    for _ in 0..5 {
        let engine = opt.gpu().unwrap();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("backward"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: engine.param_view(0).unwrap().binding().unwrap(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: targets.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: engine.gradient_view(0).unwrap().binding().unwrap(),
                },
            ],
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(n.div_ceil(64) as u32, 1, 1);
        }
        opt.record_device_step(&[true], &mut encoder).unwrap();
        queue.submit([encoder.finish()]);
        // the CPU path, fed the gradient of its own parameters
        let w = cpu.variable(0).unwrap();
        let g: Vec<f32> = w.iter().zip(&target).map(|(w, t)| 2.0 * (w - t)).collect();
        cpu.apply_gradients(&[Some(&g)]).unwrap();
    }
    let (a, b) = (opt.variable(0).unwrap(), cpu.variable(0).unwrap());
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        assert!(
            close(x, y, 1e-4),
            "{name}: element {i}: device {x}, CPU {y}"
        );
    }
    assert_ne!(a, start, "the steps moved the parameters");
}

/// A device below what the kernels need is refused when it is wrapped, naming the
/// limit, the device's value and what is needed.
#[test]
fn a_device_below_the_kernels_needs_is_refused_with_the_limit_named() {
    let Some((device, queue, _)) = device_with(wgpu::Limits {
        max_storage_buffers_per_shader_stage: 3,
        ..wgpu::Limits::downlevel_defaults()
    }) else {
        return;
    };
    let e = GpuContext::from_device(device, queue).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DeviceLimit {
                limit: "max_storage_buffers_per_shader_stage",
                device: 3,
                needed: 4
            }
        ),
        "{e}"
    );
    assert!(e
        .to_string()
        .contains("max_storage_buffers_per_shader_stage"));
}

/// A device whose storage bindings hold 1 MiB: the arena splits the model into
/// segments that fit it (every region of the `state` buffer included), and the steps
/// match the CPU path.
#[test]
fn a_small_storage_binding_splits_the_model_into_segments_that_fit() {
    let Some((ctx, name)) = context_with(wgpu::Limits {
        max_storage_buffer_binding_size: 1 << 20,
        ..wgpu::Limits::default()
    }) else {
        return;
    };
    let sizes = [300_000usize, 5, 200_001];
    let mut rng = Rng(21);
    let start: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
    let vars = || model(&start);
    let config = common::combo(1 + 2 + 16 + 32);
    let precision = Precision::default().with_param_copy(fused_rmsprop::Dtype::Bf16);
    let options = GpuOptions {
        context: Some(ctx),
        ..GpuOptions::default()
    };
    let mut gpu =
        RmsProp::with_precision(config.clone(), vars(), Backend::Gpu, &options, precision).unwrap();
    let segments = gpu.gpu().unwrap().segment_count();
    assert!(segments >= 6, "{segments} segments on {name}");
    let mut cpu = RmsProp::with_precision(
        config,
        vars(),
        Backend::Cpu,
        &GpuOptions::default(),
        precision,
    )
    .unwrap();
    for _ in 0..3 {
        let g: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(g.as_slice())).collect();
        gpu.apply_gradients(&refs).unwrap();
        cpu.apply_gradients(&refs).unwrap();
    }
    let (a, b) = (gpu.variables().unwrap(), cpu.variables().unwrap());
    for (&x, &y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(close(x, y, 1e-4), "{name}: {x} vs {y}");
    }
}
