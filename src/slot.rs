//! The names of the per-element optimizer state kept beside each variable.

/// A piece of per-element optimizer state kept beside each variable.
///
/// Which slots exist depends on the config: [`Slot::Velocity`] always,
/// [`Slot::Momentum`] when `momentum > 0`, [`Slot::AverageGradient`] when `centered`,
/// [`Slot::Ema`] with `use_ema` and [`Slot::Accumulator`] with
/// `gradient_accumulation_steps`.
///
/// ```
/// use fused_rmsprop::{Backend, RmsProp, RmsPropConfig, Slot, Variable};
/// let w = Variable::new("w", &[2], vec![1.0, 2.0]).unwrap();
/// let mut opt = RmsProp::with_backend(RmsPropConfig::default(), vec![w], Backend::Cpu).unwrap();
/// opt.apply_gradients(&[Some(&[0.5, -0.5][..])]).unwrap();
/// let velocity = opt.slot(Slot::Velocity).unwrap().unwrap(); // one Vec per variable
/// assert!(velocity[0].iter().all(|&v| v > 0.0));
/// assert_eq!(opt.slot(Slot::Momentum).unwrap(), None); // momentum is 0: no such slot
/// assert_eq!(Slot::Ema.keras_name(), "average");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The running mean of squared gradients (Keras `velocity`).
    Velocity,
    /// The momentum trace (Keras `momentum`).
    Momentum,
    /// The running mean of gradients of the centered variant (Keras `average_gradient`).
    AverageGradient,
    /// The exponential moving average of the variable (Keras `average`).
    Ema,
    /// The gradient accumulator (Keras `accumulated_gradient`).
    Accumulator,
}

impl Slot {
    /// Every slot, in arena order.
    pub const ALL: [Slot; 5] = [
        Slot::Velocity,
        Slot::Momentum,
        Slot::AverageGradient,
        Slot::Ema,
        Slot::Accumulator,
    ];

    /// The name Keras gives this slot (and the name checkpoints store it under).
    pub fn keras_name(self) -> &'static str {
        match self {
            Slot::Velocity => "velocity",
            Slot::Momentum => "momentum",
            Slot::AverageGradient => "average_gradient",
            Slot::Ema => "average",
            Slot::Accumulator => "accumulated_gradient",
        }
    }

    /// The slot Keras calls `name`, if any.
    pub fn from_keras_name(name: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.keras_name() == name)
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.keras_name())
    }
}
