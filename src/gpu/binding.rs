//! What user code binds or supplies: [`TensorView`]s of one tensor in the arena's
//! buffers, and [`UserBuffers`] with the padded layout they must follow.
//!
//! Every tensor starts at a multiple of the device's `min_storage_buffer_offset_alignment`
//! (and of 16 bytes, so the kernels move `vec4<f32>`), in every arena buffer; the
//! padding between tensors is zero and never changes.

use std::num::NonZeroU64;
use std::ops::Range;

use crate::dtype::Dtype;
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::layout::Layout;
use crate::variable::VariableSpec;

/// Usages the crate needs on parameter and gradient buffers, also ones you supply.
pub const ARENA_USAGES: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Bytes in one f32.
pub(crate) const F32: u64 = 4;

/// Bytes of a buffer holding `n` elements of `dtype`, rounded up to a whole `vec4<f32>`
/// (16 bytes, and never a zero-sized binding): the kernels read a 16-bit gradient
/// buffer as `vec4<f32>` and as pairs of `u32`.
pub(crate) fn dtype_bytes(n: usize, dtype: Dtype) -> u64 {
    (n as u64 * dtype.size_bytes() as u64)
        .next_multiple_of(16)
        .max(16)
}

/// Elements every tensor's offset is a multiple of on this device: the storage-binding
/// offset alignment counted in 16-bit elements (so offsets are aligned in f32 and in
/// 16-bit buffers alike), and at least 8 (one `vec4<f32>` of 16-bit pairs).
pub(crate) fn align_elements(ctx: &GpuContext) -> usize {
    let bytes = ctx.device.limits().min_storage_buffer_offset_alignment as usize;
    (bytes / 2).max(8)
}

/// One tensor's elements in an arena buffer, ready for a bind group: `size` bytes at
/// byte `offset` of `buffer` (a multiple of the device's
/// `min_storage_buffer_offset_alignment`). Get one from
/// [`GpuEngine::param_view`](crate::gpu::GpuEngine::param_view),
/// [`gradient_view`](crate::gpu::GpuEngine::gradient_view) (whose example binds one in a
/// shader) or [`slot_view`](crate::gpu::GpuEngine::slot_view).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The buffer holding the tensor (its segment's buffer).
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of the tensor's first element.
    pub offset: u64,
    /// Bytes: 4 per element (2 in a 16-bit gradient buffer, rounded up to a multiple
    /// of 4 as bindings must be), no padding.
    pub size: u64,
}

impl<'a> TensorView<'a> {
    /// The view as a buffer binding; `None` for an empty tensor (WebGPU has no empty
    /// bindings).
    pub fn binding(&self) -> Option<wgpu::BindingResource<'a>> {
        Some(wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: Some(NonZeroU64::new(self.size)?),
        }))
    }
}

/// Your own parameter and gradient buffers, for the optimizer to step in place (pass
/// them in [`GpuOptions::buffers`](crate::GpuOptions::buffers)).
///
/// From byte `offset` on, both hold every variable row-major in variable order:
/// parameters in the optimizer's [`Precision::params`](crate::Precision), gradients in
/// its [`Precision::gradients`](crate::Precision), each variable at the byte offset
/// [`UserBuffers::tensor_byte_ranges`] gives for that dtype (aligned to the device's
/// storage-binding alignment; the padding between them must be zero). They need the
/// usages [`ARENA_USAGES`], `offset` a multiple of `min_storage_buffer_offset_alignment`,
/// at least `offset +` [`UserBuffers::required_size`] bytes, and the model must fit one
/// storage binding (`max_storage_buffer_binding_size`).
#[derive(Debug, Clone)]
pub struct UserBuffers {
    /// Parameters.
    pub params: wgpu::Buffer,
    /// Gradients, same layout.
    pub grads: wgpu::Buffer,
    /// Byte offset of the arena in both buffers.
    pub offset: u64,
}

impl UserBuffers {
    /// Bytes a buffer of `dtype` elements needs past [`UserBuffers::offset`] for `specs`
    /// on `context`'s device (padding included): the parameter dtype for the
    /// parameters, the gradient dtype for the gradients.
    pub fn required_size(
        context: &GpuContext,
        specs: &[VariableSpec],
        dtype: Dtype,
    ) -> Result<u64> {
        let layout = Layout::new(specs, usize::MAX, usize::MAX, align_elements(context))?;
        Ok(dtype_bytes(layout.total(), dtype))
    }

    /// Each variable's bytes in a buffer of `dtype` elements, relative to
    /// [`UserBuffers::offset`], on `context`'s device.
    pub fn tensor_byte_ranges(
        context: &GpuContext,
        specs: &[VariableSpec],
        dtype: Dtype,
    ) -> Result<Vec<Range<u64>>> {
        let layout = Layout::new(specs, usize::MAX, usize::MAX, align_elements(context))?;
        let size = dtype.size_bytes() as u64;
        Ok(layout
            .tensors()
            .iter()
            .map(|t| t.offset as u64 * size..t.range().end as u64 * size)
            .collect())
    }
}
