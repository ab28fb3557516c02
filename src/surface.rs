//! [`Optimizer`]: what [`RmsProp`], [`LossScaleOptimizer`] and (feature `mpi`)
//! `ShardedRmsProp` all do, with one signature each, so training code can take any of
//! them. Each type keeps the same methods as inherent ones, with the same signatures.
//! Native only: in a browser the readers are `async` (`RmsProp::variables_async`), so
//! the trait, whose readers block, is not compiled for `wasm32`.

use crate::error::Result;
use crate::loss_scale::LossScaleOptimizer;
use crate::optimizer::RmsProp;
use crate::slot::Slot;
use crate::variable::VariableSpec;

/// The surface every optimizer here shares.
///
/// ```
/// use fused_rmsprop::{Backend, Optimizer, RmsProp, RmsPropConfig, Variable};
/// fn train(opt: &mut impl Optimizer, steps: usize) -> fused_rmsprop::Result<Vec<f32>> {
///     for _ in 0..steps {
///         let x = opt.variable(0)?;
///         opt.apply_gradients(&[Some(&x)])?; // d(x^2/2)/dx = x
///     }
///     opt.variable(0)
/// }
/// let var = Variable::new("x", &[], vec![10.0]).unwrap();
/// let mut opt = RmsProp::with_backend(RmsPropConfig::default().with_learning_rate(0.1), vec![var], Backend::Cpu).unwrap();
/// assert!(train(&mut opt, 3).unwrap()[0] < 10.0);
/// assert_eq!(opt.iterations(), 3);
/// ```
pub trait Optimizer {
    /// The variables' names and shapes, in order.
    fn specs(&self) -> &[VariableSpec];

    /// One step of Keras' `apply_gradients`: `grads[i]` is variable `i`'s gradient, or
    /// `None` for none this step. Bad input is a typed error, and changes nothing.
    fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()>;

    /// Keras' `iterations`: update steps applied.
    fn iterations(&self) -> u64;

    /// Variable `i`'s values.
    fn variable(&self, i: usize) -> Result<Vec<f32>>;

    /// Every variable's values, in order.
    fn variables(&self) -> Result<Vec<Vec<f32>>>;

    /// `slot` of every variable (`None` when the config keeps no such slot).
    fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>>;

    /// Keras' `exclude_from_weight_decay(var_names=...)`: adds substrings; a variable
    /// whose name contains any of them takes no weight decay.
    fn exclude_from_weight_decay(&mut self, var_names: &[&str]);

    /// The weight-decay exclusion substrings given so far.
    fn excluded(&self) -> &[String];

    /// Keras' `finalize_variable_values`: with `use_ema`, every variable assigned its
    /// moving average.
    fn finalize_variable_values(&mut self) -> Result<()>;
}

impl Optimizer for RmsProp {
    fn specs(&self) -> &[VariableSpec] {
        RmsProp::specs(self)
    }
    fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        RmsProp::apply_gradients(self, grads)
    }
    fn iterations(&self) -> u64 {
        RmsProp::iterations(self)
    }
    fn variable(&self, i: usize) -> Result<Vec<f32>> {
        RmsProp::variable(self, i)
    }
    fn variables(&self) -> Result<Vec<Vec<f32>>> {
        RmsProp::variables(self)
    }
    fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        RmsProp::slot(self, slot)
    }
    fn exclude_from_weight_decay(&mut self, var_names: &[&str]) {
        RmsProp::exclude_from_weight_decay(self, var_names)
    }
    fn excluded(&self) -> &[String] {
        RmsProp::excluded(self)
    }
    fn finalize_variable_values(&mut self) -> Result<()> {
        RmsProp::finalize_variable_values(self)
    }
}

impl Optimizer for LossScaleOptimizer {
    fn specs(&self) -> &[VariableSpec] {
        self.inner().specs()
    }
    fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        LossScaleOptimizer::apply_gradients(self, grads)
    }
    fn iterations(&self) -> u64 {
        LossScaleOptimizer::iterations(self)
    }
    fn variable(&self, i: usize) -> Result<Vec<f32>> {
        self.inner().variable(i)
    }
    fn variables(&self) -> Result<Vec<Vec<f32>>> {
        self.inner().variables()
    }
    fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        self.inner().slot(slot)
    }
    fn exclude_from_weight_decay(&mut self, var_names: &[&str]) {
        self.inner_mut().exclude_from_weight_decay(var_names)
    }
    fn excluded(&self) -> &[String] {
        self.inner().excluded()
    }
    fn finalize_variable_values(&mut self) -> Result<()> {
        self.inner_mut().finalize_variable_values()
    }
}

#[cfg(feature = "mpi")]
impl Optimizer for crate::sharded::ShardedRmsProp {
    fn specs(&self) -> &[VariableSpec] {
        crate::sharded::ShardedRmsProp::specs(self)
    }
    fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        crate::sharded::ShardedRmsProp::apply_gradients(self, grads)
    }
    fn iterations(&self) -> u64 {
        crate::sharded::ShardedRmsProp::iterations(self)
    }
    fn variable(&self, i: usize) -> Result<Vec<f32>> {
        crate::sharded::ShardedRmsProp::variable(self, i)
    }
    fn variables(&self) -> Result<Vec<Vec<f32>>> {
        crate::sharded::ShardedRmsProp::variables(self)
    }
    fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        crate::sharded::ShardedRmsProp::slot(self, slot)
    }
    fn exclude_from_weight_decay(&mut self, var_names: &[&str]) {
        crate::sharded::ShardedRmsProp::exclude_from_weight_decay(self, var_names)
    }
    fn excluded(&self) -> &[String] {
        crate::sharded::ShardedRmsProp::excluded(self)
    }
    fn finalize_variable_values(&mut self) -> Result<()> {
        crate::sharded::ShardedRmsProp::finalize_variable_values(self)
    }
}
