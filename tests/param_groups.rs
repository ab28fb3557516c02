//! Param groups: tensors with their own learning rate, `rho`, epsilon, momentum, weight
//! decay or frozen, all in one optimizer (one dispatch per step on the GPU), against
//! reference runs of one optimizer per group; frozen tensors; the typed errors; the
//! JSON of every dialect; checkpoints keep the groups.

mod common;

use std::sync::Arc;

use common::Rng;
use fused_rmsprop::gpu::GpuOptions;
use fused_rmsprop::{
    Backend, Error, ExponentialDecay, KerasSchedule, LearningRate, LearningRateSchedule,
    ParamGroup, RmsProp, RmsPropConfig, Slot, StateDtype, StateStorage, Variable,
};

/// Tensor sizes: empty, one element, odd sizes, and tensors of several chunks on both
/// backends (32,768 elements per CPU chunk, 8,192 per GPU chunk).
const SIZES: [usize; 9] = [5, 0, 1, 37, 1000, 9000, 40_000, 3, 64];

fn model(seed: u64) -> Vec<Variable> {
    let mut rng = Rng(seed);
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let name = if i % 4 == 1 {
                format!("t{i}/bias")
            } else {
                format!("t{i}/kernel")
            };
            Variable::new(name, &[n], rng.vec(n)).unwrap()
        })
        .collect()
}

/// The group of each tensor of [`model`] in `config` (0: none; `g`: `param_groups[g - 1]`).
fn group_of(config: &RmsPropConfig, vars: &[Variable]) -> Vec<usize> {
    vars.iter()
        .map(|v| {
            config
                .param_groups
                .iter()
                .position(|g| g.variables.contains(&v.spec.name))
                .map_or(0, |g| g + 1)
        })
        .collect()
}

/// The config's learning rate times `m`, as the plan computes a multiplier (in f64).
#[derive(Debug)]
struct Scaled(LearningRate, f64);

impl LearningRateSchedule for Scaled {
    fn learning_rate(&self, step: u64) -> f64 {
        let base = match &self.0 {
            LearningRate::Constant(x) => *x,
            LearningRate::Keras(s) => s.at(step),
            LearningRate::Custom(s) => s.learning_rate(step),
        };
        base * self.1
    }
}

/// The config one group's tensors would have alone: no groups, the group's numbers.
fn alone(config: &RmsPropConfig, group: usize) -> RmsPropConfig {
    let mut c = RmsPropConfig {
        param_groups: Vec::new(),
        ..config.clone()
    };
    if group == 0 {
        return c;
    }
    let g = &config.param_groups[group - 1];
    if let Some(lr) = &g.learning_rate {
        c.learning_rate = lr.clone();
    }
    if let Some(m) = g.learning_rate_multiplier {
        c.learning_rate = LearningRate::Custom(Arc::new(Scaled(config.learning_rate.clone(), m)));
    }
    c.rho = g.rho.unwrap_or(c.rho);
    c.epsilon = g.epsilon.unwrap_or(c.epsilon);
    c.momentum = g.momentum.unwrap_or(c.momentum);
    match g.weight_decay {
        Some(0.0) => c.weight_decay = None,
        Some(wd) => c.weight_decay = Some(wd),
        None => {}
    }
    c
}

/// Step `k`'s gradients: every tensor but a few missing ones, every group with one.
fn gradients(
    vars: &[Variable],
    groups: &[usize],
    rng: &mut Rng,
    k: usize,
) -> Vec<Option<Vec<f32>>> {
    let mut grads: Vec<Option<Vec<f32>>> = vars
        .iter()
        .enumerate()
        .map(|(t, v)| {
            (!(t + k).is_multiple_of(5))
                .then(|| rng.vec(v.values.len()).iter().map(|x| 2.0 * x).collect())
        })
        .collect();
    for g in groups {
        let members: Vec<usize> = (0..vars.len()).filter(|&t| groups[t] == *g).collect();
        if members.iter().all(|&t| grads[t].is_none()) {
            let t = members[0];
            grads[t] = Some(vec![0.5; vars[t].values.len()]);
        }
    }
    grads
}

/// The variables and every slot after `steps` steps.
type Outcome = Vec<(String, Vec<Vec<f32>>)>;

fn outcome(opt: &RmsProp) -> Outcome {
    let mut out = vec![("params".to_string(), opt.variables().unwrap())];
    for slot in Slot::ALL {
        if let Some(values) = opt.slot(slot).unwrap() {
            out.push((slot.keras_name().to_string(), values));
        }
    }
    out
}

fn refs(grads: &[Option<Vec<f32>>]) -> Vec<Option<&[f32]>> {
    grads.iter().map(|g| g.as_deref()).collect()
}

/// Runs `config` with its groups in one optimizer, and each group alone; returns both
/// outcomes in the model's tensor order.
fn grouped_and_alone(
    config: &RmsPropConfig,
    backend: Backend,
    gpu: &GpuOptions,
    steps: usize,
) -> (Outcome, Outcome) {
    let vars = model(7);
    let groups = group_of(config, &vars);
    let build = |c: RmsPropConfig, v: Vec<Variable>| {
        let mut opt = RmsProp::with_options(c, v, backend, gpu).unwrap();
        opt.exclude_from_weight_decay(&["bias"]);
        opt
    };
    let mut one = build(config.clone(), vars.clone());
    let mut distinct: Vec<usize> = groups.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut alones: Vec<(Vec<usize>, RmsProp)> = distinct
        .iter()
        .map(|&g| {
            let members: Vec<usize> = (0..vars.len()).filter(|&t| groups[t] == g).collect();
            let v = members.iter().map(|&t| vars[t].clone()).collect();
            (members, build(alone(config, g), v))
        })
        .collect();
    let mut rng = Rng(99);
    for k in 0..steps {
        let grads = gradients(&vars, &groups, &mut rng, k);
        one.apply_gradients(&refs(&grads)).unwrap();
        for (members, opt) in &mut alones {
            let mine: Vec<Option<&[f32]>> = members.iter().map(|&t| grads[t].as_deref()).collect();
            if config
                .param_groups
                .iter()
                .enumerate()
                .any(|(g, group)| group.frozen && groups[members[0]] == g + 1)
            {
                continue; // a frozen group alone: no step at all
            }
            opt.apply_gradients(&mine).unwrap();
        }
    }
    // the groups' outcomes put back in tensor order
    let grouped = outcome(&one);
    let mut together: Outcome = grouped
        .iter()
        .map(|(role, values)| (role.clone(), vec![Vec::new(); values.len()]))
        .collect();
    for (members, opt) in &alones {
        for ((role, values), (_, all)) in outcome(opt).into_iter().zip(&mut together) {
            assert_eq!(&role, &all_role(&grouped, &role));
            for (k, &t) in members.iter().enumerate() {
                all[t] = values[k].clone();
            }
        }
    }
    (grouped, together)
}

fn all_role(outcome: &Outcome, role: &str) -> String {
    outcome
        .iter()
        .find(|(r, _)| r == role)
        .map(|(r, _)| r.clone())
        .unwrap_or_else(|| panic!("{role} is kept alone but not in the grouped run"))
}

fn assert_bits_equal(a: &Outcome, b: &Outcome, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: slots kept");
    for ((role, x), (_, y)) in a.iter().zip(b) {
        for (t, (p, q)) in x.iter().zip(y).enumerate() {
            assert_eq!(p.len(), q.len(), "{what}: {role} of tensor {t}");
            for (j, (u, v)) in p.iter().zip(q).enumerate() {
                assert!(
                    u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan()),
                    "{what}: {role} of tensor {t}[{j}]: grouped {u} vs alone {v}"
                );
            }
        }
    }
}

fn names(idx: &[usize]) -> Vec<String> {
    let vars = model(7);
    idx.iter().map(|&t| vars[t].spec.name.clone()).collect()
}

/// Configs whose groups change every number a group may change, in every dialect,
/// with the shared options (schedules, EMA, clipping, accumulation, compact state).
fn grouped_configs() -> Vec<(&'static str, RmsPropConfig)> {
    let schedule = KerasSchedule::Exponential(ExponentialDecay {
        initial_learning_rate: 0.01,
        decay_steps: 3.0,
        decay_rate: 0.7,
        staircase: false,
        name: "ExponentialDecay".into(),
    });
    vec![
        (
            "keras: schedule, centered momentum, decoupled decay, EMA, clipnorm",
            RmsPropConfig::default()
                .with_learning_rate(schedule)
                .with_centered(true)
                .with_momentum(0.9)
                .with_weight_decay(0.02)
                .with_use_ema(true)
                .with_ema_momentum(0.8)
                .with_ema_overwrite_frequency(3)
                .with_clipnorm(1.5)
                .with_param_group(
                    ParamGroup::new(names(&[0, 1, 2]))
                        .with_learning_rate_multiplier(0.5)
                        .with_rho(0.7)
                        .with_weight_decay(0.0),
                )
                .with_param_group(
                    ParamGroup::new(names(&[4, 6]))
                        .with_learning_rate(0.003)
                        .with_epsilon(1e-3)
                        .with_momentum(0.5),
                )
                .with_param_group(ParamGroup::new(names(&[5])).frozen()),
        ),
        (
            "torch: momentum, L2 decay, maximize, clipvalue",
            RmsPropConfig::torch()
                .with_momentum(0.9)
                .with_weight_decay(0.01)
                .with_maximize(true)
                .with_clipvalue(0.8)
                .with_param_group(
                    ParamGroup::new(names(&[0, 3]))
                        .with_learning_rate(0.1)
                        .with_rho(0.9)
                        .with_epsilon(1e-4),
                )
                .with_param_group(ParamGroup::new(names(&[6])).with_weight_decay(0.0))
                .with_param_group(
                    ParamGroup::new(names(&[1, 5, 7]))
                        .with_momentum(0.3)
                        .with_weight_decay(0.1),
                ),
        ),
        (
            "optax: nesterov, bias correction per group rho, int8 state, accumulation",
            RmsPropConfig::optax(0.02)
                .with_momentum(0.9)
                .with_nesterov(true)
                .with_bias_correction(true)
                .with_centered(true)
                .with_gradient_accumulation_steps(2)
                .with_loss_scale_factor(4.0)
                .with_state(StateStorage::new(StateDtype::DYNAMIC8).with_min_size(64))
                .with_param_group(ParamGroup::new(names(&[4, 2])).with_rho(0.5))
                .with_param_group(
                    ParamGroup::new(names(&[6, 8]))
                        .with_learning_rate_multiplier(3.0)
                        .with_weight_decay(0.05),
                )
                .with_param_group(ParamGroup::new(names(&[0])).frozen()),
        ),
        (
            "burn: bf16 state, no decay in the config, a group with decay",
            RmsPropConfig::burn()
                .with_state(StateStorage::new(StateDtype::Bf16).with_min_size(64))
                .with_param_group(
                    ParamGroup::new(names(&[3, 4, 5]))
                        .with_weight_decay(0.2)
                        .with_learning_rate(0.05),
                ),
        ),
    ]
}

#[test]
fn groups_in_one_optimizer_are_each_group_alone_on_cpu() {
    for (what, config) in grouped_configs() {
        let (grouped, alone) = grouped_and_alone(&config, Backend::Cpu, &GpuOptions::default(), 7);
        assert_bits_equal(&grouped, &alone, what);
    }
}

#[test]
fn groups_in_one_dispatch_are_each_group_alone_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = common::on(&ctx);
    for (what, config) in grouped_configs() {
        let (grouped, alone) = grouped_and_alone(&config, Backend::Gpu, &gpu, 7);
        assert_bits_equal(&grouped, &alone, what);
        // and the GPU agrees with the CPU
        let (cpu, _) = grouped_and_alone(&config, Backend::Cpu, &GpuOptions::default(), 7);
        for ((role, g), (_, c)) in grouped.iter().zip(&cpu) {
            for (t, (x, y)) in g.iter().zip(c).enumerate() {
                for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
                    assert!(
                        common::trace::values_match(p, q),
                        "{what}: {role} of tensor {t}[{j}]: gpu {p} vs cpu {q}"
                    );
                }
            }
        }
        // the groups cost no dispatch
        let vars = model(7);
        let with = RmsProp::with_options(config.clone(), vars.clone(), Backend::Gpu, &gpu).unwrap();
        let without = RmsProp::with_options(
            RmsPropConfig {
                param_groups: Vec::new(),
                ..config.clone()
            },
            vars,
            Backend::Gpu,
            &gpu,
        )
        .unwrap();
        assert_eq!(
            with.gpu().unwrap().dispatches_per_step(),
            without.gpu().unwrap().dispatches_per_step(),
            "{what}"
        );
    }
}

/// A frozen tensor: nothing of it moves (parameters, every slot, the EMA), and its
/// gradient counts nowhere: not in the global norm, not in the non-finite guard.
fn frozen_tensors_take_no_part(backend: Backend, gpu: &GpuOptions) {
    let vars = model(3);
    let frozen = [2usize, 6];
    let config = RmsPropConfig::default()
        .with_momentum(0.5)
        .with_centered(true)
        .with_use_ema(true)
        .with_global_clipnorm(0.5)
        .with_gradient_accumulation_steps(2)
        .with_param_group(ParamGroup::new(names(&frozen)).frozen());
    let run = |frozen_grads: Option<f32>| {
        let mut opt = RmsProp::with_options(config.clone(), vars.clone(), backend, gpu).unwrap();
        opt.set_non_finite_guard(true).unwrap();
        let mut rng = Rng(5);
        for _ in 0..6 {
            let grads: Vec<Option<Vec<f32>>> = vars
                .iter()
                .enumerate()
                .map(|(t, v)| match (frozen.contains(&t), frozen_grads) {
                    (true, None) => None,
                    (true, Some(x)) => Some(vec![x; v.values.len()]),
                    (false, _) => Some(rng.vec(v.values.len())),
                })
                .collect();
            opt.apply_gradients(&refs(&grads)).unwrap();
        }
        assert_eq!(opt.raw_iterations(), 6, "no step was skipped");
        outcome(&opt)
    };
    let without = run(None);
    for given in [1e6, f32::NAN, f32::INFINITY] {
        assert_bits_equal(
            &run(Some(given)),
            &without,
            &format!("frozen gradients {given}"),
        );
    }
    for (role, values) in &without {
        for &t in &frozen {
            let start = if role == "params" {
                vars[t].values.clone()
            } else {
                vec![0.0; vars[t].values.len()]
            };
            assert_eq!(values[t], start, "{role} of frozen tensor {t} moved");
        }
    }
    // the others did move
    assert_ne!(without[0].1[4], vars[4].values);
}

#[test]
fn frozen_tensors_take_no_part_on_cpu() {
    frozen_tensors_take_no_part(Backend::Cpu, &GpuOptions::default());
}

#[test]
fn frozen_tensors_take_no_part_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    frozen_tensors_take_no_part(Backend::Gpu, &common::on(&ctx));
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn bad_groups_are_typed_errors_that_name_the_group() {
    let vars = model(1);
    let build = |c: RmsPropConfig| RmsProp::with_backend(c, vars.clone(), Backend::Cpu).map(|_| ());
    let cases = [
        (
            RmsPropConfig::default().with_param_group(ParamGroup::new(["t0/kernel", "nope"])),
            "param_groups[0].variables",
        ),
        (
            RmsPropConfig::default()
                .with_param_group(ParamGroup::new(["t0/kernel"]))
                .with_param_group(ParamGroup::new(["t0/kernel"])),
            "param_groups[1].variables",
        ),
        (
            RmsPropConfig::default()
                .with_param_group(ParamGroup::new(["t0/kernel"]).with_momentum(0.9)),
            "param_groups[0].momentum",
        ),
        (
            RmsPropConfig::torch()
                .with_momentum(0.9)
                .with_param_group(ParamGroup::new(["t0/kernel"]).with_momentum(0.0)),
            "param_groups[0].momentum",
        ),
        (
            RmsPropConfig::default().with_param_group(
                ParamGroup::new(["t0/kernel"])
                    .with_learning_rate(0.1)
                    .with_learning_rate_multiplier(2.0),
            ),
            "param_groups[0].learning_rate",
        ),
        (
            RmsPropConfig::torch().with_param_group(ParamGroup::new(["t0/kernel"]).with_rho(-0.5)),
            "param_groups[0].rho",
        ),
        (
            RmsPropConfig::default()
                .with_param_group(ParamGroup::new(["t0/kernel"]).with_epsilon(f64::NAN)),
            "param_groups[0].epsilon",
        ),
        (
            RmsPropConfig::default().with_param_group(ParamGroup::new(Vec::<String>::new())),
            "param_groups[0].variables",
        ),
    ];
    for (config, field) in cases {
        let err = build(config).unwrap_err();
        let text = err.to_string();
        assert_eq!(field_of(err), field, "{text}");
    }
}

#[test]
fn groups_round_trip_through_every_dialects_json() {
    let group = || {
        ParamGroup::new(["a", "b"])
            .with_learning_rate(0.25)
            .with_rho(0.5)
            .with_epsilon(1e-3)
            .with_weight_decay(0.0)
    };
    let configs = [
        RmsPropConfig::default().with_param_group(group().frozen()),
        RmsPropConfig::torch()
            .with_momentum(0.9)
            .with_param_group(group().with_momentum(0.5))
            .with_param_group(ParamGroup::new(["c"]).with_learning_rate_multiplier(0.1)),
        RmsPropConfig::optax(0.1).with_param_group(group()),
        RmsPropConfig::burn().with_param_group(group().with_momentum(0.1)),
    ];
    for c in configs {
        let json = c.to_json().unwrap();
        let back = RmsPropConfig::from_json(&json).unwrap();
        assert_eq!(back.param_groups, c.param_groups, "{json}");
        assert_eq!(back.to_json().unwrap(), json);
    }
    // PyTorch's names, as a param_groups entry has them
    let torch = RmsPropConfig::torch().with_param_group(group());
    assert_eq!(
        torch.to_json().unwrap()["param_groups"],
        serde_json::json!([{"variables": ["a", "b"], "lr": 0.25, "alpha": 0.5, "eps": 0.001, "weight_decay": 0.0}])
    );
    // Keras' get_config() is unchanged without groups, and says them at the end with
    let keras = RmsPropConfig::default().with_param_group(group());
    let json = keras.to_keras_json().unwrap();
    assert_eq!(
        json.as_object().unwrap().keys().next_back().unwrap(),
        "param_groups"
    );
    assert_eq!(json["param_groups"][0]["learning_rate"], 0.25);
    assert_eq!(
        RmsPropConfig::from_keras_json(&json).unwrap().param_groups,
        keras.param_groups
    );
    assert!(RmsPropConfig::default()
        .to_keras_json()
        .unwrap()
        .get("param_groups")
        .is_none());
    // a group key of another dialect is refused, naming it
    let wrong =
        serde_json::json!({"dialect": "torch", "param_groups": [{"variables": ["a"], "rho": 0.5}]});
    let err = RmsPropConfig::from_json(&wrong).unwrap_err();
    assert!(err.to_string().contains("param_groups[0].rho"), "{err}");
}

#[test]
fn checkpoints_keep_the_groups_and_refuse_other_groups() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-groups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("groups.safetensors");
    let vars = model(11);
    let config = RmsPropConfig::torch()
        .with_momentum(0.9)
        .with_param_group(ParamGroup::new(names(&[0, 4])).with_learning_rate(0.1))
        .with_param_group(ParamGroup::new(names(&[6])).frozen());
    let groups = group_of(&config, &vars);
    let mut rng = Rng(1);
    let mut a = RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
    for k in 0..3 {
        a.apply_gradients(&refs(&gradients(&vars, &groups, &mut rng, k)))
            .unwrap();
    }
    a.save_checkpoint(&path).unwrap();
    let mut b = RmsProp::load_checkpoint(&path, Backend::Cpu, &GpuOptions::default()).unwrap();
    assert_eq!(b.config(), &config);
    for k in 3..6 {
        let g = gradients(&vars, &groups, &mut rng, k);
        a.apply_gradients(&refs(&g)).unwrap();
        b.apply_gradients(&refs(&g)).unwrap();
    }
    assert_bits_equal(&outcome(&a), &outcome(&b), "resumed");
    // into other groups: refused, nothing changes
    let other = RmsPropConfig {
        param_groups: vec![ParamGroup::new(names(&[0, 4])).with_learning_rate(0.2)],
        ..config.clone()
    };
    let mut c = RmsProp::with_backend(other, vars.clone(), Backend::Cpu).unwrap();
    let before = outcome(&c);
    assert!(c.restore_checkpoint(&path).is_err());
    assert_bits_equal(&outcome(&c), &before, "refused restore");
    assert_eq!(c.iterations(), 0);
    std::fs::remove_dir_all(&dir).ok();
}
