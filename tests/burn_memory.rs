//! `BurnRmsProp` (feature `burn`) on Burn's wgpu backend frees what each step replaces:
//! the gradients and the old parameter values go back to Burn's memory pool (given up
//! in one operation on Burn's stream, not dropped one by one). A test binary of its
//! own: Burn's pool counts the whole device's allocations, and no other test may
//! allocate on it meanwhile.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use fused_rmsprop::{BurnRmsProp, RmsPropConfig};

/// `x W + b`, in two parameters.
#[derive(Module, Debug)]
struct Affine {
    w: Param<Tensor<2>>,
    b: Param<Tensor<1>>,
}

#[test]
fn wgpu_steps_free_the_gradients_and_values_they_replace() {
    let (device, setup) = match Device::wgpu_options().init_with_setup() {
        Ok(runtime) => runtime,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but Burn's wgpu runtime has no adapter: {e}");
            }
            eprintln!("\n!!!!!! BURN GPU TEST SKIPPED: no wgpu adapter ({e}) !!!!!!\n");
            return;
        }
    };
    let mut optim =
        BurnRmsProp::wgpu(RmsPropConfig::burn().with_momentum(0.9), &device, &setup).unwrap();
    let device = device.autodiff();
    let mut model = Affine {
        w: Param::from_tensor(Tensor::<2>::full([64, 8], 0.1, &device)),
        b: Param::from_tensor(Tensor::<1>::zeros([8], &device)),
    };
    let x = Tensor::<2>::full([16, 64], 0.5, &device);
    let mut live = Vec::new();
    for _ in 0..12 {
        let y = x.clone().matmul(model.w.val()) + model.b.val().unsqueeze();
        let grads = GradientsParams::from_grads(y.powi_scalar(2).mean().backward(), &model);
        model = optim.step(1e-3, model, grads).unwrap();
        device.sync().unwrap();
        let usage = device
            .memory_pool_usage()
            .expect("Burn's wgpu backend reports its pool");
        live.push((usage.number_allocs, usage.bytes_in_use));
    }
    assert!(
        live[3..].iter().all(|&l| l == live[3]),
        "Burn's live allocations (count, bytes) after each step: {live:?}"
    );
    // the steps moved the parameters (the pool held their new values)
    let w: Vec<f32> = model.w.val().into_data().try_to_vec::<f32>().unwrap();
    assert!(w.iter().all(|&v| v < 0.1), "{:?}", &w[..4]);
}
