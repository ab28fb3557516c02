//! Trains a multilayer perceptron on the optimizer's device: the way to link
//! fused-rmsprop into GPU training code.
//!
//! ```text
//! cargo run --release --example train_mlp -- [--backend auto|cpu|gpu] [--steps N]
//!     [--batch B] [--every K] [--precision f32|bf16] [--state-dtype f32|bf16|int8]
//!     [--json] [--plot loss.svg]
//! ```
//!
//! The model (32 -> 256 -> 256 -> 256 -> 8, tanh, 142,088 parameters) regresses a
//! synthetic target on 8,192 generated rows. On a GPU, the forward and backward passes
//! are WGSL kernels (`mlp.wgsl`) that read the parameters through the optimizer's
//! `param_view`s and write the gradients straight into its `gradient_view`s; the
//! optimizer's step is recorded into the same encoder (`record_device_step`), so a
//! training step is one submission, and nothing but the loss (every `--every` steps)
//! comes back to the host. On the CPU the same passes run in host code with the same
//! data and initialization.
//!
//! `--precision bf16` trains in mixed precision: the optimizer keeps f32 master weights
//! and slots plus a bf16 copy of the weights, written by each step in the same pass
//! (`Precision::param_copy`); the forward and backward passes read that copy
//! (`param_copy_view`) and write bf16 gradients (`Precision::gradients`).
//!
//! `--state-dtype bf16|int8` stores the optimizer's slots compact (`StateStorage`):
//! bf16, or 8-bit block-wise codes with one f32 scale per 256 elements, for the three
//! kernels of at least 4096 elements.
//!
//! Exits non-zero unless the loss falls at least `REQUIRED_FACTOR`-fold.

mod mlp;

use std::process::ExitCode;

use clap::Parser;
use fused_rmsprop::{Backend, Dtype, StateDtype};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// The loss must fall at least this many times.
const REQUIRED_FACTOR: f64 = 10.0;

#[derive(Parser, Debug)]
#[command(about = "Train an MLP with fused RMSprop, on the optimizer's device")]
struct Args {
    /// auto (a hardware GPU if present, else CPU), cpu or gpu.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Read the loss back every this many steps.
    #[arg(long, default_value_t = 20)]
    every: usize,
    /// Seed of the data and the initialization.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// f32, or bf16: bf16 weights (the optimizer's copy) and gradients, f32 master
    /// weights and slots.
    #[arg(long, default_value = "f32")]
    precision: Dtype,
    /// How the optimizer stores its slots: f32, bf16 or int8 (block-wise).
    #[arg(long, default_value = "f32")]
    state_dtype: StateDtype,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Write the loss curve (SVG) here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plot(path: &std::path::Path, losses: &[(usize, f64)]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = losses
        .iter()
        .map(|l| l.1)
        .fold(f64::INFINITY, f64::min)
        .max(1e-12);
    let hi = losses
        .iter()
        .map(|l| l.1)
        .fold(0.0, f64::max)
        .max(lo * 10.0);
    let last = losses.last().map_or(1, |l| l.0 + 1);
    let mut chart = ChartBuilder::on(&root)
        .caption("MLP regression, fused RMSprop", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..last, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("batch loss (log scale)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        losses.iter().map(|&(s, l)| (s, l.max(lo))),
        &BLUE,
    ))?;
    root.present()?;
    Ok(())
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let options = mlp::TrainOptions {
        backend: args.backend,
        steps: args.steps,
        batch: args.batch.max(1),
        every: args.every,
        seed: args.seed,
        precision: args.precision,
        state: args.state_dtype,
    };
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(args.steps as u64), ProgressDrawTarget::stderr())
    };
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} steps, loss {msg} ({per_sec})",
    )?);
    let report = mlp::train(&options, |step, loss| {
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("{loss:.5}"));
    })?;
    bar.finish_and_clear();
    let fell = report.first_loss / report.final_loss;
    if args.json {
        println!(
            "{}",
            json!({
                "backend": report.backend,
                "precision": report.precision,
                "state_dtype": report.state,
                "state_bytes": report.state_bytes,
                "adapter": report.adapter,
                "params": report.params,
                "batch": options.batch,
                "first_loss": report.first_loss,
                "final_loss": report.final_loss,
                "steps": report.steps,
                "steps_per_second": report.steps_per_second,
                "dispatches_per_step": report.dispatches_per_step,
                "submissions_per_step": usize::from(report.backend == "gpu"),
            })
        );
    } else {
        println!(
            "backend: {}{}, precision {}, state {} ({} bytes)\nparams: {}\nfirst loss: {:.6}\nfinal loss: {:.6} ({fell:.1}x lower)\nsteps: {} ({:.1} steps/s{})",
            report.backend,
            report.adapter.as_deref().map(|a| format!(" ({a})")).unwrap_or_default(),
            report.precision,
            report.state,
            report.state_bytes,
            report.params,
            report.first_loss,
            report.final_loss,
            report.steps,
            report.steps_per_second,
            if report.backend == "gpu" {
                format!(", {} dispatches in 1 submission each", report.dispatches_per_step)
            } else {
                String::new()
            },
        );
    }
    if let Some(path) = &args.plot {
        plot(path, &report.losses)?;
        if !args.json {
            println!("plot: {}", path.display());
        }
    }
    if report.final_loss.is_finite() && fell >= REQUIRED_FACTOR {
        Ok(())
    } else {
        Err(format!(
            "the loss fell only {fell:.2}x, from {} to {} (at least {REQUIRED_FACTOR}x required)",
            report.first_loss, report.final_loss
        )
        .into())
    }
}
