//! The host side of `shaders/rmsprop.wgsl`: its source, its constants and bindings, and
//! every struct the host writes or reads, defined once as `#[repr(C)]` Pod types that
//! are cast to bytes as they are. A test compares each one's size and field offsets
//! with the WGSL struct of the same name, read through naga's reflection.

use bytemuck::{Pod, Zeroable};

use crate::math::{GroupScalars, LossScaleState, StepScalars};

/// The WGSL source, validated for every specialization by `build.rs`.
pub(crate) const SHADER_SOURCE: &str = include_str!("../../shaders/rmsprop.wgsl");

/// Threads per workgroup (`WORKGROUP_SIZE` in the shader).
pub(crate) const WORKGROUP_SIZE: usize = 256;

/// Bytes of workgroup memory the shader declares (a test sums its `var<workgroup>`s
/// through naga's reflection); checked against the device's
/// `max_compute_workgroup_storage_size`.
pub(crate) const WORKGROUP_MEMORY_BYTES: u64 = 5188;

/// Elements per chunk on the GPU: 32 per thread of one workgroup (eight `vec4<f32>`);
/// larger chunks amortize each workgroup's setup (its rows, its plan), which software
/// adapters pay dearly for.
pub(crate) const GPU_CHUNK_LEN: usize = WORKGROUP_SIZE * 32;

/// Plans in the step uniform (`PLAN_WINDOW` in the shader): with the non-finite guard,
/// the most steps that may be in flight before the host waits for a readback.
pub(crate) const PLAN_WINDOW: usize = 64;

/// `TensorRow::flags` bits.
pub(crate) const FLAG_HAS_GRADIENT: u32 = 1;
pub(crate) const FLAG_DECAY: u32 = 2;
/// The tensor is frozen (`Phase::Frozen`: nothing moves).
pub(crate) const FLAG_FROZEN: u32 = 4;

/// Words of one row of the group table (`GroupScalars`).
pub(crate) const GROUP_ROW_WORDS: usize = std::mem::size_of::<GroupScalars>() / 4;

/// The step uniform: `plans[k]` is the plan for step counter `base + k` (low 32 bits:
/// `base_lo`); without the non-finite guard only `plans[0]` is written and used.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct StepUniform {
    pub base_lo: u32,
    pub len: u32,
    pub tensor_count: u32,
    /// `dynamic_growth_steps` of loss scaling (unused without it).
    pub growth_steps: u32,
    pub plans: [StepScalars; PLAN_WINDOW],
}

impl StepUniform {
    /// The bytes the shader reads this step: the header and the `len` plans in use.
    pub(crate) fn used_bytes(&self) -> &[u8] {
        let used = std::mem::offset_of!(StepUniform, plans)
            + self.len as usize * std::mem::size_of::<StepScalars>();
        &bytemuck::bytes_of(self)[..used]
    }
}

/// One segment's view of the model: where its chunk rows are, and the word offsets of
/// the tables in the control buffer (after [`StepState`]) and of the regions in its
/// `state` buffer. Written once, when the arena is built.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct SegmentUniform {
    /// This segment's chunks: rows `first_chunk .. first_chunk + chunk_count`.
    pub first_chunk: u32,
    pub chunk_count: u32,
    /// Control tables, in words from the end of the step state.
    pub tensor_rows: u32,
    pub chunk_rows: u32,
    pub clips: u32,
    pub partials: u32,
    pub code_maps: u32,
    /// The group table: `PLAN_WINDOW` rows of `group_count` [`GroupScalars`] (the
    /// param groups' numbers for each plan of the window).
    pub groups: u32,
    /// The segment's regions in vec4s of its `state` binding: the length of an f32
    /// slot run (the runs start the buffer), the parameter copy, the remainders.
    pub slot_run: u32,
    pub copy_at: u32,
    pub remainders_at: u32,
    /// The param groups (group 0, the config's own numbers, has no row).
    pub group_count: u32,
    /// Compact state regions, in words from the start of the segment's `state` binding.
    pub codes: u32,
    pub code_run: u32,
    pub absmax: u32,
    pub absmax_run: u32,
}

/// One row of the chunk table: a piece of one tensor inside one segment.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct ChunkRow {
    pub tensor: u32,
    /// First element, local to the segment.
    pub start: u32,
    pub len: u32,
    /// Index of the first element in its tensor (stochastic rounding's keys).
    pub tensor_start: u32,
    /// First element in the segment's store of its state format.
    pub state_at: u32,
    /// Its slots' format: 0 f32, 1 bf16, 2 int8 (`StateDtype::code`).
    pub state_format: u32,
}

/// One row of the offset table, as the kernels need it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct TensorRow {
    pub first_chunk: u32,
    pub chunk_count: u32,
    /// [`FLAG_HAS_GRADIENT`], [`FLAG_DECAY`] and [`FLAG_FROZEN`].
    pub flags: u32,
    /// The tensor's group (0: the config's numbers; `g`: the group table's row `g - 1`).
    pub group: u32,
}

/// The device's step state: the step and skip counters the non-finite guard keeps on the
/// device, and the decision of the step in progress.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct StepState {
    pub counter_lo: u32,
    pub counter_hi: u32,
    pub skipped_lo: u32,
    pub skipped_hi: u32,
    /// The plan the update uses this step.
    pub active_plan: u32,
    /// 1 when this step is skipped.
    pub skip: u32,
    /// Set when the device counter fell outside the host's plan window (a host bug).
    pub fault: u32,
    /// Loss scaling: the dynamic scale (f32 bits) the next step divides by.
    pub loss_scale: u32,
    /// Loss scaling: finite steps in a row since the scale last changed.
    pub growth_counter: u32,
    /// Loss scaling: the scale (f32 bits) this step's update divides by.
    pub active_scale: u32,
    /// Set by `norm_partials` when a gradient is not finite, cleared by `norm_finalize`.
    pub non_finite: u32,
    pub _pad: u32,
}

impl StepState {
    /// Counters at `raw` and `skipped` and the loss scale `loss_scale` (ignored without
    /// loss scaling), nothing else set.
    pub(crate) fn new(raw: u64, skipped: u64, loss_scale: LossScaleState) -> Self {
        StepState {
            counter_lo: raw as u32,
            counter_hi: (raw >> 32) as u32,
            skipped_lo: skipped as u32,
            skipped_hi: (skipped >> 32) as u32,
            loss_scale: loss_scale.scale.to_bits(),
            growth_counter: loss_scale.counter,
            ..StepState::default()
        }
    }

    /// The loss-scale state for the next step.
    pub(crate) fn loss_scale(&self) -> LossScaleState {
        LossScaleState {
            scale: f32::from_bits(self.loss_scale),
            counter: self.growth_counter,
        }
    }

    /// The step counter.
    pub(crate) fn raw(&self) -> u64 {
        u64::from(self.counter_lo) | u64::from(self.counter_hi) << 32
    }

    /// The skip count.
    pub(crate) fn skipped(&self) -> u64 {
        u64::from(self.skipped_lo) | u64::from(self.skipped_hi) << 32
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use wgpu::naga::{self, ArraySize, TypeInner};

    use super::*;
    use crate::math::ClipFactors;

    /// Size and `(field, offset)` list of a Rust struct, named as in WGSL.
    macro_rules! host_layout {
        ($t:ty { $($f:ident),* $(,)? }) => {
            (size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),*])
        };
    }

    fn shader() -> naga::Module {
        naga::front::wgsl::parse_str(SHADER_SOURCE).expect("the shader parses")
    }

    /// The WGSL struct `name`: its size and `(member, offset)` list.
    fn wgsl_layout(module: &naga::Module, name: &str) -> (usize, Vec<(String, usize)>) {
        let ty = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no struct `{name}` in the shader"))
            .1;
        let TypeInner::Struct { members, span } = &ty.inner else {
            panic!("`{name}` is not a struct");
        };
        let fields = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        (*span as usize, fields)
    }

    fn assert_same(module: &naga::Module, wgsl: &str, host: (usize, Vec<(&str, usize)>)) {
        let (size, fields) = wgsl_layout(module, wgsl);
        let host_fields: Vec<(String, usize)> =
            host.1.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(fields, host_fields, "fields of `{wgsl}`");
        assert_eq!(size, host.0, "size of `{wgsl}`");
    }

    /// Every struct the host and the shader share has one layout, checked against
    /// naga's reflection of the WGSL (not its text).
    #[test]
    fn host_structs_match_the_shader_layouts() {
        let m = shader();
        assert_same(
            &m,
            "StepScalars",
            host_layout!(StepScalars {
                learning_rate,
                rho,
                one_minus_rho,
                epsilon,
                momentum,
                weight_decay,
                loss_scale,
                accumulation_steps,
                clip_value,
                clip_norm,
                inv_clip_norm,
                ema_momentum,
                ema_overwrite,
                ema_overwrite_enabled,
                is_update_step,
                param_storage,
                rounding_seed,
                rounding_step,
                state_seed,
                increment_scale,
                update_scale,
                epsilon_outside,
                bias_correction,
                inverse_bias_correction,
                _pad0,
                _pad1,
                _pad2,
                gradient_sign,
            }),
        );
        assert_same(
            &m,
            "StepUniform",
            host_layout!(StepUniform {
                base_lo,
                len,
                tensor_count,
                growth_steps,
                plans
            }),
        );
        assert_same(
            &m,
            "ChunkRow",
            host_layout!(ChunkRow {
                tensor,
                start,
                len,
                tensor_start,
                state_at,
                state_format
            }),
        );
        assert_same(
            &m,
            "TensorRow",
            host_layout!(TensorRow {
                first_chunk,
                chunk_count,
                flags,
                group
            }),
        );
        assert_same(
            &m,
            "StepState",
            host_layout!(StepState {
                counter_lo,
                counter_hi,
                skipped_lo,
                skipped_hi,
                active_plan,
                skip,
                fault,
                loss_scale,
                growth_counter,
                active_scale,
                non_finite,
                _pad,
            }),
        );
        assert_same(
            &m,
            "SegmentUniform",
            host_layout!(SegmentUniform {
                first_chunk,
                chunk_count,
                tensor_rows,
                chunk_rows,
                clips,
                partials,
                code_maps,
                groups,
                slot_run,
                copy_at,
                remainders_at,
                group_count,
                codes,
                code_run,
                absmax,
                absmax_run,
            }),
        );
        assert_same(
            &m,
            "GroupScalars",
            host_layout!(GroupScalars {
                learning_rate,
                rho,
                one_minus_rho,
                epsilon,
                epsilon_outside,
                momentum,
                weight_decay,
                increment_scale,
                update_scale,
                bias_correction,
                inverse_bias_correction,
                _pad,
            }),
        );
        assert_same(
            &m,
            "ClipFactors",
            host_layout!(ClipFactors {
                numerator,
                denominator
            }),
        );
    }

    /// The plan window's length and stride, and the workgroup size, as the shader has them.
    #[test]
    fn shader_constants_match_the_host() {
        let m = shader();
        let (_, uniform) = m
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("StepUniform"))
            .unwrap();
        let TypeInner::Struct { members, .. } = &uniform.inner else {
            panic!("StepUniform is not a struct")
        };
        let plans = members.last().unwrap();
        let TypeInner::Array { size, stride, .. } = m.types[plans.ty].inner else {
            panic!("plans is not an array")
        };
        assert_eq!(stride as usize, size_of::<StepScalars>());
        assert!(
            matches!(size, ArraySize::Constant(n) if n.get() as usize == PLAN_WINDOW),
            "{size:?}"
        );
        for ep in &m.entry_points {
            assert_eq!(
                ep.workgroup_size,
                [WORKGROUP_SIZE as u32, 1, 1],
                "{}",
                ep.name
            );
        }
    }

    /// The workgroup memory the shader declares, the row sizes of its control tables,
    /// and its bindings, as the host has them (`contract::BINDINGS`).
    #[test]
    fn workgroup_memory_rows_and_bindings_match_the_host() {
        use crate::gpu::contract::{BindingKind, BINDINGS};
        let m = shader();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(m.to_ctx()).unwrap();
        let workgroup: u64 = m
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| u64::from(layouter[g.ty].size))
            .sum();
        assert_eq!(workgroup, WORKGROUP_MEMORY_BYTES);
        let literal = |name: &str| -> naga::Literal {
            let (_, c) = m
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no const {name}"));
            match m.global_expressions[c.init] {
                naga::Expression::Literal(l) => l,
                ref e => panic!("{name} = {e:?}"),
            }
        };
        let constant = |name: &str| -> u32 {
            match literal(name) {
                naga::Literal::U32(v) => v,
                l => panic!("{name} = {l:?}"),
            }
        };
        assert_eq!(
            constant("CHUNK_ROW_WORDS") as usize,
            size_of::<ChunkRow>() / 4
        );
        assert_eq!(
            constant("TENSOR_ROW_WORDS") as usize,
            size_of::<TensorRow>() / 4
        );
        assert_eq!(
            constant("TENSOR_FLAGS_WORD") as usize,
            offset_of!(TensorRow, flags) / 4
        );
        assert_eq!(
            constant("TENSOR_GROUP_WORD") as usize,
            offset_of!(TensorRow, group) / 4
        );
        assert_eq!(constant("GROUP_ROW_WORDS") as usize, GROUP_ROW_WORDS);
        for (name, host) in [
            ("FLAG_HAS_GRADIENT", FLAG_HAS_GRADIENT),
            ("FLAG_DECAY", FLAG_DECAY),
            ("FLAG_FROZEN", FLAG_FROZEN),
        ] {
            assert_eq!(constant(name), host, "{name}");
        }
        // quant::CodeMap::gpu_table's layout and guesses
        use crate::quant::{GUESS_CLEAN, GUESS_HIGH, GUESS_LOW, GUESS_WORDS};
        for (name, host) in [
            ("MAP_SIGNED", 256),
            ("MAP_THRESHOLDS", 512),
            ("GUESSES", 1024),
            ("GUESS_WORDS", GUESS_WORDS as u32),
            ("GUESS_LOW", GUESS_LOW),
            ("GUESS_HIGH", GUESS_HIGH),
            ("GUESS_CLEAN", u32::from(GUESS_CLEAN)),
        ] {
            assert_eq!(constant(name), host, "{name}");
        }
        let float = |name: &str| -> f32 {
            match literal(name) {
                naga::Literal::F32(v) => v,
                l => panic!("{name} = {l:?}"),
            }
        };
        let (low, high) = crate::quant::SCALE_LIMITS;
        assert_eq!((float("SCALE_LOW"), float("SCALE_HIGH")), (low, high));
        use crate::math::Phase;
        for (name, phase) in [
            ("PHASE_NO_GRADIENT", Phase::NoGradient),
            ("PHASE_ACCUMULATE", Phase::Accumulate),
            ("PHASE_UPDATE", Phase::Update),
            ("PHASE_FROZEN", Phase::Frozen),
        ] {
            assert_eq!(constant(name), phase as u32, "{name}");
        }
        let mut bound: Vec<(u32, String, BindingKind)> = m
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                assert_eq!(b.group, 0, "{:?}", g.name);
                let kind = match g.space {
                    naga::AddressSpace::Uniform => BindingKind::Uniform,
                    naga::AddressSpace::Storage { access }
                        if access.contains(naga::StorageAccess::STORE) =>
                    {
                        BindingKind::Storage
                    }
                    naga::AddressSpace::Storage { .. } => BindingKind::ReadOnlyStorage,
                    other => panic!("{:?} in {other:?}", g.name),
                };
                Some((b.binding, g.name.clone().unwrap_or_default(), kind))
            })
            .collect();
        bound.sort_by_key(|b| b.0);
        // the overrides: the contract's and the derived ones (build.rs checks it too)
        let mut declared: Vec<&str> = m
            .overrides
            .iter()
            .filter_map(|(_, o)| o.name.as_deref())
            .collect();
        let mut contract: Vec<&str> = crate::gpu::contract::OVERRIDES
            .iter()
            .map(|o| o.name)
            .chain(crate::gpu::contract::DERIVED_OVERRIDES)
            .collect();
        declared.sort_unstable();
        contract.sort_unstable();
        assert_eq!(declared, contract);
        let host: Vec<(u32, String, BindingKind)> = BINDINGS
            .iter()
            .map(|b| (b.number, b.name.to_string(), b.kind))
            .collect();
        assert_eq!(bound, host);
    }

    #[test]
    fn step_state_round_trips_64_bit_counters() {
        let scale = LossScaleState {
            scale: 0.25,
            counter: 3,
        };
        let s = StepState::new((7u64 << 32) | 5, u64::from(u32::MAX) + 1, scale);
        assert_eq!((s.raw(), s.skipped()), ((7u64 << 32) | 5, 1u64 << 32));
        assert_eq!(s.loss_scale(), scale);
        let back: StepState = bytemuck::pod_read_unaligned(bytemuck::bytes_of(&s));
        assert_eq!(back, s);
    }
}
