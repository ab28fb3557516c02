//! The model, data and training loops of `examples/train_mlp` (also run by
//! `tests/train_mlp.rs`): a tanh multilayer perceptron regressing a synthetic target,
//! trained by fused RMSprop either on the GPU (forward and backward in WGSL, gradients
//! written into the optimizer's views, one submission per step) or on the CPU (the same
//! passes in host code with ndarray).
#![allow(dead_code)]

#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;

use fused_rmsprop::half::bf16;
use fused_rmsprop::{
    Backend, BackendKind, Dtype, GpuOptions, Precision, RmsProp, RmsPropConfig, StateDtype,
    StateStorage, Variable,
};
use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Layer widths: 32 inputs, three hidden layers of 256, 8 outputs (142,088 parameters).
pub const WIDTHS: [usize; 5] = [32, 256, 256, 256, 8];
/// Rows of the generated dataset.
pub const SAMPLES: usize = 8192;
/// Dispatches of one training step before the optimizer's: gather, one forward per
/// layer, the loss, one parameter-gradient pass per layer, one input-gradient pass per
/// layer but the first.
pub const MODEL_DISPATCHES: usize = 1 + 4 + 1 + 4 + 3;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// auto, cpu or gpu.
    pub backend: Backend,
    /// Training steps.
    pub steps: usize,
    /// Rows per step.
    pub batch: usize,
    /// Read the loss back every this many steps (and at the first and last).
    pub every: usize,
    /// Seed of the data and the initialization.
    pub seed: u64,
    /// `F32`, or `Bf16`: mixed precision, the forward and backward passes reading the
    /// optimizer's bf16 parameter copy and producing bf16 gradients (f32 master weights
    /// and slots).
    pub precision: Dtype,
    /// How the optimizer stores its slots (tensors of at least 4096 elements; the
    /// rest keep f32).
    pub state: StateDtype,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// "cpu" or "gpu".
    pub backend: &'static str,
    /// "f32" or "bf16".
    pub precision: &'static str,
    /// "f32", "bf16" or "int8": the slots' storage.
    pub state: &'static str,
    /// Bytes the optimizer's slots take.
    pub state_bytes: u64,
    /// The adapter, on the GPU.
    pub adapter: Option<String>,
    /// Trainable parameters.
    pub params: usize,
    /// The first batch's loss, before any step.
    pub first_loss: f64,
    /// The last batch's loss, before the last step.
    pub final_loss: f64,
    /// Steps run.
    pub steps: usize,
    /// Steps per second, loss readbacks included.
    pub steps_per_second: f64,
    /// Compute dispatches per step, the optimizer's included (GPU; 0 on the CPU).
    pub dispatches_per_step: usize,
    /// (step, loss) at every readback.
    pub losses: Vec<(usize, f64)>,
}

/// xorshift64*, the example's only randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0 // uniform in [-1, 1)
    }
}

/// The dataset: inputs uniform in [-1, 1), targets `sin(2 x P)` for a fixed random
/// projection `P`, so a target mixes all inputs non-linearly.
pub fn dataset(seed: u64) -> (Array2<f32>, Array2<f32>) {
    let (d, o) = (WIDTHS[0], WIDTHS[WIDTHS.len() - 1]);
    let mut rng = Rng(seed | 1);
    let x = Array2::from_shape_simple_fn((SAMPLES, d), || rng.next());
    let p = Array2::from_shape_simple_fn((d, o), || rng.next() / (d as f32).sqrt());
    let y = x.dot(&p).mapv(|v| (2.0 * v).sin());
    (x, y)
}

/// The starting variables: Glorot-uniform kernels, zero biases (Keras' Dense defaults).
pub fn initial_variables(seed: u64) -> Vec<Variable> {
    let mut rng = Rng(seed.wrapping_mul(31) | 1);
    let mut vars = Vec::new();
    for (l, w) in WIDTHS.windows(2).enumerate() {
        let limit = (6.0 / (w[0] + w[1]) as f32).sqrt();
        let kernel = (0..w[0] * w[1]).map(|_| limit * rng.next()).collect();
        vars.push(Variable::new(format!("dense_{l}/kernel"), &[w[0], w[1]], kernel).unwrap());
        vars.push(Variable::new(format!("dense_{l}/bias"), &[w[1]], vec![0.0; w[1]]).unwrap());
    }
    vars
}

/// Keras' defaults but a learning rate of 1e-3 with momentum 0.5.
pub fn config() -> RmsPropConfig {
    RmsPropConfig::default()
        .with_learning_rate(1e-3)
        .with_momentum(0.5)
        .with_name("train_mlp")
}

/// Trains with `options`, calling `progress(step, loss)` at every loss readback.
#[cfg(not(target_arch = "wasm32"))]
pub fn train(
    options: &TrainOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<Report, Box<dyn std::error::Error>> {
    let (x, y) = dataset(options.seed);
    let vars = initial_variables(options.seed);
    let params = vars.iter().map(|v| v.values.len()).sum();
    let precision = match options.precision {
        Dtype::F32 => Precision::default(),
        Dtype::Bf16 => Precision::default()
            .with_gradients(Dtype::Bf16)
            .with_param_copy(Dtype::Bf16),
        other => return Err(format!("train_mlp runs in f32 or bf16, not {other}").into()),
    };
    let mut opt = RmsProp::with_precision(
        config().with_state(StateStorage::new(options.state)),
        vars,
        options.backend,
        &GpuOptions::default(),
        precision,
    )?;
    let every = options.every.max(1);
    let steps = options.steps.max(1);
    let report_at = |step: usize| step.is_multiple_of(every) || step + 1 == steps;
    let mut losses = Vec::new();
    let started = Instant::now();
    let (adapter, dispatches) = match opt.backend() {
        BackendKind::Cpu => {
            for step in 0..steps {
                // mixed precision: the forward pass reads the bf16 copy
                let vars = if opt.precision().param_copy.is_some() {
                    opt.variable_copies()?
                } else {
                    opt.variables()?
                };
                let loss = cpu_step(&mut opt, &vars, &x, &y, step * options.batch, options.batch)?;
                if report_at(step) {
                    losses.push((step, loss));
                    progress(step, loss);
                }
            }
            (None, 0)
        }
        BackendKind::Gpu => {
            let mut gpu = gpu::GpuModel::new(&opt, &x, &y, options.batch)?;
            for step in 0..steps {
                let read = report_at(step);
                if let Some(loss) = gpu.step(&mut opt, step * options.batch, read)? {
                    losses.push((step, loss));
                    progress(step, loss);
                }
            }
            let engine = opt.gpu().ok_or("no GPU engine")?;
            (
                Some(engine.adapter_name()),
                MODEL_DISPATCHES + engine.dispatches_per_step(),
            )
        }
    };
    opt.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        backend: opt.backend().as_str(),
        precision: options.precision.as_str(),
        state: options.state.as_str(),
        state_bytes: opt.state_bytes(),
        adapter,
        params,
        first_loss: losses.first().map_or(f64::NAN, |l| l.1),
        final_loss: losses.last().map_or(f64::NAN, |l| l.1),
        steps,
        steps_per_second: steps as f64 / seconds.max(1e-9),
        dispatches_per_step: dispatches,
        losses,
    })
}

/// The batch starting at row `start` (wrapping around the dataset).
fn batch_rows(data: &Array2<f32>, start: usize, batch: usize) -> Array2<f32> {
    let rows: Vec<usize> = (0..batch).map(|r| (start + r) % SAMPLES).collect();
    data.select(Axis(0), &rows)
}

/// One step in host code from the variables `vars` as the forward pass reads them
/// (the bf16 copy in mixed precision): forward, loss, backward, `apply_gradients`.
/// Returns the loss.
pub fn cpu_step(
    opt: &mut RmsProp,
    vars: &[Vec<f32>],
    x: &Array2<f32>,
    y: &Array2<f32>,
    start: usize,
    batch: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let half = opt.precision().param_copy.is_some();
    let layers = WIDTHS.len() - 1;
    let kernel = |l: usize| -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((WIDTHS[l], WIDTHS[l + 1]), &vars[2 * l]).unwrap()
    };
    // forward, keeping every activation
    let mut acts = vec![batch_rows(x, start, batch)];
    for l in 0..layers {
        let bias = Array1::from(vars[2 * l + 1].clone());
        let mut z = acts[l].dot(&kernel(l)) + &bias;
        if l + 1 < layers {
            z.mapv_inplace(f32::tanh);
        }
        acts.push(z);
    }
    let target = batch_rows(y, start, batch);
    let diff = &acts[layers] - &target;
    let count = diff.len() as f32;
    let loss = diff.iter().map(|d| d * d).sum::<f32>() / count;
    // backward
    let mut delta = diff * (2.0 / count);
    let mut grads: Vec<Vec<f32>> = vec![Vec::new(); 2 * layers];
    for l in (0..layers).rev() {
        grads[2 * l] = acts[l].t().dot(&delta).iter().copied().collect();
        grads[2 * l + 1] = delta.sum_axis(Axis(0)).to_vec();
        if l > 0 {
            let a = &acts[l];
            delta = delta.dot(&kernel(l).t()) * &a.mapv(|a| 1.0 - a * a);
        }
    }
    if half {
        let grads: Vec<Vec<bf16>> = grads
            .iter()
            .map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect();
        let refs: Vec<Option<&[bf16]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        opt.apply_typed_gradients(&refs)?;
    } else {
        let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
        opt.apply_gradients(&refs)?;
    }
    Ok(f64::from(loss))
}

/// The GPU side: buffers, pipelines and bind groups built once; a step is one encoder.
pub mod gpu {
    use super::*;
    use fused_rmsprop::gpu::TensorView;

    const SHADER: &str = include_str!("mlp.wgsl");

    /// `Layer` in mlp.wgsl.
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct LayerUniform {
        batch: u32,
        inputs: u32,
        outputs: u32,
        hidden: u32,
        samples: u32,
        start: u32,
        _pad: [u32; 2],
    }

    /// One dispatch: a pipeline, its bind group and its invocation count.
    struct Dispatch {
        pipeline: wgpu::ComputePipeline,
        bind_group: wgpu::BindGroup,
        invocations: u32,
        workgroup: u32,
    }

    pub struct GpuModel {
        device: wgpu::Device,
        queue: wgpu::Queue,
        gather: wgpu::Buffer,
        gather_uniform: LayerUniform,
        dispatches: Vec<Dispatch>,
        loss: wgpu::Buffer,
        staging: wgpu::Buffer,
        present: Vec<bool>,
        max_groups: u32,
    }

    fn storage(device: &wgpu::Device, label: &str, floats: usize) -> wgpu::Buffer {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (4 * floats.max(4)) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn whole(b: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
        b.as_entire_binding()
    }

    fn view(v: TensorView<'_>) -> wgpu::BindingResource<'_> {
        v.binding().expect("no empty tensors in this model")
    }

    impl GpuModel {
        pub fn new(
            opt: &RmsProp,
            x: &Array2<f32>,
            y: &Array2<f32>,
            batch: usize,
        ) -> Result<Self, Box<dyn std::error::Error>> {
            let engine = opt.gpu().ok_or("not on the GPU")?;
            let ctx = engine.context();
            let (device, queue) = (ctx.device.clone(), ctx.queue.clone());
            let layers = WIDTHS.len() - 1;
            let upload = |label, a: &Array2<f32>| {
                let b = storage(&device, label, a.len());
                queue.write_buffer(&b, 0, bytemuck::cast_slice(a.as_slice().unwrap()));
                b
            };
            let (x_data, y_data) = (upload("inputs", x), upload("targets", y));
            let acts: Vec<wgpu::Buffer> = WIDTHS
                .iter()
                .map(|&w| storage(&device, "activations", batch * w))
                .collect();
            // deltas[l]: d loss / d pre-activation of layer l, [batch, WIDTHS[l + 1]]
            let deltas: Vec<wgpu::Buffer> = WIDTHS[1..]
                .iter()
                .map(|&w| storage(&device, "deltas", batch * w))
                .collect();
            let target = storage(&device, "batch targets", batch * WIDTHS[layers]);
            let loss = storage(&device, "loss", 4);
            let staging = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("loss readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let half = opt.precision().param_copy.is_some();

            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("mlp.wgsl"),
                source: wgpu::ShaderSource::Wgsl(SHADER.into()),
            });
            // layout `auto`: each pipeline binds only what its entry point uses (at most
            // four storage buffers, so the model runs on downlevel devices too)
            let constants = [("BF16", if half { 1.0 } else { 0.0 })];
            let pipeline = |entry_point: &'static str| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry_point),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry_point),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        ..Default::default()
                    },
                    cache: None,
                })
            };
            let uniform = |u: LayerUniform| {
                let b = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("layer"),
                    size: std::mem::size_of::<LayerUniform>() as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                queue.write_buffer(&b, 0, bytemuck::bytes_of(&u));
                b
            };
            let dims = |l: usize| LayerUniform {
                batch: batch as u32,
                inputs: WIDTHS[l] as u32,
                outputs: WIDTHS[l + 1] as u32,
                hidden: u32::from(l + 1 < layers),
                samples: SAMPLES as u32,
                start: 0,
                _pad: [0; 2],
            };
            let mut dispatches = Vec::new();
            // bindings: 0 the layer uniform, then (binding, resource) of what the entry
            // point reads and writes
            let mut add = |entry_point: &'static str,
                           u: &wgpu::Buffer,
                           bindings: Vec<(u32, wgpu::BindingResource<'_>)>,
                           invocations: usize,
                           workgroup: u32| {
                let entries: Vec<wgpu::BindGroupEntry<'_>> = std::iter::once((0, whole(u)))
                    .chain(bindings)
                    .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
                    .collect();
                let pipeline = pipeline(entry_point);
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(entry_point),
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &entries,
                });
                dispatches.push(Dispatch {
                    pipeline,
                    bind_group,
                    invocations: invocations as u32,
                    workgroup,
                });
            };
            assert!(
                WIDTHS[0] >= WIDTHS[layers],
                "gather copies targets along inputs"
            );
            let gather_uniform = LayerUniform {
                inputs: WIDTHS[0] as u32,
                outputs: WIDTHS[layers] as u32,
                hidden: 0,
                ..dims(0)
            };
            let gather = uniform(gather_uniform);
            add(
                "gather",
                &gather,
                vec![
                    (1, whole(&x_data)),
                    (2, whole(&y_data)),
                    (4, whole(&acts[0])),
                    (5, whole(&target)),
                ],
                batch * WIDTHS[0],
                64,
            );
            let uniforms: Vec<wgpu::Buffer> = (0..layers).map(|l| uniform(dims(l))).collect();
            // the layer's kernel and bias as the forward pass reads them: f32, or the
            // bf16 copy
            let weights = |l: usize| -> Result<_, fused_rmsprop::Error> {
                Ok(if half {
                    [
                        view(engine.param_copy_view(2 * l)?),
                        view(engine.param_copy_view(2 * l + 1)?),
                    ]
                } else {
                    [
                        view(engine.param_view(2 * l)?),
                        view(engine.param_view(2 * l + 1)?),
                    ]
                })
            };
            for l in 0..layers {
                let [kernel, bias] = weights(l)?;
                add(
                    "forward",
                    &uniforms[l],
                    vec![
                        (1, whole(&acts[l])),
                        (2, kernel),
                        (3, bias),
                        (4, whole(&acts[l + 1])),
                    ],
                    batch * WIDTHS[l + 1],
                    64,
                );
            }
            add(
                "loss_gradient",
                &uniforms[layers - 1],
                vec![
                    (1, whole(&acts[layers])),
                    (2, whole(&target)),
                    (4, whole(&deltas[layers - 1])),
                    (5, whole(&loss)),
                ],
                256,
                256,
            );
            for l in (0..layers).rev() {
                let invocations = if half {
                    (WIDTHS[l] * WIDTHS[l + 1]).div_ceil(2) + WIDTHS[l + 1].div_ceil(2)
                } else {
                    (WIDTHS[l] + 1) * WIDTHS[l + 1]
                };
                add(
                    "parameter_gradients",
                    &uniforms[l],
                    vec![
                        (1, whole(&acts[l])),
                        (2, whole(&deltas[l])),
                        (4, view(engine.gradient_view(2 * l)?)),
                        (5, view(engine.gradient_view(2 * l + 1)?)),
                    ],
                    invocations,
                    64,
                );
                if l > 0 {
                    let [kernel, _] = weights(l)?;
                    add(
                        "input_gradient",
                        &uniforms[l],
                        vec![
                            (1, whole(&deltas[l])),
                            (2, kernel),
                            (3, whole(&acts[l])),
                            (4, whole(&deltas[l - 1])),
                        ],
                        batch * WIDTHS[l],
                        64,
                    );
                }
            }
            assert_eq!(dispatches.len(), MODEL_DISPATCHES);
            Ok(GpuModel {
                max_groups: device.limits().max_compute_workgroups_per_dimension,
                device,
                queue,
                gather,
                gather_uniform,
                dispatches,
                loss,
                staging,
                present: vec![true; 2 * layers],
            })
        }

        /// One training step in one submission: the batch at row `start`, forward,
        /// backward into the optimizer's gradient views, the optimizer's step. With
        /// `read_loss`, copies the loss out and waits for it (native).
        #[cfg(not(target_arch = "wasm32"))]
        pub fn step(
            &mut self,
            opt: &mut RmsProp,
            start: usize,
            read_loss: bool,
        ) -> Result<Option<f64>, Box<dyn std::error::Error>> {
            pollster::block_on(self.step_async(opt, start, read_loss))
        }

        /// [`GpuModel::step`], awaiting the loss instead of blocking (a browser's way).
        pub async fn step_async(
            &mut self,
            opt: &mut RmsProp,
            start: usize,
            read_loss: bool,
        ) -> Result<Option<f64>, Box<dyn std::error::Error>> {
            self.gather_uniform.start = (start % SAMPLES) as u32;
            self.queue
                .write_buffer(&self.gather, 0, bytemuck::bytes_of(&self.gather_uniform));
            let mut encoder = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for d in &self.dispatches {
                    let groups = d.invocations.div_ceil(d.workgroup).max(1);
                    let x = groups.min(self.max_groups);
                    pass.set_pipeline(&d.pipeline);
                    pass.set_bind_group(0, &d.bind_group, &[]);
                    pass.dispatch_workgroups(x, groups.div_ceil(x), 1);
                }
            }
            opt.record_device_step(&self.present, &mut encoder)?;
            if read_loss {
                encoder.copy_buffer_to_buffer(&self.loss, 0, &self.staging, 0, 16);
            }
            self.queue.submit([encoder.finish()]);
            if !read_loss {
                return Ok(None);
            }
            let slice = self.staging.slice(..);
            let (tx, rx) = futures_channel::oneshot::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            // a native device delivers when polled; a browser's on its own
            #[cfg(not(target_arch = "wasm32"))]
            self.device.poll(wgpu::PollType::wait_indefinitely())?;
            rx.await??;
            let loss = {
                let bytes = slice.get_mapped_range()?;
                bytemuck::cast_slice::<u8, f32>(&bytes)[0]
            };
            self.staging.unmap();
            Ok(Some(f64::from(loss)))
        }
    }
}
