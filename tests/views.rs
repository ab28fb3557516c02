//! The padded GPU arena and its tensor views: tensors of sizes 0, 1, 3, 4, 5, 63, 64
//! and 65 on one segment and on a split arena, stepped through the views (gradients
//! written where `gradient_view` says, steps recorded into our own encoder) and through
//! host uploads, against the CPU path; the padding of every buffer stays zero, NaN
//! gradients included.

mod common;

use common::trace::values_match;
use common::{combo, Rng};
use fused_rmsprop::gpu::{GpuOptions, TensorView};
use fused_rmsprop::{Backend, Error, GpuContext, RmsProp, RmsPropConfig, Slot, Variable};

const SIZES: [usize; 8] = [0, 1, 3, 4, 5, 63, 64, 65];

fn model(rng: &mut Rng) -> Vec<Variable> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| Variable::new(format!("t{i}/kernel"), &[n], rng.vec(n)).unwrap())
        .collect()
}

/// The whole of `buffer`, read back.
fn read_buffer(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(&common::read_bytes(ctx, buffer, 0, buffer.size()))
}

/// Every view of every tensor (parameters, gradients, each kept slot).
fn all_views(opt: &RmsProp) -> Vec<TensorView<'_>> {
    let gpu = opt.gpu().unwrap();
    let mut views = Vec::new();
    for i in 0..SIZES.len() {
        views.push(gpu.param_view(i).unwrap());
        views.push(gpu.gradient_view(i).unwrap());
        for slot in Slot::ALL {
            if let Ok(v) = gpu.slot_view(slot, i) {
                views.push(v);
            }
        }
    }
    views
}

/// Checks that views start aligned, never overlap, and that every word of every arena
/// buffer outside the views is 0.
fn check_padding(ctx: &GpuContext, opt: &RmsProp) -> Result<(), String> {
    let align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment).max(16);
    let views = all_views(opt);
    let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
    for v in &views {
        if v.offset % align != 0 {
            return Err(format!(
                "a view starts at {}, not a multiple of {align}",
                v.offset
            ));
        }
        if !buffers.contains(&v.buffer) {
            buffers.push(v.buffer);
        }
    }
    for buffer in buffers {
        let words = read_buffer(ctx, buffer);
        let mut covered = vec![false; words.len()];
        for v in views.iter().filter(|v| v.buffer == buffer) {
            for w in &mut covered[(v.offset / 4) as usize..((v.offset + v.size) / 4) as usize] {
                if *w {
                    return Err("two views overlap".into());
                }
                *w = true;
            }
        }
        if let Some(k) = (0..words.len()).find(|&k| !covered[k] && words[k] != 0) {
            return Err(format!(
                "padding word {k} of a {}-byte buffer is {:#x}, not 0",
                buffer.size(),
                words[k]
            ));
        }
    }
    Ok(())
}

/// Runs `steps` on both backends: the GPU takes its gradients through the views (written
/// with `write_buffer` where `gradient_view` says, the step recorded into our encoder)
/// on even steps and as host uploads on odd ones. One step holds a NaN.
fn compare(config: RmsPropConfig, gpu_options: &GpuOptions, seed: u64) -> Result<(), String> {
    let ctx = gpu_options.context.clone().unwrap();
    let mut rng = Rng(seed);
    let vars = model(&mut rng);
    let mut cpu = RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
    let mut gpu = RmsProp::with_options(config, vars.clone(), Backend::Gpu, gpu_options).unwrap();
    for step in 0..5 {
        let grads: Vec<Option<Vec<f32>>> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut g = rng.vec(v.values.len());
                if step == 3 && i == 6 {
                    g[63] = f32::NAN; // last element before the padding
                }
                (rng.below(5) != 0 || i == 7).then_some(g)
            })
            .collect();
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| g.as_deref()).collect();
        cpu.apply_gradients(&refs).unwrap();
        if step % 2 == 0 {
            let present: Vec<bool> = grads.iter().map(Option::is_some).collect();
            let engine = gpu.gpu().unwrap();
            for (i, g) in grads.iter().enumerate() {
                let view = engine.gradient_view(i).unwrap();
                if let Some(g) = g {
                    ctx.queue
                        .write_buffer(view.buffer, view.offset, bytemuck::cast_slice(g));
                }
            }
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            gpu.record_device_step(&present, &mut encoder).unwrap();
            ctx.queue.submit([encoder.finish()]);
        } else {
            gpu.apply_gradients(&refs).unwrap();
        }
    }
    if cpu.iterations() != gpu.iterations() {
        return Err("iterations differ".into());
    }
    for slot in [None].into_iter().chain(Slot::ALL.map(Some)) {
        let (a, b) = match slot {
            None => (cpu.variables().unwrap(), gpu.variables().unwrap()),
            Some(s) => match (cpu.slot(s).unwrap(), gpu.slot(s).unwrap()) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => return Err(format!("{s:?} kept on one backend only")),
            },
        };
        for (t, (x, y)) in a.iter().zip(&b).enumerate() {
            for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
                if !values_match(q, p) {
                    return Err(format!("{slot:?} of tensor {t} [{j}]: gpu {q} vs cpu {p}"));
                }
            }
        }
    }
    check_padding(&ctx, &gpu)
}

/// Combinations covering every stage: plain, centered + momentum, each clip kind, EMA
/// with overwrite, accumulation, weight decay with loss scale.
const COMBOS: [usize; 8] = [0, 3, 4, 8 + 16, 12 + 32, 2 + 8 + 64, 1 + 16 + 32 + 64, 127];

#[test]
fn padded_arena_matches_cpu_and_keeps_padding_zero() {
    let Some(ctx) = common::gpu() else { return };
    let one = common::on(&ctx);
    // segments of 128 elements: several segments, every tensor still in one
    let split = GpuOptions {
        max_segment_len: Some(128),
        ..common::on(&ctx)
    };
    let mut failures = Vec::new();
    for k in COMBOS {
        for (name, options) in [("one segment", &one), ("split arena", &split)] {
            if let Err(e) = compare(combo(k), options, 40 + k as u64) {
                failures.push(format!("combo {k}, {name}: {e}"));
            }
        }
    }
    let opt = RmsProp::with_options(combo(0), model(&mut Rng(1)), Backend::Gpu, &split).unwrap();
    assert!(opt.gpu().unwrap().segment_count() > 1);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_tensor_longer_than_a_segment_is_split_and_not_bindable() {
    let Some(ctx) = common::gpu() else { return };
    // segments are whole multiples of the binding alignment (in 16-bit elements): the
    // smallest is one of them
    let a = (ctx.device.limits().min_storage_buffer_offset_alignment as usize / 2).max(8);
    let tiny = GpuOptions {
        max_segment_len: Some(a),
        ..common::on(&ctx)
    };
    let sizes = [3, a + 1, a, 2 * a + 5, 7];
    let model = |rng: &mut Rng| -> Vec<Variable> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Variable::new(format!("t{i}/kernel"), &[n], rng.vec(n)).unwrap())
            .collect()
    };
    let opt = RmsProp::with_options(combo(0), model(&mut Rng(2)), Backend::Gpu, &tiny).unwrap();
    let gpu = opt.gpu().unwrap();
    let e = gpu.gradient_view(1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotBindable {
                index: 1,
                len,
                segments: 2
            } if len == a + 1
        ),
        "{e:?}"
    );
    assert!(gpu.param_view(2).is_ok(), "{a} elements fit one segment");
    // one update dispatch per segment; with a norm, partials per segment and a finalize
    let segments = gpu.segment_count();
    assert!(segments > 2);
    assert_eq!(gpu.dispatches_per_step(), segments);
    let clipped = RmsProp::with_options(combo(8), model(&mut Rng(2)), Backend::Gpu, &tiny).unwrap();
    assert_eq!(
        clipped.gpu().unwrap().dispatches_per_step(),
        2 * segments + 1
    );
    drop((opt, clipped));
    // stepping it is still exact (host gradients)
    let mut rng = Rng(3);
    let vars = model(&mut rng);
    let mut cpu = RmsProp::with_backend(combo(2 + 8), vars.clone(), Backend::Cpu).unwrap();
    let mut dev = RmsProp::with_options(combo(2 + 8), vars.clone(), Backend::Gpu, &tiny).unwrap();
    for _ in 0..3 {
        let g: Vec<Vec<f32>> = vars.iter().map(|v| rng.vec(v.values.len())).collect();
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(g.as_slice())).collect();
        cpu.apply_gradients(&refs).unwrap();
        dev.apply_gradients(&refs).unwrap();
    }
    let (a, b) = (cpu.variables().unwrap(), dev.variables().unwrap());
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(values_match(*y, *x), "gpu {y} vs cpu {x}");
    }
}

#[test]
fn views_and_recorded_steps_refuse_bad_requests() {
    let vars = || model(&mut Rng(4));
    let mut cpu = RmsProp::with_backend(combo(0), vars(), Backend::Cpu).unwrap();
    let Some(ctx) = common::gpu() else { return };
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    assert!(matches!(
        cpu.record_device_step(&[true; 8], &mut encoder),
        Err(Error::NeedsGpuBackend("record_device_step"))
    ));
    let mut opt = RmsProp::with_options(combo(0), vars(), Backend::Gpu, &common::on(&ctx)).unwrap();
    let gpu = opt.gpu().unwrap();
    assert!(matches!(
        gpu.gradient_view(8),
        Err(Error::NoSuchVariable(8))
    ));
    assert!(matches!(
        gpu.slot_view(Slot::Momentum, 0),
        Err(Error::SlotNotKept(Slot::Momentum))
    ));
    let empty = gpu.param_view(0).unwrap();
    assert_eq!(empty.size, 0);
    assert!(empty.binding().is_none(), "an empty tensor has no binding");
    // an empty tensor at the very end of the arena still has its (empty) view
    let mut trailing = vars();
    trailing.push(Variable::new("last/empty", &[0], vec![]).unwrap());
    let last = RmsProp::with_options(combo(0), trailing, Backend::Gpu, &common::on(&ctx)).unwrap();
    let view = last.gpu().unwrap().gradient_view(8).unwrap();
    assert_eq!(view.size, 0);
    assert!(view.offset <= view.buffer.size());
    assert!(matches!(
        opt.record_device_step(&[true; 7], &mut encoder),
        Err(Error::CountMismatch {
            expected: 8,
            found: 7,
            ..
        })
    ));
    opt.set_non_finite_guard(true).unwrap();
    assert!(matches!(
        opt.record_device_step(&[true; 8], &mut encoder),
        Err(Error::NotWithGuard("record_device_step"))
    ));
    // nothing was recorded: the encoder is empty and the optimizer untouched
    ctx.queue.submit([encoder.finish()]);
    assert_eq!(opt.iterations(), 0);
}
