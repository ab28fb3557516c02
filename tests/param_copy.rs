//! The 16-bit parameter copy (`Precision::param_copy`): after every step, write,
//! finalize and checkpoint restore it holds the f32 parameters rounded to nearest (ties
//! to even) exactly as `half` rounds them, on both backends, special values included;
//! its GPU views bind the right bytes and the padding stays zero.

mod common;

use common::{combo, Rng};
use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, Precision, RmsProp, RmsPropConfig, Variable,
};

const SIZES: [usize; 6] = [0, 1, 3, 5, 64, 1000];
const COMBOS: [usize; 6] = [0, 7, 8, 12, 112, 127];

/// Values that exercise rounding: f16 overflow and subnormals, ties, signed zeros.
const SPECIALS: [f32; 12] = [
    65504.0,
    65519.0,
    65520.0,
    1.0e5,
    -3.0e38,
    6.0e-8,
    3.0e-8,
    1.0e-6,
    -0.0,
    1.0 + 1.0 / 2048.0, // a tie between two f16 values: to even
    1.0 + 1.0 / 1024.0,
    2.5e-5,
];

fn model(rng: &mut Rng) -> Vec<Variable> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut v = rng.vec(n);
            if n == 1000 {
                v[..SPECIALS.len()].copy_from_slice(&SPECIALS);
            }
            Variable::new(format!("t{i}/kernel"), &[n], v).unwrap()
        })
        .collect()
}

fn round(x: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::F32 => x,
    }
}

fn check_copy(opt: &RmsProp, dtype: Dtype, what: &str) {
    let vars = opt.variables().unwrap();
    let copy = opt.variable_copies().unwrap();
    for (t, (v, c)) in vars.iter().zip(&copy).enumerate() {
        assert_eq!(v.len(), c.len());
        for (i, (&x, &y)) in v.iter().zip(c).enumerate() {
            let want = round(x, dtype);
            let ok = want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan());
            assert!(
                ok,
                "{what}: tensor {t}[{i}]: {x:e} rounds to {want:e}, the copy holds {y:e}"
            );
        }
    }
}

fn steps_keep_the_copy(backend: Backend, gpu: &GpuOptions) {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for k in COMBOS {
            for guard in [false, true] {
                let precision = Precision::default().with_param_copy(dtype);
                let vars = model(&mut Rng(4 + k as u64));
                let mut opt =
                    RmsProp::with_precision(combo(k), vars, backend, gpu, precision).unwrap();
                opt.set_non_finite_guard(guard).unwrap();
                let what = |s: &str| format!("{backend:?} {dtype} combo {k} guard {guard}: {s}");
                check_copy(&opt, dtype, &what("built"));
                let mut rng = Rng(50 + k as u64);
                for step in 0..4 {
                    let mut g: Vec<Vec<f32>> = SIZES.iter().map(|&n| rng.vec(n)).collect();
                    if step == 2 {
                        g[5][7] = f32::NAN;
                    }
                    // the 3-element tensor has no gradient every other step
                    let refs: Vec<Option<&[f32]>> = g
                        .iter()
                        .enumerate()
                        .map(|(i, g)| (i != 2 || step % 2 == 0).then_some(&g[..]))
                        .collect();
                    opt.apply_gradients(&refs).unwrap();
                    check_copy(&opt, dtype, &what(&format!("step {step}")));
                    if step == 1 {
                        opt.set_variable(3, &[1.0e-7, 70000.0, -2.0, 0.1, 65519.0])
                            .unwrap();
                        check_copy(&opt, dtype, &what("set_variable"));
                    }
                }
                opt.finalize_variable_values().unwrap();
                check_copy(&opt, dtype, &what("finalize"));
            }
        }
    }
}

#[test]
fn cpu_copy_is_the_rounded_parameters() {
    steps_keep_the_copy(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn gpu_copy_is_the_rounded_parameters() {
    let Some(ctx) = common::gpu() else { return };
    steps_keep_the_copy(Backend::Gpu, &common::on(&ctx));
    let split = GpuOptions {
        max_segment_len: Some(1024),
        ..common::on(&ctx)
    };
    steps_keep_the_copy(Backend::Gpu, &split);
}

/// The views bind exactly each tensor's 16-bit values; everything else in the copy
/// buffers (padding) is zero.
#[test]
fn gpu_copy_views_bind_the_tensor_and_padding_stays_zero() {
    let Some(ctx) = common::gpu() else { return };
    let split = GpuOptions {
        max_segment_len: Some(1024),
        ..common::on(&ctx)
    };
    let precision = Precision::default().with_param_copy(Dtype::Bf16);
    let mut opt = RmsProp::with_precision(
        combo(127),
        model(&mut Rng(8)),
        Backend::Gpu,
        &split,
        precision,
    )
    .unwrap();
    let g: Vec<Vec<f32>> = SIZES.iter().map(|&n| Rng(n as u64 + 1).vec(n)).collect();
    let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
    opt.apply_gradients(&refs).unwrap();
    opt.apply_gradients(&refs).unwrap();
    let vars = opt.variables().unwrap();
    let gpu = opt.gpu().unwrap();
    let mut covered: std::collections::HashMap<usize, Vec<bool>> = Default::default();
    let buffers: Vec<wgpu::Buffer> = (0..SIZES.len())
        .map(|i| gpu.param_copy_view(i).unwrap().buffer.clone())
        .collect();
    let mut contents: Vec<Vec<u8>> = Vec::new();
    for b in &buffers {
        contents.push(read_all(&ctx, b));
    }
    for (i, v) in vars.iter().enumerate() {
        let view = gpu.param_copy_view(i).unwrap();
        assert_eq!(view.size, (2 * v.len() as u64).next_multiple_of(4));
        assert_eq!(
            view.offset % u64::from(ctx.device.limits().min_storage_buffer_offset_alignment),
            0
        );
        let b = buffers.iter().position(|b| b == view.buffer).unwrap();
        let bytes = &contents[b][view.offset as usize..][..2 * v.len()];
        let got: Vec<u16> = bytemuck::pod_collect_to_vec(bytes);
        let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        assert_eq!(got, want, "tensor {i}");
        let mask = covered
            .entry(b)
            .or_insert_with(|| vec![false; contents[b].len()]);
        mask[view.offset as usize..][..2 * v.len()]
            .iter_mut()
            .for_each(|m| *m = true);
    }
    // the copy shares its buffer with the segment's slots: the padding between the
    // views (from the first view to the end of the last) stays zero
    for (b, mask) in covered {
        let first = mask.iter().position(|&m| m).unwrap();
        let end = mask.iter().rposition(|&m| m).unwrap() + 1;
        for (k, (&byte, &m)) in contents[b]
            .iter()
            .zip(&mask)
            .enumerate()
            .take(end)
            .skip(first)
        {
            assert!(
                m || byte == 0,
                "buffer {b} byte {k} between the views is {byte}"
            );
        }
    }
}

fn read_all(ctx: &fused_rmsprop::GpuContext, buffer: &wgpu::Buffer) -> Vec<u8> {
    common::read_bytes(ctx, buffer, 0, buffer.size())
}

#[test]
fn copies_are_refused_where_they_make_no_sense() {
    let vars = model(&mut Rng(1));
    let f32_copy = Precision::default().with_param_copy(Dtype::F32);
    assert!(matches!(
        RmsProp::with_precision(RmsPropConfig::default(), vars.clone(), Backend::Cpu, &GpuOptions::default(), f32_copy),
        Err(Error::InvalidConfig { field, .. }) if field == "param_copy"
    ));
    let plain =
        RmsProp::with_backend(RmsPropConfig::default(), vars.clone(), Backend::Cpu).unwrap();
    assert!(matches!(plain.variable_copies(), Err(Error::NoParamCopy)));
    if let Some(ctx) = common::gpu() {
        let plain = RmsProp::with_options(
            RmsPropConfig::default(),
            vars,
            Backend::Gpu,
            &common::on(&ctx),
        )
        .unwrap();
        assert!(matches!(
            plain.gpu().unwrap().param_copy_view(0),
            Err(Error::NoParamCopy)
        ));
        assert!(matches!(plain.variable_copies(), Err(Error::NoParamCopy)));
    }
}
