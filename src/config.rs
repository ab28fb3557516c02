//! Keras' RMSprop arguments, their validation, and Keras' `get_config()` JSON both ways.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::groups::{check_disjoint, ParamGroup};
use crate::json::{float, opt_float, parse, Fields};
use crate::schedule::LearningRate;
use crate::state::StateStorage;

/// Whose RMSprop formula and defaults a config follows (see [`RmsPropConfig::torch`],
/// [`RmsPropConfig::optax`], [`RmsPropConfig::burn`]).
///
/// | | epsilon | weight decay | learning rate multiplies |
/// | --- | --- | --- | --- |
/// | Keras | inside the root | decoupled: `p -= p * wd * lr` first | the gradient (and so the momentum buffer) |
/// | PyTorch, Burn | outside: `sqrt(v) + eps` | L2: `g += wd * p` | the buffer: `p -= lr * buf` |
/// | optax | `eps_in_sqrt` (default inside) | L2 (`add_decayed_weights` chained before) | the gradient |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// `keras.optimizers.RMSprop` (the default).
    #[default]
    Keras,
    /// `torch.optim.RMSprop`.
    Torch,
    /// `optax.rmsprop`.
    Optax,
    /// Burn's `RmsPropConfig` (PyTorch's formula with Burn's defaults).
    Burn,
}

impl Dialect {
    /// The name in JSON (`"dialect"`): `keras`, `torch`, `optax`, `burn`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Keras => "keras",
            Dialect::Torch => "torch",
            Dialect::Optax => "optax",
            Dialect::Burn => "burn",
        }
    }

    /// The dialect named `name` in JSON.
    pub fn from_name(name: &str) -> Option<Dialect> {
        [
            Dialect::Keras,
            Dialect::Torch,
            Dialect::Optax,
            Dialect::Burn,
        ]
        .into_iter()
        .find(|d| d.as_str() == name)
    }

    /// True when weight decay is an L2 term of the gradient (every dialect but Keras).
    pub(crate) fn coupled_decay(self) -> bool {
        self != Dialect::Keras
    }

    /// True when the learning rate multiplies the momentum buffer (or the increment)
    /// at the end, not the gradient before the division (PyTorch, Burn).
    pub(crate) fn scales_update(self) -> bool {
        matches!(self, Dialect::Torch | Dialect::Burn)
    }
}

/// Every argument of `keras.optimizers.RMSprop`, with Keras 3's defaults, and those of
/// the other [`Dialect`]s.
///
/// `ema_overwrite_frequency` defaults to `None` as in Keras 3 (the TensorFlow doc page
/// shows 100, which is Keras 2's default). `jit_compile` is not part of Keras 3's
/// `get_config()`; here it selects the GPU path (`true`, the default, uses a GPU when
/// one exists) and is written to JSON only when `false`.
///
/// ```
/// use fused_rmsprop::RmsPropConfig;
/// let config = RmsPropConfig::default()
///     .with_learning_rate(0.01)
///     .with_momentum(0.9)
///     .with_centered(true)
///     .with_global_clipnorm(1.0);
/// config.validate().unwrap();
/// let json = config.to_keras_json().unwrap();
/// assert_eq!(RmsPropConfig::from_keras_json(&json).unwrap().to_keras_json().unwrap(), json);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RmsPropConfig {
    /// `learning_rate`: a float or a schedule. Default 0.001.
    pub learning_rate: LearningRate,
    /// `rho`: discount of the squared-gradient average. Default 0.9.
    pub rho: f64,
    /// `momentum`. Default 0 (no momentum slot).
    pub momentum: f64,
    /// `epsilon`, added inside the square root. Default 1e-7.
    pub epsilon: f64,
    /// `centered`: normalize by the gradient's estimated variance. Default false.
    pub centered: bool,
    /// `weight_decay` (decoupled, applied before the update). Default `None`.
    pub weight_decay: Option<f64>,
    /// `clipnorm`: clip each gradient to this L2 norm. Default `None`.
    pub clipnorm: Option<f64>,
    /// `clipvalue`: clip each gradient element to `[-v, v]`. Default `None`.
    pub clipvalue: Option<f64>,
    /// `global_clipnorm`: clip all gradients together to this L2 norm. Default `None`.
    pub global_clipnorm: Option<f64>,
    /// `use_ema`: keep an exponential moving average of the variables. Default false.
    pub use_ema: bool,
    /// `ema_momentum`. Default 0.99.
    pub ema_momentum: f64,
    /// `ema_overwrite_frequency`: every this many iterations, copy the EMA into the
    /// variables. Default `None` (Keras 3).
    pub ema_overwrite_frequency: Option<u64>,
    /// `loss_scale_factor`: gradients are divided by it first. Default `None`.
    pub loss_scale_factor: Option<f64>,
    /// `gradient_accumulation_steps`: update every this many steps with the mean
    /// gradient. Default `None`.
    pub gradient_accumulation_steps: Option<u64>,
    /// `name`. Default `"rmsprop"`.
    pub name: String,
    /// `jit_compile`: use the GPU path when an adapter exists. Default true.
    pub jit_compile: bool,
    /// How the slots are stored (not a Keras option; see [`StateStorage`]). Default
    /// f32.
    pub state: StateStorage,
    /// Whose formula: Keras (default), PyTorch, optax or Burn. The fields below are
    /// other dialects' arguments; [`RmsPropConfig::validate`] refuses one set where
    /// its dialect has no such argument.
    pub dialect: Dialect,
    /// PyTorch's `maximize`: ascend the gradient. Default false.
    pub maximize: bool,
    /// optax's `nesterov` (with `momentum`). Default false.
    pub nesterov: bool,
    /// optax's `bias_correction`: the moments are divided by `1 - rho^count`.
    /// Default false.
    pub bias_correction: bool,
    /// optax's `initial_scale`: the velocity's starting value. Default 0.
    pub initial_scale: f64,
    /// Epsilon inside the square root (Keras; optax's default `eps_in_sqrt=True`) or
    /// outside it (PyTorch, Burn). Default true.
    pub eps_in_sqrt: bool,
    /// Groups of variables with hyperparameters of their own (PyTorch's
    /// `param_groups`); variables in none take the numbers above. Default none.
    pub param_groups: Vec<ParamGroup>,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            learning_rate: LearningRate::Constant(0.001),
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
            weight_decay: None,
            clipnorm: None,
            clipvalue: None,
            global_clipnorm: None,
            use_ema: false,
            ema_momentum: 0.99,
            ema_overwrite_frequency: None,
            loss_scale_factor: None,
            gradient_accumulation_steps: None,
            name: "rmsprop".to_string(),
            state: StateStorage::default(),
            jit_compile: true,
            dialect: Dialect::Keras,
            maximize: false,
            nesterov: false,
            bias_correction: false,
            initial_scale: 0.0,
            eps_in_sqrt: true,
            param_groups: Vec::new(),
        }
    }
}

impl RmsPropConfig {
    /// `torch.optim.RMSprop`'s defaults: `lr=0.01, alpha=0.99, eps=1e-8,
    /// weight_decay=0, momentum=0, centered=False, maximize=False` (`alpha` is `rho`
    /// here; epsilon outside the root; weight decay added to the gradient).
    ///
    /// ```
    /// use fused_rmsprop::{Dialect, RmsPropConfig};
    /// let c = RmsPropConfig::torch().with_momentum(0.9).with_weight_decay(1e-4);
    /// assert_eq!((c.dialect, c.rho, c.epsilon), (Dialect::Torch, 0.99, 1e-8));
    /// c.validate().unwrap();
    /// ```
    pub fn torch() -> Self {
        RmsPropConfig {
            learning_rate: LearningRate::Constant(0.01),
            rho: 0.99,
            epsilon: 1e-8,
            dialect: Dialect::Torch,
            eps_in_sqrt: false,
            ..RmsPropConfig::default()
        }
    }

    /// `optax.rmsprop(learning_rate)`'s defaults: `decay=0.9, eps=1e-8,
    /// initial_scale=0, eps_in_sqrt=True, centered=False, momentum=None,
    /// nesterov=False, bias_correction=False` (`decay` is `rho` here, `momentum=None`
    /// is 0).
    pub fn optax(learning_rate: impl Into<LearningRate>) -> Self {
        RmsPropConfig {
            learning_rate: learning_rate.into(),
            rho: 0.9,
            epsilon: 1e-8,
            dialect: Dialect::Optax,
            ..RmsPropConfig::default()
        }
    }

    /// Burn's `RmsPropConfig` defaults: `alpha=0.99, momentum=0.9, epsilon=1e-5,
    /// centered=false` (PyTorch's formula; Burn gives the learning rate at each step,
    /// here the config's, 0.01 unless set).
    pub fn burn() -> Self {
        RmsPropConfig {
            momentum: 0.9,
            epsilon: 1e-5,
            dialect: Dialect::Burn,
            ..RmsPropConfig::torch()
        }
    }
}

/// Keys of Keras 3's `RMSprop.get_config()`, in its order (plus `jit_compile`).
const KEYS: [&str; 17] = [
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "rho",
    "momentum",
    "epsilon",
    "centered",
    "jit_compile",
    StateStorage::JSON_KEY,
];

/// Which gradient clipping a config asks for (Keras applies the first set one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Clipping {
    /// No clipping.
    None,
    /// Per-tensor L2 norm.
    Norm(f32),
    /// Global L2 norm across all gradients.
    GlobalNorm(f32),
    /// Element-wise value clipping.
    Value(f32),
}

macro_rules! builder {
    ($(#[$doc:meta] $fn:ident($field:ident: $ty:ty) => $val:expr;)*) => {
        impl RmsPropConfig {
            $(#[$doc] pub fn $fn(mut self, $field: $ty) -> Self { self.$field = $val; self })*
        }
    };
}

builder! {
    /// Sets `learning_rate` (a float or a [`KerasSchedule`](crate::KerasSchedule)).
    with_learning_rate(learning_rate: impl Into<LearningRate>) => learning_rate.into();
    /// Sets `rho`.
    with_rho(rho: f64) => rho;
    /// Sets `momentum`.
    with_momentum(momentum: f64) => momentum;
    /// Sets `epsilon`.
    with_epsilon(epsilon: f64) => epsilon;
    /// Sets `centered`.
    with_centered(centered: bool) => centered;
    /// Sets `weight_decay`.
    with_weight_decay(weight_decay: f64) => Some(weight_decay);
    /// Sets `clipnorm`.
    with_clipnorm(clipnorm: f64) => Some(clipnorm);
    /// Sets `clipvalue`.
    with_clipvalue(clipvalue: f64) => Some(clipvalue);
    /// Sets `global_clipnorm`.
    with_global_clipnorm(global_clipnorm: f64) => Some(global_clipnorm);
    /// Sets `use_ema`.
    with_use_ema(use_ema: bool) => use_ema;
    /// Sets `ema_momentum`.
    with_ema_momentum(ema_momentum: f64) => ema_momentum;
    /// Sets `ema_overwrite_frequency`.
    with_ema_overwrite_frequency(ema_overwrite_frequency: u64) => Some(ema_overwrite_frequency);
    /// Sets `loss_scale_factor`.
    with_loss_scale_factor(loss_scale_factor: f64) => Some(loss_scale_factor);
    /// Sets `gradient_accumulation_steps`.
    with_gradient_accumulation_steps(gradient_accumulation_steps: u64) => Some(gradient_accumulation_steps);
    /// Sets `name`.
    with_name(name: impl Into<String>) => name.into();
    /// Sets `jit_compile` (`false` selects the CPU path).
    with_jit_compile(jit_compile: bool) => jit_compile;
    /// Sets how the slots are stored ([`StateStorage`]).
    with_state(state: StateStorage) => state;
    /// Sets PyTorch's `maximize`.
    with_maximize(maximize: bool) => maximize;
    /// Sets optax's `nesterov`.
    with_nesterov(nesterov: bool) => nesterov;
    /// Sets optax's `bias_correction`.
    with_bias_correction(bias_correction: bool) => bias_correction;
    /// Sets optax's `initial_scale`.
    with_initial_scale(initial_scale: f64) => initial_scale;
    /// Sets optax's `eps_in_sqrt`.
    with_eps_in_sqrt(eps_in_sqrt: bool) => eps_in_sqrt;
}

impl RmsPropConfig {
    /// Adds a [`ParamGroup`]: variables with hyperparameters of their own.
    pub fn with_param_group(mut self, group: ParamGroup) -> Self {
        self.param_groups.push(group);
        self
    }

    /// True when some tensor may take weight decay: the config's, or a group's.
    pub(crate) fn any_weight_decay(&self) -> bool {
        self.weight_decay.is_some()
            || self
                .param_groups
                .iter()
                .any(|g| g.weight_decay_or(self.weight_decay).is_some())
    }
}

/// Refuses a NaN or an infinity, naming `field`.
pub(crate) fn finite(field: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("must be finite, got {v}")))
    }
}

impl RmsPropConfig {
    /// Checks every rule Keras enforces, plus finiteness of every number.
    pub fn validate(&self) -> Result<()> {
        match &self.learning_rate {
            LearningRate::Constant(lr) => finite("learning_rate", *lr)?,
            LearningRate::Keras(s) => s.validate()?,
            LearningRate::Custom(_) => {}
        }
        finite("rho", self.rho)?;
        finite("momentum", self.momentum)?;
        finite("epsilon", self.epsilon)?;
        finite("ema_momentum", self.ema_momentum)?;
        let optional = [
            ("weight_decay", self.weight_decay),
            ("clipnorm", self.clipnorm),
            ("clipvalue", self.clipvalue),
            ("global_clipnorm", self.global_clipnorm),
            ("loss_scale_factor", self.loss_scale_factor),
        ];
        for (field, v) in optional {
            if let Some(v) = v {
                finite(field, v)?;
            }
        }
        let clips: Vec<&str> = [
            ("clipnorm", self.clipnorm),
            ("clipvalue", self.clipvalue),
            ("global_clipnorm", self.global_clipnorm),
        ]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
        if clips.len() > 1 {
            return Err(Error::ConflictingClipping(clips.join(", ")));
        }
        if !(0.0..=1.0).contains(&self.ema_momentum) {
            return Err(Error::invalid(
                "ema_momentum",
                format!("must be in [0, 1], got {}", self.ema_momentum),
            ));
        }
        if self.ema_overwrite_frequency == Some(0) {
            return Err(Error::invalid(
                "ema_overwrite_frequency",
                "must be >= 1, got 0",
            ));
        }
        if let Some(n) = self.gradient_accumulation_steps {
            if n < 2 {
                return Err(Error::invalid(
                    "gradient_accumulation_steps",
                    format!("must be >= 2, got {n}"),
                ));
            }
        }
        if self.loss_scale_factor == Some(0.0) {
            return Err(Error::invalid("loss_scale_factor", "must not be 0"));
        }
        self.validate_dialect()?;
        for (i, group) in self.param_groups.iter().enumerate() {
            group.validate(i, self.momentum, self.dialect == Dialect::Keras)?;
        }
        check_disjoint(&self.param_groups)?;
        self.state.validate()
    }

    /// Refuses an argument the dialect does not have, and what its library refuses.
    fn validate_dialect(&self) -> Result<()> {
        finite("initial_scale", self.initial_scale)?;
        let d = self.dialect;
        let foreign = [
            ("maximize", self.maximize, d == Dialect::Torch),
            ("nesterov", self.nesterov, d == Dialect::Optax),
            ("bias_correction", self.bias_correction, d == Dialect::Optax),
            (
                "initial_scale",
                self.initial_scale != 0.0,
                d == Dialect::Optax,
            ),
            // epsilon's place is fixed except in optax
            (
                "eps_in_sqrt",
                self.eps_in_sqrt != (d == Dialect::Keras),
                d == Dialect::Optax,
            ),
        ];
        for (field, set, allowed) in foreign {
            if set && !allowed {
                return Err(Error::invalid(
                    field,
                    format!("is not an argument of {}'s RMSprop", d.as_str()),
                ));
            }
        }
        if d != Dialect::Keras {
            // torch.optim.RMSprop raises ValueError for these; optax and Burn agree
            let lr = match self.learning_rate {
                LearningRate::Constant(lr) => lr,
                _ => 0.0,
            };
            for (field, v) in [
                ("learning_rate", lr),
                ("rho", self.rho),
                ("epsilon", self.epsilon),
                ("momentum", self.momentum),
                ("weight_decay", self.weight_decay.unwrap_or(0.0)),
            ] {
                if v < 0.0 {
                    return Err(Error::invalid(field, format!("must be >= 0, got {v}")));
                }
            }
        }
        Ok(())
    }

    /// The clipping Keras applies: `clipnorm` if > 0, else `global_clipnorm` if > 0,
    /// else `clipvalue` if > 0 (Keras ignores zero and negative values).
    pub(crate) fn clipping(&self) -> Clipping {
        match (self.clipnorm, self.global_clipnorm, self.clipvalue) {
            (Some(c), _, _) if c > 0.0 => Clipping::Norm(c as f32),
            (_, Some(c), _) if c > 0.0 => Clipping::GlobalNorm(c as f32),
            (_, _, Some(c)) if c > 0.0 => Clipping::Value(c as f32),
            _ => Clipping::None,
        }
    }

    /// Keras keeps a momentum slot only when `momentum > 0`.
    pub fn uses_momentum(&self) -> bool {
        self.momentum > 0.0
    }

    /// Reads Keras' `get_config()` JSON (a `serde_json::Value`); absent keys take
    /// Keras' defaults, unknown keys and wrong types are errors, and the result is validated.
    pub fn from_keras_json(v: &Value) -> Result<Self> {
        if v.get("dialect").is_some() {
            return Err(Error::UnknownConfigKey("dialect".into()));
        }
        // the Keras dialect's JSON: Keras' keys, and the param groups
        Self::from_json(v)
    }

    /// The config Keras' keys describe, not yet validated (the other dialects' JSON
    /// is read through it, renamed).
    pub(crate) fn keras_fields(v: &Value) -> Result<Self> {
        let f = Fields::new(v, "", &KEYS)?;
        let d = RmsPropConfig::default();
        let learning_rate = match f.value("learning_rate") {
            None => d.learning_rate,
            Some(v) => LearningRate::from_json(v, "learning_rate")?,
        };
        let count = |key: &str| -> Result<Option<u64>> {
            match f.opt_i64(key)? {
                None => Ok(None),
                Some(i) if i >= 0 => Ok(Some(i as u64)),
                Some(i) => Err(Error::invalid(key, format!("must be >= 0, got {i}"))),
            }
        };
        let config = RmsPropConfig {
            learning_rate,
            rho: f.f64_or("rho", d.rho)?,
            momentum: f.f64_or("momentum", d.momentum)?,
            epsilon: f.f64_or("epsilon", d.epsilon)?,
            centered: f.bool_or("centered", d.centered)?,
            weight_decay: f.opt_f64("weight_decay")?,
            clipnorm: f.opt_f64("clipnorm")?,
            clipvalue: f.opt_f64("clipvalue")?,
            global_clipnorm: f.opt_f64("global_clipnorm")?,
            use_ema: f.bool_or("use_ema", d.use_ema)?,
            ema_momentum: f.f64_or("ema_momentum", d.ema_momentum)?,
            ema_overwrite_frequency: count("ema_overwrite_frequency")?,
            loss_scale_factor: f.opt_f64("loss_scale_factor")?,
            gradient_accumulation_steps: count("gradient_accumulation_steps")?,
            name: f.string_or("name", &d.name)?,
            jit_compile: f.bool_or("jit_compile", d.jit_compile)?,
            state: match f.value(StateStorage::JSON_KEY) {
                None => d.state,
                Some(v) => StateStorage::from_json(v)?,
            },
            ..d
        };
        Ok(config)
    }

    /// Parses JSON text, then [`RmsPropConfig::from_keras_json`].
    pub fn from_keras_json_str(text: &str) -> Result<Self> {
        Self::from_keras_json(&parse(text)?)
    }

    /// Writes exactly what Keras' `get_config()` writes, in its key order (then
    /// `param_groups`, not a Keras key, when the config has any). A constant
    /// learning rate is written as its float32 value (Keras keeps it in a float32
    /// variable: 0.05 becomes 0.05000000074505806). A custom schedule without a Keras
    /// serialization is refused.
    pub fn to_keras_json(&self) -> Result<Value> {
        if self.dialect != Dialect::Keras {
            return Err(Error::invalid(
                "dialect",
                format!(
                    "a {} config has no Keras get_config(); write it with to_json",
                    self.dialect.as_str()
                ),
            ));
        }
        let mut keys = self.keras_keys()?;
        if let (false, Value::Object(m)) = (self.param_groups.is_empty(), &mut keys) {
            m.insert(
                crate::dialects::PARAM_GROUPS.into(),
                crate::dialects::groups_to_json(&self.param_groups, Dialect::Keras)?,
            );
        }
        Ok(keys)
    }

    /// Keras' keys of this config, whatever its dialect (the other dialects' JSON
    /// takes its shared options and schedule from them).
    pub(crate) fn keras_keys(&self) -> Result<Value> {
        let lr = match &self.learning_rate {
            // Keras keeps a float in a float32 variable
            LearningRate::Constant(x) => float(*x as f32 as f64),
            rate => rate.to_json("learning_rate")?,
        };
        let count = |x: Option<u64>| x.map_or(Value::Null, Value::from);
        let mut m = Map::new();
        m.insert("name".into(), Value::from(self.name.clone()));
        m.insert("learning_rate".into(), lr);
        m.insert("weight_decay".into(), opt_float(self.weight_decay));
        m.insert("clipnorm".into(), opt_float(self.clipnorm));
        m.insert("global_clipnorm".into(), opt_float(self.global_clipnorm));
        m.insert("clipvalue".into(), opt_float(self.clipvalue));
        m.insert("use_ema".into(), Value::from(self.use_ema));
        m.insert("ema_momentum".into(), float(self.ema_momentum));
        m.insert(
            "ema_overwrite_frequency".into(),
            count(self.ema_overwrite_frequency),
        );
        m.insert(
            "loss_scale_factor".into(),
            opt_float(self.loss_scale_factor),
        );
        m.insert(
            "gradient_accumulation_steps".into(),
            count(self.gradient_accumulation_steps),
        );
        m.insert("rho".into(), float(self.rho));
        m.insert("momentum".into(), float(self.momentum));
        m.insert("epsilon".into(), float(self.epsilon));
        m.insert("centered".into(), Value::from(self.centered));
        if !self.jit_compile {
            m.insert("jit_compile".into(), Value::from(false));
        }
        if self.state != StateStorage::default() {
            m.insert(StateStorage::JSON_KEY.into(), self.state.to_json());
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(e: Error) -> String {
        match e {
            Error::InvalidConfig { field, .. } => field,
            Error::WrongType { field, .. } => field,
            Error::UnknownConfigKey(k) => k,
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn defaults_are_keras_3() {
        let c = RmsPropConfig::default();
        assert_eq!(c.learning_rate, LearningRate::Constant(0.001));
        assert_eq!((c.rho, c.momentum, c.epsilon), (0.9, 0.0, 1e-7));
        assert_eq!(c.ema_momentum, 0.99);
        assert_eq!(c.ema_overwrite_frequency, None);
        assert_eq!(c.name, "rmsprop");
        assert!(c.jit_compile && !c.centered && !c.use_ema);
        c.validate().unwrap();
    }

    /// Floats that need all 17 significant digits survive JSON both ways (serde_json's
    /// default parser can be off by one ulp; `float_roundtrip` makes it exact).
    #[test]
    fn seventeen_digit_floats_round_trip_exactly() {
        for x in [
            0.013000000000000001f64,
            0.1 + 0.2,
            1.0 / 3.0,
            2.2250738585072014e-308,
        ] {
            let c = RmsPropConfig::default()
                .with_rho(x)
                .with_weight_decay(x * 7.0);
            let back = RmsPropConfig::from_keras_json_str(&c.to_keras_json().unwrap().to_string())
                .unwrap();
            assert_eq!(back.rho.to_bits(), x.to_bits(), "{x:e}");
            assert_eq!(
                back.weight_decay.map(f64::to_bits),
                Some((x * 7.0).to_bits())
            );
        }
    }

    #[test]
    fn two_clip_options_conflict() {
        let c = RmsPropConfig::default()
            .with_clipnorm(1.0)
            .with_clipvalue(0.5);
        assert!(
            matches!(c.validate(), Err(Error::ConflictingClipping(ref s)) if s == "clipnorm, clipvalue")
        );
        let c = RmsPropConfig::default()
            .with_global_clipnorm(1.0)
            .with_clipvalue(0.5);
        assert!(matches!(c.validate(), Err(Error::ConflictingClipping(_))));
    }

    #[test]
    fn ema_momentum_out_of_range() {
        for m in [-0.1, 1.5] {
            let c = RmsPropConfig::default()
                .with_use_ema(true)
                .with_ema_momentum(m);
            assert_eq!(field_of(c.validate().unwrap_err()), "ema_momentum");
        }
    }

    #[test]
    fn ema_overwrite_frequency_below_one() {
        let c = RmsPropConfig::default()
            .with_use_ema(true)
            .with_ema_overwrite_frequency(0);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ema_overwrite_frequency"
        );
        let e =
            RmsPropConfig::from_keras_json(&json!({"ema_overwrite_frequency": -3})).unwrap_err();
        assert_eq!(field_of(e), "ema_overwrite_frequency");
    }

    #[test]
    fn accumulation_steps_below_two() {
        let c = RmsPropConfig::default().with_gradient_accumulation_steps(1);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "gradient_accumulation_steps"
        );
    }

    #[test]
    fn non_finite_numbers_refused() {
        let c = RmsPropConfig::default().with_rho(f64::NAN);
        assert_eq!(field_of(c.validate().unwrap_err()), "rho");
    }

    #[test]
    fn unknown_key_refused() {
        let e = RmsPropConfig::from_keras_json(&json!({"rho": 0.9, "beta_1": 0.5})).unwrap_err();
        assert!(
            matches!(e, Error::UnknownConfigKey(ref k) if k == "beta_1"),
            "{e:?}"
        );
        let e = RmsPropConfig::from_keras_json(&json!({"learning_rate": {"class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5, "extra": 1}}}))
        .unwrap_err();
        assert!(
            matches!(e, Error::UnknownConfigKey(ref k) if k == "learning_rate.config.extra"),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_types_refused() {
        for (key, bad) in [
            ("rho", json!("0.9")),
            ("centered", json!(1)),
            ("name", json!(3)),
            ("learning_rate", json!([0.1])),
            ("ema_overwrite_frequency", json!(2.5)),
        ] {
            let e = RmsPropConfig::from_keras_json(&json!({ key: bad })).unwrap_err();
            assert!(
                matches!(e, Error::WrongType { ref field, .. } if field == key),
                "{e:?}"
            );
        }
        let e = RmsPropConfig::from_keras_json(&json!([1, 2])).unwrap_err();
        assert!(matches!(e, Error::WrongType { .. }));
    }

    #[test]
    fn unknown_schedule_refused() {
        let e = RmsPropConfig::from_keras_json(&json!({"learning_rate":
            {"module": "keras.optimizers.schedules", "class_name": "CyclicLR", "config": {}, "registered_name": null}}))
        .unwrap_err();
        assert!(
            matches!(e, Error::UnknownSchedule(ref c) if c == "CyclicLR"),
            "{e:?}"
        );
    }

    #[test]
    fn not_json_refused() {
        assert!(matches!(
            RmsPropConfig::from_keras_json_str("{rho: "),
            Err(Error::Json(_))
        ));
    }

    #[test]
    fn constant_learning_rate_written_as_float32() {
        let v = RmsPropConfig::default()
            .with_learning_rate(0.05)
            .to_keras_json()
            .unwrap();
        assert_eq!(v["learning_rate"], json!(0.05000000074505806));
        assert!(v.get("jit_compile").is_none());
        let v = RmsPropConfig::default()
            .with_jit_compile(false)
            .to_keras_json()
            .unwrap();
        assert_eq!(v["jit_compile"], json!(false));
        assert!(!RmsPropConfig::from_keras_json(&v).unwrap().jit_compile);
    }

    #[test]
    fn clipping_follows_keras_priority_and_ignores_non_positive() {
        assert_eq!(
            RmsPropConfig::default().with_clipnorm(0.0).clipping(),
            Clipping::None
        );
        assert_eq!(
            RmsPropConfig::default().with_clipvalue(-1.0).clipping(),
            Clipping::None
        );
        assert_eq!(
            RmsPropConfig::default()
                .with_global_clipnorm(2.0)
                .clipping(),
            Clipping::GlobalNorm(2.0)
        );
    }
}
