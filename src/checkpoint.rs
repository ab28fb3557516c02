//! Optimizer checkpoints: the whole state (config, step counter, variables, every
//! slot, EMA and accumulators) in one safetensors file whose metadata carries the
//! Keras config JSON. Writes are atomic (a temporary file in the same folder, synced,
//! then renamed over the target), so a crash mid-save never destroys the previous
//! checkpoint. A restore validates everything before it changes anything.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::backend::{Backend, LossScaling};
use crate::checkpoint_file::{self, Refusal, Tensor};
use crate::config::RmsPropConfig;
use crate::dtype::Precision;
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::math::LossScaleState;
use crate::optimizer::RmsProp;
use crate::state::{StateDtype, StateStorage};
use crate::state_layout::RawSlot;
use crate::variable::VariableSpec;
use crate::variant::{Slot, Variant};

/// The `format` metadata value of checkpoints this crate writes (with digests).
pub(crate) const CHECKPOINT_FORMAT: &str = "fused-rmsprop-checkpoint/2";
/// The format before digests: still read, unverified.
const UNVERIFIED_FORMAT: &str = "fused-rmsprop-checkpoint/1";
/// The metadata fields a checkpoint may have (besides the digests).
const FIELDS: [&str; 12] = [
    "format",
    "keras_config",
    "raw_iterations",
    "skipped_steps",
    "variables",
    "gradient_dtype",
    "param_dtype",
    "param_remainders",
    "stochastic_rounding",
    "param_copy",
    "loss_scaling",
    "exclude_from_weight_decay",
];

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: Arc::new(e),
    }
}

/// What a tensor of the file holds: the variables, or one slot (by its Keras name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stored {
    Variables,
    Slot(Slot),
}

impl Stored {
    fn name(self) -> &'static str {
        match self {
            Stored::Variables => "variables",
            Stored::Slot(s) => s.keras_name(),
        }
    }
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tensor_key(stored: Stored, i: usize) -> String {
    format!("{}/{i}", stored.name())
}

/// Everything a checkpoint holds, parsed and checked for internal consistency.
struct Parsed {
    config: RmsPropConfig,
    /// The element types (gradient dtype: absent in older files, f32).
    precision: Precision,
    /// Loss scaling's growth steps and state, when the optimizer had it.
    loss_scaling: Option<LossScaling>,
    specs: Vec<VariableSpec>,
    excluded: Vec<String>,
    raw_iterations: u64,
    /// Steps the non-finite guard skipped (absent in older files: 0).
    skipped_steps: u64,
    /// `(what, variable index) -> values` (variables: f32), as stored.
    tensors: HashMap<(Stored, usize), RawSlot>,
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let file = checkpoint_file::read(bytes).map_err(|r| match r {
        Refusal::Corrupt(why) => corrupt(path, why),
        Refusal::Mismatch(what) => Error::ChecksumMismatch {
            path: path.display().to_string(),
            what,
        },
    })?;
    let (st, meta) = (file.tensors, file.metadata);
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| corrupt(path, format!("metadata `{k}` missing")))
    };
    match get("format")?.as_str() {
        CHECKPOINT_FORMAT if file.verified => {}
        CHECKPOINT_FORMAT => return Err(corrupt(path, "the digests are missing")),
        // written before digests: read as it is (unverified)
        UNVERIFIED_FORMAT => {}
        other => return Err(corrupt(path, format!("unknown format `{other}`"))),
    }
    if let Some(k) = meta.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(corrupt(path, format!("unknown metadata `{k}`")));
    }
    let config = RmsPropConfig::from_json_str(get("keras_config")?)?;
    let raw_iterations: u64 = get("raw_iterations")?
        .parse()
        .map_err(|_| corrupt(path, "raw_iterations is not a number"))?;
    let skipped_steps: u64 = match meta.get("skipped_steps") {
        Some(v) => v
            .parse()
            .map_err(|_| corrupt(path, "skipped_steps is not a number"))?,
        None => 0,
    };
    let vars: Value =
        serde_json::from_str(get("variables")?).map_err(|e| corrupt(path, e.to_string()))?;
    let specs = specs_from_json(path, &vars)?;
    // absent from checkpoints written before 16-bit gradients existed: f32
    let gradients = match meta.get("gradient_dtype") {
        Some(d) => d
            .parse::<crate::Dtype>()
            .map_err(|e| corrupt(path, format!("gradient_dtype: {e}")))?,
        None => crate::Dtype::F32,
    };
    let param_copy = match meta.get("param_copy") {
        None => None,
        Some(d) => Some(
            d.parse::<crate::Dtype>()
                .map_err(|e| corrupt(path, format!("param_copy: {e}")))?,
        ),
    };
    let params = match meta.get("param_dtype") {
        Some(d) => d
            .parse::<crate::Dtype>()
            .map_err(|e| corrupt(path, format!("param_dtype: {e}")))?,
        None => crate::Dtype::F32,
    };
    let mut precision = Precision::default()
        .with_gradients(gradients)
        .with_params(params);
    if let Some(copy) = param_copy {
        precision = precision.with_param_copy(copy);
    }
    if meta.get("param_remainders").map(String::as_str) == Some("true") {
        precision = precision.with_param_remainders();
    }
    if let Some(seed) = meta.get("stochastic_rounding") {
        let seed = seed
            .parse::<u64>()
            .map_err(|_| corrupt(path, "stochastic_rounding is not a seed"))?;
        precision = precision.with_stochastic_rounding(seed);
    }
    precision
        .validate()
        .map_err(|e| corrupt(path, e.to_string()))?;
    let loss_scaling = match meta.get("loss_scaling") {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text).map_err(|e| corrupt(path, e.to_string()))?;
            let number = |k: &str| {
                v.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| corrupt(path, format!("loss_scaling.{k} is not a number")))
            };
            let count = |k: &str| {
                v.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| corrupt(path, format!("loss_scaling.{k} is not a count")))
            };
            Some(LossScaling {
                state: LossScaleState {
                    scale: number("scale")? as f32,
                    counter: count("counter")?,
                },
                growth_steps: count("dynamic_growth_steps")?,
                initial_scale: number("initial_scale")? as f32,
            })
        }
    };
    let excluded: Vec<String> = serde_json::from_str(get("exclude_from_weight_decay")?)
        .map_err(|e| corrupt(path, e.to_string()))?;
    let mut stored = vec![Stored::Variables];
    stored.extend(Variant::of(&config).slots().into_iter().map(Stored::Slot));
    let mut tensors = HashMap::new();
    let mut names = 0;
    for &what in &stored {
        for (i, spec) in specs.iter().enumerate() {
            let key = tensor_key(what, i);
            let read = |key: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
                let view: TensorView<'_> = st
                    .tensor(key)
                    .map_err(|_| corrupt(path, format!("tensor `{key}` missing")))?;
                if view.dtype() != dtype || view.shape() != shape {
                    return Err(corrupt(
                        path,
                        format!(
                            "tensor `{key}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                            view.dtype(),
                            view.shape(),
                        ),
                    ));
                }
                Ok(view.data().to_vec())
            };
            let f32s = |b: Vec<u8>| -> Vec<f32> {
                b.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            let dtype = match what {
                Stored::Variables => StateDtype::F32,
                Stored::Slot(_) => config.state.dtype_for(spec.len()),
            };
            names += 1;
            let value = match dtype {
                StateDtype::F32 => RawSlot::F32(f32s(read(&key, Dtype::F32, &spec.shape)?)),
                StateDtype::Bf16 => RawSlot::Bf16(
                    read(&key, Dtype::BF16, &spec.shape)?
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                StateDtype::Dynamic8 { block_size } => {
                    names += 1;
                    let blocks = spec.len().div_ceil(block_size);
                    RawSlot::Dynamic8 {
                        codes: read(&key, Dtype::U8, &spec.shape)?,
                        absmax: f32s(read(&format!("{key}/absmax"), Dtype::F32, &[blocks])?),
                        block_size,
                    }
                }
            };
            if value.len() != spec.len() {
                return Err(corrupt(path, format!("tensor `{key}` has the wrong size")));
            }
            tensors.insert((what, i), value);
        }
    }
    if st.names().len() != names {
        return Err(corrupt(
            path,
            format!(
                "{} tensors, expected {names} for this config",
                st.names().len(),
            ),
        ));
    }
    Ok(Parsed {
        config,
        precision,
        loss_scaling,
        specs,
        excluded,
        raw_iterations,
        skipped_steps,
        tensors,
    })
}

/// The variables' names and shapes as JSON: `[{"name": ..., "shape": [...]}, ...]`.
pub(crate) fn specs_to_json(specs: &[VariableSpec]) -> Value {
    specs
        .iter()
        .map(|s| json!({"name": s.name, "shape": s.shape}))
        .collect()
}

/// The variables' names and shapes from [`specs_to_json`]'s form (errors name `path`).
pub(crate) fn specs_from_json(path: &Path, v: &Value) -> Result<Vec<VariableSpec>> {
    v.as_array()
        .ok_or_else(|| corrupt(path, "variables is not a list"))?
        .iter()
        .map(|v| {
            let name = v["name"]
                .as_str()
                .ok_or_else(|| corrupt(path, "variable name"))?;
            let shape = v["shape"]
                .as_array()
                .ok_or_else(|| corrupt(path, "variable shape"))?
                .iter()
                .map(|d| {
                    d.as_u64()
                        .map(|d| d as usize)
                        .ok_or_else(|| corrupt(path, "variable shape"))
                })
                .collect::<Result<Vec<usize>>>()?;
            Ok(VariableSpec::new(name, &shape))
        })
        .collect()
}

/// What errors call a checkpoint given as bytes.
const BYTES_LABEL: &str = "<checkpoint bytes>";

/// Writes `bytes` to `path` atomically and durably: a temporary file of its own in the
/// same folder (process id and a per-process count: concurrent saves never share one),
/// synced, renamed over `path` (removed again if anything fails), then the folder
/// synced so that the rename survives a power loss (on Unix; elsewhere the platform
/// offers no such sync).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| corrupt(path, "not a file path"))?
        .to_string_lossy();
    let save = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}-{save}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, e)
    })?;
    #[cfg(unix)]
    {
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(folder)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(folder, e))?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<Parsed> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    parse(path, &bytes)
}

impl RmsProp {
    /// Saves the whole optimizer state to `path` (safetensors; the Keras config JSON,
    /// step counter, variable names and shapes and the weight-decay exclusions in its
    /// metadata). Atomic: the previous file at `path` survives a crash mid-save. Native
    /// only; in a browser, await [`RmsProp::checkpoint_bytes_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_checkpoint_digest(path.as_ref()).map(|_| ())
    }

    /// [`RmsProp::save_checkpoint`], returning the CRC32C of the file's bytes (a sharded
    /// checkpoint's manifest records its shards').
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn save_checkpoint_digest(&self, path: &Path) -> Result<u32> {
        let bytes = pollster::block_on(self.checkpoint_bytes(path))?;
        write_atomically(path, &bytes)?;
        Ok(crc32c::crc32c(&bytes))
    }

    /// The checkpoint [`RmsProp::save_checkpoint`] writes, as bytes, awaiting the GPU's
    /// readbacks instead of blocking (a browser keeps them where it likes: a download,
    /// IndexedDB); [`RmsProp::restore_checkpoint_bytes`] reads them back.
    pub async fn checkpoint_bytes_async(&self) -> Result<Vec<u8>> {
        self.checkpoint_bytes(Path::new(BYTES_LABEL)).await
    }

    /// Restores a checkpoint from its bytes, as [`RmsProp::restore_checkpoint`] does
    /// from a file.
    pub fn restore_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let label = Path::new(BYTES_LABEL);
        let p = parse(label, bytes)?;
        self.restore_parsed(label, p)
    }

    /// The checkpoint's bytes (`path` names it in errors).
    async fn checkpoint_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let config = self.config().to_json()?;
        let specs = specs_to_json(self.specs());
        // the variables, then each slot as it is stored
        let mut data: Vec<Tensor> = Vec::new();
        let tensor = |name: String, dtype: Dtype, bytes: Vec<u8>, shape: Vec<usize>| Tensor {
            name,
            dtype,
            shape,
            bytes,
        };
        for (i, v) in self.variables_async().await?.iter().enumerate() {
            let shape = self.specs()[i].shape.clone();
            data.push(tensor(
                tensor_key(Stored::Variables, i),
                Dtype::F32,
                le_bytes(v),
                shape,
            ));
        }
        for slot in Variant::of(self.config()).slots() {
            for (i, raw) in self.slots_raw_async(slot).await?.into_iter().enumerate() {
                let key = tensor_key(Stored::Slot(slot), i);
                let shape = self.specs()[i].shape.clone();
                match raw {
                    RawSlot::F32(v) => data.push(tensor(key, Dtype::F32, le_bytes(&v), shape)),
                    RawSlot::Bf16(bits) => {
                        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                        data.push(tensor(key, Dtype::BF16, bytes, shape));
                    }
                    RawSlot::Dynamic8 { codes, absmax, .. } => {
                        let blocks = vec![absmax.len()];
                        data.push(tensor(
                            format!("{key}/absmax"),
                            Dtype::F32,
                            le_bytes(&absmax),
                            blocks,
                        ));
                        data.push(tensor(key, Dtype::U8, codes, shape));
                    }
                }
            }
        }
        // the counters and the loss scale of the steps the tensors show: every readback
        // of a device-decided step settled (a browser cannot wait for them below)
        self.synchronize_async().await?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
        meta.insert("keras_config".to_string(), config.to_string());
        meta.insert(
            "raw_iterations".to_string(),
            self.raw_iterations().to_string(),
        );
        meta.insert(
            "skipped_steps".to_string(),
            self.skipped_steps().skipped.to_string(),
        );
        meta.insert("variables".to_string(), specs.to_string());
        meta.insert(
            "gradient_dtype".to_string(),
            self.precision().gradients.as_str().to_string(),
        );
        meta.insert(
            "param_dtype".to_string(),
            self.precision().params.as_str().to_string(),
        );
        if self.precision().param_remainders {
            meta.insert("param_remainders".to_string(), "true".to_string());
        }
        if let Some(seed) = self.precision().stochastic_rounding {
            meta.insert("stochastic_rounding".to_string(), seed.to_string());
        }
        if let Some(copy) = self.precision().param_copy {
            meta.insert("param_copy".to_string(), copy.as_str().to_string());
        }
        if let Some(ls) = self.loss_scaling() {
            let v = json!({
                "scale": f64::from(ls.state.scale),
                "counter": ls.state.counter,
                "dynamic_growth_steps": ls.growth_steps,
                "initial_scale": f64::from(ls.initial_scale),
            });
            meta.insert("loss_scaling".to_string(), v.to_string());
        }
        meta.insert(
            "exclude_from_weight_decay".to_string(),
            Value::from(self.excluded().to_vec()).to_string(),
        );
        checkpoint_file::write(&data, meta).map_err(|e| corrupt(path, e))
    }

    /// Restores a checkpoint saved from an optimizer with the same variables (names and
    /// shapes), the same config and the same [`Precision`] ([`Error::PrecisionMismatch`]
    /// otherwise). On any error (unreadable, truncated or corrupt
    /// file, other variables, other options) the in-memory state is left as it was.
    pub fn restore_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let p = read(path)?;
        self.restore_parsed(path, p)
    }

    /// Restores the checkpoint `bytes` read from `path` (which errors name).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn restore_checkpoint_read(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.restore_parsed(path, parse(path, bytes)?)
    }

    /// Restores a parsed checkpoint (`path` names it in errors).
    fn restore_parsed(&mut self, path: &Path, p: Parsed) -> Result<()> {
        if p.specs != self.specs() {
            return Err(corrupt(
                path,
                format!(
                    "variables differ: checkpoint has {} ({:?}...), optimizer has {}",
                    p.specs.len(),
                    p.specs.first().map(|s| (&s.name, &s.shape)),
                    self.specs().len()
                ),
            ));
        }
        match (&p.loss_scaling, self.loss_scaling()) {
            (None, None) => {}
            (Some(saved), Some(ours)) if saved.growth_steps == ours.growth_steps => {}
            (saved, ours) => {
                let describe = |ls: Option<&LossScaling>| match ls {
                    None => "no loss scaling".to_string(),
                    Some(ls) => format!("loss scaling (dynamic_growth_steps {})", ls.growth_steps),
                };
                return Err(corrupt(
                    path,
                    format!(
                        "the checkpoint has {}, this optimizer has {}",
                        describe(saved.as_ref()),
                        describe(ours.as_ref())
                    ),
                ));
            }
        }
        let ours = self.precision();
        if p.precision.gradients != ours.gradients {
            return Err(Error::PrecisionMismatch {
                what: "gradient dtype",
                checkpoint: p.precision.gradients,
                optimizer: ours.gradients,
            });
        }
        if p.precision.params != ours.params {
            return Err(Error::PrecisionMismatch {
                what: "parameter dtype",
                checkpoint: p.precision.params,
                optimizer: ours.params,
            });
        }
        if p.precision.param_remainders != ours.param_remainders {
            return Err(corrupt(
                path,
                format!(
                    "the checkpoint {} parameter remainders, this optimizer {}",
                    if p.precision.param_remainders {
                        "has"
                    } else {
                        "has no"
                    },
                    if ours.param_remainders {
                        "has"
                    } else {
                        "has none"
                    },
                ),
            ));
        }
        if p.precision.stochastic_rounding != ours.stochastic_rounding {
            return Err(corrupt(
                path,
                format!(
                    "the checkpoint's stochastic rounding seed is {:?}, this optimizer's {:?}",
                    p.precision.stochastic_rounding, ours.stochastic_rounding
                ),
            ));
        }
        if p.precision.param_copy != ours.param_copy {
            // f32 stands for "no copy" in the message
            let name = |d: Option<crate::Dtype>| d.unwrap_or(crate::Dtype::F32);
            return Err(Error::PrecisionMismatch {
                what: "parameter copy (f32: none)",
                checkpoint: name(p.precision.param_copy),
                optimizer: name(ours.param_copy),
            });
        }
        let (theirs, ours) = (p.config.state, self.config().state);
        if theirs != ours {
            let describe = |s: StateStorage| {
                format!(
                    "{} (min_size {}, stochastic rounding {:?})",
                    s.dtype, s.min_size, s.stochastic_rounding
                )
            };
            return Err(Error::StateMismatch(format!(
                "the checkpoint's slots are {}, this optimizer's {}",
                describe(theirs),
                describe(ours)
            )));
        }
        if p.config.to_json()? != self.config().to_json()? {
            return Err(corrupt(
                path,
                "the checkpoint was saved with other optimizer options",
            ));
        }
        self.apply_parsed(p)
    }

    /// Builds an optimizer from a checkpoint alone (its config, variables and
    /// [`Precision`]), on `backend`. A checkpoint of a
    /// [`LossScaleOptimizer`](crate::LossScaleOptimizer) is refused: load it with
    /// [`LossScaleOptimizer::load_checkpoint`](crate::LossScaleOptimizer::load_checkpoint).
    pub fn load_checkpoint(
        path: impl AsRef<Path>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (opt, scaling) = Self::load_parts(path, backend, gpu)?;
        if scaling.is_some() {
            return Err(corrupt(
                path,
                "the checkpoint is a LossScaleOptimizer's; load it with LossScaleOptimizer::load_checkpoint",
            ));
        }
        Ok(opt)
    }

    /// The optimizer a checkpoint holds (loss scaling on, when it had it), and its loss
    /// scaling.
    pub(crate) fn load_parts(
        path: &Path,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<(Self, Option<LossScaling>)> {
        Self::load_parts_from(read(path)?, backend, gpu, true)
    }

    /// [`RmsProp::load_parts`] of a shard's checkpoint, whose `bytes` were read from
    /// `path` (its param groups may name variables of other shards).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn load_shard_parts(
        path: &Path,
        bytes: &[u8],
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<(Self, Option<LossScaling>)> {
        Self::load_parts_from(parse(path, bytes)?, backend, gpu, false)
    }

    fn load_parts_from(
        p: Parsed,
        backend: Backend,
        gpu: &GpuOptions,
        whole_model: bool,
    ) -> Result<(Self, Option<LossScaling>)> {
        let scaling = p.loss_scaling;
        let build = if whole_model {
            RmsProp::with_specs_and_precision
        } else {
            RmsProp::build
        };
        let mut opt = build(p.config.clone(), p.specs.clone(), backend, gpu, p.precision)?;
        opt.apply_parsed(p)?;
        Ok((opt, scaling))
    }

    fn apply_parsed(&mut self, p: Parsed) -> Result<()> {
        if p.loss_scaling.is_some() {
            self.set_loss_scaling(p.loss_scaling)?;
        }
        self.set_counters(p.raw_iterations, p.skipped_steps)?;
        for (&(what, i), values) in &p.tensors {
            match (what, values) {
                (Stored::Variables, RawSlot::F32(values)) => self.set_variable(i, values)?,
                (Stored::Slot(slot), raw) => self.set_slot_raw(slot, i, raw)?,
                (Stored::Variables, other) => {
                    return Err(Error::StateMismatch(format!(
                        "variable {i} is stored as {}, not f32",
                        other.dtype()
                    )))
                }
            }
        }
        self.set_exclusions(p.excluded);
        Ok(())
    }
}
