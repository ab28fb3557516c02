//! Checkpoints as a hostile user sees them: every single flipped bit of a checkpoint is
//! refused with a typed error (CPU and GPU optimizers, f32 and int8 state, a
//! loss-scaled one), random multi-byte mutations never panic, are never accepted and
//! never change the live state; the same state always saves to the same bytes (twice,
//! in two processes, on the CPU and on the GPU path); concurrent saves to one path both
//! succeed and leave one complete file.
mod common;

use common::Rng;
use fused_rmsprop::{
    Backend, Error, GpuOptions, LossScaleConfig, LossScaleOptimizer, RmsProp, RmsPropConfig, Slot,
    StateDtype, StateStorage, Variable,
};
use pollster::block_on;

fn config(state: StateDtype) -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.9)
        .with_centered(true)
        .with_use_ema(true)
        .with_clipnorm(1.0)
        .with_state(StateStorage::new(state).with_min_size(16))
}

/// Dynamic 8-bit slots in blocks of 64.
const INT8: StateDtype = StateDtype::Dynamic8 { block_size: 64 };

/// An optimizer of `model()` on the CPU path with `state` slots.
fn cpu(state: StateDtype) -> RmsProp {
    RmsProp::with_options(config(state), model(), Backend::Cpu, &GpuOptions::default()).unwrap()
}

fn model() -> Vec<Variable> {
    let mut rng = Rng(17);
    vec![
        Variable::new("dense/kernel", &[8, 12], rng.vec(96)).unwrap(),
        Variable::new("dense/bias", &[12], rng.vec(12)).unwrap(),
    ]
}

fn train(opt: &mut RmsProp, steps: usize, seed: u64) {
    let mut rng = Rng(seed);
    let sizes: Vec<usize> = opt.specs().iter().map(|s| s.len()).collect();
    for _ in 0..steps {
        let g: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(g.as_slice())).collect();
        opt.apply_gradients(&refs).unwrap();
    }
}

/// Everything a restore could change, as bits.
fn state(opt: &RmsProp) -> (u64, Vec<Vec<u32>>) {
    let mut all = opt.variables().unwrap();
    for s in Slot::ALL {
        all.extend(opt.slot(s).unwrap().unwrap_or_default());
    }
    let bits = all
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect();
    (opt.iterations(), bits)
}

fn refused(e: &Error) -> bool {
    matches!(e, Error::Checkpoint { .. } | Error::ChecksumMismatch { .. })
}

/// Every single-bit flip of `bytes` is refused by `opt` with a checkpoint error, and
/// leaves its state as it was; returns how many flips were tried.
fn every_bit_flip_is_refused(name: &str, opt: &mut RmsProp, bytes: &[u8]) -> usize {
    let before = state(opt);
    let mut mutated = bytes.to_vec();
    for bit in 0..bytes.len() * 8 {
        mutated[bit / 8] ^= 1 << (bit % 8);
        match opt.restore_checkpoint_bytes(&mutated) {
            Ok(()) => panic!("{name}: bit {bit} flipped, and the checkpoint was accepted"),
            Err(e) => assert!(refused(&e), "{name}: bit {bit}: {e}"),
        }
        mutated[bit / 8] ^= 1 << (bit % 8);
        if bit % 4099 == 0 {
            assert_eq!(state(opt), before, "{name}: bit {bit} changed the state");
        }
    }
    assert_eq!(state(opt), before, "{name}: the state changed");
    // and the intact file still restores
    opt.restore_checkpoint_bytes(bytes).unwrap();
    bytes.len() * 8
}

/// One random mutation: bits flipped, bytes overwritten, a cut, bytes appended, or a
/// header digit changed.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = bytes.to_vec();
    let at = rng.below(m.len() as u64) as usize;
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(m.len() as u64) as usize;
                m[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let len = (1 + rng.below(16) as usize).min(m.len() - at);
            for b in &mut m[at..at + len] {
                *b = rng.below(256) as u8;
            }
        }
        2 => m.truncate(at),
        3 => m.extend((0..1 + rng.below(32)).map(|_| rng.below(256) as u8)),
        _ => {
            // a digit of the header (offsets, shapes, counters) changed to another
            let n = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize;
            let digits: Vec<usize> = (8..8 + n).filter(|&i| m[i].is_ascii_digit()).collect();
            let i = digits[rng.below(digits.len() as u64) as usize];
            m[i] = b'0' + ((m[i] - b'0' + 1 + rng.below(9) as u8) % 10);
        }
    }
    m
}

fn random_mutations_are_refused(name: &str, opt: &mut RmsProp, bytes: &[u8], count: usize) {
    let before = state(opt);
    let mut rng = Rng(0x5eed ^ bytes.len() as u64);
    for k in 0..count {
        let m = mutate(bytes, &mut rng);
        if m == bytes {
            continue;
        }
        match opt.restore_checkpoint_bytes(&m) {
            Ok(()) => panic!("{name}: mutation {k} was accepted"),
            Err(e) => assert!(refused(&e), "{name}: mutation {k}: {e}"),
        }
    }
    assert_eq!(state(opt), before, "{name}: the state changed");
}

fn backends() -> Vec<(&'static str, Backend, GpuOptions)> {
    let mut out = vec![("cpu", Backend::Cpu, GpuOptions::default())];
    if let Some(ctx) = common::gpu() {
        out.push(("gpu", Backend::Gpu, common::on(&ctx)));
    }
    out
}

#[test]
fn every_flipped_bit_is_refused_and_changes_nothing() {
    for (backend_name, backend, gpu) in backends() {
        for state_dtype in [StateDtype::F32, INT8] {
            let name = format!("{backend_name}, {state_dtype} state");
            let mut saved =
                RmsProp::with_options(config(state_dtype), model(), backend, &gpu).unwrap();
            train(&mut saved, 3, 1);
            let bytes = block_on(saved.checkpoint_bytes_async()).unwrap();
            // the live optimizer is in another state: a restore would show
            let mut live =
                RmsProp::with_options(config(state_dtype), model(), backend, &gpu).unwrap();
            train(&mut live, 2, 2);
            let flips = every_bit_flip_is_refused(&name, &mut live, &bytes);
            eprintln!("{name}: {flips} single-bit flips refused");
        }
    }
}

#[test]
fn a_loss_scaled_checkpoint_refuses_every_flipped_bit() {
    for (name, backend, gpu) in backends() {
        let make = || {
            let inner =
                RmsProp::with_options(config(StateDtype::F32), model(), backend, &gpu).unwrap();
            LossScaleOptimizer::new(
                inner,
                LossScaleConfig {
                    initial_scale: 1024.0,
                    dynamic_growth_steps: 2,
                },
            )
            .unwrap()
        };
        let mut saved = make();
        let g: Vec<Vec<f32>> = model().iter().map(|v| vec![0.25; v.values.len()]).collect();
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(g.as_slice())).collect();
        for _ in 0..3 {
            saved.apply_gradients(&refs).unwrap();
        }
        block_on(saved.inner().synchronize_async()).unwrap();
        let bytes = block_on(saved.inner().checkpoint_bytes_async()).unwrap();
        let mut live = make();
        every_bit_flip_is_refused(name, live.inner_mut(), &bytes);
        assert_eq!(live.loss_scale(), saved.loss_scale(), "{name}");
    }
}

#[test]
fn random_mutations_are_refused_and_change_nothing() {
    for (name, backend, gpu) in backends() {
        let count = if backend == Backend::Cpu { 4000 } else { 1000 };
        let mut saved = RmsProp::with_options(config(INT8), model(), backend, &gpu).unwrap();
        train(&mut saved, 3, 5);
        let bytes = block_on(saved.checkpoint_bytes_async()).unwrap();
        let mut live = RmsProp::with_options(config(INT8), model(), backend, &gpu).unwrap();
        random_mutations_are_refused(name, &mut live, &bytes, count);
    }
}

#[test]
fn the_same_state_saves_to_the_same_bytes_on_both_paths() {
    let mut saved = cpu(INT8);
    train(&mut saved, 4, 9);
    let first = block_on(saved.checkpoint_bytes_async()).unwrap();
    assert_eq!(block_on(saved.checkpoint_bytes_async()).unwrap(), first);
    // another optimizer restored to that state
    let mut other = cpu(INT8);
    other.restore_checkpoint_bytes(&first).unwrap();
    assert_eq!(block_on(other.checkpoint_bytes_async()).unwrap(), first);
    // a file on disk holds the same bytes
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-same-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.safetensors");
    saved.save_checkpoint(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), first);
    std::fs::remove_dir_all(&dir).unwrap();
    if let Some(ctx) = common::gpu() {
        let mut gpu =
            RmsProp::with_options(config(INT8), model(), Backend::Gpu, &common::on(&ctx)).unwrap();
        gpu.restore_checkpoint_bytes(&first).unwrap();
        assert_eq!(block_on(gpu.checkpoint_bytes_async()).unwrap(), first);
    }
}

/// The child of [`another_process_writes_the_same_bytes`]: writes the checkpoint to the
/// path in `FUSED_RMSPROP_CHECKPOINT_CHILD` (a no-op in a normal test run).
#[test]
fn checkpoint_child_process() {
    let Some(path) = std::env::var_os("FUSED_RMSPROP_CHECKPOINT_CHILD") else {
        return;
    };
    let mut opt = cpu(StateDtype::Bf16);
    train(&mut opt, 3, 4);
    opt.save_checkpoint(path).unwrap();
}

#[test]
fn another_process_writes_the_same_bytes() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-procs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ours, theirs) = (dir.join("ours.safetensors"), dir.join("theirs.safetensors"));
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "checkpoint_child_process", "--test-threads=1"])
        .env("FUSED_RMSPROP_CHECKPOINT_CHILD", &theirs)
        .status()
        .unwrap();
    assert!(status.success());
    let mut opt = cpu(StateDtype::Bf16);
    train(&mut opt, 3, 4);
    opt.save_checkpoint(&ours).unwrap();
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_saves_to_one_path_leave_one_complete_file() {
    let dir = std::env::temp_dir().join(format!("fused-rmsprop-race-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shared.safetensors");
    let make = |steps: usize| {
        let mut opt = cpu(StateDtype::F32);
        train(&mut opt, steps, 3);
        opt
    };
    let (a, b) = (make(1), make(2));
    let expected = [
        block_on(a.checkpoint_bytes_async()).unwrap(),
        block_on(b.checkpoint_bytes_async()).unwrap(),
    ];
    for _ in 0..25 {
        std::thread::scope(|s| {
            let one = s.spawn(|| a.save_checkpoint(&path));
            let two = s.spawn(|| b.save_checkpoint(&path));
            one.join().unwrap().unwrap();
            two.join().unwrap().unwrap();
        });
        let on_disk = std::fs::read(&path).unwrap();
        assert!(expected.contains(&on_disk), "a save left a mixed file");
    }
    // no temporary file is left behind
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint from before the digests (format `/1`, metadata in hash order, no
/// digest fields) still restores, to the same state.
#[test]
fn checkpoints_from_before_the_digests_still_restore() {
    use safetensors::tensor::SafeTensors;
    let mut saved = cpu(INT8);
    train(&mut saved, 3, 6);
    let bytes = block_on(saved.checkpoint_bytes_async()).unwrap();
    // the same content written as the crate wrote it before: safetensors' own header
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.remove("digests");
    metadata.remove("digest");
    metadata.insert("format".into(), "fused-rmsprop-checkpoint/1".into());
    let old = safetensors::serialize(st.tensors(), Some(metadata)).unwrap();
    let mut live = cpu(INT8);
    live.restore_checkpoint_bytes(&old).unwrap();
    assert_eq!(state(&live), state(&saved));
    // a file claiming the new format without its digests is refused
    let mut metadata = header.metadata().clone().unwrap();
    metadata.remove("digests");
    metadata.remove("digest");
    let stripped = safetensors::serialize(st.tensors(), Some(metadata)).unwrap();
    assert!(matches!(
        live.restore_checkpoint_bytes(&stripped),
        Err(Error::Checkpoint { .. })
    ));
}
