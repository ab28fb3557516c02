//! Backends: which one a user asks for ([`Backend`]), which one runs
//! ([`BackendKind`]), and the one interface both drivers implement ([`Engine`]), so that
//! [`crate::RmsProp`] only validates input and dispatches.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

use crate::config::RmsPropConfig;
use crate::counters::SkippedSteps;
use crate::cpu_level::CpuLevel;
use crate::dtype::GradSlice;
use crate::error::{Error, Result};
use crate::groups::TensorTable;
use crate::math::{ClipFactors, LossScaleState};
use crate::state_layout::RawSlot;
use crate::variant::{Slot, Variant};

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Keras' `jit_compile=True`: a hardware GPU adapter if wgpu finds one (a software
    /// one only when allowed), otherwise the CPU path. Logged at `info` level.
    #[default]
    Auto,
    /// The CPU path; never touches wgpu.
    Cpu,
    /// The GPU path on any adapter, software (lavapipe) included; an error when none.
    Gpu,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "gpu" => Ok(Backend::Gpu),
            other => Err(format!("unknown backend `{other}` (auto, cpu or gpu)")),
        }
    }
}

/// The backend a built optimizer actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU path.
    Cpu,
    /// The GPU path.
    Gpu,
}

impl BackendKind {
    /// `"cpu"` or `"gpu"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }
}

/// Where a step's gradients are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gradients<'a> {
    /// In host memory: one entry per variable, `None` for a missing gradient (checked by
    /// the caller: lengths and element types match, at least one is present).
    Host(&'a [Option<GradSlice<'a>>]),
    /// Already in the GPU's gradient buffers; `true` where a variable has one.
    Device(&'a [bool]),
}

impl Gradients<'_> {
    /// Whether variable `i` has a gradient this step.
    pub(crate) fn present(&self, i: usize) -> bool {
        match self {
            Gradients::Host(g) => g[i].is_some(),
            Gradients::Device(p) => p[i],
        }
    }
}

/// Keras' dynamic loss scaling as an engine runs it: the state now,
/// `dynamic_growth_steps`, and `initial_scale` (kept for checkpoints only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LossScaling {
    pub state: LossScaleState,
    pub growth_steps: u32,
    pub initial_scale: f32,
}

/// One of the arrays a backend keeps per element, all laid out alike (the engine's
/// [`crate::layout::Layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The variables.
    Params,
    /// A slot the variant keeps.
    Slot(Slot),
}

/// What a backend does: owns the parameters, slots and counters of a model and steps
/// them. `RmsProp` talks to its engine only through this.
pub(crate) trait Engine: Send + Sync + std::fmt::Debug + Any {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The structural variant the engine runs (the guard included).
    fn variant(&self) -> Variant;

    /// One step with the config's plans, `table` saying each tensor's group, weight
    /// decay and whether it is frozen (the caller has dropped frozen tensors'
    /// gradients). Advances the step counter, or (non-finite guard) the skip count.
    fn step(
        &mut self,
        config: &RmsPropConfig,
        grads: Gradients<'_>,
        table: &TensorTable,
    ) -> Result<()>;

    /// One step on gradients already on the device, recorded into the caller's encoder
    /// (submitted by the caller). GPU only, without the non-finite guard.
    fn record_step(
        &mut self,
        _config: &RmsPropConfig,
        _present: &[bool],
        _table: &TensorTable,
        _encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        Err(Error::NeedsGpuBackend("record_device_step"))
    }

    /// `finalize_variable_values`: copies the EMA into the parameters (no-op without EMA).
    fn finalize(&mut self) -> Result<()>;

    /// Every variable's part of `role`, in variable order (a GPU reads it back at once).
    fn read(&self, role: Role) -> Result<Staged<Vec<Vec<f32>>>>;

    /// One variable's part of `role`.
    fn read_tensor(&self, role: Role, tensor: usize) -> Result<Staged<Vec<f32>>>;

    /// The 16-bit parameter copy of every variable, upcast to f32 (exact), in variable
    /// order; [`Error::NoParamCopy`] without one.
    fn read_param_copy(&self) -> Result<Staged<Vec<Vec<f32>>>>;

    /// Every variable's `slot` as it is stored, in variable order (a GPU reads them back
    /// at once).
    fn read_slots_raw(&self, slot: Slot) -> Result<Staged<Vec<RawSlot>>>;

    /// Replaces one variable's `slot` with `raw` (its format and length checked).
    fn write_slot_raw(&mut self, slot: Slot, tensor: usize, raw: &RawSlot) -> Result<()>;

    /// Clip factors per tensor for the next update step, computed elsewhere (a sharded
    /// optimizer reduces a tensor's norm across ranks), instead of this engine's own
    /// norm reduction; `None`: its own. Only used when the config clips by a norm.
    fn set_external_clips(&mut self, clips: Option<Vec<ClipFactors>>);

    /// Bytes of memory the slots take (their buffers or arrays, padding included).
    fn state_bytes(&self) -> u64;

    /// Replaces one variable's part of `role` (length checked by the caller).
    fn write_tensor(&mut self, role: Role, tensor: usize, values: &[f32]) -> Result<()>;

    /// The raw step counter; waits for steps whose outcome the device decides. Should
    /// the device be lost, the last counter known.
    fn raw_iterations(&self) -> u64;

    /// The skip count known now, never waiting.
    fn skipped_steps(&self) -> SkippedSteps;

    /// Sets the step and skip counters (restoring a checkpoint), after the steps in flight.
    fn set_counters(&mut self, raw: u64, skipped: u64) -> Result<()>;

    /// The seed (mixed to 32 bits) of stochastic rounding.
    fn set_rounding_seed(&mut self, seed: u32);

    /// Turns the non-finite guard on or off.
    fn set_non_finite_guard(&mut self, enabled: bool) -> Result<()>;

    /// Turns dynamic loss scaling on, from the given state (also to set the state, as a
    /// checkpoint restores it), or off (`None`), after the steps in flight.
    fn set_loss_scaling(&mut self, scaling: Option<LossScaling>) -> Result<()>;

    /// Loss scaling with its state as known now, never waiting (on the GPU, as of the
    /// last readback that arrived; exact after [`Engine::synchronize`]); `None` when
    /// off.
    fn loss_scaling(&self) -> Option<LossScaling>;

    /// Waits for everything submitted; reports a lost device or a GPU error.
    #[cfg(not(target_arch = "wasm32"))]
    fn synchronize(&self) -> Result<()>;

    /// Like [`Engine::synchronize`], awaiting the device instead of blocking (the one
    /// way in a browser).
    fn synchronize_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;

    /// The instruction-set level the CPU loops run at; `None` on the GPU.
    fn cpu_level(&self) -> Option<CpuLevel> {
        None
    }

    /// Runs the CPU loops at `level`; refused on the GPU and where the processor lacks it.
    fn set_cpu_level(&mut self, _level: CpuLevel) -> Result<()> {
        Err(Error::NeedsCpuBackend("set_cpu_level"))
    }

    /// The concrete engine, for what only one backend offers (the GPU's buffers).
    fn as_any(&self) -> &dyn Any;
}

/// The bytes of a readback, one `Vec` per copy, once they arrive.
pub(crate) type Arriving = Pin<Box<dyn Future<Output = Result<Vec<Vec<u8>>>> + Send>>;

/// Bytes a device delivers later: the GPU driver's readbacks in flight, one `Vec` per
/// copy, in the order they were asked for.
pub(crate) trait Arrival: Send {
    /// Blocks until the bytes are there (native callers; a browser cannot block).
    #[cfg(not(target_arch = "wasm32"))]
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>>;

    /// The bytes, once the device has delivered them.
    fn arrive(self: Box<Self>) -> Arriving;
}

/// A read whose data may still be on its way from the device: already there on the
/// CPU path, copied into staging buffers on the GPU path. [`Staged::wait`] blocks for
/// it (native only), [`Staged::get`] awaits it (everywhere).
pub(crate) struct Staged<T> {
    arrival: Option<Box<dyn Arrival>>,
    finish: Box<dyn FnOnce(Vec<Vec<u8>>) -> Result<T> + Send>,
}

impl<T: Send + 'static> Staged<T> {
    /// A value already at hand.
    pub(crate) fn ready(value: T) -> Self {
        Staged {
            arrival: None,
            finish: Box::new(move |_| Ok(value)),
        }
    }

    /// The value `finish` makes of the bytes `arrival` delivers.
    pub(crate) fn new(
        arrival: Box<dyn Arrival>,
        finish: impl FnOnce(Vec<Vec<u8>>) -> Result<T> + Send + 'static,
    ) -> Self {
        Staged {
            arrival: Some(arrival),
            finish: Box::new(finish),
        }
    }

    /// Blocks until the value is there.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn wait(self) -> Result<T> {
        let bytes = match self.arrival {
            Some(a) => a.wait()?,
            None => Vec::new(),
        };
        (self.finish)(bytes)
    }

    /// The value, once the device has delivered it.
    pub(crate) async fn get(self) -> Result<T> {
        let bytes = match self.arrival {
            Some(a) => a.arrive().await?,
            None => Vec::new(),
        };
        (self.finish)(bytes)
    }
}
