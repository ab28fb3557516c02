//! The CPU path gives the same bits at every instruction-set level this processor
//! supports (baseline, AVX2, AVX-512): every structural option combination, odd tensor
//! lengths, empty and scalar tensors, NaN and infinities in gradients, missing
//! gradients, the non-finite guard on and off. Levels the processor lacks are refused
//! with a typed error.
//!
//! Every value is compared bit for bit, except that a NaN only has to be a NaN: x86
//! passes on the NaN of an operation's first operand, and the compiler may order the
//! operands of `a + b` differently at another vector width, so a NaN's sign and payload
//! (which IEEE 754 leaves unspecified, and Keras never looks at) may differ.

mod common;

use common::{combo, Rng};
use fused_rmsprop::{
    Backend, CpuLevel, Error, RmsProp, RmsPropConfig, Slot, StateDtype, StateStorage, Variable,
};

/// Odd lengths around the vector widths and the CPU chunk (32,768), empty, scalar.
fn model(rng: &mut Rng) -> Vec<Variable> {
    let lens = [0usize, 1, 3, 7, 15, 17, 31, 33, 257, 1023, 40_001];
    let mut vars: Vec<Variable> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let name = if i % 3 == 0 {
                format!("t{i}/bias")
            } else {
                format!("t{i}/kernel")
            };
            Variable::new(name, &[n], rng.vec(n)).unwrap()
        })
        .collect();
    vars.push(Variable::new("scalar", &[], vec![0.25]).unwrap());
    vars
}

/// The bits of `x`, with every NaN as the one quiet NaN.
fn bits(x: f32) -> u32 {
    if x.is_nan() {
        f32::NAN.to_bits()
    } else {
        x.to_bits()
    }
}

/// Everything a run ends with, as bits: variables, every slot, the counters.
fn run(config: &RmsPropConfig, level: CpuLevel, guard: bool, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed);
    let vars = model(&mut rng);
    let mut opt = RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
    opt.exclude_from_weight_decay(&["bias"]);
    opt.set_cpu_level(level).unwrap();
    assert_eq!(opt.cpu_level(), Some(level));
    opt.set_non_finite_guard(guard).unwrap();
    for step in 0..6 {
        let mut grads: Vec<Option<Vec<f32>>> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let missing = (i + step) % 5 == 4;
                (!missing).then(|| rng.vec(v.values.len()).iter().map(|x| 3.0 * x).collect())
            })
            .collect();
        // a NaN or an infinity every other step, in a tensor that has a gradient
        if step % 2 == 1 {
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][step % 3];
            if let Some(g) = grads.iter_mut().flatten().find(|g| g.len() > 16) {
                let at = rng.below(g.len() as u64) as usize;
                g[at] = bad;
            }
        }
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| g.as_deref()).collect();
        opt.apply_gradients(&refs).unwrap();
    }
    let mut out: Vec<Vec<u32>> = opt
        .variables()
        .unwrap()
        .iter()
        .map(|v| v.iter().map(|&x| bits(x)).collect())
        .collect();
    for slot in Slot::ALL {
        if let Some(values) = opt.slot(slot).unwrap() {
            out.extend(values.iter().map(|v| v.iter().map(|&x| bits(x)).collect()));
        }
    }
    out.push(vec![
        opt.raw_iterations() as u32,
        opt.skipped_steps().skipped as u32,
    ]);
    out
}

/// Where two runs' bits first differ: `array[element]: baseline vs other`.
fn first_difference(a: &[Vec<u32>], b: &[Vec<u32>]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} arrays vs {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(j) = (0..x.len().max(y.len())).find(|&j| x.get(j) != y.get(j)) {
            let f = |v: Option<&u32>| v.map(|&b| f32::from_bits(b));
            return Some(format!(
                "array {i}[{j}]: {:?} vs {:?}",
                f(x.get(j)),
                f(y.get(j))
            ));
        }
    }
    None
}

/// The levels this processor runs, the baseline first.
fn supported_levels() -> Vec<CpuLevel> {
    CpuLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect()
}

#[test]
fn every_supported_level_gives_the_same_bits() {
    let levels = supported_levels();
    eprintln!(
        "CPU levels supported here: {levels:?} (best {})",
        CpuLevel::best()
    );
    assert_eq!(levels[0], CpuLevel::Baseline);
    let mut compared = 0;
    for k in 0..128 {
        for guard in [false, true] {
            let config = combo(k);
            let reference = run(&config, CpuLevel::Baseline, guard, 100 + k as u64);
            for &level in &levels[1..] {
                let got = run(&config, level, guard, 100 + k as u64);
                if let Some(at) = first_difference(&reference, &got) {
                    panic!(
                        "{level} differs from baseline for combo {k} (guard {guard}) at {at}: {:?}",
                        config.to_keras_json().unwrap()
                    );
                }
                compared += 1;
            }
        }
    }
    eprintln!("{compared} runs compared bit for bit with the baseline");
}

/// Compact slots are decoded and encoded at the loops' level too: bf16 (to nearest and
/// stochastically) and int8 (two block sizes) give the baseline's bits at every level.
#[test]
fn compact_state_gives_the_same_bits_at_every_level() {
    let levels = supported_levels();
    let storages = [
        StateStorage::new(StateDtype::Bf16).with_min_size(16),
        StateStorage::new(StateDtype::Bf16)
            .with_min_size(16)
            .with_stochastic_rounding(7),
        StateStorage::new(StateDtype::DYNAMIC8).with_min_size(16),
        StateStorage::new(StateDtype::Dynamic8 { block_size: 32 }).with_min_size(16),
    ];
    let mut compared = 0;
    for (n, storage) in storages.into_iter().enumerate() {
        for k in (0..128).step_by(9) {
            let config = combo(k).with_state(storage);
            let reference = run(&config, CpuLevel::Baseline, k % 2 == 0, 300 + k as u64);
            for &level in &levels[1..] {
                let got = run(&config, level, k % 2 == 0, 300 + k as u64);
                if let Some(at) = first_difference(&reference, &got) {
                    panic!("{level} differs from baseline, storage {n}, combo {k}, at {at}");
                }
                compared += 1;
            }
        }
    }
    eprintln!("{compared} compact-state runs compared bit for bit with the baseline");
}

#[test]
fn unsupported_levels_are_refused_and_change_nothing() {
    let w = || vec![Variable::new("w", &[3], vec![1.0, 2.0, 3.0]).unwrap()];
    let mut opt = RmsProp::with_backend(RmsPropConfig::default(), w(), Backend::Cpu).unwrap();
    let before = opt.cpu_level().unwrap();
    assert!(before.is_supported());
    for level in CpuLevel::ALL.into_iter().filter(|l| !l.is_supported()) {
        assert!(
            matches!(opt.set_cpu_level(level), Err(Error::CpuLevelUnsupported(l)) if l == level)
        );
        assert_eq!(opt.cpu_level(), Some(before));
    }
}
