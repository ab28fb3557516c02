//! The JSON of every [`Dialect`]: Keras' `get_config()`, and for the others the
//! constructor's keyword arguments under their library's names, with `"dialect"`.
//!
//! | dialect | keys (defaults) |
//! | --- | --- |
//! | `torch` | `lr` (0.01), `alpha` (0.99), `eps` (1e-8), `weight_decay` (0), `momentum` (0), `centered` (false), `maximize` (false); `foreach`, `capturable`, `differentiable` read and ignored (how PyTorch runs, not what) |
//! | `optax` | `learning_rate` (required), `decay` (0.9), `eps` (1e-8), `initial_scale` (0), `eps_in_sqrt` (true), `centered` (false), `momentum` (null), `nesterov` (false), `bias_correction` (false); `weight_decay` (null: `optax.add_decayed_weights` chained before) |
//! | `burn` | `alpha` (0.99), `momentum` (0.9), `epsilon` (1e-5), `centered` (false), `weight_decay` (`{"penalty": x}` or null), `grad_clipping` (`{"Value": x}`, `{"Norm": x}` or null); `learning_rate` (0.01: Burn gives it per step) |
//!
//! Every dialect writes its [`ParamGroup`]s under `param_groups` (when there are any),
//! each `{"variables": [names], ...}` with the numbers the group sets under the
//! dialect's names (Keras: `learning_rate`, `rho`, `epsilon`, `momentum`,
//! `weight_decay`; PyTorch: `lr`, `alpha`, `eps`, `momentum`, `weight_decay`; optax:
//! `learning_rate`, `decay`, `eps`, `momentum`, `weight_decay`; Burn: `learning_rate`,
//! `alpha`, `epsilon`, `momentum`, `weight_decay`, a number here), plus
//! `learning_rate_multiplier` and `frozen` (true) when set. A key absent or null takes
//! the config's value.
//!
//! The options no dialect but Keras names (`clipnorm`, `clipvalue`,
//! `global_clipnorm`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
//! `loss_scale_factor`, `gradient_accumulation_steps`, `name`, `jit_compile`, `state`)
//! keep Keras' names in every dialect, written only when not at their default.

use serde_json::{Map, Value};

use crate::config::{Dialect, RmsPropConfig};
use crate::error::{Error, Result};
use crate::groups::ParamGroup;
use crate::json::{float, opt_float, Fields};
use crate::schedule::LearningRate;

/// The key of the param groups, in every dialect.
pub(crate) const PARAM_GROUPS: &str = "param_groups";

/// A param group's keys for the learning rate, `rho`, epsilon, momentum and weight
/// decay in dialect `d`.
fn group_keys(d: Dialect) -> [&'static str; 5] {
    match d {
        Dialect::Keras => [
            "learning_rate",
            "rho",
            "epsilon",
            "momentum",
            "weight_decay",
        ],
        Dialect::Torch => ["lr", "alpha", "eps", "momentum", "weight_decay"],
        Dialect::Optax => ["learning_rate", "decay", "eps", "momentum", "weight_decay"],
        Dialect::Burn => [
            "learning_rate",
            "alpha",
            "epsilon",
            "momentum",
            "weight_decay",
        ],
    }
}

/// The param groups as dialect `d` writes them (see the module docs).
pub(crate) fn groups_to_json(groups: &[ParamGroup], d: Dialect) -> Result<Value> {
    let [lr, rho, eps, momentum, wd] = group_keys(d);
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut m = Map::new();
        m.insert("variables".into(), Value::from(g.variables.clone()));
        if let Some(rate) = &g.learning_rate {
            m.insert(lr.into(), rate.to_json("param_groups.learning_rate")?);
        }
        let numbers = [
            ("learning_rate_multiplier", g.learning_rate_multiplier),
            (rho, g.rho),
            (eps, g.epsilon),
            (momentum, g.momentum),
            (wd, g.weight_decay),
        ];
        for (key, v) in numbers {
            if let Some(v) = v {
                m.insert(key.into(), float(v));
            }
        }
        if g.frozen {
            m.insert("frozen".into(), Value::from(true));
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

/// Reads the param groups dialect `d` wrote.
pub(crate) fn groups_from_json(v: &Value, d: Dialect) -> Result<Vec<ParamGroup>> {
    let [lr, rho, eps, momentum, wd] = group_keys(d);
    let items = v.as_array().ok_or_else(|| Error::WrongType {
        field: PARAM_GROUPS.into(),
        expected: "a list of objects",
        found: crate::json::describe(v),
    })?;
    let allowed = [
        "variables",
        lr,
        "learning_rate_multiplier",
        rho,
        eps,
        momentum,
        wd,
        "frozen",
    ];
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let ctx = format!("{PARAM_GROUPS}[{i}]");
            let f = Fields::new(item, &ctx, &allowed)?;
            let learning_rate = f
                .value(lr)
                .map(|v| LearningRate::from_json(v, &f.name(lr)))
                .transpose()?;
            Ok(ParamGroup {
                variables: f.req_string_list("variables")?,
                learning_rate,
                learning_rate_multiplier: f.opt_f64("learning_rate_multiplier")?,
                rho: f.opt_f64(rho)?,
                epsilon: f.opt_f64(eps)?,
                momentum: f.opt_f64(momentum)?,
                weight_decay: f.opt_f64(wd)?,
                frozen: f.bool_or("frozen", false)?,
            })
        })
        .collect()
}

/// Keras' names of the options every dialect shares, with their default values in
/// Keras' JSON (an option at its default is not written).
const SHARED: [&str; 11] = [
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "name",
    "jit_compile",
    crate::state::StateStorage::JSON_KEY,
];

/// One dialect's own keys and the Keras key each one fills (`None`: a dialect field
/// set after the Keras fields are read, or a key read and ignored).
struct Renames {
    keys: &'static [(&'static str, Option<&'static str>)],
}

const TORCH: Renames = Renames {
    keys: &[
        ("lr", Some("learning_rate")),
        ("alpha", Some("rho")),
        ("eps", Some("epsilon")),
        ("weight_decay", Some("weight_decay")),
        ("momentum", Some("momentum")),
        ("centered", Some("centered")),
        ("maximize", None),
        ("foreach", None),
        ("capturable", None),
        ("differentiable", None),
    ],
};

const OPTAX: Renames = Renames {
    keys: &[
        ("learning_rate", Some("learning_rate")),
        ("decay", Some("rho")),
        ("eps", Some("epsilon")),
        ("initial_scale", None),
        ("eps_in_sqrt", None),
        ("centered", Some("centered")),
        ("momentum", Some("momentum")),
        ("nesterov", None),
        ("bias_correction", None),
        ("weight_decay", Some("weight_decay")),
    ],
};

const BURN: Renames = Renames {
    keys: &[
        ("learning_rate", Some("learning_rate")),
        ("alpha", Some("rho")),
        ("momentum", Some("momentum")),
        ("epsilon", Some("epsilon")),
        ("centered", Some("centered")),
        ("weight_decay", None),
        ("grad_clipping", None),
    ],
};

impl Renames {
    fn of(dialect: Dialect) -> Option<&'static Renames> {
        match dialect {
            Dialect::Keras => None,
            Dialect::Torch => Some(&TORCH),
            Dialect::Optax => Some(&OPTAX),
            Dialect::Burn => Some(&BURN),
        }
    }
}

impl RmsPropConfig {
    /// Reads any dialect's JSON: `"dialect"` (`keras` when absent) picks the keys
    /// (see the table in this module's docs); absent keys take that library's defaults,
    /// unknown keys and wrong types are errors, and the result is validated.
    ///
    /// ```
    /// use fused_rmsprop::{Dialect, RmsPropConfig};
    /// let json = serde_json::json!({"dialect": "torch", "lr": 0.05, "alpha": 0.9,
    ///     "momentum": 0.9, "maximize": true});
    /// let c = RmsPropConfig::from_json(&json).unwrap();
    /// assert_eq!((c.dialect, c.rho, c.momentum, c.maximize), (Dialect::Torch, 0.9, 0.9, true));
    /// assert_eq!(RmsPropConfig::from_json(&c.to_json().unwrap()).unwrap(), c);
    /// ```
    pub fn from_json(v: &Value) -> Result<Self> {
        let map = v.as_object().ok_or_else(|| Error::WrongType {
            field: "config".into(),
            expected: "a JSON object",
            found: crate::json::describe(v),
        })?;
        let dialect = match map.get("dialect") {
            None | Some(Value::Null) => Dialect::Keras,
            Some(Value::String(name)) => Dialect::from_name(name)
                .ok_or_else(|| Error::invalid("dialect", format!("unknown dialect {name:?}")))?,
            Some(other) => {
                return Err(Error::WrongType {
                    field: "dialect".into(),
                    expected: "a string",
                    found: crate::json::describe(other),
                })
            }
        };
        let mut rest = map.clone();
        rest.remove("dialect");
        let groups = match rest.remove(PARAM_GROUPS) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => groups_from_json(&v, dialect)?,
        };
        let Some(renames) = Renames::of(dialect) else {
            let mut c = Self::keras_fields(&Value::Object(rest))?;
            c.param_groups = groups;
            c.validate()?;
            return Ok(c);
        };
        let own: Vec<&str> = renames.keys.iter().map(|(k, _)| *k).collect();
        let allowed: Vec<&str> = own.iter().copied().chain(SHARED).collect();
        let rest_value = Value::Object(rest.clone());
        let f = Fields::new(&rest_value, "", &allowed)?;
        // the Keras JSON these keys say: renamed, the shared ones as they are
        let mut keras = Map::new();
        for key in SHARED {
            if let Some(v) = rest.get(key) {
                keras.insert(key.to_string(), v.clone());
            }
        }
        for (key, target) in renames.keys {
            if let (Some(target), Some(v)) = (target, f.value(key)) {
                keras.insert(target.to_string(), v.clone());
            }
        }
        let base = match dialect {
            Dialect::Torch => RmsPropConfig::torch(),
            Dialect::Optax => RmsPropConfig::optax(0.0),
            _ => RmsPropConfig::burn(),
        };
        let read = Self::keras_fields(&Value::Object(keras.clone()))?;
        let given = |k: &str| keras.contains_key(k);
        let mut c = RmsPropConfig {
            learning_rate: if given("learning_rate") {
                read.learning_rate
            } else if dialect == Dialect::Optax {
                return Err(Error::MissingKey("learning_rate".into()));
            } else {
                base.learning_rate
            },
            rho: if given("rho") { read.rho } else { base.rho },
            momentum: if given("momentum") {
                read.momentum
            } else {
                base.momentum
            },
            epsilon: if given("epsilon") {
                read.epsilon
            } else {
                base.epsilon
            },
            // weight decay 0 adds nothing: no decay pass at all, as PyTorch skips it
            weight_decay: read.weight_decay.filter(|&wd| wd != 0.0),
            ..read
        };
        c.dialect = dialect;
        c.eps_in_sqrt = base.eps_in_sqrt;
        match dialect {
            Dialect::Torch => c.maximize = f.bool_or("maximize", false)?,
            Dialect::Optax => {
                c.initial_scale = f.f64_or("initial_scale", 0.0)?;
                c.eps_in_sqrt = f.bool_or("eps_in_sqrt", true)?;
                c.nesterov = f.bool_or("nesterov", false)?;
                c.bias_correction = f.bool_or("bias_correction", false)?;
            }
            Dialect::Keras => {}
            Dialect::Burn => {
                if let Some(wd) = f.value("weight_decay") {
                    let w = Fields::new(wd, "weight_decay", &["penalty"])?;
                    c.weight_decay = Some(w.req_f64("penalty")?).filter(|&p| p != 0.0);
                }
                if let Some(clip) = f.value("grad_clipping") {
                    let g = Fields::new(clip, "grad_clipping", &["Value", "Norm"])?;
                    match (g.opt_f64("Value")?, g.opt_f64("Norm")?) {
                        (Some(v), None) => c.clipvalue = Some(v),
                        (None, Some(n)) => c.clipnorm = Some(n),
                        _ => {
                            return Err(Error::invalid(
                                "grad_clipping",
                                "must be {\"Value\": x} or {\"Norm\": x}",
                            ))
                        }
                    }
                }
            }
        }
        c.param_groups = groups;
        c.validate()?;
        Ok(c)
    }

    /// Parses JSON text, then [`RmsPropConfig::from_json`].
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json(&crate::json::parse(text)?)
    }

    /// Writes this config's dialect's JSON: Keras' `get_config()`
    /// ([`RmsPropConfig::to_keras_json`]), or `"dialect"` and every constructor argument
    /// of that library under its own name, then the shared options not at their
    /// default (see this module's docs). [`RmsPropConfig::from_json`] reads it back.
    pub fn to_json(&self) -> Result<Value> {
        let Some(renames) = Renames::of(self.dialect) else {
            return self.to_keras_json();
        };
        // the shared options, as Keras writes them, when not at their default
        let keras = self.keras_keys()?;
        let defaults = RmsPropConfig::default().to_keras_json()?;
        let mut m = Map::new();
        m.insert("dialect".into(), Value::from(self.dialect.as_str()));
        // a float as given (Keras alone keeps it in float32); a schedule as Keras
        // serializes it
        let lr = match &self.learning_rate {
            LearningRate::Constant(x) => float(*x),
            _ => keras["learning_rate"].clone(),
        };
        let wd = self.weight_decay.unwrap_or(0.0);
        for (key, _) in renames.keys {
            let v = match (self.dialect, *key) {
                (_, "lr" | "learning_rate") => lr.clone(),
                (_, "alpha" | "decay") => float(self.rho),
                (_, "eps" | "epsilon") => float(self.epsilon),
                (Dialect::Optax, "momentum") => {
                    if self.momentum > 0.0 {
                        float(self.momentum)
                    } else {
                        Value::Null
                    }
                }
                (_, "momentum") => float(self.momentum),
                (_, "centered") => Value::from(self.centered),
                (_, "maximize") => Value::from(self.maximize),
                (_, "initial_scale") => float(self.initial_scale),
                (_, "eps_in_sqrt") => Value::from(self.eps_in_sqrt),
                (_, "nesterov") => Value::from(self.nesterov),
                (_, "bias_correction") => Value::from(self.bias_correction),
                (Dialect::Torch, "weight_decay") => float(wd),
                (Dialect::Optax, "weight_decay") => opt_float(self.weight_decay),
                (Dialect::Burn, "weight_decay") => match self.weight_decay {
                    Some(p) => serde_json::json!({ "penalty": float(p) }),
                    None => Value::Null,
                },
                (Dialect::Burn, "grad_clipping") => match (self.clipvalue, self.clipnorm) {
                    (Some(v), _) => serde_json::json!({ "Value": float(v) }),
                    (None, Some(n)) => serde_json::json!({ "Norm": float(n) }),
                    _ => Value::Null,
                },
                // how PyTorch runs, not what: not written
                _ => continue,
            };
            m.insert(key.to_string(), v);
        }
        for key in SHARED {
            let burn_clip =
                self.dialect == Dialect::Burn && matches!(key, "clipvalue" | "clipnorm");
            match keras.get(key) {
                Some(v) if !burn_clip && Some(v) != defaults.get(key) => {
                    if key == "ema_momentum" && !self.use_ema {
                        continue;
                    }
                    m.insert(key.to_string(), v.clone());
                }
                _ => {}
            }
        }
        if !self.param_groups.is_empty() {
            m.insert(
                PARAM_GROUPS.into(),
                groups_to_json(&self.param_groups, self.dialect)?,
            );
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_dialect_round_trips() {
        let configs = [
            RmsPropConfig::default()
                .with_learning_rate(0.5)
                .with_momentum(0.5),
            RmsPropConfig::torch()
                .with_momentum(0.9)
                .with_centered(true)
                .with_weight_decay(0.01)
                .with_maximize(true)
                .with_clipnorm(1.0),
            RmsPropConfig::optax(0.003)
                .with_momentum(0.9)
                .with_nesterov(true)
                .with_bias_correction(true)
                .with_initial_scale(1.0)
                .with_eps_in_sqrt(false)
                .with_use_ema(true),
            RmsPropConfig::burn()
                .with_weight_decay(0.05)
                .with_clipvalue(0.5)
                .with_gradient_accumulation_steps(2),
        ];
        for c in configs {
            let json = c.to_json().unwrap();
            let back = RmsPropConfig::from_json(&json).unwrap();
            assert_eq!(back, c, "{json}");
            assert_eq!(back.to_json().unwrap(), json);
        }
    }

    #[test]
    fn absent_keys_take_the_library_defaults() {
        let t = RmsPropConfig::from_json(&json!({"dialect": "torch"})).unwrap();
        assert_eq!(t, RmsPropConfig::torch());
        let b = RmsPropConfig::from_json(&json!({"dialect": "burn"})).unwrap();
        assert_eq!(b, RmsPropConfig::burn());
        let o =
            RmsPropConfig::from_json(&json!({"dialect": "optax", "learning_rate": 0.1})).unwrap();
        assert_eq!(o, RmsPropConfig::optax(0.1));
        assert!(matches!(
            RmsPropConfig::from_json(&json!({"dialect": "optax"})),
            Err(Error::MissingKey(ref k)) if k == "learning_rate"
        ));
    }

    #[test]
    fn foreign_and_unknown_keys_are_refused() {
        // Keras' name in the torch dialect
        let e = RmsPropConfig::from_json(&json!({"dialect": "torch", "rho": 0.9})).unwrap_err();
        assert!(
            matches!(e, Error::UnknownConfigKey(ref k) if k == "rho"),
            "{e:?}"
        );
        let e = RmsPropConfig::from_json(&json!({"dialect": "jax"})).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "dialect"));
        // an argument of another dialect, set through the builder
        let e = RmsPropConfig::default().with_nesterov(true).validate();
        assert!(matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "nesterov"));
        let e = RmsPropConfig::torch().with_eps_in_sqrt(true).validate();
        assert!(matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "eps_in_sqrt"));
        let e = RmsPropConfig::torch().with_learning_rate(-0.1).validate();
        assert!(
            matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "learning_rate")
        );
        assert!(RmsPropConfig::torch().to_keras_json().is_err());
    }

    #[test]
    fn burn_clipping_and_decay_use_burn_shapes() {
        let c = RmsPropConfig::from_json(&json!({"dialect": "burn",
            "weight_decay": {"penalty": 0.05}, "grad_clipping": {"Norm": 2.0}}))
        .unwrap();
        assert_eq!((c.weight_decay, c.clipnorm), (Some(0.05), Some(2.0)));
        let e = RmsPropConfig::from_json(&json!({"dialect": "burn",
            "grad_clipping": {"Value": 1.0, "Norm": 2.0}}))
        .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "grad_clipping"));
    }
}
