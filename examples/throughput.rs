//! Step throughput of one variant on one backend, against a plain copy of the same
//! number of bytes measured in the same run.
//!
//! ```text
//! cargo run --release --example throughput -- --backend cpu|gpu --variant NAME
//!     --params N [--tensors K] [--samples S] [--guard] [--cpu-level L]
//!     [--dialect keras|torch|optax|burn] [--groups G] [--json]
//! ```
//!
//! `--groups G` puts the tensors round-robin into `G` param groups (at most one per
//! tensor), each with its own
//! learning-rate multiplier and `rho` (every tensor in one: the path that patches a
//! group's numbers into the step's).
//!
//! `--guard` turns the non-finite guard on; `bytes_per_step` stays the unguarded
//! step's minimum traffic, so the ratio shows what the guard costs.
//!
//! Prints `backend, variant, params, tensors, bytes_per_step, step_seconds` (median
//! over samples of several steps after warm-up), `gbps`, `copy_gbps` and
//! `ratio = gbps / copy_gbps`. On the GPU, gradients stay on the device (written once),
//! so a step is what training code pays: one uniform write and one submit. The GPU
//! also reports `shader_copy_gbps` and `shader_ratio` (against a minimal WGSL kernel
//! copying the same bytes), `dispatches_per_step`, `submissions_per_step`, and
//! `host_seconds_per_step`, the CPU time one `apply_device_gradients` call takes to
//! record and submit (without waiting for the GPU), and `latency_seconds`, one step
//! submitted and waited for (medians).

use std::process::ExitCode;

use clap::Parser;
#[path = "../benches/support/workload.rs"]
mod workload;

use fused_rmsprop::half::{bf16, f16};
use fused_rmsprop::{
    Backend, CpuLevel, Dialect, Dtype, GpuOptions, GradientElement, ParamGroup, Precision, RmsProp,
    RmsPropConfig, StateDtype, StateStorage,
};
use serde_json::json;
use workload::{
    median_time, parallel_copy, synthetic_gradients, synthetic_model, BenchVariant, GpuCopy,
    ShaderCopy,
};

#[derive(Parser, Debug)]
#[command(about = "Measure RMSprop step throughput against memory bandwidth")]
struct Args {
    /// cpu or gpu (gpu accepts software adapters).
    #[arg(long, default_value = "cpu")]
    backend: Backend,
    /// plain, momentum, centered, centered-momentum, optionally +clip and/or +ema.
    #[arg(long, default_value = "plain")]
    variant: String,
    /// Total parameters.
    #[arg(long, default_value_t = 16 << 20)]
    params: usize,
    /// Number of tensors the parameters are split into.
    #[arg(long, default_value_t = 1)]
    tensors: usize,
    /// Timed samples (the median is reported); each sample runs several steps.
    #[arg(long, default_value_t = 11)]
    samples: usize,
    /// Turn the non-finite guard on (the gradients are finite: every step applies).
    #[arg(long)]
    guard: bool,
    /// The gradients' dtype: f32, bf16 or f16 (`bytes_per_step` counts its size).
    #[arg(long, default_value = "f32")]
    gradient_dtype: Dtype,
    /// Store the parameters in this dtype (f32, bf16, f16; `bytes_per_step` counts
    /// their size).
    #[arg(long, default_value = "f32")]
    param_dtype: Dtype,
    /// bf16 parameters plus remainders: exact f32 masters (2 + 2 bytes per parameter).
    #[arg(long)]
    param_remainders: bool,
    /// Round 16-bit parameters stochastically (from seed 1).
    #[arg(long)]
    stochastic_rounding: bool,
    /// Keep a 16-bit copy of the parameters (bf16 or f16), written by every step
    /// (`bytes_per_step` counts its 2 bytes per parameter).
    #[arg(long)]
    param_copy: Option<Dtype>,
    /// Store the slots compact (tensors of at least 4096 elements): f32, bf16 or int8
    /// (blocks of 256; `bytes_per_step` counts 4 or 2 + 8/256 bytes per slot element
    /// read and written instead of 8).
    #[arg(long, default_value = "f32")]
    state_dtype: StateDtype,
    /// Run the CPU loops at this level (baseline, avx2, avx512) instead of the best one.
    #[arg(long)]
    cpu_level: Option<CpuLevel>,
    /// Whose formula: keras, torch, optax or burn (same hyperparameters; torch's and
    /// Burn's epsilon outside the root).
    #[arg(long, default_value = "keras", value_parser = parse_dialect)]
    dialect: Dialect,
    /// Param groups (tensors round-robin), each with its own numbers; 0: none.
    #[arg(long, default_value_t = 0)]
    groups: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_dialect(name: &str) -> Result<Dialect, String> {
    Dialect::from_name(name)
        .ok_or_else(|| format!("unknown dialect `{name}` (keras, torch, optax, burn)"))
}

/// The synthetic gradients in the dtype asked for.
enum HostGradients {
    F32(Vec<Vec<f32>>),
    Bf16(Vec<Vec<bf16>>),
    F16(Vec<Vec<f16>>),
}

impl HostGradients {
    fn new(grads: Vec<Vec<f32>>, dtype: Dtype) -> Self {
        fn cast<T>(grads: &[Vec<f32>], f: fn(f32) -> T) -> Vec<Vec<T>> {
            grads
                .iter()
                .map(|g| g.iter().map(|&x| f(x)).collect())
                .collect()
        }
        match dtype {
            Dtype::F32 => HostGradients::F32(grads),
            Dtype::Bf16 => HostGradients::Bf16(cast(&grads, bf16::from_f32)),
            Dtype::F16 => HostGradients::F16(cast(&grads, f16::from_f32)),
        }
    }

    fn apply(&self, opt: &mut RmsProp) -> fused_rmsprop::Result<()> {
        fn typed<T: GradientElement>(opt: &mut RmsProp, g: &[Vec<T>]) -> fused_rmsprop::Result<()> {
            let refs: Vec<Option<&[T]>> = g.iter().map(|g| Some(g.as_slice())).collect();
            opt.apply_typed_gradients(&refs)
        }
        match self {
            HostGradients::F32(g) => typed(opt, g),
            HostGradients::Bf16(g) => typed(opt, g),
            HostGradients::F16(g) => typed(opt, g),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Steps per timed sample: enough to amortize timer and submit overhead.
fn reps_for(bytes: u64) -> usize {
    ((1u64 << 30) / bytes.max(1)).clamp(1, 50) as usize
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let variant = BenchVariant::parse(&args.variant)?;
    if args.backend == Backend::Auto {
        return Err("choose --backend cpu or gpu".into());
    }
    let model = synthetic_model(args.params, args.tensors);
    let tensors = model.len();
    let grads = HostGradients::new(synthetic_gradients(&model), args.gradient_dtype);
    let gradient_bytes = args.gradient_dtype.size_bytes() as u64;
    let copy_bytes = if args.param_copy.is_some() { 2 } else { 0 };
    // 16-bit parameters read and write 2 bytes each instead of 4 (with remainders, the
    // GPU moves both halves, the CPU one f32)
    let param_saving = if args.param_remainders {
        0
    } else {
        2 * (4 - args.param_dtype.size_bytes() as u64)
    };
    let slots =
        1 + u64::from(variant.momentum) + u64::from(variant.centered) + u64::from(variant.ema);
    // bytes each slot element moves per step (read and written)
    let slot_traffic = match args.state_dtype {
        StateDtype::F32 => 8.0,
        StateDtype::Bf16 => 4.0,
        StateDtype::Dynamic8 { block_size } => 2.0 + 8.0 / block_size as f64,
    };
    let per_param = (variant.bytes_per_param_with(gradient_bytes) + copy_bytes
        - param_saving
        - 8 * slots) as f64
        + slots as f64 * slot_traffic;
    let bytes = (per_param * args.params as f64).round() as u64;
    let reps = reps_for(bytes);
    let mut precision = Precision::default()
        .with_gradients(args.gradient_dtype)
        .with_params(args.param_dtype);
    if args.stochastic_rounding {
        precision = precision.with_stochastic_rounding(1);
    }
    if args.param_remainders {
        precision = precision.with_param_remainders();
    }
    if let Some(copy) = args.param_copy {
        precision = precision.with_param_copy(copy);
    }
    let config = variant
        .config()
        .with_state(StateStorage::new(args.state_dtype));
    let mut config = RmsPropConfig {
        dialect: args.dialect,
        eps_in_sqrt: matches!(args.dialect, Dialect::Keras | Dialect::Optax),
        ..config
    };
    // a group names at least one tensor
    let groups = args.groups.min(model.len());
    for g in 0..groups {
        let names = model
            .iter()
            .enumerate()
            .filter(|(t, _)| t % groups == g)
            .map(|(_, v)| v.spec.name.clone());
        config = config.with_param_group(
            ParamGroup::new(names)
                .with_learning_rate_multiplier(1.0 / (g + 1) as f64)
                .with_rho(0.95),
        );
    }
    let mut opt = RmsProp::with_precision(
        config,
        model,
        args.backend,
        &GpuOptions::default(),
        precision,
    )?;
    opt.set_non_finite_guard(args.guard)?;
    if let Some(level) = args.cpu_level {
        opt.set_cpu_level(level)?;
    }
    let cpu_level = opt.cpu_level().map(CpuLevel::name);
    let backend = opt.backend();
    let name = if args.guard {
        format!("{}+guard", variant.name())
    } else {
        variant.name()
    };

    let mut gpu_fields = serde_json::Map::new();
    let (step, copy) = match opt.gpu() {
        None => {
            for _ in 0..3 {
                grads.apply(&mut opt)?;
            }
            let step = median_time(args.samples, reps, |r| {
                for _ in 0..r {
                    let _ = grads.apply(&mut opt);
                }
            });
            // same bytes: copy half of them (each byte read once, written once)
            let half = (bytes / 2 / 4) as usize;
            let src = vec![1.0f32; half];
            let mut dst = vec![0.0f32; half];
            parallel_copy(&mut dst, &src);
            let copy = median_time(args.samples, reps, |r| {
                for _ in 0..r {
                    parallel_copy(&mut dst, &src);
                }
            });
            (step, copy)
        }
        Some(_) => {
            grads.apply(&mut opt)?; // uploads the gradients once
            let present = vec![true; tensors];
            for _ in 0..3 {
                opt.apply_device_gradients(&present)?;
            }
            opt.synchronize()?;
            let mut failed = None;
            let step = median_time(args.samples, reps, |r| {
                for _ in 0..r {
                    if let Err(e) = opt.apply_device_gradients(&present) {
                        failed = Some(e);
                    }
                }
                if let Err(e) = opt.synchronize() {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(e.into());
            }
            let gpu = opt.gpu().ok_or("no gpu")?;
            let dispatches = gpu.dispatches_per_step();
            let ctx = &gpu.context().clone();
            let baseline = GpuCopy::new(ctx, bytes);
            let copy = median_time(args.samples, reps, |r| {
                for _ in 0..r {
                    baseline.submit(ctx);
                }
                let _ = opt.synchronize();
            });
            let shader = ShaderCopy::new(ctx, bytes);
            shader.submit(ctx);
            let shader_copy = median_time(args.samples, reps, |r| {
                for _ in 0..r {
                    shader.submit(ctx);
                }
                let _ = opt.synchronize();
            });
            // the host's share: record and submit only (the GPU drains between samples)
            let mut host = Vec::new();
            for _ in 0..args.samples.max(1) {
                opt.synchronize()?;
                let t = std::time::Instant::now();
                opt.apply_device_gradients(&present)?;
                host.push(t.elapsed().as_secs_f64());
            }
            opt.synchronize()?;
            host.sort_by(f64::total_cmp);
            // end-to-end latency: one step submitted and waited for
            let mut latency = Vec::new();
            for _ in 0..args.samples.max(1) {
                let t = std::time::Instant::now();
                opt.apply_device_gradients(&present)?;
                opt.synchronize()?;
                latency.push(t.elapsed().as_secs_f64());
            }
            latency.sort_by(f64::total_cmp);
            gpu_fields.insert("latency_seconds".into(), json!(latency[latency.len() / 2]));
            let shader_gbps = bytes as f64 / shader_copy.as_secs_f64() / 1e9;
            let gbps = bytes as f64 / step.as_secs_f64() / 1e9;
            gpu_fields.insert("adapter".into(), json!(ctx.adapter_name()));
            gpu_fields.insert("shader_copy_gbps".into(), json!(shader_gbps));
            gpu_fields.insert("shader_ratio".into(), json!(gbps / shader_gbps));
            gpu_fields.insert("dispatches_per_step".into(), json!(dispatches));
            gpu_fields.insert("submissions_per_step".into(), json!(1));
            gpu_fields.insert("host_seconds_per_step".into(), json!(host[host.len() / 2]));
            (step, copy)
        }
    };
    let step_s = step.as_secs_f64();
    let gbps = bytes as f64 / step_s / 1e9;
    let copy_gbps = bytes as f64 / copy.as_secs_f64() / 1e9;
    let mut out = json!({
        "backend": backend.as_str(),
        "variant": name,
        "dialect": args.dialect.as_str(),
        "groups": groups,
        "gradient_dtype": args.gradient_dtype.as_str(),
        "param_copy": args.param_copy.map(Dtype::as_str),
        "param_dtype": args.param_dtype.as_str(),
        "stochastic_rounding": args.stochastic_rounding,
        "param_remainders": args.param_remainders,
        "state_dtype": args.state_dtype.as_str(),
        "state_bytes_per_param": opt.state_bytes() as f64 / args.params as f64,
        "guard": args.guard,
        "cpu_level": cpu_level,
        "params": args.params,
        "tensors": tensors,
        "bytes_per_step": bytes,
        "step_seconds": step_s,
        "gbps": gbps,
        "copy_gbps": copy_gbps,
        "ratio": gbps / copy_gbps,
    });
    if let Some(map) = out.as_object_mut() {
        map.extend(gpu_fields.clone());
    }
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{:>4} {:<8} {:<28} params={:<10} tensors={:<6} step={:.3} ms  {:.1} GB/s  copy {:.1} GB/s  ratio {:.2}",
            backend.as_str(),
            cpu_level.unwrap_or(""),
            name,
            args.params,
            tensors,
            step_s * 1e3,
            gbps,
            copy_gbps,
            gbps / copy_gbps
        );
        let field = |k: &str| gpu_fields.get(k).and_then(|v| v.as_f64());
        if let (Some(gbps), Some(ratio)) = (field("shader_copy_gbps"), field("shader_ratio")) {
            println!("     shader copy {gbps:.1} GB/s  shader_ratio {ratio:.2}");
        }
    }
    if args.guard && opt.skipped_steps().skipped != 0 {
        return Err("the guard skipped finite steps".into());
    }
    Ok(())
}
