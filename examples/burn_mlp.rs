//! Trains a Burn model twice in one run, from the same initialization on the same data:
//! with `BurnRmsProp` (this crate's fused step, Burn's dialect) and with Burn's own
//! `RmsProp` (the same settings), and prints both loss curves, steps per second and the
//! optimizer step's own time.
//!
//! ```text
//! cargo run --release --features burn --example burn_mlp -- [--backend auto|cpu|flex|gpu]
//!     [--model mlp|conv] [--steps N] [--tensors N] [--inputs D] [--hidden H]
//!     [--channels C] [--json] [--plot loss.svg]
//! ```
//!
//! Both models regress `sin` of a projection of `x` on generated rows of `--inputs`.
//! The MLP (the default) is `x -> relu(x W1 + b1) W2 + b2`; `W2` (`H x 1`) is kept as
//! `--tensors - 3` row blocks, joined in the forward pass, so that `--tensors` changes
//! how many parameter tensors the optimizers step and not how many parameters there
//! are. `--model conv` is a small convolutional net over each row as a square image
//! (`--inputs` a square): two 3x3 convolutions of `--channels` channels with ReLUs and
//! a linear head (6 tensors).
//!
//! `--backend gpu` runs Burn's wgpu backend (a software adapter included) and
//! `BurnRmsProp::wgpu` on Burn's own device; `cpu` runs Burn's ndarray backend and
//! this crate's CPU path through the host, `flex` the same on Burn's flex backend;
//! `auto` takes wgpu when Burn finds an adapter. The optimizer step's time is measured
//! from finished gradients (the device synchronized) to the stepped parameters
//! (synchronized again), for both optimizers, and reported as the median of the steps
//! after the first; the first step (which builds the fused optimizer and its pipelines,
//! and Burn's kernels) and the mean of all steps are reported beside it
//! (`fused_first_step_ms`, `fused_mean_step_ms` in `--json`).
//!
//! Exits non-zero unless the two curves end within 1% of each other and, in runs of at
//! least 20 steps, both losses fall (momentum can lift the first few).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, RmsPropConfig as BurnConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use clap::Parser;
use fused_rmsprop::{BurnRmsProp, RmsPropConfig};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "A Burn model trained with BurnRmsProp and with Burn's RmsProp")]
struct Args {
    /// auto (wgpu when Burn finds an adapter, else ndarray), cpu (ndarray), flex, or gpu
    /// (wgpu).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// mlp, or conv (a convolutional net over each row as a square image).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Training steps for each optimizer.
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Parameter tensors in the model (at least 4).
    #[arg(long, default_value_t = 10)]
    tensors: usize,
    /// Input width D.
    #[arg(long, default_value_t = 64)]
    inputs: usize,
    /// Hidden width H (at least `--tensors - 3`).
    #[arg(long, default_value_t = 16384)]
    hidden: usize,
    /// Channels of the convolutional net's two convolutions.
    #[arg(long, default_value_t = 32)]
    channels: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-5)]
    lr: f64,
    /// One JSON line instead of the text report.
    #[arg(long)]
    json: bool,
    /// Write both loss curves to this SVG file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

/// A model the example trains: rows in, one prediction per row out.
trait Net: Module + Clone {
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;
}

#[derive(Module, Debug)]
struct Model {
    w1: Param<Tensor<2>>,
    b1: Param<Tensor<1>>,
    /// `W2`'s row blocks.
    w2: Vec<Param<Tensor<2>>>,
    b2: Param<Tensor<1>>,
}

impl Model {
    fn new(args: &Args, device: &Device) -> Self {
        device.seed(11);
        let blocks = args.tensors - 3;
        let (d, h) = (args.inputs, args.hidden);
        let bound = (1.0 / d as f64).sqrt();
        let bound2 = (1.0 / h as f64).sqrt();
        let w2 = (0..blocks)
            .map(|k| {
                let rows = h / blocks + usize::from(k < h % blocks);
                let w = Tensor::random([rows, 1], Distribution::Uniform(-bound2, bound2), device);
                Param::from_tensor(w)
            })
            .collect();
        Model {
            w1: Param::from_tensor(Tensor::random(
                [d, h],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b1: Param::from_tensor(Tensor::zeros([h], device)),
            w2,
            b2: Param::from_tensor(Tensor::zeros([1], device)),
        }
    }
}

impl Net for Model {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = relu(x.matmul(self.w1.val()) + self.b1.val().unsqueeze());
        let w2 = Tensor::cat(self.w2.iter().map(|w| w.val()).collect(), 0);
        h.matmul(w2) + self.b2.val().unsqueeze()
    }
}

/// Two 3x3 convolutions (no padding) and a linear head, over `side x side` images.
#[derive(Module, Debug)]
struct ConvNet {
    conv1: Conv2d,
    conv2: Conv2d,
    head: Linear,
}

impl ConvNet {
    fn new(side: usize, channels: usize, device: &Device) -> Self {
        device.seed(11);
        let out = side - 4;
        ConvNet {
            conv1: Conv2dConfig::new([1, channels], [3, 3]).init(device),
            conv2: Conv2dConfig::new([channels, channels], [3, 3]).init(device),
            head: LinearConfig::new(channels * out * out, 1).init(device),
        }
    }
}

impl Net for ConvNet {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, d] = x.dims();
        let side = d.isqrt();
        let h = relu(self.conv1.forward(x.reshape([n, 1, side, side])));
        let h = relu(self.conv2.forward(h));
        let [n, c, hh, ww] = h.dims();
        self.head.forward(h.reshape([n, c * hh * ww]))
    }
}

/// Rows `x` and targets `sin(3 x . v)` for a fixed direction `v`; the same for both runs.
fn batches(args: &Args, device: &Device) -> Vec<(Tensor<2>, Tensor<2>)> {
    device.seed(5);
    let v = Tensor::<2>::random([args.inputs, 1], Distribution::Normal(0.0, 1.0), device)
        / (args.inputs as f64).sqrt();
    (0..8)
        .map(|_| {
            let x = Tensor::<2>::random(
                [args.batch, args.inputs],
                Distribution::Uniform(-1.0, 1.0),
                device,
            );
            let y = (x.clone().matmul(v.clone()) * 3.0).sin();
            (x, y)
        })
        .collect()
}

/// One training run: per-step losses, total time, and the optimizer steps' time.
struct Run {
    losses: Vec<f64>,
    total: Duration,
    /// Each step's optimizer time.
    steps: Vec<Duration>,
}

impl Run {
    /// The optimizer step's time in milliseconds: the median of the steps after the
    /// first (which builds pipelines and state), or the first when it is the only one.
    fn step_ms(&self) -> f64 {
        let mut later: Vec<f64> = self.steps.iter().skip(1).map(ms).collect();
        if later.is_empty() {
            return self.first_step_ms();
        }
        later.sort_by(f64::total_cmp);
        let mid = later.len() / 2;
        if later.len() % 2 == 1 {
            later[mid]
        } else {
            (later[mid - 1] + later[mid]) / 2.0
        }
    }

    /// The first step's optimizer time in milliseconds.
    fn first_step_ms(&self) -> f64 {
        self.steps.first().map_or(0.0, ms)
    }

    /// The mean optimizer time of all steps, the first included, in milliseconds.
    fn mean_step_ms(&self) -> f64 {
        self.steps.iter().map(ms).sum::<f64>() / self.steps.len().max(1) as f64
    }
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn train<M: Net>(
    args: &Args,
    device: &Device,
    mut model: M,
    data: &[(Tensor<2>, Tensor<2>)],
    mut step: impl FnMut(M, GradientsParams) -> M,
) -> Run {
    let mut losses = Vec::with_capacity(args.steps);
    let mut steps = Vec::with_capacity(args.steps);
    let start = Instant::now();
    for i in 0..args.steps {
        let (x, y) = &data[i % data.len()];
        let loss = (model.forward(x.clone()) - y.clone())
            .powf_scalar(2.0)
            .mean();
        let grads = GradientsParams::from_grads(loss.clone().backward(), &model);
        losses.push(loss.into_scalar::<f32>() as f64);
        device.sync().expect("the gradients");
        let t = Instant::now();
        model = step(model, grads);
        device.sync().expect("the step");
        steps.push(t.elapsed());
    }
    Run {
        losses,
        total: start.elapsed(),
        steps,
    }
}

fn plot(
    path: &std::path::Path,
    fused: &[f64],
    theirs: &[f64],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = fused.iter().chain(theirs);
    let lo = all
        .clone()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-12);
    let hi = all.copied().fold(0.0, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Burn model: BurnRmsProp and Burn's RmsProp",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..fused.len().max(1), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("batch loss (log scale)")
        .draw()?;
    for (losses, color, label) in [
        (fused, BLUE, "BurnRmsProp (fused)"),
        (theirs, RED, "burn::optim::RmsProp"),
    ] {
        chart
            .draw_series(LineSeries::new(
                losses.iter().enumerate().map(|(s, &l)| (s, l.max(lo))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// Burn 0.22 deprecates its ndarray backend for flex; the CPU run uses ndarray, which
// issue 25 names.
#[allow(deprecated)]
fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args = Args::parse();
    let config = RmsPropConfig::burn();
    let (device, fused, backend) = match args.backend.as_str() {
        "cpu" => (Device::ndarray(), BurnRmsProp::new(config)?, "cpu"),
        "flex" => (Device::flex(), BurnRmsProp::new(config)?, "flex"),
        "gpu" | "auto" => match Device::wgpu_options().init_with_setup() {
            Ok((device, setup)) => {
                let optim = BurnRmsProp::wgpu(config, &device, &setup)?;
                if !args.json {
                    println!("Burn's wgpu device: {}", setup.adapter.get_info().name);
                }
                (device, optim, "gpu")
            }
            Err(e) if args.backend == "gpu" => return Err(e.into()),
            Err(_) => (Device::ndarray(), BurnRmsProp::new(config)?, "cpu"),
        },
        other => return Err(format!("unknown --backend {other}: auto, cpu, flex or gpu").into()),
    };
    let device = device.autodiff();
    match args.model.as_str() {
        "mlp" => {
            if args.tensors < 4 || args.hidden < args.tensors - 3 {
                return Err("--tensors must be at least 4 and at most --hidden + 3".into());
            }
            let model = Model::new(&args, &device);
            run(&args, &device, backend, fused, model, args.tensors)
        }
        "conv" => {
            let side = args.inputs.isqrt();
            if side * side != args.inputs || side < 5 || args.channels == 0 {
                return Err(
                    "--model conv needs --inputs a square of at least 25, and --channels".into(),
                );
            }
            let model = ConvNet::new(side, args.channels, &device);
            run(&args, &device, backend, fused, model, 6)
        }
        other => Err(format!("unknown --model {other}: mlp or conv").into()),
    }
}

/// Trains `model` with `fused` and with Burn's `RmsProp`, reports, and says whether the
/// curves agree.
fn run<M: Net>(
    args: &Args,
    device: &Device,
    backend: &str,
    mut fused: BurnRmsProp,
    model: M,
    tensors: usize,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let data = batches(args, device);
    let params = model.num_params();
    let reference = model.clone();

    let ours = train(args, device, model, &data, |m, g| {
        fused.step(args.lr, m, g).expect("the fused step")
    });
    let mut burn_optim = BurnConfig::new().init();
    let theirs = train(args, device, reference, &data, |m, g| {
        burn_optim.step(args.lr, m, g)
    });

    let (fused_ms, burn_ms) = (ours.step_ms(), theirs.step_ms());
    let first = ours.losses[0];
    let (fused_final, burn_final) = (*ours.losses.last().unwrap(), *theirs.losses.last().unwrap());
    if args.json {
        println!(
            "{}",
            json!({
                "backend": backend,
                "model": args.model,
                "params": params,
                "tensors": tensors,
                "steps": args.steps,
                "fused_first_loss": first,
                "fused_final_loss": fused_final,
                "burn_final_loss": burn_final,
                "fused_step_ms": fused_ms,
                "burn_step_ms": burn_ms,
                "fused_first_step_ms": ours.first_step_ms(),
                "burn_first_step_ms": theirs.first_step_ms(),
                "fused_mean_step_ms": ours.mean_step_ms(),
                "burn_mean_step_ms": theirs.mean_step_ms(),
                "fused_steps_per_s": args.steps as f64 / ours.total.as_secs_f64(),
                "burn_steps_per_s": args.steps as f64 / theirs.total.as_secs_f64(),
            })
        );
    } else {
        println!(
            "{backend}, {}: {params} parameters in {tensors} tensors, {} steps",
            args.model, args.steps
        );
        println!(
            "BurnRmsProp: loss {first:.5} -> {fused_final:.5}, optimizer step {fused_ms:.3} ms (first {:.1} ms), {:.1} steps/s",
            ours.first_step_ms(),
            args.steps as f64 / ours.total.as_secs_f64()
        );
        println!(
            "Burn RmsProp: loss {:.5} -> {burn_final:.5}, optimizer step {burn_ms:.3} ms (first {:.1} ms), {:.1} steps/s",
            theirs.losses[0],
            theirs.first_step_ms(),
            args.steps as f64 / theirs.total.as_secs_f64()
        );
        println!("optimizer step: fused {:.2}x faster", burn_ms / fused_ms);
    }
    if let Some(path) = &args.plot {
        plot(path, &ours.losses, &theirs.losses)?;
        if !args.json {
            println!("plot: {}", path.display());
        }
    }
    let fell = args.steps < 20 || (fused_final < first && burn_final < theirs.losses[0]);
    let agree = (fused_final - burn_final).abs() <= 0.01 * burn_final.abs() + 1e-6;
    if !(fell && agree) {
        eprintln!(
            "FAILED: losses fell: {fell}; final losses within 1%: {agree} ({fused_final} against {burn_final})"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
