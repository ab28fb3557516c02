//! The GPU path: fused WGSL kernels over a flat, segmented buffer arena.
//!
//! - `context`: adapter choice, device and queue, wgpu errors as values;
//! - `shader`: the host side of `shaders/rmsprop.wgsl` (constants, bindings, the
//!   structs it reads and writes);
//! - `pipelines`: one pipeline set per structural variant, cached per device;
//! - `binding`: tensor views for user bind groups, and user-supplied buffers;
//! - `arena`: parameters, gradients and slots in GPU buffers with offset and chunk tables;
//! - `nonfinite`: the step counters, decided on the device under the non-finite guard;
//! - `engine`: one step = one uniform write + one submit.

mod arena;
mod binding;
mod context;
mod engine;
mod nonfinite;
mod pipelines;
mod shader;

pub use binding::{TensorView, UserBuffers, ARENA_USAGES};
pub use context::GpuContext;
pub use engine::{GpuEngine, GpuOptions};
