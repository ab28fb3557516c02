//! The GPU arena: parameters, gradients and slots in flat buffers, split into
//! segments that respect `max_storage_buffer_binding_size`, plus the chunk and
//! tensor tables the kernels read, and explicit upload and readback.
//!
//! Per segment of `len` elements: a `params` buffer (`len` f32), a `grads` buffer
//! (`len` f32) and a `slots` buffer holding each slot as a run of f32, in the order of
//! [`Variant::slots`]. Element `e` of the model lives at local index `e - segment.start`
//! of the segment holding it; its slots where the [`StateLayout`] puts its chunk (with
//! f32 state, at the same local index; compact slots in the `state_codes` and
//! `state_absmax` runs).

use std::num::NonZeroU64;

use crate::backend::Role;
use crate::dtype::{combine_master, split_master, Dtype, GradSlice};
use crate::error::{Error, Result};
use crate::gpu::binding::{
    align_elements, dtype_bytes, f32_bytes, TensorView, UserBuffers, ARENA_USAGES, F32,
};
use crate::gpu::context::GpuContext;
use crate::gpu::nonfinite::STEP_STATE_BYTES;
use crate::gpu::pipelines::Pipelines;
use crate::gpu::shader::{binding, ChunkRow, StepUniform, TensorRow, GPU_CHUNK_LEN};
use crate::layout::Layout;
use crate::quant::CodeMap;
use crate::state::{StateDtype, StateStorage};
use crate::state_layout::{check_raw, RawSlot, StateLayout};
use crate::variable::VariableSpec;
use crate::variant::{Slot, Variant};

/// One segment of the GPU arena: a run of whole tensors (or a piece of one tensor longer
/// than a binding), small enough for one storage binding, with its buffers.
#[derive(Debug)]
pub(crate) struct Segment {
    /// First arena element in this segment.
    pub start: usize,
    /// Number of elements (padding included; a multiple of 4).
    pub len: usize,
    /// Parameters, from byte `params_base` on.
    pub params: wgpu::Buffer,
    pub params_base: u64,
    /// Gradients, from byte `grads_base` on.
    pub grads: wgpu::Buffer,
    pub grads_base: u64,
    /// f32 slots, one run of `f32_run` elements per slot.
    pub slots: wgpu::Buffer,
    pub f32_run: usize,
    /// Compact slots (bf16 or int8 packed in words), one run of `code_run` words per
    /// slot; int8 blocks' scales, one run of `absmax_run` per slot (16-byte
    /// placeholders without).
    pub state_codes: wgpu::Buffer,
    pub code_run: usize,
    pub state_absmax: wgpu::Buffer,
    pub absmax_run: usize,
    /// The 16-bit parameter copy (a 16-byte placeholder without one).
    pub param_copy: wgpu::Buffer,
    /// The remainders of bf16 parameters (a 16-byte placeholder without them).
    pub param_remainders: wgpu::Buffer,
    pub chunk_count: usize,
    pub bind_group: wgpu::BindGroup,
}

/// An array of the arena, as views and copies name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Params,
    Grads,
    Slot(Slot),
    ParamCopy,
    ParamRemainders,
}

impl From<Role> for Target {
    fn from(role: Role) -> Self {
        match role {
            Role::Params => Target::Params,
            Role::Slot(s) => Target::Slot(s),
        }
    }
}

/// Parameters, gradients and slots of a model on the GPU.
#[derive(Debug)]
pub(crate) struct GpuArena {
    pub(crate) layout: Layout,
    /// Where each chunk's slots live.
    pub(crate) state: StateLayout,
    pub(crate) variant: Variant,
    pub(crate) segments: Vec<Segment>,
    pub(crate) tensors: wgpu::Buffer,
    pub(crate) uniform: wgpu::Buffer,
    /// Per-tensor clip factors (`ClipFactors`), written by `norm_finalize` or the host.
    pub(crate) clips: wgpu::Buffer,
    /// The device's [`crate::gpu::shader::StepState`] (the non-finite guard's counters).
    pub(crate) step_state: wgpu::Buffer,
    pub(crate) tensor_flags: Vec<u32>,
}

/// A piece of an arena range inside one segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub segment: usize,
    pub local: usize,
    pub len: usize,
    /// Offset of this piece inside the requested range.
    pub at: usize,
}

fn make_buffer(
    ctx: &GpuContext,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    ctx.scoped(&format!("allocating `{label}` ({size} bytes)"), || {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    })
}

fn range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: NonZeroU64::new(size),
    })
}

/// Largest segment length the device allows for this variant: every binding
/// (the slots buffer holds all slots) must fit `max_storage_buffer_binding_size`.
fn max_segment_len(ctx: &GpuContext, variant: &Variant) -> usize {
    let limits = ctx.device.limits();
    let max_bytes = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let per_element = F32 * variant.slots().len() as u64;
    let len = (max_bytes / per_element) as usize;
    let len = len.min(u32::MAX as usize / 2);
    if len >= GPU_CHUNK_LEN {
        len / GPU_CHUNK_LEN * GPU_CHUNK_LEN
    } else {
        len.max(1)
    }
}

/// Refuses user buffers that lack usages, room or alignment, naming what was expected.
fn check_user_buffers(
    ctx: &GpuContext,
    layout: &Layout,
    segment_len: usize,
    params: Dtype,
    gradients: Dtype,
    u: &UserBuffers,
) -> Result<()> {
    let total = layout.total();
    let invalid = |name: &str, reason: String| Error::InvalidBuffer {
        name: name.into(),
        reason,
    };
    if layout.segments().len() > 1 {
        return Err(invalid(
            "params",
            format!("the model takes {total} elements with padding, more than one binding holds on this device ({segment_len}); let the crate allocate the arena"),
        ));
    }
    let align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment);
    if !u.offset.is_multiple_of(align) {
        return Err(invalid(
            "params",
            format!(
                "offset {} is not a multiple of min_storage_buffer_offset_alignment ({align})",
                u.offset
            ),
        ));
    }
    for (name, b, dtype) in [
        ("params", &u.params, params),
        ("grads", &u.grads, gradients),
    ] {
        if !b.usage().contains(ARENA_USAGES) {
            return Err(invalid(
                name,
                format!("needs usages {ARENA_USAGES:?}, has {:?}", b.usage()),
            ));
        }
        let bytes = dtype_bytes(total, dtype);
        let needed = u.offset + bytes;
        if b.size() < needed {
            return Err(invalid(
                name,
                format!("{} bytes, the model needs {needed} (offset {} + {bytes} for {total} {dtype} elements with padding)", b.size(), u.offset),
            ));
        }
    }
    Ok(())
}

impl GpuArena {
    /// Allocates the arena for `specs` (zeroed), or uses `user` buffers for parameters
    /// and gradients (checked as [`UserBuffers`] documents).
    pub(crate) fn new(
        ctx: &GpuContext,
        pipelines: &Pipelines,
        specs: &[VariableSpec],
        variant: Variant,
        storage: &StateStorage,
        segment_len: Option<usize>,
        user: Option<UserBuffers>,
    ) -> Result<Self> {
        let max_len = max_segment_len(ctx, &variant);
        let segment_len = segment_len.map_or(max_len, |s| s.clamp(1, max_len));
        // compact state: a tensor split across segments splits at whole int8 blocks
        let segment_len = if storage.dtype == StateDtype::F32 {
            segment_len
        } else {
            segment_len.max(256) / 256 * 256
        };
        let layout = Layout::new(specs, GPU_CHUNK_LEN, segment_len, align_elements(ctx))?;
        let state = StateLayout::new(&layout, storage, align_elements(ctx));
        if let Some(u) = &user {
            check_user_buffers(
                ctx,
                &layout,
                segment_len,
                variant.params,
                variant.gradients,
                u,
            )?;
        }
        let slot_count = variant.slots().len();
        let n_tensors = layout.tensors().len();
        let n_chunks = layout.chunks().len();
        let storage_ro = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let row = std::mem::size_of::<TensorRow>() / 4;
        let tensors = make_buffer(ctx, "tensors", f32_bytes(row * n_tensors), storage_ro)?;
        let partials = make_buffer(
            ctx,
            "partials",
            f32_bytes(n_chunks),
            wgpu::BufferUsages::STORAGE,
        )?;
        let clips = make_buffer(
            ctx,
            "clips",
            f32_bytes(2 * n_tensors.max(1)),
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let uniform = make_buffer(
            ctx,
            "step uniform",
            std::mem::size_of::<StepUniform>() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let step_state = make_buffer(
            ctx,
            "step state",
            STEP_STATE_BYTES,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )?;
        let maps = CodeMap::gpu_table();
        let code_maps = make_buffer(ctx, "code maps", f32_bytes(maps.len()), storage_ro)?;
        ctx.queue
            .write_buffer(&code_maps, 0, bytemuck::cast_slice(&maps));
        let mut segments = Vec::with_capacity(layout.segments().len());
        for (s, elements) in layout.segments().iter().enumerate() {
            let start = elements.start;
            let len = elements.len();
            // an empty model still binds one vec4 per buffer
            let cap = len.max(4);
            let grad_bytes = dtype_bytes(cap, variant.gradients);
            let (params, params_base, grads, grads_base) = match &user {
                Some(u) => (u.params.clone(), u.offset, u.grads.clone(), u.offset),
                None => (
                    make_buffer(
                        ctx,
                        "params",
                        dtype_bytes(cap, variant.params),
                        ARENA_USAGES,
                    )?,
                    0,
                    make_buffer(ctx, "grads", grad_bytes, ARENA_USAGES)?,
                    0,
                ),
            };
            let (f32_len, compact_len) = state.sizes(s);
            let f32_run = f32_len.max(4);
            let slots = make_buffer(ctx, "slots", f32_bytes(f32_run * slot_count), ARENA_USAGES)?;
            let (code_run, absmax_run) = match variant.state {
                StateDtype::F32 => (4, 4),
                StateDtype::Bf16 => ((compact_len / 2).max(4), 4),
                StateDtype::Int8 => (
                    (compact_len / 4).max(4),
                    (compact_len / variant.block_size as usize).max(4),
                ),
            };
            let state_codes = make_buffer(
                ctx,
                "state codes",
                f32_bytes(code_run * slot_count),
                ARENA_USAGES,
            )?;
            let state_absmax = make_buffer(
                ctx,
                "state scales",
                f32_bytes(absmax_run * slot_count),
                ARENA_USAGES,
            )?;
            let copy_bytes = match variant.param_copy {
                Some(dtype) => dtype_bytes(cap, dtype),
                None => 16,
            };
            let param_copy = make_buffer(ctx, "param copy", copy_bytes, ARENA_USAGES)?;
            // the parameters bind as f32 lanes or as 16-bit pairs; the other binding
            // gets this placeholder
            let unused_params = make_buffer(ctx, "unused params", 16, wgpu::BufferUsages::STORAGE)?;
            let remainder_bytes = if variant.param_remainders {
                dtype_bytes(cap, Dtype::Bf16)
            } else {
                16
            };
            let param_remainders =
                make_buffer(ctx, "param remainders", remainder_bytes, ARENA_USAGES)?;
            // 0x7fff: no remainder, the master is the bf16 value (user parameter buffers
            // hold bf16 values to start from)
            let exact: Vec<u8> = [0xff, 0x7f].repeat(remainder_bytes as usize / 2);
            ctx.queue.write_buffer(&param_remainders, 0, &exact);
            let (params_f32, params_16) = if variant.params == Dtype::F32 {
                (
                    range(&params, params_base, cap as u64 * F32),
                    unused_params.as_entire_binding(),
                )
            } else {
                (
                    unused_params.as_entire_binding(),
                    range(&params, params_base, cap as u64 * 2),
                )
            };
            let table: Vec<ChunkRow> = layout
                .chunks()
                .iter()
                .enumerate()
                .filter(|(_, c)| c.segment == s)
                .map(|(g, c)| ChunkRow {
                    tensor: c.tensor as u32,
                    start: (c.offset - start) as u32,
                    len: c.len as u32,
                    global_index: g as u32,
                    tensor_start: (c.offset - layout.tensors()[c.tensor].offset) as u32,
                    state_at: state.place(g).at as u32,
                    state_format: state.place(g).dtype.code(),
                })
                .collect();
            let table_bytes = f32_bytes(std::mem::size_of_val(table.as_slice()) / 4);
            let chunks = make_buffer(ctx, "chunks", table_bytes, storage_ro)?;
            ctx.queue
                .write_buffer(&chunks, 0, bytemuck::cast_slice(&table));
            let bind_group = ctx.scoped("creating bind group", || {
                ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("rmsprop segment"),
                    layout: &pipelines.layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: binding::UNIFORM,
                            resource: uniform.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::CHUNKS,
                            resource: range(&chunks, 0, table_bytes),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::TENSORS,
                            resource: tensors.as_entire_binding(),
                        },
                        // exact sizes: the shader derives the segment length from params
                        wgpu::BindGroupEntry {
                            binding: binding::PARAMS,
                            resource: params_f32,
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::PARAMS_16,
                            resource: params_16,
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::PARAM_REMAINDERS,
                            resource: param_remainders.as_entire_binding(),
                        },
                        // the gradients twice: as f32 lanes and as 16-bit pairs (the
                        // variant's GRADIENT_DTYPE picks the one the kernels read)
                        wgpu::BindGroupEntry {
                            binding: binding::GRADS,
                            resource: range(&grads, grads_base, grad_bytes),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::GRADS_16,
                            resource: range(&grads, grads_base, grad_bytes),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::PARAM_COPY,
                            resource: param_copy.as_entire_binding(),
                        },
                        // exact sizes: the shader derives the runs from them
                        wgpu::BindGroupEntry {
                            binding: binding::SLOTS,
                            resource: slots.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::STATE_CODES,
                            resource: state_codes.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::STATE_ABSMAX,
                            resource: state_absmax.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::CODE_MAPS,
                            resource: code_maps.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::PARTIALS,
                            resource: partials.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::CLIPS,
                            resource: clips.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: binding::STEP_STATE,
                            resource: step_state.as_entire_binding(),
                        },
                    ],
                })
            })?;
            segments.push(Segment {
                start,
                len: cap,
                params,
                params_base,
                grads,
                grads_base,
                slots,
                f32_run,
                state_codes,
                code_run,
                state_absmax,
                absmax_run,
                param_copy,
                param_remainders,
                chunk_count: table.len(),
                bind_group,
            });
        }
        let tensor_flags = vec![u32::MAX; n_tensors];
        ctx.take_error()?;
        Ok(GpuArena {
            layout,
            state,
            variant,
            segments,
            tensors,
            uniform,
            clips,
            step_state,
            tensor_flags,
        })
    }

    /// Writes the tensor table with new per-step flags, only when they changed.
    pub(crate) fn set_flags(&mut self, ctx: &GpuContext, flags: Vec<u32>) {
        if flags == self.tensor_flags {
            return;
        }
        let rows: Vec<TensorRow> = self
            .layout
            .tensors()
            .iter()
            .zip(&flags)
            .map(|(t, &flags)| TensorRow {
                first_chunk: t.first_chunk as u32,
                chunk_count: t.chunk_count as u32,
                flags,
                _pad: 0,
            })
            .collect();
        if !rows.is_empty() {
            ctx.queue
                .write_buffer(&self.tensors, 0, bytemuck::cast_slice(&rows));
        }
        self.tensor_flags = flags;
    }

    /// Splits the arena range `start .. start + len` by segment.
    pub(crate) fn pieces(&self, start: usize, len: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        let end = start + len;
        for (i, s) in self.segments.iter().enumerate() {
            let lo = start.max(s.start);
            let hi = end.min(s.start + s.len);
            if lo < hi {
                out.push(Piece {
                    segment: i,
                    local: lo - s.start,
                    len: hi - lo,
                    at: lo - start,
                });
            }
        }
        out
    }

    /// Bytes per element of `target`.
    fn element_bytes(&self, target: Target) -> u64 {
        match target {
            Target::Grads => self.variant.gradients.size_bytes() as u64,
            Target::ParamCopy | Target::ParamRemainders => 2,
            Target::Params => self.variant.params.size_bytes() as u64,
            Target::Slot(_) => F32,
        }
    }

    /// The buffer and byte offset of `target`'s first element in a segment.
    fn target(&self, target: Target, segment: usize) -> Result<(&wgpu::Buffer, u64)> {
        let s = &self.segments[segment];
        match target {
            Target::Params => Ok((&s.params, s.params_base)),
            Target::Grads => Ok((&s.grads, s.grads_base)),
            Target::ParamRemainders => Ok((&s.param_remainders, 0)),
            Target::ParamCopy => match self.variant.param_copy {
                Some(_) => Ok((&s.param_copy, 0)),
                None => Err(Error::NoParamCopy),
            },
            Target::Slot(slot) => {
                let k = self
                    .variant
                    .slot_index(slot)
                    .ok_or(Error::SlotNotKept(slot))?;
                Ok((&s.slots, (k * s.f32_run) as u64 * F32))
            }
        }
    }

    /// Tensor `tensor` of `target` as one binding range; [`Error::NotBindable`] when the
    /// tensor spans segments.
    pub(crate) fn view(&self, target: Target, tensor: usize) -> Result<TensorView<'_>> {
        let t = self.layout.tensor(tensor)?;
        if let (Target::Slot(slot), false) = (target, self.variant.state == StateDtype::F32) {
            let pieces = self.state.pieces(&self.layout, tensor);
            let [(segment, place, _, _)] = pieces.as_slice() else {
                return Err(Error::NotBindable {
                    index: tensor,
                    len: t.len,
                    segments: pieces.len(),
                });
            };
            if place.dtype != StateDtype::F32 {
                return Err(Error::CompactSlot {
                    slot,
                    index: tensor,
                    dtype: place.dtype,
                });
            }
            let (buffer, base) = self.target(target, *segment)?;
            return Ok(TensorView {
                buffer,
                offset: base + place.at as u64 * F32,
                size: (t.len as u64 * F32).max(4),
            });
        }
        let (segment, local) = if t.len == 0 {
            // no elements: its aligned offset in the last segment starting at or before it
            // (an empty tensor may sit at the very end of the arena)
            let segment = self
                .segments
                .iter()
                .rposition(|s| s.start <= t.offset)
                .unwrap_or(0);
            (segment, t.offset - self.segments[segment].start)
        } else {
            let pieces = self.pieces(t.offset, t.len);
            let [p] = pieces.as_slice() else {
                return Err(Error::NotBindable {
                    index: tensor,
                    len: t.len,
                    segments: pieces.len(),
                });
            };
            (p.segment, p.local)
        };
        let (buffer, base) = self.target(target, segment)?;
        let element = self.element_bytes(target);
        Ok(TensorView {
            buffer,
            offset: base + local as u64 * element,
            size: (t.len as u64 * element).next_multiple_of(4),
        })
    }

    /// Uploads `values` to `role` at arena element `start` (rounded, for parameters
    /// stored in 16 bits).
    pub(crate) fn write(
        &self,
        ctx: &GpuContext,
        role: Target,
        start: usize,
        values: &[f32],
    ) -> Result<()> {
        let element = self.element_bytes(role);
        for p in self.pieces(start, values.len()) {
            let (buffer, base) = self.target(role, p.segment)?;
            let data = &values[p.at..p.at + p.len];
            let offset = base + p.local as u64 * element;
            if element == F32 {
                ctx.queue
                    .write_buffer(buffer, offset, bytemuck::cast_slice(data));
            } else if role == Target::Params && self.variant.param_remainders {
                let (mut hi, mut rem): (Vec<u16>, Vec<u16>) =
                    data.iter().map(|&x| split_master(x)).unzip();
                if hi.len() % 2 == 1 {
                    hi.push(0);
                    rem.push(0x7fff);
                }
                ctx.queue
                    .write_buffer(buffer, offset, bytemuck::cast_slice(&hi));
                let (remainders, _) = self.target(Target::ParamRemainders, p.segment)?;
                ctx.queue.write_buffer(
                    remainders,
                    p.local as u64 * element,
                    bytemuck::cast_slice(&rem),
                );
            } else {
                let dtype = self.variant.params;
                let mut bits: Vec<u16> = data.iter().map(|&x| dtype.half_bits(x)).collect();
                // writes are whole words: an odd piece also writes the padding after it
                // (zero, as it is)
                if bits.len() % 2 == 1 {
                    bits.push(0);
                }
                ctx.queue
                    .write_buffer(buffer, offset, bytemuck::cast_slice(&bits));
            }
        }
        Ok(())
    }

    /// Uploads one step's host gradients straight into the queue's staging memory: one
    /// staged write per segment, covering it whole, so the padding (and the gradients of
    /// variables that have none this step) are written as zeros.
    pub(crate) fn write_gradients(
        &self,
        ctx: &GpuContext,
        grads: &[Option<GradSlice<'_>>],
    ) -> Result<()> {
        let dtype = self.variant.gradients;
        if let Some(found) = grads
            .iter()
            .flatten()
            .map(|g| g.dtype())
            .find(|&d| d != dtype)
        {
            return Err(Error::GradientDtype {
                expected: dtype,
                found,
            });
        }
        let element = dtype.size_bytes();
        let mut staged = Vec::with_capacity(self.segments.len());
        for seg in &self.segments {
            let size = NonZeroU64::new(dtype_bytes(seg.len, self.variant.gradients))
                .ok_or_else(|| Error::Gpu("an arena segment has no elements".into()))?;
            let view = ctx
                .queue
                .write_buffer_with(&seg.grads, seg.grads_base, size)
                .ok_or_else(|| Error::Gpu("cannot stage the gradient upload".into()))?;
            staged.push(view);
        }
        // bytes of each segment written so far: tensors come in arena order
        let mut done = vec![0usize; staged.len()];
        for (t, g) in self.layout.tensors().iter().zip(grads) {
            for p in self.pieces(t.offset, t.len) {
                let mut view = staged[p.segment].slice(..);
                let at = p.local * element;
                let end = at + p.len * element;
                view.slice(done[p.segment]..at).fill(0);
                let mut dst = view.slice(at..end);
                match g {
                    Some(g) => dst.copy_from_slice(g.range(p.at..p.at + p.len).bytes()),
                    None => dst.fill(0),
                }
                done[p.segment] = end;
            }
        }
        for (view, done) in staged.iter_mut().zip(done) {
            view.slice(done..).fill(0);
        }
        Ok(())
    }

    /// Reads `role` back for the arena range `start .. start + len` as f32 (waits for the
    /// GPU): 16-bit parameters upcast, bf16 parameters with remainders combined into
    /// their f32 masters.
    pub(crate) fn read(
        &self,
        ctx: &GpuContext,
        role: Target,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let raw = self.read_raw(ctx, role, start, len)?;
        if self.element_bytes(role) == F32 {
            return Ok(bytemuck::pod_collect_to_vec(&raw));
        }
        let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&raw);
        if role == Target::Params && self.variant.param_remainders {
            let rem: Vec<u16> = bytemuck::pod_collect_to_vec(&self.read_raw(
                ctx,
                Target::ParamRemainders,
                start,
                len,
            )?);
            return Ok(bits
                .iter()
                .zip(&rem)
                .map(|(&h, &r)| combine_master(h, r))
                .collect());
        }
        let dtype = self.variant.params;
        Ok(bits.iter().map(|&b| dtype.upcast_bits(b)).collect())
    }

    /// The bytes of `role` for the arena range `start .. start + len`, one staging buffer
    /// per segment piece so no buffer exceeds the device's limits.
    fn read_raw(
        &self,
        ctx: &GpuContext,
        role: Target,
        start: usize,
        len: usize,
    ) -> Result<Vec<u8>> {
        let element = self.element_bytes(role);
        let mut out = vec![0u8; len * element as usize];
        for p in self.pieces(start, len) {
            let (buffer, base) = self.target(role, p.segment)?;
            let bytes = p.len * element as usize;
            let view = read_bytes(ctx, buffer, base + p.local as u64 * element, bytes)?;
            out[p.at * element as usize..][..bytes].copy_from_slice(&view);
        }
        Ok(out)
    }

    /// Slot `slot` of tensor `t` as it is stored (waits for the GPU): its pieces'
    /// values, bits or codes and scales, one after the other.
    pub(crate) fn read_slot_raw(&self, ctx: &GpuContext, slot: Slot, t: usize) -> Result<RawSlot> {
        let k = self
            .variant
            .slot_index(slot)
            .ok_or(Error::SlotNotKept(slot))?;
        let block = self.state.block_size();
        let pieces = self.state.pieces(&self.layout, t);
        let dtype = pieces.first().map_or(StateDtype::F32, |p| p.1.dtype);
        let (mut values, mut bits, mut codes, mut absmax) = (vec![], vec![], vec![], vec![]);
        for (segment, place, len, _) in pieces {
            let seg = &self.segments[segment];
            let words = (k * seg.code_run) as u64 * F32;
            match place.dtype {
                StateDtype::F32 => {
                    let offset = (k * seg.f32_run + place.at) as u64 * F32;
                    let raw = read_bytes(ctx, &seg.slots, offset, 4 * len)?;
                    values.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&raw));
                }
                StateDtype::Bf16 => {
                    let raw =
                        read_bytes(ctx, &seg.state_codes, words + place.at as u64 * 2, 2 * len)?;
                    bits.extend(bytemuck::pod_collect_to_vec::<u8, u16>(&raw));
                }
                StateDtype::Int8 => {
                    codes.extend(read_bytes(
                        ctx,
                        &seg.state_codes,
                        words + place.at as u64,
                        len,
                    )?);
                    let offset = (k * seg.absmax_run + place.at / block) as u64 * F32;
                    let raw = read_bytes(ctx, &seg.state_absmax, offset, 4 * len.div_ceil(block))?;
                    absmax.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&raw));
                }
            }
        }
        Ok(match dtype {
            StateDtype::F32 => RawSlot::F32(values),
            StateDtype::Bf16 => RawSlot::Bf16(bits),
            StateDtype::Int8 => RawSlot::Int8 { codes, absmax },
        })
    }

    /// The format of tensor `t`'s slots.
    pub(crate) fn slot_dtype(&self, t: usize) -> StateDtype {
        self.state
            .pieces(&self.layout, t)
            .first()
            .map_or(StateDtype::F32, |p| p.1.dtype)
    }

    /// Stores `raw` as slot `slot` of tensor `t` (its format and length checked).
    pub(crate) fn write_slot_raw(
        &self,
        ctx: &GpuContext,
        slot: Slot,
        t: usize,
        raw: &RawSlot,
    ) -> Result<()> {
        let k = self
            .variant
            .slot_index(slot)
            .ok_or(Error::SlotNotKept(slot))?;
        let block = self.state.block_size();
        let len = self.layout.tensor(t)?.len;
        check_raw(slot, t, self.slot_dtype(t), len, raw, block)?;
        for (segment, place, len, at) in self.state.pieces(&self.layout, t) {
            let seg = &self.segments[segment];
            let words = (k * seg.code_run) as u64 * F32;
            // writes are whole words: a piece's padding (zero) completes the last one
            match raw {
                RawSlot::F32(v) => {
                    let offset = (k * seg.f32_run + place.at) as u64 * F32;
                    ctx.queue.write_buffer(
                        &seg.slots,
                        offset,
                        bytemuck::cast_slice(&v[at..at + len]),
                    );
                }
                RawSlot::Bf16(v) => {
                    let mut bits = v[at..at + len].to_vec();
                    bits.resize(len.next_multiple_of(2), 0);
                    let offset = words + place.at as u64 * 2;
                    ctx.queue
                        .write_buffer(&seg.state_codes, offset, bytemuck::cast_slice(&bits));
                }
                RawSlot::Int8 { codes, absmax } => {
                    let mut piece = codes[at..at + len].to_vec();
                    piece.resize(len.next_multiple_of(4), 0);
                    ctx.queue
                        .write_buffer(&seg.state_codes, words + place.at as u64, &piece);
                    let scales = &absmax[at / block..(at + len).div_ceil(block)];
                    let offset = (k * seg.absmax_run + place.at / block) as u64 * F32;
                    ctx.queue
                        .write_buffer(&seg.state_absmax, offset, bytemuck::cast_slice(scales));
                }
            }
        }
        Ok(())
    }
}

/// `len` bytes of `buffer` from byte `offset` (a multiple of 4), through one staging
/// buffer (waits for the GPU).
fn read_bytes(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<Vec<u8>> {
    // copies are whole words
    let size = (len as u64).next_multiple_of(4).max(4);
    {
        {
            let staging = make_buffer(
                ctx,
                "readback",
                size,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("readback"),
                });
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
            ctx.queue.submit([encoder.finish()]);
            let slice = staging.slice(..);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            ctx.wait()?;
            // Another thread polling the same device may be the one that fires our
            // callback, so wait for it (a lost device drops it: disconnected, not a hang).
            rx.recv_timeout(std::time::Duration::from_secs(120))
                .map_err(|e| Error::Gpu(format!("readback did not complete: {e}")))?
                .map_err(|e| Error::Gpu(format!("mapping the readback buffer: {e}")))?;
            let out = slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading the readback buffer: {e}")))?[..len]
                .to_vec();
            staging.unmap();
            Ok(out)
        }
    }
}

impl GpuArena {
    /// The 16-bit parameter copy of the whole arena, as stored (waits for the GPU).
    pub(crate) fn read_param_copy(&self, ctx: &GpuContext) -> Result<Vec<u16>> {
        let raw = self.read_raw(ctx, Target::ParamCopy, 0, self.layout.total())?;
        Ok(bytemuck::pod_collect_to_vec(&raw))
    }

    /// Copies the EMA slot over the parameters in every segment (one submit).
    pub(crate) fn copy_ema_to_params(&self, ctx: &GpuContext) -> Result<()> {
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("finalize"),
            });
        for i in 0..self.segments.len() {
            let s = &self.segments[i];
            if s.len == 0 {
                continue;
            }
            let (slots, base) = self.target(Target::Slot(Slot::Ema), i)?;
            encoder.copy_buffer_to_buffer(
                slots,
                base,
                &s.params,
                s.params_base,
                s.len as u64 * F32,
            );
        }
        ctx.queue.submit([encoder.finish()]);
        ctx.take_error()
    }
}
