//! 16-bit gradients (bf16, f16) on both backends: a step on 16-bit gradients is exactly
//! the f32 step on the same gradients upcast, on host slices and (GPU) in the device's
//! gradient buffers, for configs covering every stage, tensors of awkward sizes, and
//! the special values (signed zeros, subnormals, the largest values, infinities, NaN);
//! gradients in the wrong dtype are refused and change nothing.

mod common;

use common::{combo, Rng};
use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, Dtype, Error, GpuOptions, GradientElement, Precision, RmsProp, RmsPropConfig, Variable,
};

const SIZES: [usize; 8] = [0, 1, 3, 5, 63, 64, 65, 1000];
/// Configs covering every stage: plain; centered + momentum + clipnorm; global clipnorm;
/// clipvalue; EMA with overwrite + accumulation + weight decay with a loss scale; all.
const COMBOS: [usize; 6] = [0, 7, 8, 12, 112, 127];
const STEPS: usize = 4;

fn model(rng: &mut Rng) -> Vec<Variable> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| Variable::new(format!("t{i}/kernel"), &[n], rng.vec(n)).unwrap())
        .collect()
}

/// A 16-bit type and its conversions.
trait Half: GradientElement + Copy {
    const NAME: Dtype;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Special values: zeros, the smallest and largest subnormals, the largest finite,
    /// the smallest normal.
    fn specials() -> Vec<Self>;
}

impl Half for bf16 {
    const NAME: Dtype = Dtype::Bf16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn specials() -> Vec<Self> {
        [
            0x0000, 0x8000, 0x0001, 0x8001, 0x007f, 0x7f7f, 0xff7f, 0x0080,
        ]
        .map(bf16::from_bits)
        .to_vec()
    }
}

impl Half for f16 {
    const NAME: Dtype = Dtype::F16;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn specials() -> Vec<Self> {
        [
            0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x7bff, 0xfbff, 0x0400,
        ]
        .map(f16::from_bits)
        .to_vec()
    }
}

/// Step `step`'s gradients in `H`: random values over many magnitudes (subnormals of
/// `H` included), the special values in the 1000-element tensor, and in step 2 a NaN and
/// both infinities there.
fn gradients<H: Half>(rng: &mut Rng, step: usize) -> Vec<Vec<H>> {
    SIZES
        .iter()
        .map(|&n| {
            let mut g: Vec<H> = (0..n)
                .map(|_| {
                    let magnitude = 10f32.powi(rng.below(14) as i32 - 9);
                    H::from_f32(rng.unit() * magnitude)
                })
                .collect();
            if n == 1000 {
                let specials = H::specials();
                g[..specials.len()].copy_from_slice(&specials);
                if step == 2 {
                    g[500] = H::from_f32(f32::NAN);
                    g[501] = H::from_f32(f32::INFINITY);
                    g[502] = H::from_f32(f32::NEG_INFINITY);
                }
            }
            g
        })
        .collect()
}

/// Bit-equal, or both NaN.
fn same(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<(), String> {
    for (t, (a, b)) in a.iter().zip(b).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()) {
                return Err(format!("tensor {t} element {i}: {x:e} vs {y:e}"));
            }
        }
    }
    Ok(())
}

fn build(
    config: &RmsPropConfig,
    vars: &[Variable],
    backend: Backend,
    gpu: &GpuOptions,
    gradients: Dtype,
) -> RmsProp {
    let precision = Precision::default().with_gradients(gradients);
    RmsProp::with_precision(config.clone(), vars.to_vec(), backend, gpu, precision).unwrap()
}

/// Every variable and slot of `opt`.
fn state(opt: &RmsProp) -> Vec<Vec<f32>> {
    let mut all = opt.variables().unwrap();
    for slot in fused_rmsprop::Slot::ALL {
        if let Some(s) = opt.slot(slot).unwrap() {
            all.extend(s);
        }
    }
    all
}

/// 16-bit host gradients against f32 ones upcast, on `backend`, every combo, guard off
/// and on (the guard skips the NaN step in both).
fn host_steps_match<H: Half>(backend: Backend, gpu: &GpuOptions) {
    for k in COMBOS {
        for guard in [false, true] {
            let config = combo(k);
            let vars = model(&mut Rng(11 + k as u64));
            let mut half = build(&config, &vars, backend, gpu, H::NAME);
            let mut full = build(&config, &vars, backend, gpu, Dtype::F32);
            half.set_non_finite_guard(guard).unwrap();
            full.set_non_finite_guard(guard).unwrap();
            let mut rng = Rng(5 + k as u64);
            for step in 0..STEPS {
                let g = gradients::<H>(&mut rng, step);
                let up: Vec<Vec<f32>> = g
                    .iter()
                    .map(|g| g.iter().map(|x| x.to_f32()).collect())
                    .collect();
                // the first tensor has no gradient every other step
                let missing = |i: usize| i == 1 && step % 2 == 1;
                let gh: Vec<Option<&[H]>> = g
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (!missing(i)).then_some(&g[..]))
                    .collect();
                let gf: Vec<Option<&[f32]>> = up
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (!missing(i)).then_some(&g[..]))
                    .collect();
                half.apply_typed_gradients(&gh).unwrap();
                full.apply_gradients(&gf).unwrap();
                same(&state(&half), &state(&full)).unwrap_or_else(|e| {
                    panic!(
                        "{backend:?} {} combo {k} guard {guard} step {step}: {e}",
                        H::NAME
                    )
                });
            }
            half.synchronize().unwrap();
            full.synchronize().unwrap();
            assert_eq!(half.iterations(), full.iterations());
            assert_eq!(half.skipped_steps(), full.skipped_steps());
            if guard {
                half.synchronize().unwrap();
                assert_eq!(
                    half.skipped_steps().skipped,
                    1,
                    "combo {k}: only the NaN step is skipped"
                );
            }
        }
    }
}

#[test]
fn cpu_bf16_and_f16_steps_are_the_f32_steps_of_the_upcast_gradients() {
    host_steps_match::<bf16>(Backend::Cpu, &GpuOptions::default());
    host_steps_match::<f16>(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn gpu_bf16_and_f16_steps_are_the_f32_steps_of_the_upcast_gradients() {
    let Some(ctx) = common::gpu() else { return };
    host_steps_match::<bf16>(Backend::Gpu, &common::on(&ctx));
    host_steps_match::<f16>(Backend::Gpu, &common::on(&ctx));
}

/// On a split arena (segments of at most 1,024 elements), 16-bit gradients written by us into the
/// gradient views give the same step as the host upload, and the CPU agrees within the
/// backends' usual tolerance.
fn device_views_match<H: Half>(ctx: &fused_rmsprop::GpuContext) {
    let split = GpuOptions {
        max_segment_len: Some(1024),
        ..common::on(ctx)
    };
    for k in COMBOS {
        let config = combo(k);
        let vars = model(&mut Rng(3 + k as u64));
        let mut device = build(&config, &vars, Backend::Gpu, &split, H::NAME);
        let mut host = build(&config, &vars, Backend::Gpu, &split, H::NAME);
        let mut cpu = build(
            &config,
            &vars,
            Backend::Cpu,
            &GpuOptions::default(),
            H::NAME,
        );
        let mut rng = Rng(17);
        for step in 0..STEPS {
            let g = gradients::<H>(&mut rng, step);
            let gpu = device.gpu().unwrap();
            for (i, g) in g.iter().enumerate() {
                let view = gpu.gradient_view(i).unwrap();
                let mut bytes = bytemuck::cast_slice::<H, u8>(g).to_vec();
                assert_eq!(view.size, (bytes.len() as u64).next_multiple_of(4));
                bytes.resize(view.size as usize, 0);
                ctx.queue.write_buffer(view.buffer, view.offset, &bytes);
            }
            device.apply_device_gradients(&[true; SIZES.len()]).unwrap();
            let slices: Vec<Option<&[H]>> = g.iter().map(|g| Some(&g[..])).collect();
            host.apply_typed_gradients(&slices).unwrap();
            cpu.apply_typed_gradients(&slices).unwrap();
            same(&state(&device), &state(&host))
                .unwrap_or_else(|e| panic!("{} combo {k} step {step}: {e}", H::NAME));
            for (a, b) in state(&device).iter().zip(state(&cpu)) {
                for (x, y) in a.iter().zip(&b) {
                    let close = x == y
                        || (x - y).abs() <= 1e-4 * (1.0 + y.abs())
                        || (x.is_nan() && y.is_nan());
                    assert!(
                        close,
                        "{} combo {k} step {step}: gpu {x:e} vs cpu {y:e}",
                        H::NAME
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_16_bit_gradient_views_match_host_uploads_and_the_cpu() {
    let Some(ctx) = common::gpu() else { return };
    device_views_match::<bf16>(&ctx);
    device_views_match::<f16>(&ctx);
}

fn refusals(backend: Backend, gpu: &GpuOptions) {
    let vars = model(&mut Rng(1));
    let mut opt = build(&RmsPropConfig::default(), &vars, backend, gpu, Dtype::Bf16);
    let before = state(&opt);
    let f32s: Vec<Vec<f32>> = SIZES.iter().map(|&n| vec![1.0; n]).collect();
    let f32s: Vec<Option<&[f32]>> = f32s.iter().map(|g| Some(&g[..])).collect();
    match opt.apply_gradients(&f32s) {
        Err(Error::GradientDtype {
            expected: Dtype::Bf16,
            found: Dtype::F32,
        }) => {}
        other => panic!("{backend:?}: f32 gradients for a bf16 optimizer gave {other:?}"),
    }
    let f16s: Vec<Vec<f16>> = SIZES.iter().map(|&n| vec![f16::ONE; n]).collect();
    let f16s: Vec<Option<&[f16]>> = f16s.iter().map(|g| Some(&g[..])).collect();
    match opt.apply_typed_gradients(&f16s) {
        Err(Error::GradientDtype {
            expected: Dtype::Bf16,
            found: Dtype::F16,
        }) => {}
        other => panic!("{backend:?}: f16 gradients for a bf16 optimizer gave {other:?}"),
    }
    let mut short: Vec<Vec<bf16>> = SIZES.iter().map(|&n| vec![bf16::ONE; n]).collect();
    short[3].pop();
    let short: Vec<Option<&[bf16]>> = short.iter().map(|g| Some(&g[..])).collect();
    assert!(matches!(
        opt.apply_typed_gradients(&short),
        Err(Error::GradientLength {
            expected: 5,
            found: 4,
            ..
        })
    ));
    assert_eq!(opt.iterations(), 0);
    same(&state(&opt), &before).unwrap();
    assert_eq!(opt.precision().gradients, Dtype::Bf16);
}

#[test]
fn gradients_in_the_wrong_dtype_are_refused_and_change_nothing() {
    refusals(Backend::Cpu, &GpuOptions::default());
    if let Some(ctx) = common::gpu() {
        refusals(Backend::Gpu, &common::on(&ctx));
    }
}

/// Your own buffers in mixed precision: bf16 parameters and gradients at the offsets
/// `UserBuffers` gives for bf16, stepped in place, the same as host uploads.
#[test]
fn user_buffers_in_bf16() {
    use fused_rmsprop::gpu::{UserBuffers, ARENA_USAGES};
    let Some(ctx) = common::gpu() else { return };
    let vars = model(&mut Rng(5));
    let specs: Vec<_> = vars.iter().map(|v| v.spec.clone()).collect();
    let precision = Precision::default()
        .with_gradients(Dtype::Bf16)
        .with_params(Dtype::Bf16);
    let size = UserBuffers::required_size(&ctx, &specs, Dtype::Bf16).unwrap();
    let ranges = UserBuffers::tensor_byte_ranges(&ctx, &specs, Dtype::Bf16).unwrap();
    let make = |label| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: ARENA_USAGES,
            mapped_at_creation: false,
        })
    };
    let (params, grads) = (make("my params"), make("my grads"));
    // the starting values, in bf16, where the layout says
    let halves = |v: &[f32]| -> Vec<u8> {
        let mut b: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        if b.len() % 2 == 1 {
            b.push(0);
        }
        bytemuck::cast_slice(&b).to_vec()
    };
    for (v, r) in vars.iter().zip(&ranges) {
        if !v.values.is_empty() {
            ctx.queue.write_buffer(&params, r.start, &halves(&v.values));
        }
    }
    let options = GpuOptions {
        buffers: Some(UserBuffers {
            params,
            grads: grads.clone(),
            offset: 0,
        }),
        ..common::on(&ctx)
    };
    let config = combo(7);
    let mut mine =
        RmsProp::with_specs_and_precision(config.clone(), specs, Backend::Gpu, &options, precision)
            .unwrap();
    let mut host = RmsProp::with_precision(
        config,
        vars.clone(),
        Backend::Gpu,
        &common::on(&ctx),
        precision,
    )
    .unwrap();
    assert_eq!(mine.variables().unwrap(), host.variables().unwrap());
    let mut rng = Rng(9);
    for step in 0..3 {
        let g = gradients::<bf16>(&mut rng, step);
        for (g, r) in g.iter().zip(&ranges) {
            if !g.is_empty() {
                let up: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
                ctx.queue.write_buffer(&grads, r.start, &halves(&up));
            }
        }
        mine.apply_device_gradients(&[true; SIZES.len()]).unwrap();
        let slices: Vec<Option<&[bf16]>> = g.iter().map(|g| Some(&g[..])).collect();
        host.apply_typed_gradients(&slices).unwrap();
        same(&state(&mine), &state(&host)).unwrap_or_else(|e| panic!("step {step}: {e}"));
    }
    // too small for bf16 parameters and gradients: refused with the sizes
    let small = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: size / 2,
        usage: ARENA_USAGES,
        mapped_at_creation: false,
    });
    let specs: Vec<_> = vars.iter().map(|v| v.spec.clone()).collect();
    let options = GpuOptions {
        buffers: Some(UserBuffers {
            params: small,
            grads,
            offset: 0,
        }),
        ..common::on(&ctx)
    };
    assert!(matches!(
        RmsProp::with_specs_and_precision(
            RmsPropConfig::default(),
            specs,
            Backend::Gpu,
            &options,
            precision
        ),
        Err(Error::InvalidBuffer { .. })
    ));
}
