//! # fused-rmsprop
//!
//! Keras 3's `RMSprop`, exact to its float32 semantics, as fused WGSL compute kernels
//! (wgpu) with a multi-threaded CPU path that takes over when no GPU adapter exists.
//!
//! The update, per element (epsilon sits *inside* the square root, as in Keras and
//! unlike PyTorch, which adds it to the root; the learning rate multiplies the
//! gradient before the division):
//!
//! ```text
//! velocity = rho * velocity + (1 - rho) * g^2
//! denom    = velocity + eps                 (centered: velocity - avg_grad^2 + eps)
//! p       -= lr * g / sqrt(denom)           (momentum: m = momentum * m + that; p -= m)
//! ```
//!
//! Around it, in Keras' order: loss-scale unscaling, gradient accumulation, clipping
//! (`clipnorm`, `global_clipnorm`, `clipvalue`), decoupled weight decay, and the EMA
//! of the variables with optional overwrite. `src/math.rs` holds the exact expressions
//! (every stage, in Keras' float32 order), and `ARCHITECTURE.md` where each one runs.
//!
//! ```
//! use fused_rmsprop::{Backend, RmsProp, RmsPropConfig, Variable};
//! let config = RmsPropConfig::default().with_learning_rate(0.01).with_momentum(0.9);
//! let w = Variable::new("dense/kernel", &[2, 3], vec![0.5; 6]).unwrap();
//! let b = Variable::new("dense/bias", &[3], vec![0.0; 3]).unwrap();
//! let mut opt = RmsProp::with_backend(config, vec![w, b], Backend::Cpu).unwrap();
//! opt.exclude_from_weight_decay(&["bias"]);
//! for _ in 0..3 {
//!     let gw = vec![0.1f32; 6];
//!     opt.apply_gradients(&[Some(&gw), None]).unwrap(); // no gradient for the bias
//! }
//! assert_eq!(opt.iterations(), 3);
//! assert!(opt.variable(0).unwrap()[0] < 0.5);
//! assert_eq!(opt.variable(1).unwrap(), vec![0.0; 3]);
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod backend;
#[cfg(feature = "burn")]
mod burn_bridge;
mod checkpoint;
mod checkpoint_file;
mod config;
mod counters;
mod cpu;
mod cpu_level;
mod dialects;
mod dtype;
mod error;
pub mod gpu;
mod groups;
mod json;
mod layout;
mod loss_scale;
mod math;
mod optimizer;
mod plan;
mod quant;
mod schedule;
#[cfg(feature = "mpi")]
mod sharded;
mod slot;
mod state;
mod state_layout;
// the blocking readers it names are native only (a browser awaits them)
#[cfg(not(target_arch = "wasm32"))]
mod surface;
mod variable;
mod variant;

pub use backend::{Backend, BackendKind};
#[cfg(feature = "burn")]
pub use burn_bridge::{BurnRmsProp, Refused, WgpuSetup};
pub use config::{Dialect, RmsPropConfig};
pub use counters::SkippedSteps;
pub use cpu_level::CpuLevel;
pub use dtype::{Dtype, GradientElement, Precision};
#[cfg(feature = "burn")]
pub use error::BurnProblem;
pub use error::{Error, Result};
pub use gpu::{GpuContext, GpuOptions};
pub use groups::ParamGroup;
/// The 16-bit float types gradients can arrive in ([`half::bf16`], [`half::f16`]).
pub use half;
pub use loss_scale::{LossScaleConfig, LossScaleOptimizer};
pub use math::LossScaleState;
/// The MPI bindings (rsmpi) the sharded optimizer runs on (feature `mpi`).
#[cfg(feature = "mpi")]
pub use mpi;
pub use optimizer::RmsProp;
pub use quant::CodeMap;
pub use schedule::{
    CosineDecay, CosineDecayRestarts, ExponentialDecay, InverseTimeDecay, KerasSchedule,
    LearningRate, LearningRateSchedule, PiecewiseConstantDecay, PolynomialDecay,
};
#[cfg(feature = "mpi")]
pub use sharded::{merge_sharded_checkpoint, split_checkpoint, ShardedRmsProp};
pub use slot::Slot;
pub use state::{StateDtype, StateStorage};
#[cfg(not(target_arch = "wasm32"))]
pub use surface::Optimizer;
pub use variable::{Variable, VariableSpec};

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
