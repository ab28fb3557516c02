//! The GPU arena: parameters, gradients and slots in flat buffers, split into
//! segments that respect `max_storage_buffer_binding_size`, the control buffer with
//! the tables the kernels read, and explicit upload and readback.
//!
//! Per segment of `len` elements: a `params` and a `grads` buffer (the user's, or the
//! crate's) and a `state` buffer holding the segment's own arrays in [`Regions`]: each
//! slot as a run of f32 (in [`Variant::slots`] order), compact slots and their scales,
//! the 16-bit parameter copy and the remainders. Element `e` of the model lives at local
//! index `e - segment.start` of the segment holding it; its slots where the
//! [`StateLayout`] puts its chunk (with f32 state, at the same local index of each
//! run). One `control` buffer per model holds the device's step state and the tables
//! ([`ControlLayout`]): four storage bindings per dispatch in every mode.

use std::num::NonZeroU64;

use crate::backend::Role;
use crate::dtype::{combine_master, split_master, Dtype, GradSlice};
use crate::error::{Error, Result};
use crate::gpu::binding::{
    align_elements, dtype_bytes, TensorView, UserBuffers, ARENA_USAGES, F32,
};
use crate::gpu::context::GpuContext;
use crate::gpu::contract;
use crate::gpu::limits::{check_binding, check_workgroups};
use crate::gpu::nonfinite::STEP_STATE_BYTES;
use crate::gpu::pipelines::Pipelines;
use crate::gpu::readback::Reads;
use crate::gpu::shader::{
    ChunkRow, SegmentUniform, StepUniform, TensorRow, GPU_CHUNK_LEN, GROUP_ROW_WORDS, PLAN_WINDOW,
};
use crate::layout::Layout;
use crate::math::{ClipFactors, GroupScalars};
use crate::quant::CodeMap;
use crate::state::{StateDtype, StateStorage};
use crate::state_layout::{check_raw, RawSlot, StateLayout};
use crate::variable::VariableSpec;
use crate::variant::{Slot, Variant};

/// Where a segment's own arrays live in its `state` buffer, in u32 words (each region
/// starts at a multiple of the device's storage-binding alignment, so f32 slots and the
/// parameter copy can be bound as views).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Regions {
    /// f32 slots: one run of `f32_run` words per kept slot, from word 0.
    pub f32_run: usize,
    /// Compact slots (bf16 two per word, int8 four): one run of `code_run` words per slot.
    pub codes: usize,
    pub code_run: usize,
    /// int8 blocks' scales: one run of `absmax_run` per slot.
    pub absmax: usize,
    pub absmax_run: usize,
    /// The 16-bit parameter copy, two per word.
    pub param_copy: usize,
    /// The remainders of bf16 parameters, two per word.
    pub remainders: usize,
    /// Words of the whole buffer.
    pub total: usize,
}

impl Regions {
    /// The regions of a segment of `len` elements whose slots take `f32_len` f32 and
    /// `compact_len` compact elements, each region at a multiple of `align` words.
    fn new(
        variant: &Variant,
        len: usize,
        (f32_len, compact_len): (usize, usize),
        align: usize,
    ) -> Self {
        let slots = variant.slots().len();
        let up = |n: usize, to: usize| n.next_multiple_of(to);
        let f32_run = up(f32_len, align);
        let (code_run, absmax_run) = match variant.state {
            StateDtype::F32 => (0, 0),
            StateDtype::Bf16 => (up(compact_len / 2, 4), 0),
            StateDtype::Dynamic8 { block_size } => (
                up(compact_len / 4, 4),
                up(compact_len.div_ceil(block_size), 4),
            ),
        };
        // 16-bit arrays: two per word, whole vec4s
        let halves = up(len.div_ceil(2), 4);
        let codes = up(slots * f32_run, align);
        let absmax = up(codes + slots * code_run, align);
        let param_copy = up(absmax + slots * absmax_run, align);
        let copy_words = if variant.param_copy.is_some() {
            halves
        } else {
            0
        };
        let remainders = up(param_copy + copy_words, align);
        let remainder_words = if variant.param_remainders { halves } else { 0 };
        Regions {
            f32_run,
            codes,
            code_run,
            absmax,
            absmax_run,
            param_copy,
            remainders,
            // never an empty binding
            total: up(remainders + remainder_words, 4).max(4),
        }
    }

    /// The word of f32 slot run `k` holding slot element `at`.
    pub(crate) fn f32_word(&self, k: usize, at: usize) -> usize {
        k * self.f32_run + at
    }

    /// The first word of compact slot run `k`.
    pub(crate) fn code_word(&self, k: usize) -> usize {
        self.codes + k * self.code_run
    }

    /// The word of scale `block` of int8 slot run `k`.
    pub(crate) fn absmax_word(&self, k: usize, block: usize) -> usize {
        self.absmax + k * self.absmax_run + block
    }

    /// Bytes of slot storage (what `state_bytes` counts): the slot runs and scales.
    pub(crate) fn slot_bytes(&self, slots: usize) -> u64 {
        (slots * (self.f32_run + self.code_run + self.absmax_run)) as u64 * F32
    }
}

/// Where the tables live in the control buffer, in u32 words after the step state.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ControlLayout {
    pub tensor_rows: usize,
    pub chunk_rows: usize,
    pub clips: usize,
    pub partials: usize,
    pub code_maps: usize,
    /// The group table: `PLAN_WINDOW` rows of `group_count` group rows.
    pub groups: usize,
    pub group_count: usize,
    /// Words of the tables.
    pub words: usize,
}

impl ControlLayout {
    fn new(tensors: usize, chunks: usize, code_map_words: usize, group_count: usize) -> Self {
        let tensor_rows = 0;
        let chunk_rows = tensor_rows + tensors * std::mem::size_of::<TensorRow>() / 4;
        let clips = chunk_rows + chunks * std::mem::size_of::<ChunkRow>() / 4;
        let partials = clips + 2 * tensors;
        let code_maps = partials + chunks;
        let groups = code_maps + code_map_words;
        let group_words = PLAN_WINDOW * group_count * GROUP_ROW_WORDS;
        ControlLayout {
            tensor_rows,
            chunk_rows,
            clips,
            partials,
            code_maps,
            groups,
            group_count,
            words: (groups + group_words).next_multiple_of(4).max(4),
        }
    }

    /// Byte offset of table word `word` in the control buffer.
    pub(crate) fn byte(word: usize) -> u64 {
        STEP_STATE_BYTES + word as u64 * F32
    }

    /// Bytes of the control buffer.
    fn bytes(&self) -> u64 {
        Self::byte(self.words)
    }
}

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
    /// The segment's own arrays (slots, compact slots, scales, the parameter copy, the
    /// remainders), in `regions`.
    pub state: wgpu::Buffer,
    pub regions: Regions,
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
    pub(crate) uniform: wgpu::Buffer,
    /// The step state ([`crate::gpu::shader::StepState`], at byte 0) and the tables.
    pub(crate) control: wgpu::Buffer,
    pub(crate) control_layout: ControlLayout,
    /// Each tensor's `(flags, group)` as last written to the tensor table.
    pub(crate) tensor_rows: Vec<(u32, u32)>,
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

/// Bytes per element of a segment's `state` buffer for `variant` (every slot in f32,
/// the 16-bit copy and remainders), a bound on what any state dtype takes.
fn state_bytes_per_element(variant: &Variant) -> u64 {
    let halves = u64::from(variant.param_copy.is_some()) + u64::from(variant.param_remainders);
    F32 * variant.slots().len() as u64 + 2 * halves
}

/// Largest segment length the device allows for this variant: every binding (the
/// `state` buffer holds all slots, the copy and the remainders, each region padded to
/// the binding alignment) must fit `max_storage_buffer_binding_size`.
fn max_segment_len(ctx: &GpuContext, variant: &Variant) -> usize {
    let limits = ctx.device.limits();
    let max_bytes = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    // what `Regions::new` may add to the elements' bytes: each f32 run and each of the
    // four later regions rounded up to the alignment, each compact run and scale run
    // to a vec4 (anything past this is refused by `check_binding`, never miscounted)
    let align = u64::from(limits.min_storage_buffer_offset_alignment.max(16));
    let slots = variant.slots().len() as u64;
    let padding = (slots + 4) * align + slots * 32;
    let per_element = state_bytes_per_element(variant).max(F32);
    let len = (max_bytes.saturating_sub(padding) / per_element) as usize;
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

/// What an arena holds: the variables, the structure, how slots are stored, and how
/// many param groups the group table has rows for.
pub(crate) struct ArenaModel<'a> {
    pub specs: &'a [VariableSpec],
    pub variant: Variant,
    pub storage: &'a StateStorage,
    pub group_count: usize,
}

impl GpuArena {
    /// Allocates the arena for `model` (zeroed), or uses `user` buffers for parameters
    /// and gradients (checked as [`UserBuffers`] documents). Every buffer is checked
    /// against the device's limits first ([`Error::DeviceLimit`]).
    pub(crate) fn new(
        ctx: &GpuContext,
        pipelines: &Pipelines,
        model: ArenaModel<'_>,
        segment_len: Option<usize>,
        user: Option<UserBuffers>,
    ) -> Result<Self> {
        let ArenaModel {
            specs,
            variant,
            storage,
            group_count,
        } = model;
        let limits = ctx.device.limits();
        let max_len = max_segment_len(ctx, &variant);
        let segment_len = segment_len.map_or(max_len, |s| s.clamp(1, max_len));
        // compact state: a tensor split across segments splits at whole int8 blocks
        let segment_len = if storage.dtype == StateDtype::F32 {
            segment_len
        } else {
            segment_len.max(256) / 256 * 256
        };
        let align = align_elements(ctx);
        let layout = Layout::new(specs, GPU_CHUNK_LEN, segment_len, align)?;
        let state = StateLayout::new(&layout, storage, align);
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
        let n_tensors = layout.tensors().len();
        let n_chunks = layout.chunks().len();
        let maps = if matches!(variant.state, StateDtype::Dynamic8 { .. }) {
            CodeMap::gpu_table()
        } else {
            Vec::new()
        };
        let control_layout = ControlLayout::new(n_tensors, n_chunks, maps.len(), group_count);
        // words per binding-alignment step of the state regions
        let align_words = (limits.min_storage_buffer_offset_alignment as usize / 4).max(4);
        let regions: Vec<Regions> = layout
            .segments()
            .iter()
            .enumerate()
            .map(|(s, e)| Regions::new(&variant, e.len().max(4), state.sizes(s), align_words))
            .collect();
        // the limits, before any allocation
        check_binding(&limits, control_layout.bytes())?;
        for (r, e) in regions.iter().zip(layout.segments()) {
            check_binding(&limits, r.total as u64 * F32)?;
            check_binding(&limits, dtype_bytes(e.len(), variant.params))?;
            check_binding(&limits, dtype_bytes(e.len(), variant.gradients))?;
        }
        // each segment's chunks, `first .. first + count` of the chunk table (in segment
        // order): one workgroup each
        let segment_chunks: Vec<(usize, usize)> = (0..layout.segments().len())
            .map(|s| {
                let first = layout.chunks().partition_point(|c| c.segment < s);
                let count = layout.chunks()[first..]
                    .iter()
                    .take_while(|c| c.segment == s)
                    .count();
                (first, count)
            })
            .collect();
        for &(_, count) in &segment_chunks {
            check_workgroups(&limits, count)?;
        }

        let uniform = make_buffer(
            ctx,
            "step uniform",
            std::mem::size_of::<StepUniform>() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let control = make_buffer(
            ctx,
            "control",
            control_layout.bytes(),
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )?;
        let rows: Vec<ChunkRow> = layout
            .chunks()
            .iter()
            .enumerate()
            .map(|(g, c)| ChunkRow {
                tensor: c.tensor as u32,
                start: (c.offset - layout.segments()[c.segment].start) as u32,
                len: c.len as u32,
                tensor_start: (c.offset - layout.tensors()[c.tensor].offset) as u32,
                state_at: state.place(g).at as u32,
                state_format: state.place(g).dtype.code(),
            })
            .collect();
        let write_words = |word: usize, bytes: &[u8]| {
            if !bytes.is_empty() {
                ctx.queue
                    .write_buffer(&control, ControlLayout::byte(word), bytes);
            }
        };
        write_words(control_layout.chunk_rows, bytemuck::cast_slice(&rows));
        write_words(control_layout.code_maps, bytemuck::cast_slice(&maps));
        // one segment uniform per segment, at the uniform offset alignment
        let stride = (std::mem::size_of::<SegmentUniform>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let n_segments = layout.segments().len() as u64;
        let segment_uniforms = make_buffer(
            ctx,
            "segment uniforms",
            stride * n_segments.max(1),
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut segments = Vec::with_capacity(layout.segments().len());
        for (s, elements) in layout.segments().iter().enumerate() {
            let start = elements.start;
            let len = elements.len();
            // an empty model still binds one vec4 per buffer
            let cap = len.max(4);
            let grad_bytes = dtype_bytes(cap, variant.gradients);
            let param_bytes = dtype_bytes(cap, variant.params);
            let (params, params_base, grads, grads_base) = match &user {
                Some(u) => (u.params.clone(), u.offset, u.grads.clone(), u.offset),
                None => (
                    make_buffer(ctx, "params", param_bytes, ARENA_USAGES)?,
                    0,
                    make_buffer(ctx, "grads", grad_bytes, ARENA_USAGES)?,
                    0,
                ),
            };
            let r = regions[s];
            let state_buffer = make_buffer(ctx, "state", r.total as u64 * F32, ARENA_USAGES)?;
            if variant.param_remainders {
                // 0x7fff: no remainder, the master is the bf16 value (user parameter
                // buffers hold bf16 values to start from)
                let words = r.total - r.remainders;
                ctx.queue.write_buffer(
                    &state_buffer,
                    r.remainders as u64 * F32,
                    &[0xff, 0x7f].repeat(2 * words),
                );
            }
            let (first_chunk, chunk_count) = segment_chunks[s];
            let info = SegmentUniform {
                first_chunk: first_chunk as u32,
                chunk_count: chunk_count as u32,
                tensor_rows: control_layout.tensor_rows as u32,
                chunk_rows: control_layout.chunk_rows as u32,
                clips: control_layout.clips as u32,
                partials: control_layout.partials as u32,
                code_maps: control_layout.code_maps as u32,
                groups: control_layout.groups as u32,
                slot_run: (r.f32_run / 4) as u32,
                copy_at: (r.param_copy / 4) as u32,
                remainders_at: (r.remainders / 4) as u32,
                group_count: group_count as u32,
                codes: r.codes as u32,
                code_run: r.code_run as u32,
                absmax: r.absmax as u32,
                absmax_run: r.absmax_run as u32,
            };
            ctx.queue.write_buffer(
                &segment_uniforms,
                s as u64 * stride,
                bytemuck::bytes_of(&info),
            );
            let entry = |b: contract::Binding, resource| wgpu::BindGroupEntry {
                binding: b.number,
                resource,
            };
            let bind_group = ctx.scoped("creating bind group", || {
                ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("rmsprop segment"),
                    layout: &pipelines.layout,
                    entries: &[
                        entry(contract::STEP, uniform.as_entire_binding()),
                        entry(
                            contract::SEGMENT,
                            range(
                                &segment_uniforms,
                                s as u64 * stride,
                                std::mem::size_of::<SegmentUniform>() as u64,
                            ),
                        ),
                        entry(contract::CONTROL, control.as_entire_binding()),
                        entry(contract::PARAMS, range(&params, params_base, param_bytes)),
                        entry(contract::GRADS, range(&grads, grads_base, grad_bytes)),
                        entry(contract::STATE, state_buffer.as_entire_binding()),
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
                state: state_buffer,
                regions: r,
                chunk_count,
                bind_group,
            });
        }
        let tensor_rows = vec![(u32::MAX, 0); n_tensors];
        ctx.take_error()?;
        Ok(GpuArena {
            layout,
            state,
            variant,
            segments,
            uniform,
            control,
            control_layout,
            tensor_rows,
        })
    }

    /// Writes the tensor table with new per-step `(flags, group)`s, only when they
    /// changed.
    pub(crate) fn set_rows(&mut self, ctx: &GpuContext, flags: Vec<(u32, u32)>) {
        if flags == self.tensor_rows {
            return;
        }
        let rows: Vec<TensorRow> = self
            .layout
            .tensors()
            .iter()
            .zip(&flags)
            .map(|(t, &(flags, group))| TensorRow {
                first_chunk: t.first_chunk as u32,
                chunk_count: t.chunk_count as u32,
                flags,
                group,
            })
            .collect();
        if !rows.is_empty() {
            ctx.queue.write_buffer(
                &self.control,
                ControlLayout::byte(self.control_layout.tensor_rows),
                bytemuck::cast_slice(&rows),
            );
        }
        self.tensor_rows = flags;
    }

    /// Queues the group table's rows for the plans in use (`group_count` per plan).
    pub(crate) fn write_groups(&self, ctx: &GpuContext, rows: &[GroupScalars]) -> Result<()> {
        let capacity = PLAN_WINDOW * self.control_layout.group_count;
        if rows.len() > capacity {
            return Err(Error::invalid(
                "param_groups",
                format!(
                    "{} group rows do not fit the {capacity} the arena was built for (param groups are fixed when the optimizer is built)",
                    rows.len()
                ),
            ));
        }
        if !rows.is_empty() {
            ctx.queue.write_buffer(
                &self.control,
                ControlLayout::byte(self.control_layout.groups),
                bytemuck::cast_slice(rows),
            );
        }
        Ok(())
    }

    /// Queues clip factors given from outside (one per tensor) into the clip table.
    pub(crate) fn write_clips(&self, ctx: &GpuContext, clips: &[ClipFactors]) {
        if !clips.is_empty() {
            ctx.queue.write_buffer(
                &self.control,
                ControlLayout::byte(self.control_layout.clips),
                bytemuck::cast_slice(clips),
            );
        }
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
            Target::ParamRemainders => Ok((&s.state, s.regions.remainders as u64 * F32)),
            Target::ParamCopy => match self.variant.param_copy {
                Some(_) => Ok((&s.state, s.regions.param_copy as u64 * F32)),
                None => Err(Error::NoParamCopy),
            },
            Target::Slot(slot) => {
                let k = self
                    .variant
                    .slot_index(slot)
                    .ok_or(Error::SlotNotKept(slot))?;
                Ok((&s.state, s.regions.f32_word(k, 0) as u64 * F32))
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
                let (remainders, base) = self.target(Target::ParamRemainders, p.segment)?;
                ctx.queue.write_buffer(
                    remainders,
                    base + p.local as u64 * element,
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

    /// Reads `role` back for the arena range `start .. start + len` as f32: 16-bit
    /// parameters upcast, bf16 parameters with remainders combined into their f32
    /// masters.
    pub(crate) fn read(&self, role: Target, start: usize, len: usize) -> Result<Reads<Vec<f32>>> {
        let raw = self.read_raw(role, start, len)?;
        if self.element_bytes(role) == F32 {
            return Ok(raw.map(|raw| Ok(bytemuck::pod_collect_to_vec(&raw))));
        }
        if role == Target::Params && self.variant.param_remainders {
            let rem = self.read_raw(Target::ParamRemainders, start, len)?;
            return Ok(raw.and(rem).map(|(raw, rem)| {
                let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&raw);
                let rem: Vec<u16> = bytemuck::pod_collect_to_vec(&rem);
                Ok(bits
                    .iter()
                    .zip(&rem)
                    .map(|(&h, &r)| combine_master(h, r))
                    .collect())
            }));
        }
        let dtype = self.variant.params;
        Ok(raw.map(move |raw| {
            let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&raw);
            Ok(bits.iter().map(|&b| dtype.upcast_bits(b)).collect())
        }))
    }

    /// The bytes of `role` for the arena range `start .. start + len`, one copy per
    /// segment piece.
    fn read_raw(&self, role: Target, start: usize, len: usize) -> Result<Reads<Vec<u8>>> {
        let element = self.element_bytes(role) as usize;
        let mut pieces = Vec::new();
        for p in self.pieces(start, len) {
            let (buffer, base) = self.target(role, p.segment)?;
            let offset = base + (p.local * element) as u64;
            pieces.push(Reads::copy(buffer, offset, p.len * element));
        }
        Ok(Reads::all(pieces).map(|pieces| Ok(pieces.concat())))
    }

    /// Slot `slot` of tensor `t` as it is stored: its pieces' values, bits or codes
    /// and scales, one after the other.
    pub(crate) fn read_slot_raw(&self, slot: Slot, t: usize) -> Result<Reads<RawSlot>> {
        let k = self
            .variant
            .slot_index(slot)
            .ok_or(Error::SlotNotKept(slot))?;
        let pieces = self.state.pieces(&self.layout, t);
        let dtype = pieces.first().map_or(StateDtype::F32, |p| p.1.dtype);
        // per piece: its values, bits or codes, then (int8) its scales
        let mut reads = Vec::new();
        for (segment, place, len, _) in pieces {
            let seg = &self.segments[segment];
            let r = &seg.regions;
            let words = r.code_word(k) as u64 * F32;
            match place.dtype {
                StateDtype::F32 => {
                    let offset = r.f32_word(k, place.at) as u64 * F32;
                    reads.push(Reads::copy(&seg.state, offset, 4 * len));
                }
                StateDtype::Bf16 => {
                    reads.push(Reads::copy(
                        &seg.state,
                        words + place.at as u64 * 2,
                        2 * len,
                    ));
                }
                StateDtype::Dynamic8 { block_size: block } => {
                    reads.push(Reads::copy(&seg.state, words + place.at as u64, len));
                    let offset = r.absmax_word(k, place.at / block) as u64 * F32;
                    reads.push(Reads::copy(&seg.state, offset, 4 * len.div_ceil(block)));
                }
            }
        }
        Ok(Reads::all(reads).map(move |parts| {
            Ok(match dtype {
                StateDtype::F32 => RawSlot::F32(bytemuck::pod_collect_to_vec(&parts.concat())),
                StateDtype::Bf16 => RawSlot::Bf16(bytemuck::pod_collect_to_vec(&parts.concat())),
                StateDtype::Dynamic8 { block_size } => {
                    let (mut codes, mut absmax) = (Vec::new(), Vec::new());
                    for pair in parts.chunks(2) {
                        codes.extend_from_slice(&pair[0]);
                        absmax.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&pair[1]));
                    }
                    RawSlot::Dynamic8 {
                        codes,
                        absmax,
                        block_size,
                    }
                }
            })
        }))
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
        let len = self.layout.tensor(t)?.len;
        check_raw(slot, t, self.slot_dtype(t), len, raw)?;
        for (segment, place, len, at) in self.state.pieces(&self.layout, t) {
            let seg = &self.segments[segment];
            let r = &seg.regions;
            let words = r.code_word(k) as u64 * F32;
            // writes are whole words: a piece's padding (zero) completes the last one
            match raw {
                RawSlot::F32(v) => {
                    let offset = r.f32_word(k, place.at) as u64 * F32;
                    ctx.queue.write_buffer(
                        &seg.state,
                        offset,
                        bytemuck::cast_slice(&v[at..at + len]),
                    );
                }
                RawSlot::Bf16(v) => {
                    let mut bits = v[at..at + len].to_vec();
                    bits.resize(len.next_multiple_of(2), 0);
                    let offset = words + place.at as u64 * 2;
                    ctx.queue
                        .write_buffer(&seg.state, offset, bytemuck::cast_slice(&bits));
                }
                RawSlot::Dynamic8 {
                    codes,
                    absmax,
                    block_size: block,
                } => {
                    let block = *block;
                    let mut piece = codes[at..at + len].to_vec();
                    piece.resize(len.next_multiple_of(4), 0);
                    ctx.queue
                        .write_buffer(&seg.state, words + place.at as u64, &piece);
                    let scales = &absmax[at / block..(at + len).div_ceil(block)];
                    let offset = r.absmax_word(k, place.at / block) as u64 * F32;
                    ctx.queue
                        .write_buffer(&seg.state, offset, bytemuck::cast_slice(scales));
                }
            }
        }
        Ok(())
    }
}

impl GpuArena {
    /// The 16-bit parameter copy of the whole arena, as stored.
    pub(crate) fn read_param_copy(&self) -> Result<Reads<Vec<u16>>> {
        let raw = self.read_raw(Target::ParamCopy, 0, self.layout.total())?;
        Ok(raw.map(|raw| Ok(bytemuck::pod_collect_to_vec(&raw))))
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
