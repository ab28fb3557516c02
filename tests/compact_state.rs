//! Compact slots (`StateStorage`: bf16, or int8 block-wise with dynamic code maps):
//! the backends agree (bytes identical where the f32 values are, within one code
//! otherwise), every stored value is the nearest code of the f32 value an f32
//! optimizer computes from the same state (a property over zero, tiny, huge and
//! non-finite gradients), non-finite elements stay in their element, tensors under the
//! threshold keep f32 slots, and the memory is what the format promises.

mod common;

use common::{combo, Rng};
use fused_rmsprop::{
    Backend, CodeMap, Error, GpuOptions, RmsProp, RmsPropConfig, Slot, StateDtype, StateStorage,
    Variable,
};
use proptest::prelude::*;

/// Tensors over and under the threshold (4096), odd lengths, one spanning many blocks.
fn model() -> Vec<Variable> {
    let mut rng = Rng(3);
    [("w", 9000usize), ("bias", 300), ("v", 4096), ("tail", 5003)]
        .iter()
        .map(|&(name, n)| Variable::new(name, &[n], rng.vec(n)).unwrap())
        .collect()
}

fn run(config: &RmsPropConfig, backend: Backend, gpu: &GpuOptions, steps: usize) -> RmsProp {
    let vars = model();
    let mut opt = RmsProp::with_options(config.clone(), vars.clone(), backend, gpu).unwrap();
    let mut rng = Rng(11);
    for k in 0..steps {
        let grads: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| rng.vec(v.values.len()).iter().map(|x| 2.0 * x).collect())
            .collect();
        let mut refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
        if k % 3 == 2 {
            refs[1] = None; // a missing gradient
        }
        opt.apply_gradients(&refs).unwrap();
    }
    opt
}

/// The largest gap between neighbouring finite values of `map` (the top decade).
fn max_gap(map: &CodeMap) -> f32 {
    let v = &map.values[..=map.max_finite as usize];
    v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
}

/// `a` and `b` (one slot of one tensor) differ by at most `codes` steps of the map in
/// every block of `block` elements (scaled by the block's largest magnitude).
fn within_codes(
    a: &[f32],
    b: &[f32],
    block: usize,
    map: &CodeMap,
    codes: f32,
) -> Result<(), String> {
    for (k, (x, y)) in a.chunks(block).zip(b.chunks(block)).enumerate() {
        let m = x
            .iter()
            .chain(y)
            .filter(|v| v.is_finite())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
            let ok = if p.is_nan() || q.is_nan() {
                p.is_nan() && q.is_nan()
            } else if p.is_infinite() || q.is_infinite() {
                p == q
            } else {
                (p - q).abs() <= codes * max_gap(map) * m * 1.0001 + 1e-30
            };
            if !ok {
                return Err(format!("block {k} [{j}]: {p} vs {q} (block max {m})"));
            }
        }
    }
    Ok(())
}

fn with_state(config: RmsPropConfig, dtype: StateDtype) -> RmsPropConfig {
    config.with_state(StateStorage::new(dtype))
}

/// Dynamic 8-bit state in blocks of `block_size`.
fn int8(block_size: usize) -> StateDtype {
    StateDtype::Dynamic8 { block_size }
}

#[test]
fn cpu_and_gpu_agree_on_every_option() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = common::on(&ctx);
    let mut failures = Vec::new();
    // every structural option appears: centered, momentum, the clips, EMA with
    // overwrite, accumulation, weight decay with loss scale
    for (k, dtype) in [
        (0, int8(256)),
        (3, int8(64)),
        (7, int8(256)),
        (19, StateDtype::Bf16),
        (43, int8(32)),
        (83, int8(128)),
        (127, int8(256)),
        (127, StateDtype::Bf16),
        (54, StateDtype::Bf16),
    ] {
        let config = with_state(combo(k), dtype);
        let block = dtype.block_size().unwrap_or(256);
        let cpu = run(&config, Backend::Cpu, &GpuOptions::default(), 7);
        let gpu = run(&config, Backend::Gpu, &gpu, 7);
        let (a, b) = (cpu.variables().unwrap(), gpu.variables().unwrap());
        for (t, (x, y)) in a.iter().zip(&b).enumerate() {
            for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
                if !common::trace::values_match(q, p) {
                    failures.push(format!("combo {k} {dtype}: param {t}[{j}] cpu {p} gpu {q}"));
                    break;
                }
            }
        }
        for slot in Slot::ALL {
            let (Some(a), Some(b)) = (cpu.slot(slot).unwrap(), gpu.slot(slot).unwrap()) else {
                continue;
            };
            for (t, (x, y)) in a.iter().zip(&b).enumerate() {
                let r = if dtype == StateDtype::Bf16 || x.len() < 4096 {
                    // bf16 (or f32): a unit of bf16 apart at most
                    x.iter().zip(y).try_for_each(|(&p, &q)| {
                        let ok = common::trace::values_match(q, p)
                            || (p - q).abs() <= p.abs().max(q.abs()) / 128.0;
                        ok.then_some(()).ok_or(format!("{p} vs {q}"))
                    })
                } else {
                    within_codes(x, y, block, CodeMap::for_slot(slot), 1.0)
                };
                if let Err(e) = r {
                    failures.push(format!(
                        "combo {k} {dtype}/{block}: {slot} of tensor {t}: {e}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Where the f32 values are the same on both backends (the velocity of a first step,
/// and accumulation: products and sums, correctly rounded on both), so are the stored
/// codes and scales.
#[test]
fn same_f32_values_store_the_same_bytes() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = common::on(&ctx);
    let config =
        with_state(RmsPropConfig::default(), int8(256)).with_gradient_accumulation_steps(4);
    // three accumulation steps, then the velocity of plain RMSprop's first step
    let plain = with_state(RmsPropConfig::default(), int8(64));
    for (config, steps, slot) in [(config, 3, Slot::Accumulator), (plain, 1, Slot::Velocity)] {
        let cpu = run(&config, Backend::Cpu, &GpuOptions::default(), steps);
        let gpu = run(&config, Backend::Gpu, &gpu, steps);
        let (a, b) = (
            cpu.slot(slot).unwrap().unwrap(),
            gpu.slot(slot).unwrap().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(x), bits(y), "{slot}");
            assert!(x.iter().any(|&v| v != 0.0));
        }
    }
}

/// Runs one step with compact state and the same step with f32 state started from the
/// compact state's decoded values: every stored value must be the f32 value within
/// half a code of the map (one code for bf16: a unit of rounding).
fn one_step_matches_f32(
    config: &RmsPropConfig,
    grads: &[Vec<f32>],
    state: &mut RmsProp,
    shadow: &mut RmsProp,
) -> Result<(), String> {
    let storage = config.state;
    for (i, v) in state.variables().unwrap().iter().enumerate() {
        shadow.set_variable(i, v).unwrap();
    }
    for slot in Slot::ALL {
        if let Some(values) = state.slot(slot).unwrap() {
            for (i, v) in values.iter().enumerate() {
                shadow.set_slot(slot, i, v).unwrap();
            }
        }
    }
    let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
    state.apply_gradients(&refs).unwrap();
    shadow.apply_gradients(&refs).unwrap();
    for slot in Slot::ALL {
        let (Some(q), Some(f)) = (state.slot(slot).unwrap(), shadow.slot(slot).unwrap()) else {
            continue;
        };
        for (t, (q, f)) in q.iter().zip(&f).enumerate() {
            let map = CodeMap::for_slot(slot);
            // an infinite signed slot is stored as NaN in int8 (documented)
            let f: Vec<f32> = f
                .iter()
                .map(|&x| {
                    if x.is_infinite()
                        && slot != Slot::Velocity
                        && matches!(storage.dtype, StateDtype::Dynamic8 { .. })
                    {
                        f32::NAN
                    } else {
                        x
                    }
                })
                .collect();
            let r = match storage.dtype {
                StateDtype::Dynamic8 { block_size } => within_codes(q, &f, block_size, map, 0.5),
                _ => q.iter().zip(&f).try_for_each(|(&a, &b)| {
                    let ok =
                        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= b.abs() / 256.0;
                    ok.then_some(()).ok_or(format!("{a} vs {b}"))
                }),
            };
            r.map_err(|e| format!("step {}: {slot} of tensor {t}: {e}", state.iterations()))?;
        }
    }
    Ok(())
}

/// Gradients of every magnitude: zero, tiny, ordinary, huge, and (rarely) NaN or
/// infinite.
fn gradient() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => Just(0.0f32),
        2 => -1e-30f32..1e-30,
        20 => -3.0f32..3.0,
        2 => -1e30f32..1e30,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0015),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stored_state_is_the_f32_state_within_the_map(
        grads in prop::collection::vec(prop::collection::vec(gradient(), 600), 12),
        block in prop::sample::select(vec![32usize, 64, 256]),
        bf16 in any::<bool>(),
        k in 0usize..128,
    ) {
        let dtype = if bf16 { StateDtype::Bf16 } else { int8(block) };
        let config = combo(k).with_state(StateStorage::new(dtype).with_min_size(500));
        let vars = vec![
            Variable::new("w", &[600], Rng(5).vec(600)).unwrap(),
            Variable::new("b", &[7], vec![0.5; 7]).unwrap(),
        ];
        let mut opt = RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
        let exact = config.clone().with_state(StateStorage::default());
        let mut shadow = RmsProp::with_backend(exact, vars, Backend::Cpu).unwrap();
        for g in &grads {
            let step = vec![g.clone(), vec![0.25; 7]];
            one_step_matches_f32(&config, &step, &mut opt, &mut shadow).map_err(TestCaseError::fail)?;
        }
    }
}

/// A NaN or an infinity in a gradient reaches only its own element's slots: the rest
/// of its block keeps the scale of its finite values.
#[test]
fn non_finite_elements_stay_in_their_element() {
    let config = RmsPropConfig::default()
        .with_momentum(0.9)
        .with_centered(true)
        .with_state(StateStorage::new(StateDtype::DYNAMIC8));
    let n = 4096;
    let var = || vec![Variable::new("w", &[n], vec![1.0; n]).unwrap()];
    let mut compact = RmsProp::with_backend(config.clone(), var(), Backend::Cpu).unwrap();
    let mut exact = RmsProp::with_backend(
        config.with_state(StateStorage::default()),
        var(),
        Backend::Cpu,
    )
    .unwrap();
    let mut rng = Rng(9);
    for step in 0..20 {
        let mut g = rng.vec(n);
        if step == 3 {
            g[10] = f32::NAN;
            g[700] = f32::INFINITY;
        }
        compact.apply_gradients(&[Some(&g)]).unwrap();
        exact.apply_gradients(&[Some(&g)]).unwrap();
    }
    let (p, e) = (
        &compact.variables().unwrap()[0],
        &exact.variables().unwrap()[0],
    );
    assert!(p[10].is_nan() && p[700].is_nan() && e[10].is_nan());
    let velocity = &compact.slot(Slot::Velocity).unwrap().unwrap()[0];
    assert!(velocity[10].is_nan());
    assert_eq!(velocity[700], f32::INFINITY);
    // everything else trains as f32 state does, within what int8 momentum costs, and
    // the two blocks holding the NaN and the infinity no worse than the clean ones
    let drift = |j: usize| (p[j] - e[j]).abs();
    let poisoned = |j: usize| j / 256 == 0 || j / 256 == 2;
    let clean = (0..n)
        .filter(|&j| !poisoned(j))
        .map(drift)
        .fold(0.0, f32::max);
    assert!(clean < 5e-3, "{clean}");
    for j in (0..n).filter(|&j| poisoned(j) && j != 10 && j != 700) {
        assert!(
            drift(j) <= 1.5 * clean,
            "[{j}]: {} vs {} (clean blocks: {clean})",
            p[j],
            e[j]
        );
    }
    assert!(velocity[11].is_finite() && velocity[701].is_finite() && velocity[11] > 0.0);
}

#[test]
fn small_tensors_keep_f32_and_memory_is_as_promised() {
    let n = 1 << 16;
    let vars = || {
        vec![
            Variable::new("w", &[n], Rng(1).vec(n)).unwrap(),
            Variable::new("b", &[100], vec![0.0; 100]).unwrap(),
        ]
    };
    let config = RmsPropConfig::default()
        .with_momentum(0.9)
        .with_centered(true);
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    for (backend, gpu) in backends {
        let bytes = |dtype| {
            let c = config.clone().with_state(StateStorage::new(dtype));
            let mut opt = RmsProp::with_options(c, vars(), backend, &gpu).unwrap();
            opt.apply_gradients(&[Some(&vec![0.5; n][..]), Some(&[1.0; 100][..])])
                .unwrap();
            // the bias (under the threshold) keeps exact f32 slots
            let f = RmsProp::with_options(config.clone(), vars(), backend, &gpu).map(|mut f| {
                f.apply_gradients(&[Some(&vec![0.5; n][..]), Some(&[1.0; 100][..])])
                    .unwrap();
                f.slot(Slot::Velocity).unwrap().unwrap()[1].clone()
            });
            assert_eq!(opt.slot(Slot::Velocity).unwrap().unwrap()[1], f.unwrap());
            opt.state_bytes() as f64
        };
        // three slots; small tensors and padding add a little
        let per_param = |dtype| bytes(dtype) / n as f64;
        let (f32s, bf16s, int8s) = (
            per_param(StateDtype::F32),
            per_param(StateDtype::Bf16),
            per_param(StateDtype::DYNAMIC8),
        );
        let overhead = 3.0 * 4.0 * 256.0 / n as f64 + 0.01;
        assert!((f32s - 12.0).abs() < overhead, "{backend:?} f32 {f32s}");
        assert!((bf16s - 6.0).abs() < overhead, "{backend:?} bf16 {bf16s}");
        assert!(
            (int8s - 3.0 * (1.0 + 4.0 / 256.0)).abs() < overhead,
            "{backend:?} int8 {int8s}"
        );
    }
}

#[test]
fn views_of_compact_slots_are_refused_and_runs_repeat() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = common::on(&ctx);
    let config = with_state(RmsPropConfig::default().with_momentum(0.5), int8(256));
    let a = run(&config, Backend::Gpu, &gpu, 5);
    let g = a.gpu().unwrap();
    assert!(matches!(
        g.slot_view(Slot::Momentum, 0),
        Err(Error::CompactSlot {
            index: 0,
            dtype: StateDtype::Dynamic8 { block_size: 256 },
            ..
        })
    ));
    // the bias keeps f32 slots: a view of them exists
    assert!(g.slot_view(Slot::Velocity, 1).is_ok());
    // the same run again stores the same values
    let b = run(&config, Backend::Gpu, &gpu, 5);
    assert_eq!(
        a.slot(Slot::Momentum).unwrap(),
        b.slot(Slot::Momentum).unwrap()
    );
    assert_eq!(a.variables().unwrap(), b.variables().unwrap());
}

#[test]
fn invalid_storage_is_a_typed_error() {
    let var = || vec![Variable::new("w", &[3], vec![1.0; 3]).unwrap()];
    for bad in [
        StateStorage::new(int8(48)),
        StateStorage::new(int8(1024)),
        StateStorage::new(int8(0)),
        StateStorage::new(StateDtype::DYNAMIC8).with_stochastic_rounding(1),
    ] {
        let e = RmsProp::with_backend(
            RmsPropConfig::default().with_state(bad),
            var(),
            Backend::Cpu,
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    }
}

/// A checkpoint keeps compact slots as they are stored (codes and scales, bf16 bits):
/// restored on either backend, the state is the same bits and training goes on the
/// same; a restore into other slot storage is refused with a typed error, changing
/// nothing.
#[test]
fn checkpoints_keep_compact_state_exactly() {
    let dir = std::env::temp_dir().join(format!("compact-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    for dtype in [int8(64), StateDtype::Bf16] {
        let config = with_state(combo(3 + 16), dtype);
        for (from, from_gpu) in &backends {
            let saved = run(&config, *from, from_gpu, 5);
            let path = dir.join(format!("{}.safetensors", dtype.as_str()));
            saved.save_checkpoint(&path).unwrap();
            for (to, to_gpu) in &backends {
                let mut restored = RmsProp::load_checkpoint(&path, *to, to_gpu).unwrap();
                for slot in Slot::ALL {
                    let bits = |o: &RmsProp| {
                        o.slot(slot)
                            .unwrap()
                            .map(|v| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>())
                    };
                    assert_eq!(
                        bits(&saved),
                        bits(&restored),
                        "{dtype} {slot} {from:?} -> {to:?}"
                    );
                }
                // a step on the restored optimizer is the step on the original (same backend)
                if to == from {
                    let mut original = run(&config, *from, from_gpu, 5);
                    let g: Vec<Vec<f32>> =
                        model().iter().map(|v| vec![0.3; v.values.len()]).collect();
                    let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
                    original.apply_gradients(&refs).unwrap();
                    restored.apply_gradients(&refs).unwrap();
                    assert_eq!(original.variables().unwrap(), restored.variables().unwrap());
                    assert_eq!(
                        original.slot(Slot::Velocity).unwrap(),
                        restored.slot(Slot::Velocity).unwrap()
                    );
                }
            }
            // other slot storage: refused, nothing changed
            for other in [
                StateStorage::default(),
                match dtype {
                    StateDtype::Dynamic8 { .. } => StateStorage::new(int8(128)),
                    StateDtype::F32 | StateDtype::Bf16 => {
                        StateStorage::new(dtype).with_stochastic_rounding(3)
                    }
                },
            ] {
                let mut opt = RmsProp::with_options(
                    combo(3 + 16).with_state(other),
                    model(),
                    *from,
                    from_gpu,
                )
                .unwrap();
                let before = opt.variables().unwrap();
                let e = opt.restore_checkpoint(&path).unwrap_err();
                assert!(matches!(e, Error::StateMismatch(_)), "{e}");
                assert_eq!(opt.variables().unwrap(), before);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// bf16 slots rounded stochastically keep small updates that rounding to nearest
/// loses: with rho 0.999 and a constant gradient the velocity climbs toward 1 by
/// 0.001 * (1 - v) a step, below half a bf16 unit past 0.5, where rounding to nearest
/// stalls; stochastic rounding follows the f32 velocity on average. Both backends draw
/// the same bits for the same f32 values (a seed's runs agree within one bf16 unit).
#[test]
fn stochastic_bf16_slots_keep_small_updates() {
    let n = 8192;
    let steps = 1500;
    let exact = 1.0 - 0.999f64.powi(steps);
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    let mut runs = Vec::new();
    for (backend, gpu) in &backends {
        let velocity = |storage: StateStorage| {
            let config = RmsPropConfig::default().with_rho(0.999).with_state(storage);
            let var = Variable::new("w", &[n], vec![0.0; n]).unwrap();
            let mut opt = RmsProp::with_options(config, vec![var], *backend, gpu).unwrap();
            let g = vec![1.0f32; n];
            for _ in 0..steps {
                opt.apply_gradients(&[Some(&g)]).unwrap();
            }
            opt.slot(Slot::Velocity).unwrap().unwrap().remove(0)
        };
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let nearest = velocity(StateStorage::new(StateDtype::Bf16));
        let stochastic = velocity(StateStorage::new(StateDtype::Bf16).with_stochastic_rounding(42));
        assert!(
            mean(&nearest) < exact - 0.2,
            "{backend:?}: nearest {} vs {exact}",
            mean(&nearest)
        );
        assert!(
            (mean(&stochastic) - exact).abs() < 0.01 * exact,
            "{backend:?}: {} vs {exact}",
            mean(&stochastic)
        );
        runs.push(stochastic);
    }
    if let [cpu, gpu] = runs.as_slice() {
        let close = cpu
            .iter()
            .zip(gpu)
            .filter(|(a, b)| (*a - *b).abs() <= a.abs() / 128.0)
            .count();
        assert_eq!(close, n, "a seed draws the same bits on both backends");
    }
}

/// Weight decay is applied with 8-bit state as with f32 state (bitsandbytes' 8-bit
/// RMSprop leaves it out of its update): with zero gradients the slots stay zero, so
/// every step is the decay alone: the same bits as with f32 state on the same backend,
/// and not a no-op.
#[test]
fn int8_state_keeps_weight_decay() {
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    for (backend, gpu) in &backends {
        let params = |state: StateDtype, decay: f64| {
            let config = RmsPropConfig::default()
                .with_weight_decay(decay)
                .with_state(StateStorage::new(state).with_min_size(16));
            let vars = model();
            let mut opt = RmsProp::with_options(config, vars.clone(), *backend, gpu).unwrap();
            let zeros: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.0; v.values.len()]).collect();
            let refs: Vec<Option<&[f32]>> = zeros.iter().map(|g| Some(&g[..])).collect();
            for _ in 0..3 {
                opt.apply_gradients(&refs).unwrap();
            }
            (
                opt.variables().unwrap().concat(),
                vars.iter()
                    .flat_map(|v| v.values.clone())
                    .collect::<Vec<f32>>(),
            )
        };
        let (int8, start) = params(StateDtype::DYNAMIC8, 0.1);
        let (f32s, _) = params(StateDtype::F32, 0.1);
        let (undecayed, _) = params(StateDtype::DYNAMIC8, 0.0);
        assert_eq!(
            undecayed, start,
            "{backend:?}: zero gradients, no decay: nothing moves"
        );
        let moved = int8.iter().zip(&start).filter(|(a, b)| a != b).count();
        assert!(
            moved > start.len() / 2,
            "{backend:?}: the decay moved {moved} parameters"
        );
        for (k, (a, b)) in int8.iter().zip(&f32s).enumerate() {
            // on one backend, the decay is the same arithmetic whatever the slots' format
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{backend:?}: parameter {k}: {a} with int8 state, {b} with f32"
            );
        }
    }
}

/// Both backends draw an element's stochastic rounding bits from its own index: one
/// step whose f32 velocity is exact on both (small integer gradients), so every bf16
/// slot must be the same bits, over a tensor the CPU codes in several passes.
#[test]
fn stochastic_bf16_slots_draw_the_same_bits_on_both_backends() {
    let Some(ctx) = common::gpu() else { return };
    let n = 5000;
    let config = RmsPropConfig::default()
        .with_state(StateStorage::new(StateDtype::Bf16).with_stochastic_rounding(7));
    let g: Vec<f32> = (0..n).map(|i| (i % 7 + 1) as f32).collect();
    let velocity = |backend: Backend, gpu: &GpuOptions| {
        let vars = vec![
            Variable::new("a", &[3], vec![0.0; 3]).unwrap(),
            Variable::new("w", &[n], vec![0.0; n]).unwrap(),
        ];
        let mut opt = RmsProp::with_options(config.clone(), vars, backend, gpu).unwrap();
        opt.apply_gradients(&[Some(&[1.0; 3]), Some(&g)]).unwrap();
        opt.slot(Slot::Velocity).unwrap().unwrap().remove(1)
    };
    let cpu = velocity(Backend::Cpu, &GpuOptions::default());
    let gpu = velocity(Backend::Gpu, &common::on(&ctx));
    let differ: Vec<usize> = (0..n)
        .filter(|&i| cpu[i].to_bits() != gpu[i].to_bits())
        .collect();
    assert!(
        differ.is_empty(),
        "{} elements differ, the first at {:?}",
        differ.len(),
        differ.first()
    );
    // the rounding is stochastic: equal f32 values do not all round the same way
    let sevens: Vec<u32> = (6..n).step_by(7).map(|i| cpu[i].to_bits()).collect();
    assert!(sevens.iter().any(|&b| b != sevens[0]));
}

/// The GPU's int8 encoding (a guess and two comparisons) gives the CPU's bytes on the
/// hardest values: every threshold of the map times the block's scale, one unit of f32
/// either side, zeros, NaN and infinities, at scales from tiny to huge. (The first
/// accumulation stores the gradient itself, so the accumulator is those values.)
#[test]
fn the_gpu_encodes_boundary_values_as_the_cpu_does() {
    let Some(ctx) = common::gpu() else { return };
    let map = CodeMap::signed();
    let mut values = Vec::new();
    for scale in [1.0f32, 3.1e-3, 7.7e12, 2.3e-30] {
        let mut block = vec![
            scale,
            -scale,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for &t in &map.thresholds[..map.max_finite as usize] {
            let x = t * scale;
            for y in [
                x,
                f32::from_bits(x.to_bits() + 1),
                f32::from_bits(x.to_bits().max(1) - 1),
            ] {
                if y.abs() <= scale {
                    block.push(y);
                }
            }
        }
        block.resize(block.len().next_multiple_of(256), 0.0);
        // the block's scale is `scale`: put it first in every block
        for chunk in block.chunks(256) {
            let mut chunk = chunk.to_vec();
            chunk[0] = scale;
            values.extend(chunk);
        }
    }
    let n = values.len();
    let config = RmsPropConfig::default()
        .with_gradient_accumulation_steps(2)
        .with_state(StateStorage::new(StateDtype::DYNAMIC8).with_min_size(256));
    let accumulated = |backend, gpu: &GpuOptions| {
        let var = Variable::new("w", &[n], vec![0.0; n]).unwrap();
        let mut opt = RmsProp::with_options(config.clone(), vec![var], backend, gpu).unwrap();
        opt.apply_gradients(&[Some(&values)]).unwrap();
        opt.slot(Slot::Accumulator).unwrap().unwrap().remove(0)
    };
    let cpu = accumulated(Backend::Cpu, &GpuOptions::default());
    let gpu = accumulated(Backend::Gpu, &common::on(&ctx));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&cpu), bits(&gpu));
    // and those bytes are the nearest codes: the values come back within half a code
    // (an infinite signed value as NaN)
    let expected: Vec<f32> = values
        .iter()
        .map(|&x| if x.is_infinite() { f32::NAN } else { x })
        .collect();
    within_codes(&cpu, &expected, 256, map, 0.5).unwrap();
    assert!(cpu[6] != values[6], "the accumulator holds codes, not f32");
}

/// Compact slots under steps the device decides (the non-finite guard, Keras'
/// `LossScaleOptimizer`): a skipped step leaves the codes alone, and both backends
/// agree, scale included.
#[test]
fn compact_state_with_device_decided_steps() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = common::on(&ctx);
    for dtype in [int8(256), StateDtype::Bf16] {
        let config = with_state(combo(3), dtype);
        let outcomes: Vec<(Vec<Vec<f32>>, f32, u64)> = [
            (Backend::Cpu, GpuOptions::default()),
            (Backend::Gpu, gpu.clone()),
        ]
        .into_iter()
        .map(|(backend, gpu)| {
            let inner = RmsProp::with_options(config.clone(), model(), backend, &gpu).unwrap();
            let mut lso = fused_rmsprop::LossScaleOptimizer::new(
                inner,
                fused_rmsprop::LossScaleConfig::default(),
            )
            .unwrap();
            let mut rng = Rng(4);
            let mut skipped_state = None;
            for step in 0..6 {
                let mut grads: Vec<Vec<f32>> =
                    model().iter().map(|v| rng.vec(v.values.len())).collect();
                if step == 3 {
                    grads[0][17] = f32::NAN;
                    lso.inner().synchronize().unwrap();
                    skipped_state = Some(lso.inner().slot(Slot::Velocity).unwrap().unwrap());
                }
                let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
                lso.apply_gradients(&refs).unwrap();
                if step == 3 {
                    lso.inner().synchronize().unwrap();
                    // the skipped step changed no code
                    assert_eq!(
                        Some(lso.inner().slot(Slot::Velocity).unwrap().unwrap()),
                        skipped_state,
                        "{backend:?} {dtype}"
                    );
                }
            }
            lso.inner().synchronize().unwrap();
            let scale = lso.loss_scale();
            let inner = lso.inner();
            (inner.variables().unwrap(), scale, inner.iterations())
        })
        .collect();
        let (cpu, gpu_run) = (&outcomes[0], &outcomes[1]);
        assert_eq!(
            (cpu.1, cpu.2),
            (gpu_run.1, gpu_run.2),
            "{dtype}: scale and iterations"
        );
        for (x, y) in cpu.0.iter().flatten().zip(gpu_run.0.iter().flatten()) {
            assert!(common::trace::values_match(*y, *x), "{dtype}: {x} vs {y}");
        }
    }
}

/// `finalize_variable_values` with compact slots assigns each parameter its decoded
/// EMA, on both backends alike, and the 16-bit parameter copy follows.
#[test]
fn finalize_assigns_the_decoded_ema_and_refreshes_the_copy() {
    use fused_rmsprop::{Dtype, Precision};
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    let config = with_state(
        RmsPropConfig::default()
            .with_use_ema(true)
            .with_ema_momentum(0.5),
        int8(256),
    );
    for (backend, gpu) in backends {
        let precision = Precision::default().with_param_copy(Dtype::Bf16);
        let mut opt =
            RmsProp::with_precision(config.clone(), model(), backend, &gpu, precision).unwrap();
        let mut rng = Rng(8);
        for _ in 0..4 {
            let g: Vec<Vec<f32>> = model().iter().map(|v| rng.vec(v.values.len())).collect();
            let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
            opt.apply_gradients(&refs).unwrap();
        }
        let ema = opt.slot(Slot::Ema).unwrap().unwrap();
        opt.finalize_variable_values().unwrap();
        assert_eq!(opt.variables().unwrap(), ema, "{backend:?}");
        let copies = opt.variable_copies().unwrap();
        for (c, v) in copies.iter().flatten().zip(ema.iter().flatten()) {
            assert_eq!(
                *c,
                fused_rmsprop::half::bf16::from_f32(*v).to_f32(),
                "{backend:?}"
            );
        }
    }
}
