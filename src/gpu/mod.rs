//! The GPU path: fused WGSL kernels over a flat, segmented buffer arena.
//!
//! - `context`: adapter choice, device and queue, wgpu errors as values;
//! - `contract`: the bindings and overrides of `shaders/rmsprop.wgsl`, written once
//!   (`build.rs` compiles it too);
//! - `shader`: the host side of `shaders/rmsprop.wgsl` (constants, the structs it reads
//!   and writes);
//! - `limits`: what the kernels need from a device, checked before wgpu can fail;
//! - `pipelines`: one pipeline set per structural variant, cached per device;
//! - `binding`: tensor views for user bind groups, and user-supplied buffers;
//! - `arena`: parameters, gradients and slots in GPU buffers with offset and chunk tables;
//! - `nonfinite`: the step counters, decided on the device under the non-finite guard;
//! - `readback`: buffers read back in one submission, waited for or awaited;
//! - `engine`: one step = one uniform write + one submit.

mod arena;
mod binding;
mod context;
// Some of the contract is read only by build.rs and the tests.
#[cfg_attr(not(test), allow(dead_code))]
mod contract;
mod engine;
mod limits;
mod nonfinite;
mod pipelines;
mod readback;
mod shader;
#[cfg(test)]
mod tint;

pub use binding::{TensorView, UserBuffers, ARENA_USAGES};
pub use context::GpuContext;
pub use engine::{GpuEngine, GpuOptions};
