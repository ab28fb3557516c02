//! Replays an `rmsprop-trace/1` file and prints one JSON object on stdout:
//! `{"backend": "cpu"|"gpu", "variables": [[...], ...], "iterations": N}`.
//!
//! ```text
//! cargo run --release --example replay -- [--backend auto|cpu|gpu]
//!     [--gradient-dtype f32|bf16|f16] [--param-dtype f32|bf16|f16]
//!     [--param-copy bf16|f16] [--sharded] TRACE.json
//! mpirun -np N target/release/examples/replay --sharded [--backend cpu|gpu] TRACE.json
//! ```
//!
//! `--gradient-dtype` rounds the trace's gradients to that dtype (nearest, ties to even)
//! and feeds them in it (`RmsProp::apply_typed_gradients`). `--param-dtype` stores the
//! parameters in that dtype (`Precision::params`: the starting values and every
//! assignment rounded; the printed variables are the stored values). `--param-copy` keeps a
//! 16-bit copy of the parameters and adds `"param_copy"`: its values, one list per
//! variable. A trace with `loss_scale_optimizer` runs inside Keras' `LossScaleOptimizer`
//! and adds `"loss_scale"`, the final scale.
//!
//! `--sharded` (built with `--features mpi`, run under `mpirun`) replays the trace
//! data-parallel with sharded state (`ShardedRmsProp`): every rank feeds the trace's
//! gradients, rank 0 prints the JSON (with `"ranks": N`), the others print nothing.
//!
//! Exit codes: 0 success; 2 bad input (usage, unreadable file, not JSON, invalid
//! config or trace), with one `error: ...` line on stderr and nothing on stdout;
//! 3 when `--backend gpu` finds no GPU adapter.

use std::process::ExitCode;

#[path = "../tests/common/trace.rs"]
mod trace;

use fused_rmsprop::{Backend, Dtype, Error, GpuOptions, Precision};
use trace::{outcome_json, Trace};

const USAGE: &str =
    "usage: replay [--backend auto|cpu|gpu] [--gradient-dtype f32|bf16|f16] [--param-dtype f32|bf16|f16] [--param-copy bf16|f16] [--sharded] TRACE.json";

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    let one_line = msg.to_string().replace('\n', " ");
    eprintln!("error: {one_line}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let mut backend = Backend::Auto;
    let mut precision = Precision::default();
    let mut path = None;
    let mut sharded = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => match args.next().map(|b| b.parse::<Backend>()) {
                Some(Ok(b)) => backend = b,
                Some(Err(e)) => return fail(2, e),
                None => return fail(2, "--backend needs a value (auto, cpu or gpu)"),
            },
            "--gradient-dtype" => match args.next().map(|d| d.parse::<Dtype>()) {
                Some(Ok(d)) => precision = precision.with_gradients(d),
                Some(Err(e)) => return fail(2, e),
                None => return fail(2, "--gradient-dtype needs a value (f32, bf16 or f16)"),
            },
            "--param-dtype" => match args.next().map(|d| d.parse::<Dtype>()) {
                Some(Ok(d)) => precision = precision.with_params(d),
                Some(Err(e)) => return fail(2, e),
                None => return fail(2, "--param-dtype needs a value (f32, bf16 or f16)"),
            },
            "--param-copy" => match args.next().map(|d| d.parse::<Dtype>()) {
                Some(Ok(d)) => precision = precision.with_param_copy(d),
                Some(Err(e)) => return fail(2, e),
                None => return fail(2, "--param-copy needs a value (bf16 or f16)"),
            },
            "--sharded" => sharded = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s if s.starts_with("--backend=") => match s["--backend=".len()..].parse::<Backend>() {
                Ok(b) => backend = b,
                Err(e) => return fail(2, e),
            },
            s if s.starts_with('-') && s.len() > 1 => {
                return fail(2, format!("unknown option `{s}`"))
            }
            s => {
                if path.replace(s.to_string()).is_some() {
                    return fail(2, "give exactly one trace file");
                }
            }
        }
    }
    let Some(path) = path else {
        return fail(2, USAGE);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return fail(2, format!("cannot read {path}: {e}")),
    };
    let trace = match Trace::from_json_str(&text) {
        Ok(t) => t,
        Err(e) => return fail(2, format!("{path}: {e}")),
    };
    if sharded {
        if precision != Precision::default() {
            return fail(
                2,
                "--sharded replays in f32 (no --gradient-dtype, --param-dtype, --param-copy)",
            );
        }
        return replay_sharded(&trace, backend, &path);
    }
    match trace.replay_with(backend, &GpuOptions::default(), precision) {
        Ok((kind, outcome)) => {
            println!("{}", outcome_json(kind, &outcome));
            ExitCode::SUCCESS
        }
        Err(e @ Error::NoAdapter(_)) => fail(3, e),
        Err(e @ Error::Gpu(_)) if backend == Backend::Gpu => fail(3, e),
        Err(e) => fail(2, format!("{path}: {e}")),
    }
}

#[cfg(feature = "mpi")]
fn replay_sharded(trace: &Trace, backend: Backend, path: &str) -> ExitCode {
    use fused_rmsprop::mpi::traits::Communicator;
    let Some(universe) = fused_rmsprop::mpi::initialize() else {
        return fail(2, "MPI is already initialized");
    };
    let world = universe.world();
    match trace.replay_sharded(&world, backend, &GpuOptions::default()) {
        Ok(outcome) => {
            if world.rank() == 0 {
                let kind = match backend {
                    Backend::Gpu => fused_rmsprop::BackendKind::Gpu,
                    _ => fused_rmsprop::BackendKind::Cpu,
                };
                let mut json = outcome_json(kind, &outcome);
                json["ranks"] = world.size().into();
                println!("{json}");
            }
            ExitCode::SUCCESS
        }
        Err(e @ Error::NoAdapter(_)) => fail(3, e),
        Err(e) => fail(2, format!("{path}: rank {}: {e}", world.rank())),
    }
}

#[cfg(not(feature = "mpi"))]
fn replay_sharded(_: &Trace, _: Backend, _: &str) -> ExitCode {
    fail(
        2,
        "--sharded needs the `mpi` feature: cargo build --release --features mpi --example replay, then mpirun -np N target/release/examples/replay --sharded TRACE",
    )
}
