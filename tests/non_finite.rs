//! NaN and infinity in gradients flow through as Keras lets them, on both backends.
//! Expected values follow from Keras' expressions, written out per case.

mod common;

use fused_rmsprop::{Backend, GpuOptions, RmsProp, RmsPropConfig, Variable};

fn model() -> Vec<Variable> {
    vec![
        Variable::new("a", &[3], vec![1.0, 2.0, 3.0]).unwrap(),
        Variable::new("b", &[2], vec![-1.0, -2.0]).unwrap(),
    ]
}

fn step(config: RmsPropConfig, backend: Backend, gpu: &GpuOptions, ga: [f32; 3]) -> Vec<Vec<f32>> {
    let mut opt = RmsProp::with_options(config, model(), backend, gpu).unwrap();
    opt.apply_gradients(&[Some(&ga), Some(&[0.5, -0.5])])
        .unwrap();
    opt.variables().unwrap()
}

fn check(backend: Backend, gpu: &GpuOptions) {
    let lr = RmsPropConfig::default().with_learning_rate(0.1);
    // No clipping: velocity = inf, increment = lr*inf/sqrt(inf) = NaN at that element only.
    let v = step(lr.clone(), backend, gpu, [f32::INFINITY, 1.0, 0.0]);
    assert!(v[0][0].is_nan(), "{backend:?}: {v:?}");
    assert!(v[0][1].is_finite() && v[0][2] == 3.0 && v[1].iter().all(|x| x.is_finite()));
    // A NaN gradient: NaN at that element only.
    let v = step(lr.clone(), backend, gpu, [1.0, f32::NAN, 0.0]);
    assert!(
        v[0][1].is_nan() && v[0][0].is_finite(),
        "{backend:?}: {v:?}"
    );
    // global_clipnorm with a non-finite global norm: scale is NaN, every variable NaN.
    let v = step(
        lr.clone().with_global_clipnorm(1.0),
        backend,
        gpu,
        [f32::INFINITY, 1.0, 0.0],
    );
    assert!(v.iter().flatten().all(|x| x.is_nan()), "{backend:?}: {v:?}");
    // clipnorm: tensor a has norm inf: g * c / inf is 0 for finite g, NaN for the inf.
    let v = step(
        lr.clone().with_clipnorm(1.0),
        backend,
        gpu,
        [f32::INFINITY, 1.0, 0.0],
    );
    assert!(v[0][0].is_nan(), "{backend:?}: {v:?}");
    assert_eq!(
        &v[0][1..],
        &[2.0, 3.0],
        "{backend:?}: zero clipped gradient leaves a[1..]"
    );
    assert!(v[1].iter().all(|x| x.is_finite()));
    // clipvalue keeps NaN, clamps infinity to the bound.
    let v = step(
        lr.with_clipvalue(0.5),
        backend,
        gpu,
        [f32::NAN, f32::NEG_INFINITY, 0.0],
    );
    assert!(v[0][0].is_nan(), "{backend:?}: {v:?}");
    // clamped to -0.5: one step moves by lr * g / sqrt(0.1 * g^2 + eps), about +0.316
    let expected = 2.0 - 0.1 * -0.5 / (0.1f32 * 0.25 + 1e-7).sqrt();
    assert!(
        (v[0][1] - expected).abs() < 1e-5,
        "{backend:?}: {} vs {expected}",
        v[0][1]
    );
}

#[test]
fn non_finite_gradients_on_cpu() {
    check(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn non_finite_gradients_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    check(Backend::Gpu, &common::on(&ctx));
}
