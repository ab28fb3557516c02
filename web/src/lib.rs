//! fused-rmsprop in the browser (wasm32 + WebGPU, through wasm-bindgen): what
//! `web/index.html` (the `train_mlp` page), `web/test.html` (the Keras traces and the
//! MLP in headless Chromium, `web/run.mjs`) and `web/bench.html` (side by side with
//! TensorFlow.js) call. Every failure reaches JavaScript as an exception carrying the
//! crate's typed error message, never as a wasm trap.
//!
//! The model and the trace harness are the native ones, compiled again for wasm:
//! `examples/train_mlp/mlp.rs` and `tests/common/trace.rs`.
#![allow(clippy::await_holding_refcell_ref)] // one call at a time, checked by try_borrow_mut

use std::cell::RefCell;
use std::rc::Rc;

use fused_rmsprop::{
    Backend, BackendKind, GpuContext, GpuOptions, Precision, RmsProp, RmsPropConfig, StateDtype,
    StateStorage, Variable,
};
use ndarray::Array2;
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

// the native example's driver (`train`) is not compiled here; parts of its imports go
// unused
#[allow(unused_imports)]
#[path = "../../examples/train_mlp/mlp.rs"]
mod mlp;
#[path = "../../tests/common/trace.rs"]
mod trace;

thread_local! {
    /// The page's GPU context, once [`init_gpu`] found one.
    static GPU: RefCell<Option<GpuContext>> = const { RefCell::new(None) };
}

/// Panics (bugs) print their message to the console instead of a bare trap.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

fn js(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// The GPU context [`init_gpu`] made.
fn gpu() -> Option<GpuContext> {
    GPU.with(|g| g.borrow().clone())
}

/// Creates the device on the browser's WebGPU adapter (software ones included) and
/// returns the adapter's name; throws the crate's error (no WebGPU, a device below
/// the kernels' limits) otherwise.
#[wasm_bindgen]
pub async fn init_gpu() -> Result<String, JsError> {
    let ctx = GpuContext::new_async(true).await.map_err(js)?;
    let name = ctx.adapter_name();
    GPU.with(|g| *g.borrow_mut() = Some(ctx));
    Ok(name)
}

/// The adapter's WebGPU limits as the crate sees them, for the page to show.
#[wasm_bindgen]
pub fn gpu_limits() -> Option<String> {
    let ctx = gpu()?;
    let l = ctx.device.limits();
    Some(format!(
        "{} storage buffers per stage, {} MiB per binding, {} invocations per workgroup",
        l.max_storage_buffers_per_shader_stage,
        l.max_storage_buffer_binding_size >> 20,
        l.max_compute_invocations_per_workgroup
    ))
}

/// Replays a Keras trace (its JSON text) on `backend` (`"gpu"` or `"cpu"`) and compares
/// it with the results Keras recorded, as the native conformance tests do. Returns
/// `{"name", "backend", "matches", "mismatch"}` as JSON; throws for a trace that does
/// not parse or an optimizer that refuses it.
#[wasm_bindgen]
pub async fn replay_trace(text: String, backend: String) -> Result<String, JsError> {
    let trace = trace::Trace::from_json_str(&text).map_err(js)?;
    let expected = trace
        .expected
        .clone()
        .ok_or_else(|| js("invalid trace: it has no expected results"))?;
    let (backend, options) = options_for(&backend)?;
    let (ran, got) = trace
        .replay_async(backend, &options, Precision::default())
        .await
        .map_err(js)?;
    let mismatch = trace::first_mismatch(&got, &expected);
    Ok(json!({
        "name": trace.name,
        "backend": ran.as_str(),
        "matches": mismatch.is_none(),
        "mismatch": mismatch,
    })
    .to_string())
}

/// The backend and GPU options for `"gpu"` (the context [`init_gpu`] made) or `"cpu"`.
fn options_for(backend: &str) -> Result<(Backend, GpuOptions), JsError> {
    match backend {
        "cpu" => Ok((Backend::Cpu, GpuOptions::default())),
        "gpu" => {
            let context = gpu().ok_or_else(|| js("no WebGPU device: call init_gpu first"))?;
            Ok((
                Backend::Gpu,
                GpuOptions {
                    context: Some(context),
                    ..Default::default()
                },
            ))
        }
        other => Err(js(format!("unknown backend `{other}` (gpu or cpu)"))),
    }
}

/// Requests a device with WebGPU's default limits and hands it to the crate
/// ([`GpuContext::from_device`], which checks its limits); returns the adapter's name,
/// or throws the crate's refusal ([`fused_rmsprop::Error::DeviceLimit`] names the limit
/// and both numbers).
#[wasm_bindgen]
pub async fn wrap_new_device() -> Result<String, JsError> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .map_err(js)?;
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor::default())
        .await
        .map_err(js)?;
    let ctx = GpuContext::from_device(device, queue).map_err(js)?;
    Ok(ctx.adapter_name())
}

/// What the page's option controls choose (JSON).
struct TrainerOptions {
    backend: String,
    momentum: f64,
    centered: bool,
    clipping: String,
    state: StateDtype,
    batch: usize,
    seed: u64,
}

impl TrainerOptions {
    fn parse(text: &str) -> Result<Self, JsError> {
        let v: Value = serde_json::from_str(text).map_err(js)?;
        let text_of = |key: &str, default: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        Ok(TrainerOptions {
            backend: text_of("backend", "gpu"),
            momentum: v.get("momentum").and_then(Value::as_f64).unwrap_or(0.5),
            centered: v.get("centered").and_then(Value::as_bool).unwrap_or(false),
            clipping: text_of("clipping", "none"),
            state: text_of("state", "f32").parse().map_err(js)?,
            batch: v.get("batch").and_then(Value::as_u64).unwrap_or(32).max(1) as usize,
            seed: v.get("seed").and_then(Value::as_u64).unwrap_or(7),
        })
    }

    fn config(&self) -> Result<RmsPropConfig, JsError> {
        let mut c = mlp::config().with_state(StateStorage::new(self.state));
        c.momentum = self.momentum;
        c.centered = self.centered;
        match self.clipping.as_str() {
            "none" => {}
            "clipnorm" => c.clipnorm = Some(1.0),
            "clipvalue" => c.clipvalue = Some(0.1),
            "global_clipnorm" => c.global_clipnorm = Some(1.0),
            other => return Err(js(format!("unknown clipping `{other}`"))),
        }
        c.validate().map_err(js)?;
        Ok(c)
    }
}

/// The model being trained and its optimizer.
struct Training {
    opt: RmsProp,
    gpu: Option<mlp::gpu::GpuModel>,
    x: Array2<f32>,
    y: Array2<f32>,
    batch: usize,
    step: usize,
}

impl Training {
    /// `steps` training steps; the loss of the last one (read back).
    async fn run(&mut self, steps: usize) -> Result<f64, Box<dyn std::error::Error>> {
        let mut loss = f64::NAN;
        for k in 0..steps.max(1) {
            let (start, last) = (self.step * self.batch, k + 1 == steps.max(1));
            loss = match self.gpu.as_mut() {
                Some(model) => model
                    .step_async(&mut self.opt, start, last)
                    .await?
                    .unwrap_or(f64::NAN),
                None => {
                    let vars = self.opt.variables_async().await?;
                    mlp::cpu_step(&mut self.opt, &vars, &self.x, &self.y, start, self.batch)?
                }
            };
            self.step += 1;
        }
        Ok(loss)
    }
}

/// The `train_mlp` model (142,088 parameters) with its optimizer, on the page's GPU (its
/// forward and backward passes in WGSL writing the optimizer's gradient views, one
/// submission per step) or on the CPU path.
#[wasm_bindgen]
pub struct Trainer {
    training: Rc<RefCell<Training>>,
    backend: BackendKind,
    adapter: String,
    state_bytes: u64,
}

#[wasm_bindgen]
impl Trainer {
    /// A trainer from the page's options (JSON: `backend` gpu|cpu, `momentum`,
    /// `centered`, `clipping` none|clipnorm|clipvalue|global_clipnorm, `state`
    /// f32|bf16|int8, `batch`, `seed`).
    #[wasm_bindgen(constructor)]
    pub fn new(options: &str) -> Result<Trainer, JsError> {
        let o = TrainerOptions::parse(options)?;
        let (backend, gpu_options) = options_for(&o.backend)?;
        let (x, y) = mlp::dataset(o.seed);
        let opt = RmsProp::with_options(
            o.config()?,
            mlp::initial_variables(o.seed),
            backend,
            &gpu_options,
        )
        .map_err(js)?;
        let gpu = match opt.backend() {
            BackendKind::Gpu => Some(mlp::gpu::GpuModel::new(&opt, &x, &y, o.batch).map_err(js)?),
            BackendKind::Cpu => None,
        };
        let adapter = opt.gpu().map_or_else(
            || "CPU (wasm, one thread)".to_string(),
            |g| g.adapter_name(),
        );
        Ok(Trainer {
            backend: opt.backend(),
            state_bytes: opt.state_bytes(),
            adapter,
            training: Rc::new(RefCell::new(Training {
                opt,
                gpu,
                x,
                y,
                batch: o.batch,
                step: 0,
            })),
        })
    }

    /// `"gpu"` or `"cpu"`.
    pub fn backend(&self) -> String {
        self.backend.as_str().to_string()
    }

    /// The adapter the optimizer runs on.
    pub fn adapter(&self) -> String {
        self.adapter.clone()
    }

    /// Bytes the optimizer's slots take.
    pub fn state_bytes(&self) -> f64 {
        self.state_bytes as f64
    }

    /// Trainable parameters.
    pub fn params(&self) -> usize {
        mlp::initial_variables(0)
            .iter()
            .map(|v| v.values.len())
            .sum()
    }

    /// Runs `steps` training steps; resolves to the last step's loss (one readback).
    pub fn run(&self, steps: u32) -> js_sys::Promise {
        let training = self.training.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut t = training
                .try_borrow_mut()
                .map_err(|_| js("the trainer is already running"))?;
            let loss = t.run(steps as usize).await.map_err(js)?;
            Ok(JsValue::from_f64(loss))
        })
    }
}

/// One optimizer step over gradients already on the device, for the TF.js comparison:
/// `total` parameters in `tensors` tensors, Keras' default RMSprop.
#[wasm_bindgen]
pub struct OptimizerBench {
    opt: Rc<RefCell<RmsProp>>,
    present: Vec<bool>,
}

#[wasm_bindgen]
impl OptimizerBench {
    /// Builds the optimizer on the page's GPU and writes one gradient per tensor into
    /// its gradient buffers (deterministic values in [-1, 1)).
    #[wasm_bindgen(constructor)]
    pub fn new(tensors: usize, total: usize) -> Result<OptimizerBench, JsError> {
        let (backend, options) = options_for("gpu")?;
        let tensors = tensors.clamp(1, total.max(1));
        let mut vars = Vec::with_capacity(tensors);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for t in 0..tensors {
            let len = total / tensors + usize::from(t < total % tensors);
            let values = (0..len).map(|_| next()).collect();
            vars.push(Variable::new(format!("w{t}"), &[len], values).map_err(js)?);
        }
        let config = RmsPropConfig::default().with_learning_rate(1e-3);
        let opt = RmsProp::with_options(config, vars, backend, &options).map_err(js)?;
        let engine = opt
            .gpu()
            .ok_or_else(|| js("the optimizer is not on the GPU"))?;
        let queue = &engine.context().queue;
        for t in 0..tensors {
            let view = engine.gradient_view(t).map_err(js)?;
            let grads: Vec<f32> = (0..view.size / 4).map(|_| next() * 0.1).collect();
            queue.write_buffer(view.buffer, view.offset, bytemuck::cast_slice(&grads));
        }
        Ok(OptimizerBench {
            opt: Rc::new(RefCell::new(opt)),
            present: vec![true; tensors],
        })
    }

    /// Runs `steps` steps and resolves once the device has finished them.
    pub fn run(&self, steps: u32) -> js_sys::Promise {
        let (opt, present) = (self.opt.clone(), self.present.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let mut opt = opt
                .try_borrow_mut()
                .map_err(|_| js("the benchmark is already running"))?;
            for _ in 0..steps {
                opt.apply_device_gradients(&present).map_err(js)?;
            }
            opt.synchronize_async().await.map_err(js)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The first parameter of the first tensor (to check that steps happened).
    pub fn first_value(&self) -> js_sys::Promise {
        let opt = self.opt.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let opt = opt
                .try_borrow()
                .map_err(|_| js("the benchmark is running"))?;
            let v = opt.variable_async(0).await.map_err(js)?;
            Ok(JsValue::from_f64(f64::from(v[0])))
        })
    }
}
