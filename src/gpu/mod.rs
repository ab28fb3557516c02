//! The GPU path: fused WGSL kernels over a flat, segmented buffer arena.
//!
//! - [`context`]: adapter choice, device and queue, errors as values;
//! - [`pipelines`]: one pipeline set per [`crate::plan::Variant`], cached per device;
//! - [`arena`]: parameters, gradients and slots in GPU buffers with offset and chunk tables;
//! - [`engine`]: one step = one uniform write + one submit;
//! - `guard`: the device-side counters of the opt-in non-finite guard.

pub mod arena;
pub mod context;
pub mod engine;
mod guard;
pub mod pipelines;

pub use arena::{GpuArena, Segment, UserBuffers, ARENA_USAGES};
pub use context::{GpuContext, ALLOW_SOFTWARE_ENV};
pub use engine::{GpuEngine, GpuOptions};
