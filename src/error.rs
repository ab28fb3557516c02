//! Typed errors: every refusal names the field, variable or device at fault.

use std::sync::Arc;

use thiserror::Error;

use crate::cpu_level::CpuLevel;
use crate::dtype::Dtype;
use crate::slot::Slot;

/// Everything that can go wrong in this crate. No public function panics on bad
/// input; it returns one of these instead, and a refused step leaves parameters
/// and slots exactly as they were.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A config field holds a value Keras would refuse (or that makes no sense).
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The Keras argument name.
        field: String,
        /// Why the value was refused.
        reason: String,
    },
    /// More than one of `clipnorm`, `clipvalue` and `global_clipnorm` is set.
    #[error("only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set, got {0}")]
    ConflictingClipping(String),
    /// A config JSON object has a key Keras' `get_config()` never writes.
    #[error("unknown config key `{0}`")]
    UnknownConfigKey(String),
    /// A JSON value has the wrong type.
    #[error("`{field}` must be {expected}, got {found}")]
    WrongType {
        /// The key whose value is wrong.
        field: String,
        /// What was expected.
        expected: &'static str,
        /// A short rendering of what was found.
        found: String,
    },
    /// A required JSON key is absent.
    #[error("missing key `{0}`")]
    MissingKey(String),
    /// The learning-rate schedule's `class_name` is not one this crate knows.
    #[error("unknown learning-rate schedule class `{0}`")]
    UnknownSchedule(String),
    /// Text that should be JSON is not.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// A variable's values do not fill its shape.
    #[error(
        "variable `{name}` has shape {shape:?} ({expected} values) but {found} values were given"
    )]
    ValueLength {
        /// The variable's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Number of values the shape needs.
        expected: usize,
        /// Number of values given.
        found: usize,
    },
    /// A gradient's length differs from its variable's.
    #[error("gradient for variable `{name}` has {found} values, the variable has {expected}")]
    GradientLength {
        /// The variable's name.
        name: String,
        /// The variable's length.
        expected: usize,
        /// The gradient's length.
        found: usize,
    },
    /// Gradients in another element type than the optimizer takes.
    #[error("gradients are {found}, this optimizer takes {expected} (its Precision::gradients)")]
    GradientDtype {
        /// The optimizer's gradient dtype.
        expected: Dtype,
        /// The dtype given.
        found: Dtype,
    },
    /// A checkpoint saved with other element types than the optimizer restoring it.
    #[error("the checkpoint's {what} is {checkpoint}, this optimizer's is {optimizer}")]
    PrecisionMismatch {
        /// Which element type differs.
        what: &'static str,
        /// The checkpoint's.
        checkpoint: Dtype,
        /// The optimizer's.
        optimizer: Dtype,
    },
    /// The optimizer keeps no 16-bit parameter copy (see `Precision::param_copy`).
    #[error("this optimizer keeps no 16-bit parameter copy (Precision::param_copy is None)")]
    NoParamCopy,
    /// More or fewer gradients (or values) than variables.
    #[error("expected {expected} {what}, one per variable, got {found}")]
    CountMismatch {
        /// What was counted ("gradients", "values").
        what: &'static str,
        /// Number of variables.
        expected: usize,
        /// Number given.
        found: usize,
    },
    /// Every gradient of a step is missing (Keras: "No gradients provided for any variable").
    #[error("no gradients provided for any variable")]
    NoGradients,
    /// An index names no variable.
    #[error("no variable with index {0}")]
    NoSuchVariable(usize),
    /// The variables hold more elements than this crate accepts (2^34, 64 GiB per f32
    /// array).
    #[error("variable `{name}` of shape {shape:?} takes the model past {limit} elements")]
    ModelTooLarge {
        /// The variable that crossed the limit.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The limit.
        limit: usize,
    },
    /// The config keeps no such slot (e.g. `momentum` when momentum is 0).
    #[error("this config keeps no `{0}` slot")]
    SlotNotKept(Slot),
    /// A GPU-only operation (device-resident gradients) was called on an optimizer that
    /// runs on the CPU.
    #[error("`{0}` needs the GPU backend; this optimizer runs on the CPU")]
    NeedsGpuBackend(&'static str),
    /// A CPU-only operation (choosing the CPU level) was called on an optimizer that runs
    /// on a GPU.
    #[error("`{0}` needs the CPU backend; this optimizer runs on a GPU")]
    NeedsCpuBackend(&'static str),
    /// An operation that the non-finite guard or loss scaling rules out: a step recorded
    /// into your own encoder cannot map their readback before you submit it.
    #[error(
        "`{0}` needs the non-finite guard and loss scaling off (they read back every step they submit themselves)"
    )]
    NotWithGuard(&'static str),
    /// This processor lacks the instruction set of a requested [`CpuLevel`].
    #[error("this processor does not support the CPU level `{0}` (best: `{best}`)", best = CpuLevel::best())]
    CpuLevelUnsupported(CpuLevel),
    /// The GPU path was requested but no usable adapter exists.
    #[error("no GPU adapter available: {0}")]
    NoAdapter(String),
    /// The GPU failed: device creation, out of memory, a lost device, a failed map or
    /// readback, a validation error reported by wgpu.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A call would have to block the thread until the GPU answers, which a browser
    /// forbids (wasm): await [`crate::RmsProp::synchronize_async`] first.
    #[error("{0}: waiting for them would block the browser's thread; await RmsProp::synchronize_async() first")]
    WouldBlock(String),
    /// The device lacks a limit the kernels need (see the README's limits table): a
    /// device made with lower limits than the mode or the model needs.
    #[error("the device's `{limit}` is {device}, this optimizer needs {needed}")]
    DeviceLimit {
        /// The `wgpu::Limits` field (WebGPU's limit in snake case).
        limit: &'static str,
        /// The device's value.
        device: u64,
        /// What the mode or the model needs.
        needed: u64,
    },
    /// A user-supplied buffer does not meet the documented requirements.
    #[error("buffer `{name}` is unusable: {reason}")]
    InvalidBuffer {
        /// Which buffer.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Slots stored in another format than this optimizer's (`StateStorage`): a
    /// checkpoint of other slot dtypes, or raw state of the wrong shape.
    #[error("slot storage differs: {0}")]
    StateMismatch(String),
    /// A sharded optimizer's rank failed (bad input, a lost device, other starting
    /// values) or the ranks disagree: every rank returns an error.
    #[error("sharded step stopped by rank {rank}: {reason}")]
    Sharded {
        /// The rank that failed (or the first that disagreed).
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// A slot stored compact (bf16 or int8) has no f32 view.
    #[error("slot `{slot}` of variable {index} is stored as {dtype}: it has no f32 binding view")]
    CompactSlot {
        /// The slot.
        slot: Slot,
        /// The variable.
        index: usize,
        /// How it is stored.
        dtype: crate::state::StateDtype,
    },
    /// A variable is longer than one storage binding on this device, so the arena splits
    /// it across segments and no single binding views it.
    #[error("variable {index} ({len} elements) spans {segments} arena segments: it is larger than one storage binding on this device")]
    NotBindable {
        /// The variable.
        index: usize,
        /// Its number of elements.
        len: usize,
        /// How many segments hold a part of it.
        segments: usize,
    },
    /// A checkpoint is unreadable, truncated, corrupt, or does not fit this optimizer.
    #[error("checkpoint `{path}`: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint's bytes do not match the CRC32C it records for them: a tensor or a
    /// metadata field was corrupted after it was written. Nothing was restored.
    #[error(
        "checkpoint `{path}`: the CRC32C of {what} does not match its bytes (the file is corrupt)"
    )]
    ChecksumMismatch {
        /// The file.
        path: String,
        /// The tensor or metadata field whose bytes changed.
        what: String,
    },
    /// A Burn module's parameter or gradient cannot be stepped by this optimizer (feature
    /// `burn`). Nothing was stepped.
    #[cfg(feature = "burn")]
    #[error("Burn parameter `{name}`: {problem}")]
    BurnParam {
        /// The parameter's module path (`layer.weight`).
        name: String,
        /// What is wrong with it.
        problem: BurnProblem,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on `{path}`: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the operating system reported.
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// Why a Burn parameter cannot be stepped ([`Error::BurnParam`]).
#[cfg(feature = "burn")]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BurnProblem {
    /// The module's parameters changed since the optimizer first stepped it.
    #[error("the module changed since the first step: {0}")]
    ModuleChanged(String),
    /// A parameter or gradient of an element type the optimizer was not built for.
    #[error("its {what} is {found}, the optimizer steps {expected}")]
    Dtype {
        /// `"parameter"` or `"gradient"`.
        what: &'static str,
        /// The element type the optimizer steps.
        expected: String,
        /// The tensor's.
        found: String,
    },
    /// A gradient whose shape is not its parameter's.
    #[error("its gradient has shape {found:?}, the parameter {expected:?}")]
    GradientShape {
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The gradient's.
        found: Vec<usize>,
    },
    /// A tensor on another device than the optimizer's.
    #[error("its {what} is on {found}, the optimizer on {expected}")]
    Device {
        /// `"parameter"` or `"gradient"`.
        what: &'static str,
        /// The optimizer's device.
        expected: String,
        /// The tensor's.
        found: String,
    },
    /// Burn could not read or resolve a tensor.
    #[error("Burn refused: {0}")]
    Backend(String),
    /// A learning rate (Burn's `ModuleLearningRate`, per parameter) the optimizer's
    /// param groups cannot give this parameter.
    #[error("its learning rate: {0}")]
    LearningRate(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
