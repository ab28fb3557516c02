//! How the optimizer stores its slots: [`StateStorage`] (f32, bf16 or 8-bit
//! block-quantized, with a size threshold), part of [`crate::RmsPropConfig`] and of its
//! JSON under a key of our own.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::json::Fields;

/// The smallest int8 block size the kernels take (block sizes are powers of two from
/// this to [`MAX_BLOCK_SIZE`]; the WGSL's `BLOCK_SIZE` override takes the same, which
/// `gpu::contract::BLOCK_SIZE` lists and a test holds to these).
pub(crate) const MIN_BLOCK_SIZE: usize = 32;
/// The largest int8 block size, and the default.
pub(crate) const MAX_BLOCK_SIZE: usize = 256;

/// How the slots of tensors at or over the size threshold are stored: the one
/// description of a slot format. The host's stores, readbacks and checkpoints
/// (`state_layout::Coded`), the arena, and the WGSL's `STATE_DTYPE` codes all follow
/// it, and every match over it is exhaustive: a new format (fp8 e4m3 with block
/// scales, say) is a variant here, its coders in `quant.rs` and their WGSL mirror.
///
/// ```
/// use fused_rmsprop::StateDtype;
/// let q: StateDtype = "int8".parse().unwrap();
/// assert_eq!(q, StateDtype::DYNAMIC8);
/// assert_eq!(q.block_size(), Some(256));
/// assert_eq!(StateDtype::Dynamic8 { block_size: 64 }.to_string(), "int8 (blocks of 64)");
/// assert_eq!(StateDtype::Bf16.block_size(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StateDtype {
    /// f32 (Keras-exact).
    #[default]
    F32,
    /// bfloat16: each slot value rounded (to nearest even, or stochastically) as it is
    /// stored; 2 bytes per slot element.
    Bf16,
    /// bitsandbytes' block-wise dynamic 8-bit state: one code per element into a
    /// dynamic map (signed, or unsigned for the velocity: `quant::CodeMap`), one f32
    /// scale (the largest finite magnitude) per block of `block_size` elements; about
    /// 1 + 4 / `block_size` bytes per slot element. Written `"int8"` in JSON, on the
    /// command line and in checkpoints.
    Dynamic8 {
        /// Elements per scale: a power of two from 32 to 256 (256 in
        /// [`StateDtype::DYNAMIC8`]).
        block_size: usize,
    },
}

impl StateDtype {
    /// Dynamic 8-bit state in blocks of 256 (bitsandbytes' block size), what `"int8"`
    /// means where no block size is given.
    pub const DYNAMIC8: StateDtype = StateDtype::Dynamic8 {
        block_size: MAX_BLOCK_SIZE,
    };

    /// `"f32"`, `"bf16"` or `"int8"` (the block size is not in the name).
    pub fn as_str(self) -> &'static str {
        match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
            StateDtype::Dynamic8 { .. } => "int8",
        }
    }

    /// Elements per scale of a block-scaled format; `None` for the others.
    pub fn block_size(self) -> Option<usize> {
        match self {
            StateDtype::F32 | StateDtype::Bf16 => None,
            StateDtype::Dynamic8 { block_size } => Some(block_size),
        }
    }

    /// The WGSL `STATE_DTYPE` override (and the chunk formats of the state layout).
    pub(crate) fn code(self) -> u32 {
        match self {
            StateDtype::F32 => 0,
            StateDtype::Bf16 => 1,
            StateDtype::Dynamic8 { .. } => 2,
        }
    }

    /// The same format with `block_size` elements per scale (no change to formats
    /// without blocks).
    pub(crate) fn with_block_size(self, block_size: usize) -> StateDtype {
        match self {
            StateDtype::F32 | StateDtype::Bf16 => self,
            StateDtype::Dynamic8 { .. } => StateDtype::Dynamic8 { block_size },
        }
    }

    /// Refuses a block size the kernels do not take.
    pub(crate) fn validate(self) -> Result<()> {
        match self {
            StateDtype::F32 | StateDtype::Bf16 => Ok(()),
            StateDtype::Dynamic8 { block_size } => check_block_size(block_size),
        }
    }
}

/// Refuses a block size the kernels do not take (`gpu::contract::BLOCK_SIZE` lists them).
fn check_block_size(block_size: usize) -> Result<()> {
    if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) && block_size.is_power_of_two() {
        return Ok(());
    }
    Err(Error::invalid(
        "fused_rmsprop_state.block_size",
        format!(
            "must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, got {block_size}"
        ),
    ))
}

impl std::fmt::Display for StateDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateDtype::F32 | StateDtype::Bf16 => f.write_str(self.as_str()),
            StateDtype::Dynamic8 { block_size } => {
                write!(f, "{} (blocks of {block_size})", self.as_str())
            }
        }
    }
}

impl std::str::FromStr for StateDtype {
    type Err = String;
    /// `f32`, `bf16`, or `int8` (blocks of 256), also as `float32`, `bfloat16`, `8bit`
    /// and `dynamic8`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(StateDtype::F32),
            "bf16" | "bfloat16" => Ok(StateDtype::Bf16),
            "int8" | "8bit" | "dynamic8" => Ok(StateDtype::DYNAMIC8),
            other => Err(format!("unknown state dtype `{other}` (f32, bf16 or int8)")),
        }
    }
}

/// How the slots (velocity, momentum, average gradient, EMA, accumulator) are stored.
/// Not a Keras option: it travels in the config JSON under
/// [`StateStorage::JSON_KEY`], written only when it is not the default, which Keras'
/// `from_config` does not know (remove it before handing the JSON to Keras).
///
/// Compact slots are decoded to f32, updated, and encoded again in the same fused pass;
/// the update itself is the f32 one. Tensors with fewer than `min_size` elements keep
/// f32 slots (their state is small and often sensitive: biases, norms).
///
/// ```
/// use fused_rmsprop::{RmsPropConfig, StateDtype, StateStorage};
/// let config = RmsPropConfig::default()
///     .with_momentum(0.9)
///     .with_state(StateStorage::new(StateDtype::DYNAMIC8));
/// let json = config.to_keras_json().unwrap();
/// assert_eq!(json["fused_rmsprop_state"]["dtype"], "int8");
/// let back = RmsPropConfig::from_keras_json(&json).unwrap();
/// assert_eq!(back.state, config.state);
/// assert_eq!(back.to_keras_json().unwrap(), json);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct StateStorage {
    /// The slots' element type for tensors of at least `min_size` elements.
    pub dtype: StateDtype,
    /// Tensors with fewer elements keep f32 slots. Default 4096 (bitsandbytes'
    /// `min_8bit_size`).
    pub min_size: usize,
    /// `Bf16` state rounded stochastically from this seed (unbiased: small updates to
    /// the velocity are not lost), instead of to nearest.
    pub stochastic_rounding: Option<u64>,
}

impl Default for StateStorage {
    fn default() -> Self {
        StateStorage {
            dtype: StateDtype::F32,
            min_size: 4096,
            stochastic_rounding: None,
        }
    }
}

impl StateStorage {
    /// The config JSON key holding this (not a Keras key).
    pub const JSON_KEY: &'static str = "fused_rmsprop_state";

    /// Slots in `dtype`, with the default threshold.
    pub fn new(dtype: StateDtype) -> Self {
        StateStorage {
            dtype,
            ..StateStorage::default()
        }
    }

    /// With tensors under `min_size` elements keeping f32 slots.
    pub fn with_min_size(self, min_size: usize) -> Self {
        StateStorage { min_size, ..self }
    }

    /// With bf16 slots rounded stochastically from `seed`.
    pub fn with_stochastic_rounding(self, seed: u64) -> Self {
        StateStorage {
            stochastic_rounding: Some(seed),
            ..self
        }
    }

    /// The dtype of a tensor of `len` elements' slots.
    pub(crate) fn dtype_for(&self, len: usize) -> StateDtype {
        if len >= self.min_size {
            self.dtype
        } else {
            StateDtype::F32
        }
    }

    /// Refuses a block size the kernels do not take, and stochastic rounding of slots
    /// that are not bf16.
    pub fn validate(&self) -> Result<()> {
        self.dtype.validate()?;
        if self.stochastic_rounding.is_some() && self.dtype != StateDtype::Bf16 {
            return Err(Error::invalid(
                "fused_rmsprop_state.stochastic_rounding",
                format!("rounds bf16 slots; these are {}", self.dtype),
            ));
        }
        Ok(())
    }

    /// The mixed seed of stochastic rounding (0 without).
    pub(crate) fn rounding_seed(&self) -> u32 {
        let seed = self.stochastic_rounding.unwrap_or(0);
        crate::math::hash32(seed as u32 ^ crate::math::hash32((seed >> 32) as u32 ^ 0x2545_f491))
    }

    /// The JSON object under [`StateStorage::JSON_KEY`].
    pub(crate) fn to_json(self) -> Value {
        let mut m = Map::new();
        m.insert("dtype".into(), Value::from(self.dtype.as_str()));
        m.insert("min_size".into(), Value::from(self.min_size as u64));
        if let Some(block_size) = self.dtype.block_size() {
            m.insert("block_size".into(), Value::from(block_size as u64));
        }
        m.insert(
            "stochastic_rounding".into(),
            self.stochastic_rounding.map_or(Value::Null, Value::from),
        );
        Value::Object(m)
    }

    /// Reads the JSON object under [`StateStorage::JSON_KEY`] (missing keys: defaults).
    pub(crate) fn from_json(v: &Value) -> Result<Self> {
        let key = StateStorage::JSON_KEY;
        let f = Fields::new(
            v,
            key,
            &["dtype", "min_size", "block_size", "stochastic_rounding"],
        )?;
        let d = StateStorage::default();
        let dtype = match f.value("dtype") {
            None => d.dtype,
            Some(Value::String(s)) => s
                .parse()
                .map_err(|e: String| Error::invalid(&f.name("dtype"), e))?,
            Some(other) => {
                return Err(Error::WrongType {
                    field: f.name("dtype"),
                    expected: "\"f32\", \"bf16\" or \"int8\"",
                    found: crate::json::describe(other),
                })
            }
        };
        let count = |name: &str, default: usize| -> Result<usize> {
            match f.opt_i64(name)? {
                None => Ok(default),
                Some(i) if i >= 0 => Ok(i as usize),
                Some(i) => Err(Error::invalid(
                    &f.name(name),
                    format!("must be >= 0, got {i}"),
                )),
            }
        };
        let seed = match f.opt_i64("stochastic_rounding")? {
            None => None,
            Some(i) if i >= 0 => Some(i as u64),
            Some(i) => {
                return Err(Error::invalid(
                    &f.name("stochastic_rounding"),
                    format!("a seed must be >= 0, got {i}"),
                ))
            }
        };
        // a block size belongs to a block-scaled format; any other takes none, but one
        // that is written (earlier versions wrote 256 for every format) must be valid
        let dtype = match f.value("block_size") {
            None => dtype,
            Some(_) => {
                let block_size = count("block_size", MAX_BLOCK_SIZE)?;
                check_block_size(block_size)?;
                dtype.with_block_size(block_size)
            }
        };
        let s = StateStorage {
            dtype,
            min_size: count("min_size", d.min_size)?,
            stochastic_rounding: seed,
        };
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_and_refuses_bad_values() {
        let s = StateStorage::new(StateDtype::Bf16)
            .with_min_size(10)
            .with_stochastic_rounding(7);
        assert_eq!(StateStorage::from_json(&s.to_json()).unwrap(), s);
        let bad = |v: Value| StateStorage::from_json(&v).unwrap_err().to_string();
        assert!(bad(json!({"block_size": 100})).contains("power of two"));
        assert!(bad(json!({"block_size": 512})).contains("power of two"));
        assert!(bad(json!({"dtype": "int4"})).contains("int4"));
        assert!(bad(json!({"dtype": "int8", "stochastic_rounding": 3})).contains("bf16"));
        assert!(bad(json!({"dtype": "int8", "block_size": 48})).contains("power of two"));
        let q = StateStorage::from_json(&json!({"dtype": "int8", "block_size": 64})).unwrap();
        assert_eq!(q.dtype, StateDtype::Dynamic8 { block_size: 64 });
        assert_eq!(q.to_json()["block_size"], 64);
        assert_eq!(StateStorage::from_json(&q.to_json()).unwrap(), q);
        // a block size with another format (written by earlier versions) is checked, then unused
        let b = StateStorage::from_json(&json!({"dtype": "bf16", "block_size": 256})).unwrap();
        assert_eq!(b.dtype, StateDtype::Bf16);
        assert!(b.to_json().get("block_size").is_none());
        assert!(bad(json!({"min_size": -1})).contains("min_size"));
        assert!(bad(json!({"blocks": 1})).contains("blocks"));
        assert_eq!(
            StateStorage::from_json(&json!({})).unwrap(),
            StateStorage::default()
        );
    }
}
