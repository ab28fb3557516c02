//! `BurnRmsProp` (feature `burn`) on a Burn MLP: on Burn's wgpu backend (lavapipe in
//! CI) and on its ndarray backend through the host.
//!
//! - against this crate's CPU path fed the same gradients, within the conformance
//!   tolerance, for several dialects and options, and for bf16 and f16 modules (also on
//!   Burn's flex backend);
//! - with the Burn dialect, against Burn's own `RmsProp`: the same loss curve;
//! - bad input: a changed module, a wrong element type, a wrong device, no gradient;
//!   each refused with the module given back unchanged.

mod common;

use std::sync::OnceLock;

use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::exponential::ExponentialLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrSchedulerConfig};
use burn::lr_scheduler::LrSchedulerConfig;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, RmsPropConfig as BurnConfig};
use burn::tensor::activation::relu;
use burn::tensor::{DType, Device, Tensor, TensorData};
use common::trace::values_match;
use common::Rng;
use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, BurnProblem, BurnRmsProp, Dtype, Error, GpuOptions, Precision, RmsProp, RmsPropConfig,
    StateDtype, StateStorage, Variable, WgpuSetup,
};

#[derive(Module, Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(widths: &[usize], device: &Device) -> Self {
        device.seed(7);
        let layers = widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        Mlp { layers }
    }

    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

const WIDTHS: [usize; 4] = [8, 16, 16, 1];
const BATCH: usize = 32;

/// A regression batch: `y = sin(sum of x)`.
fn batch(device: &Device, seed: u64) -> (Tensor<2>, Tensor<2>) {
    let mut rng = Rng(seed);
    let x: Vec<f32> = (0..BATCH * WIDTHS[0]).map(|_| rng.unit()).collect();
    let y: Vec<f32> = x
        .chunks(WIDTHS[0])
        .map(|r| r.iter().sum::<f32>().sin())
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [BATCH, WIDTHS[0]]), device),
        Tensor::from_data(TensorData::new(y, [BATCH, 1]), device),
    )
}

fn loss(model: &Mlp, x: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
    (model.forward(x) - y).powf_scalar(2.0).mean()
}

/// Every float parameter's values, in visiting order.
fn params<M: Module>(model: &M) -> Vec<Vec<f32>> {
    host_values(model, None).into_iter().flatten().collect()
}

/// Burn's wgpu runtime, registered once per process (Burn refuses a second
/// registration). `None` without an adapter: a failure under CI, loud elsewhere.
fn wgpu() -> Option<&'static (Device, WgpuSetup)> {
    static RUNTIME: OnceLock<Option<(Device, WgpuSetup)>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| match Device::wgpu_options().init_with_setup() {
            Ok((device, setup)) => {
                eprintln!("Burn's wgpu runs on: {}", setup.adapter.get_info().name);
                Some((device, setup))
            }
            Err(e) => {
                if std::env::var_os("CI").is_some() {
                    panic!("CI is set but Burn's wgpu runtime has no adapter: {e}");
                }
                eprintln!("\n!!!!!! BURN GPU TEST SKIPPED: no wgpu adapter ({e}) !!!!!!\n");
                None
            }
        })
        .as_ref()
}

/// Where a test runs: Burn's ndarray or flex backend through the host, or Burn's wgpu
/// device.
#[derive(Clone, Copy, Debug)]
enum On {
    Ndarray,
    Flex,
    Wgpu,
}

fn device_and_optimizer(on: On, config: RmsPropConfig) -> Option<(Device, BurnRmsProp)> {
    match on {
        // Burn 0.22 deprecates ndarray for flex; the issue this answers names ndarray.
        #[allow(deprecated)]
        On::Ndarray => Some((
            Device::ndarray().autodiff(),
            BurnRmsProp::new(config).unwrap(),
        )),
        On::Flex => Some((Device::flex().autodiff(), BurnRmsProp::new(config).unwrap())),
        On::Wgpu => {
            let (device, setup) = wgpu()?;
            let optim = BurnRmsProp::wgpu(config, device, setup).unwrap();
            Some((device.clone().autodiff(), optim))
        }
    }
}

const STEPS: usize = 12;

/// Trains with `BurnRmsProp` and, fed the same gradients at every step, this crate's
/// CPU path; the parameters must agree within the conformance tolerance at the end.
/// Half way, the first weight is replaced by Burn's code (both runs): the next step must
/// start from the new values. Two steps have no gradient for a weight between others.
fn fused_matches_cpu_path(on: On, config: RmsPropConfig, lr: f64) {
    let Some((device, mut optim)) = device_and_optimizer(on, config.clone()) else {
        return;
    };
    let mut model = Mlp::new(&WIDTHS, &device);
    let mut cpu = cpu_path(&model, config);
    let names: Vec<&str> = cpu.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names[..3],
        ["layers.0.weight", "layers.0.bias", "layers.1.weight"],
        "Burn's module paths name the parameters"
    );
    let mut first = None;
    let mut last = 0.0;
    for step in 0..STEPS {
        if step == STEPS / 2 {
            let w = &model.layers[0].weight;
            let dims = w.val().dims();
            let fresh = Tensor::<2>::full(dims, 0.05, &device).require_grad();
            model.layers[0].weight = Param::initialized(w.id, fresh);
            cpu.set_variable(0, &vec![0.05; dims[0] * dims[1]]).unwrap();
        }
        let (x, y) = batch(&device, 1 + step as u64);
        let l = loss(&model, x, y);
        let value: f32 = l.clone().into_scalar();
        first.get_or_insert(value);
        last = value;
        let mut grads = GradientsParams::from_grads(l.backward(), &model);
        if step == 2 || step == 3 {
            // a parameter between two others has no gradient (a frozen layer): it keeps
            // its value, and the new values around it still land in their places
            grads.remove::<2>(model.layers[1].weight.id);
        }
        step_cpu_path(&mut cpu, &model, &grads, lr);
        model = optim.step(lr, model, grads).unwrap();
    }
    assert_matches_cpu_path(on, &model, &cpu);
    assert_ne!(
        params(&model),
        params(&Mlp::new(&WIDTHS, &device)),
        "the model moved"
    );
    // Keras' iterations count updates (one per accumulation cycle)
    assert_eq!(optim.optimizer().unwrap().iterations(), cpu.iterations());
    assert!(cpu.iterations() >= STEPS as u64 / 2);
    let first = first.unwrap();
    assert!(last < first, "{on:?}: the loss fell ({first} -> {last})");
}

fn configs() -> Vec<(&'static str, RmsPropConfig, f64)> {
    vec![
        (
            "burn, weight decay",
            RmsPropConfig::burn().with_weight_decay(0.01),
            0.005,
        ),
        (
            "keras, centered momentum, clipnorm",
            RmsPropConfig::default()
                .with_momentum(0.5)
                .with_centered(true)
                .with_clipnorm(1.0),
            0.002,
        ),
        (
            "torch, momentum, int8 state",
            RmsPropConfig::torch()
                .with_momentum(0.9)
                .with_state(StateStorage::new(StateDtype::DYNAMIC8).with_min_size(64)),
            0.002,
        ),
        (
            "keras, EMA",
            RmsPropConfig::default().with_use_ema(true),
            0.003,
        ),
        (
            "keras, gradients accumulated over 2 steps",
            RmsPropConfig::default().with_gradient_accumulation_steps(2),
            0.003,
        ),
    ]
}

#[test]
fn ndarray_steps_match_the_cpu_path() {
    for (name, config, lr) in configs() {
        eprintln!("ndarray: {name}");
        fused_matches_cpu_path(On::Ndarray, config, lr);
    }
}

#[test]
fn flex_steps_match_the_cpu_path() {
    for (name, config, lr) in configs() {
        eprintln!("flex: {name}");
        fused_matches_cpu_path(On::Flex, config, lr);
    }
}

#[test]
fn wgpu_steps_match_the_cpu_path() {
    for (name, config, lr) in configs() {
        eprintln!("wgpu: {name}");
        fused_matches_cpu_path(On::Wgpu, config, lr);
    }
}

/// Burn's `RmsProp` (`alpha 0.99, momentum 0.9, epsilon 1e-5`, L2 decay, each
/// gradient clipped to norm 0.5) and ours built from the same Burn config: the same loss
/// at every step and the same parameters at the end.
fn burn_dialect_matches_burns_rmsprop(on: On) {
    let burn_config = BurnConfig::new()
        .with_weight_decay(Some(WeightDecayConfig::new(0.01)))
        .with_grad_clipping(Some(GradientClippingConfig::Norm(0.5)));
    let config = RmsPropConfig::from_burn_config(&burn_config).unwrap();
    assert_eq!(
        config,
        RmsPropConfig::burn()
            .with_weight_decay(0.01)
            .with_clipnorm(0.5)
    );
    let Some((device, mut fused)) = device_and_optimizer(on, config) else {
        return;
    };
    let mut theirs = burn_config.init();
    train_alongside_burn(on, &device, &mut fused, &mut theirs, 100, &mut || {
        0.005.into()
    });
}

/// Trains one MLP with `fused` and a copy with Burn's `theirs`, on the same batches
/// (seeds from `seed`), each step's learning rates from `rates`: the losses must agree
/// at every step and the parameters at the end. Gives back the fused model.
fn train_alongside_burn(
    on: On,
    device: &Device,
    fused: &mut BurnRmsProp,
    theirs: &mut ModuleOptimizer,
    seed: u64,
    rates: &mut dyn FnMut() -> ModuleLearningRate,
) -> Mlp {
    let mut ours = Mlp::new(&WIDTHS, device);
    let mut reference = ours.clone();
    for step in 0..STEPS {
        let (x, y) = batch(device, seed + step as u64);
        let l_ours = loss(&ours, x.clone(), y.clone());
        let l_ref = loss(&reference, x, y);
        let (a, b): (f32, f32) = (l_ours.clone().into_scalar(), l_ref.clone().into_scalar());
        assert!(
            values_match(a, b),
            "{on:?} step {step}: loss {a} with BurnRmsProp, {b} with Burn's RmsProp"
        );
        let g_ours = GradientsParams::from_grads(l_ours.backward(), &ours);
        let g_ref = GradientsParams::from_grads(l_ref.backward(), &reference);
        let lr = rates();
        ours = fused.step(lr.clone(), ours, g_ours).unwrap();
        reference = theirs.step(lr, reference, g_ref);
    }
    for (i, (a, b)) in params(&ours).iter().zip(params(&reference)).enumerate() {
        for (x, y) in a.iter().zip(&b) {
            assert!(
                values_match(*x, *y),
                "{on:?}: parameter {i}: {x} against Burn's {y}"
            );
        }
    }
    ours
}

#[test]
fn burn_dialect_matches_burns_own_rmsprop_on_ndarray() {
    burn_dialect_matches_burns_rmsprop(On::Ndarray);
}

#[test]
fn burn_dialect_matches_burns_own_rmsprop_on_wgpu() {
    burn_dialect_matches_burns_rmsprop(On::Wgpu);
}

/// Runs one good step, then hands `step` a module; the step must be refused with
/// `expect` and give the module back unchanged, and a good step must still work.
fn refused(on: On, what: &str, bad: impl FnOnce(&Device, &Mlp) -> (Mlp, GradientsParams)) -> Error {
    let (device, mut optim) = device_and_optimizer(on, RmsPropConfig::burn()).unwrap();
    let model = Mlp::new(&WIDTHS, &device);
    let (x, y) = batch(&device, 3);
    let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
    let model = optim.step(0.01, model, grads).unwrap();
    let iterations = optim.optimizer().unwrap().iterations();
    let (bad_model, bad_grads) = bad(&device, &model);
    let before = params(&bad_model);
    let refusal = optim.step(0.01, bad_model, bad_grads).unwrap_err();
    assert_eq!(
        params(&refusal.module),
        before,
        "{what}: the module is given back unchanged"
    );
    assert_eq!(
        optim.optimizer().unwrap().iterations(),
        iterations,
        "{what}: no step"
    );
    let (x, y) = batch(&device, 4);
    let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
    optim.step(0.01, model, grads).unwrap();
    assert_eq!(optim.optimizer().unwrap().iterations(), iterations + 1);
    refusal.error
}

fn bad_input_is_refused(on: On) {
    if matches!(on, On::Wgpu) && wgpu().is_none() {
        return;
    }
    // Another shape of model.
    let e = refused(on, "changed module", |device, _| {
        let other = Mlp::new(&[8, 4, 1], device);
        let (x, y) = batch(device, 5);
        let g = GradientsParams::from_grads(loss(&other, x, y).backward(), &other);
        (other, g)
    });
    assert!(
        matches!(
            e,
            Error::BurnParam {
                problem: BurnProblem::ModuleChanged(_),
                ..
            }
        ),
        "{e}"
    );
    // No gradient at all.
    let e = refused(on, "no gradients", |_, model| {
        (model.clone(), GradientsParams::new())
    });
    assert!(matches!(e, Error::NoGradients), "{e}");
    // A gradient of another shape.
    let e = refused(on, "gradient shape", |device, model| {
        let mut grads = GradientsParams::new();
        let id = model.layers[0].weight.id;
        grads.register(id, Tensor::<2>::ones([3, 3], &device.clone().inner()));
        (model.clone(), grads)
    });
    assert!(
        matches!(
            e,
            Error::BurnParam {
                problem: BurnProblem::GradientShape { .. },
                ..
            }
        ),
        "{e}"
    );
    // A gradient in another float type (ndarray has no f16).
    let other = match on {
        On::Ndarray => DType::F64,
        On::Flex | On::Wgpu => DType::F16,
    };
    let e = refused(on, "gradient dtype", |device, model| {
        let mut grads = GradientsParams::new();
        let w = &model.layers[0].weight;
        let shape = w.val().dims();
        let g = Tensor::<2>::ones(shape, &device.clone().inner()).cast(other);
        grads.register(w.id, g);
        (model.clone(), grads)
    });
    assert!(
        matches!(
            e,
            Error::BurnParam {
                problem: BurnProblem::Dtype { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_input_is_refused_on_ndarray() {
    bad_input_is_refused(On::Ndarray);
}

#[test]
fn bad_input_is_refused_on_flex() {
    bad_input_is_refused(On::Flex);
}

#[test]
fn bad_input_is_refused_on_wgpu() {
    bad_input_is_refused(On::Wgpu);
}

/// A model on the ndarray backend handed to a wgpu optimizer.
#[test]
fn a_tensor_on_another_device_is_refused() {
    let Some((device, setup)) = wgpu() else {
        return;
    };
    let mut optim = BurnRmsProp::wgpu(RmsPropConfig::burn(), device, setup).unwrap();
    #[allow(deprecated)]
    let cpu = Device::ndarray().autodiff();
    let model = Mlp::new(&WIDTHS, &cpu);
    let (x, y) = batch(&cpu, 6);
    let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
    let before = params(&model);
    let refusal = optim.step(0.01, model, grads).unwrap_err();
    assert!(
        matches!(
            refusal.error,
            Error::BurnParam {
                problem: BurnProblem::Device { .. },
                ..
            }
        ),
        "{}",
        refusal.error
    );
    assert_eq!(params(&refusal.module), before);
    assert!(optim.optimizer().is_none(), "nothing was built");
}

/// A small convolutional net: two 3x3 convolutions and a linear head.
#[derive(Module, Debug)]
struct ConvNet {
    conv1: burn::nn::conv::Conv2d,
    conv2: burn::nn::conv::Conv2d,
    head: Linear,
}

impl ConvNet {
    fn new(device: &Device) -> Self {
        use burn::nn::conv::Conv2dConfig;
        device.seed(3);
        ConvNet {
            conv1: Conv2dConfig::new([1, 4], [3, 3]).init(device),
            conv2: Conv2dConfig::new([4, 8], [3, 3]).init(device),
            head: LinearConfig::new(8 * 4 * 4, 1).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let h = relu(self.conv1.forward(x));
        let h = relu(self.conv2.forward(h));
        let [n, c, hh, ww] = h.dims();
        self.head.forward(h.reshape([n, c * hh * ww]))
    }
}

/// A convolutional net (its kernels' gradients come from Burn's convolution backward):
/// `BurnRmsProp` against this crate's CPU path fed the same gradients.
fn conv_net_matches_the_cpu_path(on: On) {
    let config = RmsPropConfig::burn().with_weight_decay(0.01);
    let Some((device, mut optim)) = device_and_optimizer(on, config.clone()) else {
        return;
    };
    let mut model = ConvNet::new(&device);
    let mut cpu = cpu_path(&model, config);
    let mut rng = Rng(17);
    for _ in 0..6 {
        let x: Vec<f32> = (0..4 * 8 * 8).map(|_| rng.unit()).collect();
        let y: Vec<f32> = (0..4).map(|_| rng.unit()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [4, 1, 8, 8]), &device);
        let y = Tensor::<2>::from_data(TensorData::new(y, [4, 1]), &device);
        let l = (model.forward(x) - y).powf_scalar(2.0).mean();
        let grads = GradientsParams::from_grads(l.backward(), &model);
        step_cpu_path(&mut cpu, &model, &grads, 0.01);
        model = optim.step(0.01, model, grads).unwrap();
    }
    assert_matches_cpu_path(on, &model, &cpu);
}

/// This crate's CPU path over `model`'s float parameters, each under its module path.
fn cpu_path<M: Module>(model: &M, config: RmsPropConfig) -> RmsProp {
    cpu_path_in(model, config, Precision::default())
}

/// [`cpu_path`] in `precision`.
fn cpu_path_in<M: Module>(model: &M, config: RmsPropConfig, precision: Precision) -> RmsProp {
    struct Named {
        path: Vec<String>,
        out: Vec<Variable>,
    }
    impl ModuleVisitor for Named {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let shape = value.dims();
            let values = f32s(value.into_data());
            let variable = Variable::new(self.path.join("."), &shape, values).unwrap();
            self.out.push(variable);
        }
    }
    let mut named = Named {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut named);
    RmsProp::with_precision(
        config,
        named.out,
        Backend::Cpu,
        &GpuOptions::default(),
        precision,
    )
    .unwrap()
}

/// A tensor's elements as f32 (16-bit ones upcast, exactly).
fn f32s(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// One step of the CPU path with `grads` (Burn's gradients of `model`, read back, in
/// the CPU path's gradient type).
fn step_cpu_path<M: Module>(cpu: &mut RmsProp, model: &M, grads: &GradientsParams, lr: f64) {
    fn typed<T: fused_rmsprop::GradientElement>(
        cpu: &mut RmsProp,
        host: &[Option<Vec<f32>>],
        from: impl Fn(f32) -> T,
    ) {
        let owned: Vec<Option<Vec<T>>> = host
            .iter()
            .map(|g| g.as_ref().map(|g| g.iter().map(|&x| from(x)).collect()))
            .collect();
        let refs: Vec<Option<&[T]>> = owned.iter().map(|g| g.as_deref()).collect();
        cpu.apply_typed_gradients(&refs).unwrap();
    }
    let host = host_values(model, Some(grads));
    cpu.set_learning_rate(lr).unwrap();
    match cpu.precision().gradients {
        Dtype::Bf16 => typed(cpu, &host, bf16::from_f32),
        Dtype::F16 => typed(cpu, &host, f16::from_f32),
        _ => typed(cpu, &host, |x| x),
    }
}

/// `model`'s parameters (stepped by `BurnRmsProp`) against the CPU path's, within the
/// conformance tolerance.
fn assert_matches_cpu_path<M: Module>(on: On, model: &M, cpu: &RmsProp) {
    let expected = cpu.variables().unwrap();
    for (i, (f, e)) in params(model).iter().zip(&expected).enumerate() {
        for (j, (a, b)) in f.iter().zip(e).enumerate() {
            assert!(
                values_match(*a, *b),
                "{on:?}: parameter {i} element {j}: fused {a}, CPU path {b}"
            );
        }
    }
}

/// Every float parameter's values (or, with `grads`, its gradient's), in visiting order.
fn host_values<M: Module>(model: &M, grads: Option<&GradientsParams>) -> Vec<Option<Vec<f32>>> {
    struct Reader<'a> {
        grads: Option<&'a GradientsParams>,
        out: Vec<Option<Vec<f32>>>,
    }
    impl ModuleVisitor for Reader<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = match self.grads {
                Some(g) => g.get::<D>(param.id),
                None => Some(param.val()),
            };
            self.out.push(tensor.map(|t| f32s(t.into_data())));
        }
    }
    let mut reader = Reader {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut reader);
    reader.out
}

#[test]
fn a_conv_net_matches_the_cpu_path_on_ndarray() {
    conv_net_matches_the_cpu_path(On::Ndarray);
}

#[test]
fn a_conv_net_matches_the_cpu_path_on_wgpu() {
    conv_net_matches_the_cpu_path(On::Wgpu);
}

/// Burn's param groups: Burn's `ModuleOptimizer::with_group` (another alpha and momentum
/// for the first layer) and `BurnRmsProp::with_burn_group` with the same Burn group: the
/// same loss at every step and the same parameters at the end.
fn burn_groups_match_burns_module_optimizer(on: On) {
    use burn::module::ParamGroup as BurnParamGroup;
    use fused_rmsprop::ParamGroup;
    let first = || BurnParamGroup::from_paths(vec!["layers.0.weight", "layers.0.bias"]);
    let Some((device, fused)) = device_and_optimizer(on, RmsPropConfig::burn()) else {
        return;
    };
    let mut fused = fused.with_burn_group(
        first(),
        ParamGroup::new(Vec::<String>::new())
            .with_rho(0.9)
            .with_momentum(0.5),
    );
    let mut theirs = BurnConfig::new().init().with_group(
        first(),
        BurnConfig::new().with_alpha(0.9).with_momentum(0.5).build(),
        None,
    );
    train_alongside_burn(on, &device, &mut fused, &mut theirs, 200, &mut || {
        0.005.into()
    });
    let groups = &fused.optimizer().unwrap().config().param_groups;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].variables, ["layers.0.weight", "layers.0.bias"]);
}

#[test]
fn burn_groups_match_burns_module_optimizer_on_ndarray() {
    burn_groups_match_burns_module_optimizer(On::Ndarray);
}

#[test]
fn burn_groups_match_burns_module_optimizer_on_wgpu() {
    burn_groups_match_burns_module_optimizer(On::Wgpu);
}

/// Burn's learning rate per parameter group (a `ModuleLrScheduler`: the first layer on
/// its own exponential decay, the rest constant), the same at every step for Burn's
/// `RmsProp` and for `BurnRmsProp`, which has the first layer's Burn group (with no
/// numbers of its own): the same losses and parameters. Without that group the step is
/// refused, naming a parameter of the first layer.
fn burn_group_rates_match_burns_module_optimizer(on: On) {
    use burn::module::ParamGroup as BurnParamGroup;
    use fused_rmsprop::ParamGroup;
    let first = || BurnParamGroup::from_paths(vec!["layers.0.weight", "layers.0.bias"]);
    let scheduler = || {
        ModuleLrSchedulerConfig::new(LrSchedulerConfig::Constant(0.005))
            .with_group(first(), ExponentialLrSchedulerConfig::new(0.02, 0.8))
            .init()
            .unwrap()
    };
    let Some((device, fused)) = device_and_optimizer(on, RmsPropConfig::burn()) else {
        return;
    };
    let mut fused = fused.with_burn_group(first(), ParamGroup::new(Vec::<String>::new()));
    let mut theirs = BurnConfig::new().init();
    let mut rates = scheduler();
    train_alongside_burn(on, &device, &mut fused, &mut theirs, 300, &mut || {
        rates.step()
    });
    let groups = &fused.optimizer().unwrap().config().param_groups;
    let rate = f64::from(groups[0].learning_rate.as_ref().unwrap().at(0));
    let expected = 0.02 * 0.8f64.powi(STEPS as i32 - 1);
    assert!(
        (rate - expected).abs() < 1e-6 * expected,
        "the first layer's rate {rate}"
    );

    let (device, mut alone) = device_and_optimizer(on, RmsPropConfig::burn()).unwrap();
    let model = Mlp::new(&WIDTHS, &device);
    let (x, y) = batch(&device, 10);
    let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
    let refusal = alone.step(scheduler().step(), model, grads).unwrap_err();
    match &refusal.error {
        Error::BurnParam {
            name,
            problem: BurnProblem::LearningRate(_),
        } => assert_eq!(name, "layers.0.weight"),
        e => panic!("{e}"),
    }
    assert_eq!(
        alone.optimizer().unwrap().iterations(),
        0,
        "nothing stepped"
    );
}

#[test]
fn burn_group_rates_match_burns_module_optimizer_on_ndarray() {
    burn_group_rates_match_burns_module_optimizer(On::Ndarray);
}

#[test]
fn burn_group_rates_match_burns_module_optimizer_on_wgpu() {
    burn_group_rates_match_burns_module_optimizer(On::Wgpu);
}

/// Under the non-finite guard (three submissions on wgpu), a step with a NaN gradient
/// changes nothing but the skip counter, and the next step runs.
fn the_guard_skips_a_nan_step(on: On) {
    let Some((device, mut optim)) = device_and_optimizer(on, RmsPropConfig::burn()) else {
        return;
    };
    let model = Mlp::new(&WIDTHS, &device);
    optim.bind(&model).unwrap();
    optim
        .optimizer_mut()
        .unwrap()
        .set_non_finite_guard(true)
        .unwrap();
    let (x, y) = batch(&device, 9);
    let grads = GradientsParams::from_grads(loss(&model, x.clone(), y.clone()).backward(), &model);
    let model = optim.step(0.01, model, grads).unwrap();
    let before = params(&model);
    let mut grads = GradientsParams::new();
    let w = &model.layers[1].weight;
    let nan = Tensor::<2>::full(w.val().dims(), f32::NAN, &device.clone().inner());
    grads.register(w.id, nan);
    let model = optim.step(0.01, model, grads).unwrap();
    assert_eq!(
        params(&model),
        before,
        "{on:?}: the skipped step moved nothing"
    );
    let opt = optim.optimizer().unwrap();
    assert_eq!((opt.iterations(), opt.skipped_steps().skipped), (1, 1));
    let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
    let model = optim.step(0.01, model, grads).unwrap();
    assert_ne!(params(&model), before);
    assert_eq!(optim.optimizer().unwrap().iterations(), 2);
}

#[test]
fn the_guard_skips_a_nan_step_on_ndarray() {
    the_guard_skips_a_nan_step(On::Ndarray);
}

#[test]
fn the_guard_skips_a_nan_step_on_wgpu() {
    the_guard_skips_a_nan_step(On::Wgpu);
}

/// `model` with every float parameter cast to `dtype` (Burn 0.22 has no cast of a whole
/// module: its users configure the device's float type, or load a record in it).
fn cast_module<M: Module>(model: M, dtype: DType) -> M {
    struct CastTo(DType);
    impl ModuleMapper for CastTo {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let cast = Tensor::from_inner(tensor.inner().cast(self.0)).require_grad();
            Param::from_mapped_value(id, cast, mapper)
        }
    }
    model.map(&mut CastTo(dtype))
}

/// Every float parameter's element type.
fn dtypes<M: Module>(model: &M) -> Vec<DType> {
    struct Types(Vec<DType>);
    impl ModuleVisitor for Types {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let mut types = Types(Vec::new());
    model.visit(&mut types);
    types.0
}

/// One unit in the last place of `x` in `dtype` (16-bit).
fn one_ulp(x: f32, dtype: Dtype) -> f32 {
    let bits = match dtype {
        Dtype::Bf16 => 8,
        _ => 11,
    };
    let exponent = x.abs().max(f32::MIN_POSITIVE).log2().floor();
    2f32.powf(exponent - (bits - 1) as f32).max(match dtype {
        Dtype::F16 => 2f32.powi(-24),
        _ => 0.0,
    })
}

/// A module of 16-bit parameters and gradients (tensors of odd lengths among them):
/// `BurnRmsProp` with `precision`'s options against this crate's CPU path in the same
/// precision, fed the same gradients. Through the host (the CPU path itself) bit for bit;
/// on wgpu within one unit of the 16-bit type per element (parameters rounded from f32
/// results that may differ in their last bit), as `tests/param_dtypes.rs` holds the GPU.
/// With remainders, the optimizer's f32 masters too, and the module's values are the
/// masters rounded.
fn half_model_matches_the_cpu_path(on: On, dtype: DType, precision: Precision) {
    let config = RmsPropConfig::burn()
        .with_momentum(0.5)
        .with_weight_decay(0.01);
    let Some((device, optim)) = device_and_optimizer(on, config.clone()) else {
        return;
    };
    let mut optim = optim.with_precision(precision);
    let element = if dtype == DType::BF16 {
        Dtype::Bf16
    } else {
        Dtype::F16
    };
    let widths = [8, 15, 9, 1];
    let mut model = cast_module(Mlp::new(&widths, &device), dtype);
    let start = params(&model);
    let mut cpu = cpu_path_in(
        &model,
        config,
        precision.with_params(element).with_gradients(element),
    );
    let lr = 0.01;
    for step in 0..STEPS {
        let (x, y) = batch(&device, 60 + step as u64);
        let l = loss(&model, x.cast(dtype), y.cast(dtype));
        let grads = GradientsParams::from_grads(l.backward(), &model);
        step_cpu_path(&mut cpu, &model, &grads, lr);
        model = optim.step(lr, model, grads).unwrap();
        assert!(
            dtypes(&model).iter().all(|&d| d == dtype),
            "{on:?}: the parameters stay {dtype:?}"
        );
    }
    let exact = !matches!(on, On::Wgpu);
    let expected = cpu.variables().unwrap();
    let mut moved = 0;
    for (i, ((f, e), s)) in params(&model).iter().zip(&expected).zip(&start).enumerate() {
        for (j, ((&a, &b), &s)) in f.iter().zip(e).zip(s).enumerate() {
            let ok = if precision.param_remainders {
                // the module holds the masters rounded to nearest
                (a - b).abs() <= one_ulp(b, element) / 2.0
            } else if exact {
                a.to_bits() == b.to_bits()
            } else {
                (a - b).abs() <= one_ulp(b, element)
            };
            assert!(
                ok,
                "{on:?} {dtype:?} {precision:?}: parameter {i} element {j}: fused {a}, CPU path {b}"
            );
            moved += usize::from(a != s);
        }
    }
    assert!(moved > 100, "{on:?} {dtype:?}: only {moved} elements moved");
    let opt = optim.optimizer().unwrap();
    assert_eq!(opt.precision().params, element);
    if precision.param_remainders {
        let masters = opt.variables().unwrap();
        assert_eq!(
            masters, expected,
            "{on:?}: the f32 masters, kept between steps"
        );
        let rounded = masters
            .iter()
            .flatten()
            .filter(|&&m| bf16::from_f32(m).to_f32() != m)
            .count();
        assert!(
            rounded > 100,
            "the masters hold more than bf16 ({rounded} of them)"
        );
    }
}

#[test]
fn half_modules_match_the_cpu_path_on_flex() {
    let precision = Precision::default();
    half_model_matches_the_cpu_path(On::Flex, DType::BF16, precision);
    half_model_matches_the_cpu_path(On::Flex, DType::F16, precision);
    half_model_matches_the_cpu_path(On::Flex, DType::BF16, precision.with_param_remainders());
    half_model_matches_the_cpu_path(On::Flex, DType::F16, precision.with_stochastic_rounding(5));
}

/// Burn's wgpu backend compiles WGSL, which has no bf16 (cubecl 0.11 refuses it): f16.
#[test]
fn half_modules_match_the_cpu_path_on_wgpu() {
    let precision = Precision::default();
    half_model_matches_the_cpu_path(On::Wgpu, DType::F16, precision);
    half_model_matches_the_cpu_path(On::Wgpu, DType::F16, precision.with_stochastic_rounding(5));
}

/// A module whose parameters are not all of one type, and an option its type cannot
/// take: refused, with nothing built.
#[test]
fn mixed_types_and_options_they_cannot_take_are_refused() {
    let (device, mut optim) = device_and_optimizer(On::Flex, RmsPropConfig::burn()).unwrap();
    let mut model = Mlp::new(&WIDTHS, &device);
    model.layers[0] = cast_module(model.layers[0].clone(), DType::F16);
    match &optim.bind(&model).unwrap_err() {
        Error::BurnParam {
            name,
            problem: BurnProblem::Dtype { what, .. },
        } => assert_eq!((name.as_str(), *what), ("layers.1.weight", "parameter")),
        e => panic!("{e}"),
    }
    assert!(optim.optimizer().is_none(), "nothing was built");
    let (device, optim) = device_and_optimizer(On::Flex, RmsPropConfig::burn()).unwrap();
    let mut optim = optim.with_precision(Precision::default().with_param_remainders());
    let model = cast_module(Mlp::new(&WIDTHS, &device), DType::F16);
    let e = optim.bind(&model).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field.contains("param_remainders")),
        "{e}"
    );
}
