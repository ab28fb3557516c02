//! Burn's learning rate per parameter (`ModuleLearningRate`, what Burn's
//! `ModuleLrScheduler::step` gives, or one rate for all) as this crate's learning rates:
//! the config's for the parameters at Burn's base rate, and a param group's for the
//! parameters of a group that sets no rate of its own (a Burn group added with
//! `with_burn_group`, say), which takes its parameters' rate at each step.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ::burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;

use crate::burn_bridge::module::Taken;
use crate::config::RmsPropConfig;
use crate::error::{BurnProblem, Error, Result};
use crate::schedule::LearningRate;

/// Where a parameter's learning rate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateRule {
    /// The config's, which is Burn's base rate; or its param group's own rate (or
    /// multiplier of the config's): Burn's rate for it must be the base rate.
    Base,
    /// Param group `k`'s, which sets no rate of its own and takes its parameters' rate
    /// from Burn at each step.
    Group(usize),
    /// None: its group is frozen.
    Frozen,
}

/// Each parameter's (named `names`) [`RateRule`] under `config`'s param groups.
pub(crate) fn rules(config: &RmsPropConfig, names: &[String]) -> Vec<RateRule> {
    let group_of: std::collections::HashMap<&str, usize> = config
        .param_groups
        .iter()
        .enumerate()
        .flat_map(|(k, g)| g.variables.iter().map(move |v| (v.as_str(), k)))
        .collect();
    names
        .iter()
        .map(|name| {
            let group = group_of.get(name.as_str()).copied();
            match group.map(|k| (k, &config.param_groups[k])) {
                Some((_, g)) if g.frozen => RateRule::Frozen,
                Some((k, g))
                    if g.learning_rate.is_none() && g.learning_rate_multiplier.is_none() =>
                {
                    RateRule::Group(k)
                }
                _ => RateRule::Base,
            }
        })
        .collect()
}

/// One step's learning rates.
pub(crate) struct StepRates {
    /// The config's: Burn's base rate.
    pub(crate) base: f64,
    /// Each [`RateRule::Group`]'s group and its rate (`None`: the config's).
    pub(crate) groups: Vec<(usize, Option<LearningRate>)>,
}

/// This step's rates from Burn's: the base rate (the config's) and each
/// [`RateRule::Group`]'s (`None` where it is the base rate, so that the config is as it
/// was built). Refused, naming the parameter, where two parameters of one group have
/// different rates, or a [`RateRule::Base`] parameter has another rate than the base.
pub(crate) fn this_step(
    lr: &ModuleLearningRate,
    taken: &[Taken],
    rules: &[RateRule],
) -> Result<StepRates> {
    // Burn's lookups panic on a rate with no group (`ModuleLearningRate::default()`).
    let rates = catch_unwind(AssertUnwindSafe(|| {
        let base = lr.base();
        let each: Vec<f64> = taken
            .iter()
            .map(|t| lr.lr_from_param(t.id, Some(&t.name)))
            .collect();
        (base, each)
    }));
    let (base, each) = rates.map_err(|_| Error::BurnParam {
        name: "(module)".into(),
        problem: BurnProblem::LearningRate(
            "Burn's ModuleLearningRate has no rate for every parameter (no base group)".into(),
        ),
    })?;
    // each following group's rate, and the parameter that gave it first
    let mut shared: std::collections::BTreeMap<usize, (f64, &str)> = Default::default();
    for ((t, &rate), &rule) in taken.iter().zip(&each).zip(rules) {
        let refuse = |why: String| Error::BurnParam {
            name: t.name.clone(),
            problem: BurnProblem::LearningRate(why),
        };
        match rule {
            RateRule::Base if rate != base => {
                return Err(refuse(format!(
                    "Burn gives it {rate}, the base rate is {base}; it is in no param group that takes Burn's rate (add its Burn group with BurnRmsProp::with_burn_group)"
                )))
            }
            RateRule::Base | RateRule::Frozen => {}
            RateRule::Group(k) => match shared.get(&k) {
                Some(&(theirs, first)) if theirs != rate => {
                    return Err(refuse(format!(
                        "Burn gives it {rate} and `{first}`, of the same param group, {theirs}: a param group steps with one rate"
                    )))
                }
                Some(_) => {}
                None => {
                    shared.insert(k, (rate, &t.name));
                }
            },
        }
    }
    let groups = shared
        .into_iter()
        .map(|(k, (rate, _))| (k, (rate != base).then_some(LearningRate::from(rate))))
        .collect();
    Ok(StepRates { base, groups })
}
