//! Optimizes a toy loss headlessly: a sum of Rosenbrock terms over `--params`
//! parameters (100,000 by default), its gradient computed here in closed form.
//!
//! ```text
//! cargo run --release --example toy_loss -- [--backend auto|cpu|gpu] [--steps N]
//!     [--learning-rate LR] [--rho R] [--momentum M] [--centered] [--global-clipnorm C]
//!     [--use-ema] [--schedule constant|exponential|cosine] [--state-dtype f32|bf16|int8]
//!     [--plot loss.svg]
//! ```
//!
//! Exits non-zero if the loss did not fall at least `REQUIRED_FACTOR`-fold.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use fused_rmsprop::{
    Backend, CosineDecay, ExponentialDecay, KerasSchedule, LearningRate, RmsProp, RmsPropConfig,
    StateDtype, StateStorage, Variable,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The loss must fall at least this many times over the run.
const REQUIRED_FACTOR: f64 = 5.0;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Schedule {
    Constant,
    Exponential,
    Cosine,
}

#[derive(Parser, Debug)]
#[command(about = "Optimize a sum of Rosenbrock terms with fused RMSprop")]
struct Args {
    /// auto (GPU if present, else CPU), cpu or gpu.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Number of parameters (even).
    #[arg(long, default_value_t = 100_000)]
    params: usize,
    /// Initial learning rate.
    #[arg(long, default_value_t = 0.03)]
    learning_rate: f64,
    /// rho.
    #[arg(long, default_value_t = 0.9)]
    rho: f64,
    /// momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Use the centered variant.
    #[arg(long)]
    centered: bool,
    /// Clip all gradients to this global norm.
    #[arg(long)]
    global_clipnorm: Option<f64>,
    /// Keep an EMA of the parameters and finalize with it.
    #[arg(long)]
    use_ema: bool,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value = "constant")]
    schedule: Schedule,
    /// Write the loss curve as SVG here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// How the optimizer stores its slots: f32, bf16 or int8 (block-wise).
    #[arg(long, default_value = "f32")]
    state_dtype: StateDtype,
}

/// f(x) = sum_i 100 (x[2i+1] - x[2i]^2)^2 + (1 - x[2i])^2, averaged over pairs.
fn loss_and_gradient(x: &[f32], grad: &mut [f32]) -> f64 {
    let pairs = (x.len() / 2).max(1) as f64;
    let mut loss = 0.0f64;
    for (xp, gp) in x.chunks_exact(2).zip(grad.chunks_exact_mut(2)) {
        let (a, b) = (xp[0] as f64, xp[1] as f64);
        let r = b - a * a;
        loss += 100.0 * r * r + (1.0 - a) * (1.0 - a);
        gp[0] = ((-400.0 * a * r - 2.0 * (1.0 - a)) / pairs) as f32;
        gp[1] = ((200.0 * r) / pairs) as f32;
    }
    loss / pairs
}

fn config(args: &Args) -> RmsPropConfig {
    let lr: LearningRate = match args.schedule {
        Schedule::Constant => args.learning_rate.into(),
        Schedule::Exponential => KerasSchedule::Exponential(ExponentialDecay {
            initial_learning_rate: args.learning_rate,
            decay_steps: args.steps.max(1) as f64,
            decay_rate: 0.1,
            staircase: false,
            name: "ExponentialDecay".into(),
        })
        .into(),
        Schedule::Cosine => KerasSchedule::Cosine(CosineDecay {
            initial_learning_rate: args.learning_rate,
            decay_steps: args.steps.max(1) as f64,
            alpha: 0.05,
            name: "CosineDecay".into(),
            warmup_target: None,
            warmup_steps: 0.0,
        })
        .into(),
    };
    let mut c = RmsPropConfig::default()
        .with_learning_rate(lr)
        .with_rho(args.rho)
        .with_momentum(args.momentum)
        .with_centered(args.centered)
        .with_use_ema(args.use_ema)
        .with_name("toy_loss")
        .with_state(StateStorage::new(args.state_dtype));
    if let Some(g) = args.global_clipnorm {
        c = c.with_global_clipnorm(g);
    }
    c
}

fn plot(path: &std::path::Path, losses: &[f64]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = losses
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .max(1e-12);
    let hi = losses.iter().cloned().fold(0.0, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(&root)
        .caption("RMSprop on a sum of Rosenbrock terms", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..losses.len(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        losses.iter().enumerate().map(|(i, &l)| (i, l.max(lo))),
        &BLUE,
    ))?;
    root.present()?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let n = args.params.max(2) / 2 * 2;
    // Start away from the minimum at (1, 1): a deterministic spread around (-0.5, 0.5).
    let start: Vec<f32> = (0..n)
        .map(|i| {
            let jitter = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
            if i % 2 == 0 {
                -0.5 + 0.5 * jitter
            } else {
                0.5 + 0.5 * jitter
            }
        })
        .collect();
    let var = Variable::new("rosenbrock/x", &[n], start)?;
    let mut opt = RmsProp::with_backend(config(args), vec![var], args.backend)?;
    eprintln!(
        "backend: {} ({} parameters, {} steps)",
        opt.backend().as_str(),
        n,
        args.steps
    );

    let bar = ProgressBar::with_draw_target(Some(args.steps as u64), ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} steps, loss {msg} ({per_sec})",
    )?);
    let mut grad = vec![0.0f32; n];
    let mut losses = Vec::with_capacity(args.steps + 1);
    let started = Instant::now();
    for _ in 0..args.steps {
        let x = opt.variable(0)?;
        let loss = loss_and_gradient(&x, &mut grad);
        losses.push(loss);
        bar.set_message(format!("{loss:.6}"));
        opt.apply_gradients(&[Some(&grad)])?;
        bar.inc(1);
    }
    opt.finalize_variable_values()?;
    let final_x = opt.variable(0)?;
    let final_loss = loss_and_gradient(&final_x, &mut grad);
    losses.push(final_loss);
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let first = losses[0];
    println!(
        "backend: {}, state {}\nfirst loss: {first:.6}\nfinal loss: {final_loss:.6}\nsteps: {}\nsteps/s: {:.1}",
        opt.backend().as_str(),
        args.state_dtype,
        args.steps,
        args.steps as f64 / seconds.max(1e-9)
    );
    if let Some(path) = &args.plot {
        plot(path, &losses)?;
        println!("plot: {}", path.display());
    }
    if final_loss.is_finite() && final_loss * REQUIRED_FACTOR <= first {
        println!(
            "ok: the loss fell {:.1}x (at least {REQUIRED_FACTOR}x required)",
            first / final_loss
        );
        Ok(())
    } else {
        Err(format!(
            "the loss fell only from {first} to {final_loss} (at least {REQUIRED_FACTOR}x required)"
        )
        .into())
    }
}
