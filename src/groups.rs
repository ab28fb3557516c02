//! Per-tensor hyperparameters: [`ParamGroup`]s (PyTorch's `param_groups`, optax's
//! `multi_transform`) in the config, and the per-tensor table they resolve to
//! ([`TensorTable`]: each tensor's group, whether it takes weight decay, whether it
//! is frozen), the one table both backends read.
//!
//! Group 0 is the config's own numbers; group `g > 0` is `param_groups[g - 1]`, whose
//! step numbers the plan gives as [`GroupScalars`](crate::math::GroupScalars) and the
//! kernels patch into the step's with [`with_group`](crate::math::with_group), once per
//! chunk. The weight-decay exclusions are one rule of the table: an excluded tensor
//! takes no decay whatever its group.

use crate::config::finite;
use crate::error::{Error, Result};
use crate::schedule::LearningRate;

/// Variables with hyperparameters of their own: every field left `None` takes the
/// config's value. Options that change the kernel's structure (`centered`, momentum
/// on or off, the state's storage) are the config's for every group.
///
/// ```
/// use fused_rmsprop::{ParamGroup, RmsPropConfig};
/// let config = RmsPropConfig::torch()
///     .with_param_group(ParamGroup::new(["embedding"]).with_learning_rate(0.1).with_weight_decay(0.0))
///     .with_param_group(ParamGroup::new(["head/bias"]).frozen());
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamGroup {
    /// The group's variables, by exact name.
    pub variables: Vec<String>,
    /// The group's own learning rate (a float or a schedule).
    pub learning_rate: Option<LearningRate>,
    /// Or a multiplier of the config's learning rate (of its schedule's value).
    pub learning_rate_multiplier: Option<f64>,
    /// The group's `rho` (PyTorch's `alpha`, optax's `decay`).
    pub rho: Option<f64>,
    /// The group's epsilon (placed as the dialect places it).
    pub epsilon: Option<f64>,
    /// The group's momentum coefficient (> 0 exactly when the config's is).
    pub momentum: Option<f64>,
    /// The group's weight decay; `Some(0.0)` turns decay off for the group.
    pub weight_decay: Option<f64>,
    /// No update: parameters and slots stay as they are (the EMA too), and the
    /// group's gradients are ignored (they count in no norm and no non-finite check).
    pub frozen: bool,
}

impl ParamGroup {
    /// A group of the variables named `variables`, with the config's numbers.
    pub fn new<S: Into<String>>(variables: impl IntoIterator<Item = S>) -> Self {
        ParamGroup {
            variables: variables.into_iter().map(Into::into).collect(),
            ..ParamGroup::default()
        }
    }

    /// Sets the group's own learning rate.
    pub fn with_learning_rate(mut self, learning_rate: impl Into<LearningRate>) -> Self {
        self.learning_rate = Some(learning_rate.into());
        self
    }

    /// Scales the config's learning rate for this group.
    pub fn with_learning_rate_multiplier(mut self, multiplier: f64) -> Self {
        self.learning_rate_multiplier = Some(multiplier);
        self
    }

    /// Sets the group's `rho`.
    pub fn with_rho(mut self, rho: f64) -> Self {
        self.rho = Some(rho);
        self
    }

    /// Sets the group's epsilon.
    pub fn with_epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = Some(epsilon);
        self
    }

    /// Sets the group's momentum coefficient.
    pub fn with_momentum(mut self, momentum: f64) -> Self {
        self.momentum = Some(momentum);
        self
    }

    /// Sets the group's weight decay (0 turns it off).
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }

    /// Freezes the group: no update, slots untouched.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// The group's weight decay as the kernels see it: its own, else the config's.
    pub(crate) fn weight_decay_or(&self, config: Option<f64>) -> Option<f64> {
        match self.weight_decay {
            Some(0.0) => None,
            Some(wd) => Some(wd),
            None => config,
        }
    }

    /// Checks the group against its config (`index` names it in errors).
    pub(crate) fn validate(&self, index: usize, config_momentum: f64, keras: bool) -> Result<()> {
        let field = |name: &str| format!("param_groups[{index}].{name}");
        if self.variables.is_empty() {
            return Err(Error::invalid(&field("variables"), "names no variable"));
        }
        if self.learning_rate.is_some() && self.learning_rate_multiplier.is_some() {
            return Err(Error::invalid(
                &field("learning_rate"),
                "give a learning rate or a multiplier of the config's, not both",
            ));
        }
        match &self.learning_rate {
            Some(LearningRate::Keras(s)) => s.validate()?,
            Some(LearningRate::Constant(lr)) => number(&field("learning_rate"), *lr, keras)?,
            _ => {}
        }
        let numbers = [
            ("learning_rate_multiplier", self.learning_rate_multiplier),
            ("rho", self.rho),
            ("epsilon", self.epsilon),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ];
        for (name, v) in numbers {
            if let Some(v) = v {
                number(&field(name), v, keras)?;
            }
        }
        if let Some(m) = self.momentum {
            if (m > 0.0) != (config_momentum > 0.0) {
                return Err(Error::invalid(
                    &field("momentum"),
                    format!(
                        "momentum on or off is the config's for every group (a slot); the config's is {config_momentum}, the group's {m}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A group's number: finite, and not negative outside Keras (PyTorch refuses those).
fn number(field: &str, v: f64, keras: bool) -> Result<()> {
    finite(field, v)?;
    if !keras && v < 0.0 {
        return Err(Error::invalid(field, format!("must be >= 0, got {v}")));
    }
    Ok(())
}

/// Whether variable `name` takes weight decay, given `exclude_from_weight_decay`
/// substrings (Keras searches them as a regular expression; plain names match the same).
pub(crate) fn takes_weight_decay(name: &str, excluded: &[String]) -> bool {
    !excluded.iter().any(|s| name.contains(s.as_str()))
}

/// Refuses a variable named in two groups.
pub(crate) fn check_disjoint(groups: &[ParamGroup]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        for name in &group.variables {
            if let Some(first) = seen.insert(name.as_str(), g) {
                return Err(Error::invalid(
                    &format!("param_groups[{g}].variables"),
                    format!("{name:?} is in param_groups[{first}] too"),
                ));
            }
        }
    }
    Ok(())
}

/// Refuses a group naming a variable the model does not have.
pub(crate) fn check_names(groups: &[ParamGroup], names: &[&str]) -> Result<()> {
    for (g, group) in groups.iter().enumerate() {
        if let Some(name) = group
            .variables
            .iter()
            .find(|n| !names.contains(&n.as_str()))
        {
            return Err(Error::invalid(
                &format!("param_groups[{g}].variables"),
                format!("no variable is named {name:?}"),
            ));
        }
    }
    Ok(())
}

/// What the step does to one tensor, beyond its gradient: its group, whether weight
/// decay applies to it, whether it is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorRule {
    /// 0: the config's numbers; `g`: `param_groups[g - 1]`'s.
    pub group: u32,
    /// Weight decay applies (the group decays, and no exclusion names the tensor).
    pub decay: bool,
    /// No update at all.
    pub frozen: bool,
}

/// The per-tensor table: one [`TensorRule`] per tensor, in variable order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TensorTable {
    pub rules: Vec<TensorRule>,
}

impl TensorTable {
    /// Resolves `groups` and the weight-decay exclusions over the tensors named
    /// `names` (a name no tensor has is skipped: a shard holds only some of the
    /// model's tensors; [`check_names`] refuses it for a whole model).
    pub(crate) fn resolve(
        config_decay: Option<f64>,
        groups: &[ParamGroup],
        names: &[&str],
        excluded: &[String],
    ) -> Self {
        let mut rules: Vec<TensorRule> = names
            .iter()
            .map(|name| TensorRule {
                group: 0,
                decay: config_decay.is_some() && takes_weight_decay(name, excluded),
                frozen: false,
            })
            .collect();
        for (g, group) in groups.iter().enumerate() {
            for name in &group.variables {
                for (t, _) in names.iter().enumerate().filter(|(_, n)| **n == name) {
                    rules[t] = TensorRule {
                        group: g as u32 + 1,
                        decay: group.weight_decay_or(config_decay).is_some()
                            && takes_weight_decay(name, excluded),
                        frozen: group.frozen,
                    };
                }
            }
        }
        TensorTable { rules }
    }

    /// Whether tensor `t`'s gradient takes part in the step (given, and not frozen).
    pub(crate) fn present(&self, t: usize, given: bool) -> bool {
        given && !self.rules.get(t).is_some_and(|r| r.frozen)
    }

    /// A step's gradients in tensor order, a frozen tensor's dropped.
    pub(crate) fn unfrozen<T>(&self, grads: impl IntoIterator<Item = Option<T>>) -> Vec<Option<T>> {
        grads
            .into_iter()
            .enumerate()
            .map(|(t, g)| g.filter(|_| self.present(t, true)))
            .collect()
    }

    /// The rule of tensor `t` (the config's group, decaying, for a table too short:
    /// never, the optimizer resolves one rule per tensor).
    pub(crate) fn rule(&self, t: usize) -> TensorRule {
        self.rules.get(t).copied().unwrap_or(TensorRule {
            group: 0,
            decay: true,
            frozen: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_exclusions_make_one_table() {
        let groups = vec![
            ParamGroup::new(["a", "b/bias"]).with_weight_decay(0.5),
            ParamGroup::new(["c"]).with_weight_decay(0.0),
            ParamGroup::new(["d"]).frozen(),
        ];
        let names = ["a", "b/bias", "c", "d", "e/bias", "f"];
        let excluded = vec!["bias".to_string()];
        let t = TensorTable::resolve(None, &groups, &names, &excluded);
        let rules: Vec<(u32, bool, bool)> = t
            .rules
            .iter()
            .map(|r| (r.group, r.decay, r.frozen))
            .collect();
        assert_eq!(
            rules,
            [
                (1, true, false),
                (1, false, false), // excluded by name
                (2, false, false), // the group's 0 turns decay off
                (3, false, true),  // no decay in the config, none in the group
                (0, false, false),
                (0, false, false),
            ]
        );
        assert!(!t.present(3, true) && t.present(0, true) && !t.present(0, false));
        let with_config = TensorTable::resolve(Some(0.1), &groups, &names, &excluded);
        assert!(with_config.rule(5).decay && !with_config.rule(4).decay);
        assert!(with_config.rule(3).decay && !with_config.rule(2).decay);
    }

    #[test]
    fn unknown_and_repeated_names_are_refused() {
        let groups = vec![ParamGroup::new(["nope"])];
        let err = check_names(&groups, &["a"]).unwrap_err();
        assert!(
            err.to_string().contains("param_groups[0].variables"),
            "{err}"
        );
        assert!(err.to_string().contains("\"nope\""), "{err}");
        assert_eq!(
            TensorTable::resolve(None, &groups, &["a"], &[])
                .rule(0)
                .group,
            0
        );
        let twice = vec![ParamGroup::new(["a"]), ParamGroup::new(["a"])];
        let err = check_disjoint(&twice).unwrap_err();
        assert!(err.to_string().contains("param_groups[0]"), "{err}");
    }

    #[test]
    fn momentum_on_or_off_is_structural() {
        let g = ParamGroup::new(["a"]).with_momentum(0.9);
        assert!(g.validate(0, 0.0, true).is_err());
        assert!(g.validate(0, 0.5, true).is_ok());
        let both = ParamGroup::new(["a"])
            .with_learning_rate(0.1)
            .with_learning_rate_multiplier(2.0);
        assert!(both.validate(0, 0.0, true).is_err());
        let negative = ParamGroup::new(["a"]).with_rho(-0.1);
        assert!(negative.validate(0, 0.0, false).is_err());
    }

    #[test]
    fn exclusion_by_substring() {
        let ex = vec!["bias".to_string()];
        assert!(!takes_weight_decay("layer1/bias", &ex));
        assert!(takes_weight_decay("layer0/kernel", &ex));
    }
}
