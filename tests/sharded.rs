//! `ShardedRmsProp` under `mpirun` (feature `mpi`). This file is its own harness: run
//! plainly (`cargo test --release --features mpi --test sharded`) it starts each
//! scenario under `mpirun -np N` with itself as the program, and each rank runs the
//! scenario named by `FUSED_RMSPROP_MPI_CHILD`:
//!
//! - `traces`: every Keras trace (and the `LossScaleOptimizer` ones), and the PyTorch and
//!   optax traces (their dialects and param groups),
//!   data-parallel, every rank feeding the trace's gradients, matches Keras, for
//!   N = 1, 2, 3, 4 on the CPU path and N = 2 on the GPU (lavapipe in CI);
//! - `repeat`: two runs of every trace give the same bits;
//! - `faults`: a rank's bad input, ranks disagreeing on missing gradients, and a lost
//!   device on one rank make every rank return an error (no hang), and change nothing;
//!   with the non-finite guard, a NaN on one rank skips the step on all;
//! - `compact`: int8 slots sharded (pieces of whole blocks) step as one process's: the
//!   same bits on the CPU path with two ranks, within tolerance on the GPU;
//! - `checkpoint`: a sharded checkpoint resumes bit for bit; merged into one process it
//!   goes on as one process does; split again for the same ranks it resumes bit for bit;
//!   every flipped bit of its manifest and a flipped bit of any shard file are refused.
//!
//! Without `mpirun` it fails under CI (`CI` set) and says so loudly elsewhere.

#[path = "common/trace.rs"]
mod trace;

use std::process::{Command, ExitCode};

use fused_rmsprop::mpi::traits::{Communicator, CommunicatorCollectives};
use fused_rmsprop::{
    merge_sharded_checkpoint, split_checkpoint, Backend, Error, GpuContext, GpuOptions, RmsProp,
    RmsPropConfig, ShardedRmsProp, Variable,
};
use trace::{first_mismatch, values_match, Trace};

const CHILD: &str = "FUSED_RMSPROP_MPI_CHILD";
const BACKEND: &str = "FUSED_RMSPROP_MPI_BACKEND";
const DIR: &str = "FUSED_RMSPROP_MPI_DIR";

fn main() -> ExitCode {
    match std::env::var(CHILD) {
        Ok(name) => child(&name),
        Err(_) => parent(),
    }
}

/// Runs every scenario under mpirun; fails if any fails.
fn parent() -> ExitCode {
    if Command::new("mpirun").arg("--version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            eprintln!("CI is set but mpirun is missing: install openmpi-bin");
            return ExitCode::FAILURE;
        }
        eprintln!("\n!!!!!! SHARDED TESTS SKIPPED: no mpirun (install openmpi-bin) !!!!!!\n");
        return ExitCode::SUCCESS;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = std::env::temp_dir().join(format!("sharded-test-{}", std::process::id()));
    let runs: &[(&str, &str, usize)] = &[
        ("traces", "cpu", 1),
        ("traces", "cpu", 2),
        ("traces", "cpu", 3),
        ("traces", "cpu", 4),
        ("traces", "gpu", 2),
        ("repeat", "cpu", 3),
        ("faults", "cpu", 2),
        ("faults", "gpu", 2),
        ("checkpoint", "cpu", 2),
        ("compact", "cpu", 2),
        ("compact", "gpu", 2),
        ("checkpoint", "gpu", 3),
    ];
    let mut failed = Vec::new();
    for &(name, backend, ranks) in runs {
        let started = std::time::Instant::now();
        let out = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                &ranks.to_string(),
            ])
            .arg(&exe)
            .env(CHILD, name)
            .env(BACKEND, backend)
            .env(DIR, dir.join(format!("{name}-{backend}-{ranks}")))
            .env("FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER", "1")
            .output()
            .expect("mpirun runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ok = out.status.success() && stdout.contains(&format!("ok {name}"));
        println!(
            "test sharded {name} on {backend} with {ranks} ranks ... {} ({:.1} s)",
            if ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if !ok {
            println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            failed.push(format!("{name}/{backend}/{ranks}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failed.is_empty() {
        println!("\nsharded: {} scenarios passed", runs.len());
        ExitCode::SUCCESS
    } else {
        println!("\nsharded: failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// One rank of a scenario; rank 0 prints `ok NAME` when every check held.
fn child(name: &str) -> ExitCode {
    let universe = fused_rmsprop::mpi::initialize().expect("MPI initializes once");
    let world = universe.world();
    let backend = match std::env::var(BACKEND).as_deref() {
        Ok("gpu") => Backend::Gpu,
        _ => Backend::Cpu,
    };
    let gpu = match backend {
        Backend::Gpu => GpuOptions {
            context: Some(GpuContext::new(true).expect("a GPU adapter (lavapipe in CI)")),
            ..GpuOptions::default()
        },
        _ => GpuOptions::default(),
    };
    let result = match name {
        "traces" => traces(&world, backend, &gpu),
        "repeat" => repeat(&world, backend, &gpu),
        "faults" => faults(&world, backend, &gpu),
        "checkpoint" => checkpoint(&world, backend, &gpu),
        "compact" => compact(&world, backend, &gpu),
        other => Err(format!("no scenario `{other}`")),
    };
    match result {
        Ok(()) => {
            if world.rank() == 0 {
                println!("ok {name}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {}: {e}", world.rank());
            ExitCode::FAILURE
        }
    }
}

fn all_traces() -> Vec<(String, Trace)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut out = Vec::new();
    // Keras' traces, and PyTorch's and optax's (their dialects and param groups)
    for folder in [
        "keras/traces",
        "keras/loss_scale",
        "dialects/torch",
        "dialects/optax",
    ] {
        let mut paths: Vec<_> = std::fs::read_dir(root.join(folder))
            .expect("the traces")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).expect("a trace");
            let t = Trace::from_json_str(&text).expect("a valid trace");
            out.push((p.display().to_string(), t));
        }
    }
    assert!(out.len() > 50, "the traces are missing");
    out
}

/// Replays a trace data-parallel. The PyTorch and optax traces are fed as gradients
/// every rank has already averaged: the mean of three equal f32 gradients is not always
/// the gradient (an ulp off), and optax's centered bias correction turns such an ulp
/// into NaN or not (`optax_bias_correction_centered`); Keras' traces also run the
/// reduce-scatter mean.
fn replay<C: Communicator>(
    comm: &C,
    path: &str,
    t: &Trace,
    backend: Backend,
    gpu: &GpuOptions,
) -> fused_rmsprop::Result<trace::Outcome> {
    if !path.contains("dialects") {
        return t.replay_sharded(comm, backend, gpu);
    }
    let mut opt = t.sharded(comm, backend, gpu)?;
    opt.set_gradients_averaged(true);
    t.feed_sharded(&mut opt, &t.steps)?;
    t.outcome_sharded(&mut opt)
}

fn traces<C: Communicator>(comm: &C, backend: Backend, gpu: &GpuOptions) -> Result<(), String> {
    for (path, t) in all_traces() {
        let got = replay(comm, &path, &t, backend, gpu).map_err(|e| format!("{path}: {e}"))?;
        let expected = t
            .expected
            .as_ref()
            .ok_or(format!("{path}: no expected outcome"))?;
        if let Some(m) = first_mismatch(&got, expected) {
            return Err(format!("{path} with {} ranks: {m}", comm.size()));
        }
    }
    Ok(())
}

fn repeat<C: Communicator>(comm: &C, backend: Backend, gpu: &GpuOptions) -> Result<(), String> {
    let bits = |o: &trace::Outcome| -> Vec<u32> {
        o.variables.iter().flatten().map(|x| x.to_bits()).collect()
    };
    for (path, t) in all_traces() {
        let a = replay(comm, &path, &t, backend, gpu).map_err(|e| e.to_string())?;
        let b = replay(comm, &path, &t, backend, gpu).map_err(|e| e.to_string())?;
        if bits(&a) != bits(&b) {
            return Err(format!("{path}: two runs differ"));
        }
    }
    Ok(())
}

/// A small model with a long tensor (it spans every shard), a short one and a bias.
fn model() -> Vec<Variable> {
    let v = |name: &str, n: usize, f: f32| {
        Variable::new(
            name,
            &[n],
            (0..n).map(|i| ((i as f32 * f).sin()) * 0.5).collect(),
        )
        .unwrap()
    };
    vec![
        v("dense/kernel", 3000, 0.37),
        v("dense/bias", 40, 0.11),
        v("out/kernel", 700, 0.23),
    ]
}

fn gradients(step: usize) -> Vec<Vec<f32>> {
    model()
        .iter()
        .enumerate()
        .map(|(t, v)| {
            (0..v.values.len())
                .map(|i| ((i * 7 + t * 13 + step * 31) as f32 * 0.017).cos())
                .collect()
        })
        .collect()
}

fn config() -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.9)
        .with_centered(true)
        .with_clipnorm(1.5)
        .with_weight_decay(0.01)
        .with_use_ema(true)
        .with_ema_overwrite_frequency(3)
}

fn faults<C: Communicator>(comm: &C, backend: Backend, gpu: &GpuOptions) -> Result<(), String> {
    let rank = comm.rank();
    let mut opt =
        ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(|e| e.to_string())?;
    let g = gradients(0);
    let all: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
    opt.apply_gradients(&all).map_err(|e| e.to_string())?;
    let before = opt.model().to_vec();
    // bad input on rank 1 only: everyone errs, nothing changes
    let short = &g[0][..10];
    let mut bad = all.clone();
    if rank == 1 {
        bad[0] = Some(short);
    }
    match opt.apply_gradients(&bad) {
        Err(Error::GradientLength { .. }) if rank == 1 => {}
        Err(Error::Sharded { rank: 1, .. }) if rank != 1 => {}
        other => return Err(format!("bad input on rank 1: rank {rank} got {other:?}")),
    }
    // ranks disagreeing on a missing gradient
    let mut missing = all.clone();
    if rank == 0 {
        missing[1] = None;
    }
    if !matches!(opt.apply_gradients(&missing), Err(Error::Sharded { .. })) {
        return Err("disagreeing missing gradients were accepted".into());
    }
    if opt.model() != before.as_slice() || opt.raw_iterations() != 1 {
        return Err("a refused step changed the state".into());
    }
    // the ranks are still in step: a good step goes through
    opt.apply_gradients(&all)
        .map_err(|e| format!("after the faults: {e}"))?;
    // the non-finite guard: a NaN on one rank skips the step on every rank
    opt.set_non_finite_guard(true);
    let before = (opt.model().to_vec(), opt.raw_iterations());
    let mut poisoned = g.clone();
    if rank == comm.size() - 1 {
        poisoned[2][5] = f32::NAN;
    }
    let refs: Vec<Option<&[f32]>> = poisoned.iter().map(|g| Some(&g[..])).collect();
    opt.apply_gradients(&refs).map_err(|e| e.to_string())?;
    if opt.skipped_steps() != 1 || (opt.model().to_vec(), opt.raw_iterations()) != before {
        return Err(format!(
            "rank {rank}: a NaN on the last rank did not skip the step everywhere"
        ));
    }
    opt.apply_gradients(&all).map_err(|e| e.to_string())?;
    if opt.raw_iterations() != before.1 + 1 {
        return Err("a finite step after the skip did not apply".into());
    }
    if backend == Backend::Gpu {
        // a lost device on rank 1: every rank returns an error instead of hanging
        if rank == 1 {
            gpu.context.as_ref().expect("a context").device.destroy();
        }
        match opt.apply_gradients(&all) {
            Err(_) => {}
            Ok(()) => return Err(format!("rank {rank} stepped with rank 1's device lost")),
        }
    }
    Ok(())
}

/// `mine` on this rank, made an error on every rank when any rank has one.
fn agreed<C: Communicator>(comm: &C, mine: Result<(), String>) -> Result<(), String> {
    let mut all = vec![0u8; comm.size() as usize];
    comm.all_gather_into(&[u8::from(mine.is_err())], &mut all[..]);
    match (mine, all.iter().position(|&f| f == 1)) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(r)) => Err(format!("rank {r} failed")),
        (Ok(()), None) => Ok(()),
    }
}

fn checkpoint<C: Communicator>(comm: &C, backend: Backend, gpu: &GpuOptions) -> Result<(), String> {
    let dir = std::path::PathBuf::from(std::env::var(DIR).map_err(|e| e.to_string())?);
    let e = |e: fused_rmsprop::Error| e.to_string();
    let steps = |opt: &mut ShardedRmsProp, range: std::ops::Range<usize>| -> Result<(), String> {
        for k in range {
            let g = gradients(k);
            let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
            opt.apply_gradients(&refs).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let mut a = ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(e)?;
    a.exclude_from_weight_decay(&["bias"]);
    steps(&mut a, 0..4)?;
    a.save_checkpoint(dir.join("sharded")).map_err(e)?;
    steps(&mut a, 4..7)?;
    // resumed from the checkpoint: the same bits
    let mut b = ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(e)?;
    b.restore_checkpoint(dir.join("sharded")).map_err(e)?;
    if b.raw_iterations() != 4 {
        return Err(format!("restored at step {}", b.raw_iterations()));
    }
    steps(&mut b, 4..7)?;
    if a.model() != b.model() {
        return Err("the resumed run differs".into());
    }
    // merged into one process (rank 0 writes, everyone reads): goes on as one process
    let single = dir.join("single.safetensors");
    if comm.rank() == 0 {
        merge_sharded_checkpoint(dir.join("sharded"), &single).map_err(e)?;
        split_checkpoint(&single, comm.size() as usize, dir.join("resplit")).map_err(e)?;
    }
    comm.barrier();
    let mut one =
        RmsProp::load_checkpoint(&single, Backend::Cpu, &GpuOptions::default()).map_err(e)?;
    if one.raw_iterations() != 4 || one.excluded() != ["bias"] {
        return Err("the merged checkpoint lost its counter or exclusions".into());
    }
    for k in 4..7 {
        let g = gradients(k);
        let refs: Vec<Option<&[f32]>> = g.iter().map(|g| Some(&g[..])).collect();
        one.apply_gradients(&refs).map_err(e)?;
    }
    for (x, y) in a
        .model()
        .iter()
        .flatten()
        .zip(one.variables().map_err(e)?.iter().flatten())
    {
        if !values_match(*x, *y) {
            return Err(format!(
                "one process from the merged checkpoint: {y} vs sharded {x}"
            ));
        }
    }
    // split again: resumes as the original sharded run
    let mut c = ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(e)?;
    c.restore_checkpoint(dir.join("resplit")).map_err(e)?;
    steps(&mut c, 4..7)?;
    for (x, y) in a.model().iter().flatten().zip(c.model().iter().flatten()) {
        if !values_match(*x, *y) {
            return Err(format!("resumed from the split checkpoint: {y} vs {x}"));
        }
    }
    // integrity: rank 0 flips every bit of the manifest, then one bit of each shard
    // file; merging refuses each with a typed error
    let sharded = dir.join("sharded");
    let shard_file =
        |r: usize| sharded.join(format!("shard-{r:05}-of-{:05}.safetensors", comm.size()));
    let io = |e: std::io::Error| e.to_string();
    let merges = || -> Result<(), String> {
        let out = dir.join("flipped.safetensors");
        let refused = |r: Result<(), Error>| {
            matches!(
                r,
                Err(Error::Checkpoint { .. } | Error::ChecksumMismatch { .. })
            )
        };
        let manifest = sharded.join("manifest.json");
        let original = std::fs::read(&manifest).map_err(io)?;
        for bit in 0..original.len() * 8 {
            let mut m = original.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&manifest, &m).map_err(io)?;
            if !refused(merge_sharded_checkpoint(&sharded, &out)) {
                return Err(format!("manifest bit {bit} flipped, and the merge went on"));
            }
        }
        std::fs::write(&manifest, &original).map_err(io)?;
        for r in (0..comm.size() as usize).filter(|&r| shard_file(r).exists()) {
            let original = std::fs::read(shard_file(r)).map_err(io)?;
            let mut m = original.clone();
            let middle = m.len() / 2;
            m[middle] ^= 4;
            std::fs::write(shard_file(r), &m).map_err(io)?;
            match merge_sharded_checkpoint(&sharded, &out) {
                Err(Error::ChecksumMismatch { .. }) => {}
                other => return Err(format!("shard {r} with a flipped bit: {other:?}")),
            }
            std::fs::write(shard_file(r), &original).map_err(io)?;
        }
        merge_sharded_checkpoint(&sharded, &out).map_err(e)?;
        Ok(())
    };
    // rank 0 merges; every rank learns whether it failed (no rank waits for one gone)
    agreed(comm, if comm.rank() == 0 { merges() } else { Ok(()) })?;
    comm.barrier();
    // a restore with rank 0's shard corrupted fails on every rank and changes nothing
    let original = std::fs::read(shard_file(0)).map_err(io)?;
    comm.barrier();
    if comm.rank() == 0 {
        let mut m = original.clone();
        let middle = m.len() / 2;
        m[middle] ^= 1;
        std::fs::write(shard_file(0), &m).map_err(io)?;
    }
    comm.barrier();
    let mut d = ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(e)?;
    let before = d.model().to_vec();
    let restored = d.restore_checkpoint(&sharded);
    agreed(
        comm,
        match restored {
            Ok(()) => Err("a sharded checkpoint with a corrupted shard was restored".into()),
            Err(_) if d.model() != before => Err("a refused restore changed the state".into()),
            Err(_) => Ok(()),
        },
    )?;
    if comm.rank() == 0 {
        std::fs::write(shard_file(0), &original).map_err(io)?;
    }
    comm.barrier();
    // another number of ranks is refused, with a typed error, on every rank
    let mut other = ShardedRmsProp::new(comm, config(), model(), backend, gpu).map_err(e)?;
    if comm.rank() == 0 {
        split_checkpoint(&single, comm.size() as usize + 1, dir.join("wrong")).map_err(e)?;
    }
    comm.barrier();
    if !matches!(
        other.restore_checkpoint(dir.join("wrong")),
        Err(Error::Checkpoint { .. } | Error::Sharded { .. })
    ) {
        return Err("a checkpoint of another number of ranks was restored".into());
    }
    Ok(())
}

fn compact<C: Communicator>(comm: &C, backend: Backend, gpu: &GpuOptions) -> Result<(), String> {
    use fused_rmsprop::{Optimizer, Slot, StateDtype, StateStorage};
    let e = |e: fused_rmsprop::Error| e.to_string();
    let config = RmsPropConfig::default()
        .with_learning_rate(0.01)
        .with_momentum(0.9)
        .with_centered(true)
        .with_state(StateStorage::new(StateDtype::DYNAMIC8));
    let vars = vec![Variable::new(
        "w",
        &[16384],
        (0..16384).map(|i| (i as f32 * 0.01).sin()).collect(),
    )
    .unwrap()];
    let mut sharded =
        ShardedRmsProp::new(comm, config.clone(), vars.clone(), backend, gpu).map_err(e)?;
    let mut one = RmsProp::with_backend(config, vars, Backend::Cpu).map_err(e)?;
    // both through the surface they share
    fn six_steps(opt: &mut impl Optimizer) -> fused_rmsprop::Result<()> {
        opt.exclude_from_weight_decay(&["bias"]);
        for k in 0..6 {
            let g: Vec<f32> = (0..16384)
                .map(|i| ((i * 3 + k * 7) as f32 * 0.013).cos())
                .collect();
            opt.apply_gradients(&[Some(&g)])?;
        }
        Ok(())
    }
    six_steps(&mut sharded).map_err(e)?;
    six_steps(&mut one).map_err(e)?;
    if Optimizer::variables(&sharded).map_err(e)? != sharded.model()
        || Optimizer::excluded(&sharded) != ["bias"]
    {
        return Err("the Optimizer surface of ShardedRmsProp".into());
    }
    // each rank's share, give or take the GPU's 16-byte placeholder buffers
    let ranks = comm.size() as u64;
    if sharded.state_bytes() * ranks > one.state_bytes() + 128 * ranks {
        return Err(format!(
            "state per rank {} of {}",
            sharded.state_bytes(),
            one.state_bytes()
        ));
    }
    let (a, b) = (
        sharded.model()[0].clone(),
        one.variables().map_err(e)?.remove(0),
    );
    let (va, vb) = (
        sharded
            .slot(Slot::Momentum)
            .map_err(e)?
            .unwrap_or_default()
            .remove(0),
        one.slot(Slot::Momentum)
            .map_err(e)?
            .unwrap_or_default()
            .remove(0),
    );
    if backend == Backend::Cpu {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if bits(&a) != bits(&b) || bits(&va) != bits(&vb) {
            return Err("sharded int8 state differs from one process's".into());
        }
    } else if let Some((x, y)) = a.iter().zip(&b).find(|(x, y)| !values_match(**x, **y)) {
        return Err(format!("sharded int8 on the GPU: {x} vs one process {y}"));
    }
    Ok(())
}
