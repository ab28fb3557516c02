//! GPU-vs-CPU parity: every option combination on random models, many tensors of
//! mixed sizes (0, 1, not multiples of 4), missing gradients, a split arena, more
//! than 65,535 workgroups, and an arena over lavapipe's 128 MiB binding limit.
//! The CPU path is the oracle (it runs `math.rs`, which the WGSL mirrors).

mod common;

use common::combo;
use common::trace::values_match;
use common::Rng;
use fused_rmsprop::gpu::GpuOptions;
use fused_rmsprop::{Backend, GpuContext, RmsProp, RmsPropConfig, Slot, Variable};

fn random_model(rng: &mut Rng, tensors: usize, max_len: u64) -> Vec<Variable> {
    (0..tensors)
        .map(|i| {
            let n = match rng.below(6) {
                0 => 0,
                1 => 1,
                _ => rng.below(max_len) as usize,
            };
            let name = if i % 3 == 0 {
                format!("t{i}/bias")
            } else {
                format!("t{i}/kernel")
            };
            Variable::new(name, &[n], rng.vec(n)).unwrap()
        })
        .collect()
}

/// Runs the same steps on both backends and compares variables and every slot.
fn compare(
    config: RmsPropConfig,
    vars: Vec<Variable>,
    gpu: &GpuOptions,
    steps: usize,
    missing_rate: u64,
    seed: u64,
) -> Result<(), String> {
    let mut cpu = RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
    let mut gpu = RmsProp::with_options(config.clone(), vars.clone(), Backend::Gpu, gpu).unwrap();
    cpu.exclude_from_weight_decay(&["bias"]);
    gpu.exclude_from_weight_decay(&["bias"]);
    let mut rng = Rng(seed);
    for _ in 0..steps {
        let grads: Vec<Option<Vec<f32>>> = vars
            .iter()
            .map(|v| {
                if missing_rate > 0 && rng.below(missing_rate) == 0 {
                    None
                } else {
                    Some(rng.vec(v.values.len()).iter().map(|x| 3.0 * x).collect())
                }
            })
            .collect();
        let mut refs: Vec<Option<&[f32]>> = grads.iter().map(|g| g.as_deref()).collect();
        if refs.iter().all(Option::is_none) {
            refs[0] = Some(&vars[0].values);
        }
        cpu.apply_gradients(&refs).unwrap();
        gpu.apply_gradients(&refs).unwrap();
    }
    assert_eq!(cpu.iterations(), gpu.iterations());
    let mut roles = vec![None];
    roles.extend(Slot::ALL.map(Some));
    for role in roles {
        let (a, b) = match role {
            None => (
                Some(cpu.variables().unwrap()),
                Some(gpu.variables().unwrap()),
            ),
            Some(slot) => (cpu.slot(slot).unwrap(), gpu.slot(slot).unwrap()),
        };
        let role = role.map_or("params", Slot::keras_name);
        assert_eq!(a.is_some(), b.is_some(), "{role} kept on one backend only");
        let (Some(a), Some(b)) = (a, b) else { continue };
        for (t, (x, y)) in a.iter().zip(&b).enumerate() {
            for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
                if !values_match(q, p) {
                    return Err(format!(
                        "{role} of tensor {t} (len {}) [{j}]: gpu {q} vs cpu {p}",
                        x.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

fn options(ctx: &GpuContext) -> GpuOptions {
    common::on(ctx)
}

#[test]
fn every_option_combination_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(7);
    let mut failures = Vec::new();
    for k in 0..128 {
        let vars = random_model(&mut rng, 5, 3000);
        if let Err(e) = compare(combo(k), vars, &options(&ctx), 5, 4, 100 + k as u64) {
            failures.push(format!(
                "combo {k} ({:?}): {e}",
                combo(k).to_keras_json().unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn thousand_mixed_tensors_with_missing_gradients() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(11);
    let vars = random_model(&mut rng, 1200, 700);
    assert!(vars.iter().any(|v| v.values.is_empty()));
    assert!(vars.iter().any(|v| v.values.len() == 1));
    for k in [0, 2 + 8 + 16 + 64, 1 + 4 + 32] {
        compare(combo(k), vars.clone(), &options(&ctx), 4, 5, 3).unwrap();
    }
}

#[test]
fn split_arena_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(13);
    // tensors larger than a segment, spanning several
    let vars = random_model(&mut rng, 40, 20_000);
    let gpu = GpuOptions {
        max_segment_len: Some(4096 + 7),
        ..options(&ctx)
    };
    let opt = RmsProp::with_options(combo(0), vars.clone(), Backend::Gpu, &gpu).unwrap();
    let segments = opt.gpu().unwrap().segment_count();
    assert!(
        segments > 10,
        "expected a split arena, got {segments} segment(s)"
    );
    for k in [0, 1 + 2 + 4 + 16, 8 + 32 + 64, 3 + 8 + 16 + 32 + 64] {
        compare(combo(k), vars.clone(), &gpu, 4, 6, 5).unwrap();
    }
}

#[test]
fn more_than_65535_workgroups() {
    let Some(ctx) = common::gpu() else { return };
    // 70,000 tiny tensors: one chunk (one workgroup) each
    let vars: Vec<Variable> = (0..70_000)
        .map(|i| Variable::new(format!("v{i}"), &[1 + i % 3], vec![0.5; 1 + i % 3]).unwrap())
        .collect();
    let opt = RmsProp::with_options(combo(0), vars.clone(), Backend::Gpu, &options(&ctx)).unwrap();
    assert!(opt.gpu().unwrap().workgroups_per_pass() > 65_535);
    drop(opt);
    compare(combo(8 + 2), vars, &options(&ctx), 2, 0, 9).unwrap();
}

#[test]
fn arena_over_the_storage_binding_limit() {
    let Some(ctx) = common::gpu() else { return };
    let limit = ctx.device.limits().max_storage_buffer_binding_size;
    // one tensor whose parameters alone exceed one binding (capped for huge limits)
    let n = ((limit / 4) as usize + 1_000_003).min(40_000_000);
    if (n as u64) * 4 <= limit {
        eprintln!("binding limit {limit} B is larger than this test's 160 MB model; it still runs");
    }
    let mut rng = Rng(17);
    let vars = vec![
        Variable::new("big", &[n], rng.vec(n)).unwrap(),
        Variable::new("small/bias", &[3], vec![1.0, 2.0, 3.0]).unwrap(),
    ];
    let config = combo(2 + 8); // momentum + global clipnorm
    let opt =
        RmsProp::with_options(config.clone(), vars.clone(), Backend::Gpu, &options(&ctx)).unwrap();
    let segments = opt.gpu().unwrap().segment_count();
    drop(opt);
    if (n as u64) * 8 > limit {
        assert!(
            segments >= 2,
            "{n} elements with 2 slots should not fit one binding of {limit} B"
        );
    }
    compare(config, vars, &options(&ctx), 2, 0, 21).unwrap();
}

#[test]
fn large_tensors_reduced_cooperatively_match_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(23);
    // 300,000 elements = 147 chunks: summed by the whole finalize workgroup
    let mut vars = random_model(&mut rng, 6, 500);
    vars.insert(
        2,
        Variable::new("big/kernel", &[600, 500], rng.vec(300_000)).unwrap(),
    );
    vars.push(Variable::new("big2/kernel", &[140_000], rng.vec(140_000)).unwrap());
    for k in [4, 8, 4 + 2 + 32, 8 + 1 + 16 + 64] {
        compare(combo(k), vars.clone(), &options(&ctx), 3, 5, 29).unwrap();
    }
}

/// PyTorch's, optax's and Burn's formulas with the options the dialects share with
/// Keras (clipping, EMA, accumulation, compact state, loss scale factor): the same
/// results on both backends.
#[test]
fn every_dialect_with_the_shared_options_matches_cpu() {
    use fused_rmsprop::{StateDtype, StateStorage};
    let Some(ctx) = common::gpu() else { return };
    let dialects = [
        RmsPropConfig::torch()
            .with_momentum(0.9)
            .with_centered(true)
            .with_weight_decay(0.05)
            .with_maximize(true),
        RmsPropConfig::optax(0.01)
            .with_momentum(0.8)
            .with_nesterov(true)
            .with_centered(true)
            .with_bias_correction(true)
            .with_initial_scale(0.5)
            .with_weight_decay(0.01),
        RmsPropConfig::optax(0.01).with_eps_in_sqrt(false),
        RmsPropConfig::burn().with_weight_decay(0.05),
    ];
    let shared: [fn(RmsPropConfig) -> RmsPropConfig; 7] = [
        |c| c,
        |c| c.with_clipnorm(0.5),
        |c| c.with_global_clipnorm(1.0),
        |c| c.with_use_ema(true).with_ema_overwrite_frequency(2),
        |c| {
            c.with_gradient_accumulation_steps(2)
                .with_loss_scale_factor(4.0)
        },
        |c| c.with_state(StateStorage::new(StateDtype::DYNAMIC8).with_min_size(64)),
        |c| c.with_state(StateStorage::new(StateDtype::Bf16).with_min_size(64)),
    ];
    let mut rng = Rng(17);
    let mut failures = Vec::new();
    for (d, dialect) in dialects.iter().enumerate() {
        for (k, with) in shared.iter().enumerate() {
            let config = with(dialect.clone());
            let vars = random_model(&mut rng, 6, 3000);
            if let Err(e) = compare(
                config,
                vars,
                &options(&ctx),
                6,
                4,
                500 + 10 * d as u64 + k as u64,
            ) {
                failures.push(format!("dialect {d}, shared option {k}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
