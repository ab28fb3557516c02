//! One sharded step's cost at N ranks (feature `mpi`, run under `mpirun`): step time,
//! bytes each rank sends per step, and each rank's optimizer state.
//!
//! ```text
//! cargo build --release --features mpi --example sharded_scaling
//! mpirun -np N target/release/examples/sharded_scaling [--params P] [--steps S] [--backend cpu|gpu]
//! ```
//!
//! Rank 0 prints one JSON line: `ranks`, `params`, `step_seconds` (median), the bytes a
//! rank sends per step (`wire_bytes_per_rank`: the reduce-scatter's (N-1)/N and the
//! all-gather's (N-1)/N of the model's 4-byte elements, counted from the shard
//! layout, plus the few bytes of the agreement), and `state_bytes_per_rank` (the
//! largest shard's slots) against one process's (`state_bytes_one_process`).

use std::time::Instant;

use fused_rmsprop::mpi::traits::CommunicatorCollectives;
use fused_rmsprop::{Backend, GpuOptions, RmsPropConfig, ShardedRmsProp, Variable};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let universe = fused_rmsprop::mpi::initialize().ok_or("MPI is already initialized")?;
    let world = universe.world();
    let params: usize = arg("--params", "4194304").parse()?;
    let steps: usize = arg("--steps", "7").parse()?;
    let backend: Backend = arg("--backend", "cpu").parse()?;
    // eight tensors of near-equal size, centered RMSprop with momentum (3 slots)
    let vars: Vec<Variable> = (0..8)
        .map(|t| {
            let n = params / 8 + usize::from(t < params % 8);
            Variable::new(format!("layer{t}/kernel"), &[n], vec![0.01; n])
        })
        .collect::<Result<_, _>>()?;
    let config = RmsPropConfig::default()
        .with_momentum(0.9)
        .with_centered(true)
        .with_clipnorm(1.0);
    let mut opt = ShardedRmsProp::new(
        &world,
        config,
        vars.clone(),
        backend,
        &GpuOptions::default(),
    )?;
    let grads: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.001; v.values.len()]).collect();
    let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
    opt.apply_gradients(&refs)?;
    let mut times = Vec::new();
    for _ in 0..steps {
        world.barrier();
        let t = Instant::now();
        opt.apply_gradients(&refs)?;
        world.barrier();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (rank, ranks) = opt.rank();
    let state = opt.state_bytes();
    let mut all = vec![0u64; ranks];
    world.all_gather_into(&state, &mut all[..]);
    if rank == 0 {
        let shard_elements: usize = opt.shard().iter().map(|(_, r)| r.len()).sum();
        let flat = ranks as f64 * opt.shard_len() as f64;
        let wire = if ranks > 1 {
            2.0 * 4.0 * flat * (ranks - 1) as f64 / ranks as f64
        } else {
            0.0
        };
        println!(
            "{}",
            serde_json::json!({
                "ranks": ranks,
                "params": params,
                "backend": format!("{backend:?}").to_lowercase(),
                "step_seconds": times[times.len() / 2],
                "wire_bytes_per_rank": wire,
                "state_bytes_per_rank": all.iter().max(),
                "state_bytes_one_process": 12 * params,
                "shard_elements_rank0": shard_elements,
            })
        );
    }
    Ok(())
}
