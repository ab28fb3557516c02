//! The CPU driver: parameters and slots in flat host arrays, one step as (at most) a
//! parallel norm reduction and one fused parallel pass over the chunk table, every
//! element through [`math::update_element`](crate::math::update_element).
//!
//! - `kernels`: the per-chunk loops. The structural options are const generics and each
//!   chunk's [`Phase`] is matched once outside its loop, so every variant compiles to
//!   its own branch-free, vectorizable loop;
//! - `isa`: those loops compiled per instruction-set level and chosen at run time (the
//!   crate's only `unsafe`).
//!
//! This module never touches wgpu.

#[allow(unsafe_code)] // the target-feature dispatch; see the module's safety note
mod isa;
mod kernels;
mod slots;

use std::future::Future;
use std::pin::Pin;

use rayon::prelude::*;

use crate::backend::{BackendKind, Engine, Gradients, LossScaling, Role, Staged};
use crate::config::RmsPropConfig;
use crate::counters::{SkippedSteps, StepCounters};
use crate::cpu_level::CpuLevel;
use crate::dtype::{GradSlice, HalfVec};
use crate::error::{Error, Result};
use crate::groups::TensorTable;
use crate::layout::{Chunk, Layout};
use crate::math::{
    next_loss_scale, with_group, ClipFactors, GroupScalars, Phase, StepScalars, TensorStep,
};
use crate::plan::{clip_factors, plan_groups, plan_step};
use crate::state::StateDtype;
use crate::state::StateStorage;
use crate::state_layout::{check_raw, RawSlot, StateLayout, StatePlace};
use crate::variable::VariableSpec;
use crate::variant::{Slot, Variant};
use isa::Isa;
use kernels::{ChunkArrays, PendingJob, SlotCoding};
use slots::{SlotPiece, SlotStore};

/// Calls `$m!` with every valid word of `math::kernel` flags (`kernel::is_valid`:
/// nesterov only with momentum), the words the CPU loops are instantiated for; a
/// unit test checks the list.
macro_rules! kernel_words {
    ($m:ident) => {
        $m!(
            0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 15, 16, 17, 18, 19, 22, 23, 24, 25, 26, 27, 30, 31,
            32, 33, 34, 35, 38, 39, 40, 41, 42, 43, 46, 47, 48, 49, 50, 51, 54, 55, 56, 57, 58, 59,
            62, 63
        )
    };
}

/// Elements per chunk on the CPU: 128 KiB of each array, large enough to amortize
/// scheduling, small enough to balance across threads.
pub(crate) const CPU_CHUNK_LEN: usize = 1 << 15;

/// True when a model of `elements` is stepped on the calling thread: waking rayon's
/// threads from outside its pool (tens of microseconds, the caller blocked meanwhile)
/// costs more than one chunk's work, so a model of at most one chunk runs alone (a Burn
/// model of 10,000 parameters took 80 to 110 us a step in rayon, 10 to 20 without it).
fn runs_alone(elements: usize) -> bool {
    elements <= CPU_CHUNK_LEN
}

/// Parameters, slots and counters of a model in host memory.
#[derive(Debug, Clone)]
pub(crate) struct CpuEngine {
    layout: Layout,
    variant: Variant,
    /// The parameters: f32 (also with remainders: the master is f32), or 16-bit.
    params: Vec<f32>,
    /// 16-bit parameters (then `params` is empty).
    params_16: Option<HalfVec>,
    /// Indexed by [`Slot`] (`slot as usize`); a slot the variant does not keep is empty.
    slots: [SlotStore; 5],
    /// Where each chunk's slot elements live (f32 or compact).
    state: StateLayout,
    counters: StepCounters,
    /// Keras' dynamic loss scaling, when on.
    loss_scaling: Option<LossScaling>,
    /// The 16-bit copy of the parameters, when the variant keeps one.
    param_copy: Option<HalfVec>,
    /// Stochastic rounding's seed, mixed.
    rounding_seed: u32,
    /// Clip factors given from outside for the next step (`Engine::set_external_clips`).
    external_clips: Option<Vec<ClipFactors>>,
    /// The instruction-set level the loops run at.
    isa: Isa,
}

/// Cuts `buf` into the chunks' pieces; an unused (empty) slot gives empty pieces.
fn split_chunks<'a>(buf: &'a mut [f32], chunks: &[Chunk]) -> Vec<&'a mut [f32]> {
    if buf.is_empty() {
        return chunks.iter().map(|_| Default::default()).collect();
    }
    let mut rest = buf;
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(c.len);
        out.push(head);
        rest = tail;
    }
    out
}

/// True when the CPU stores the parameters in 16 bits (16-bit parameters without
/// remainders: with them the master is an exact f32, which takes the 4 bytes either way).
fn stores_16_bit(variant: &Variant) -> bool {
    variant.param_rounding() != crate::dtype::Dtype::F32
}

impl CpuEngine {
    /// Zeroed parameters and slots for `specs` (slots stored as `storage` says),
    /// counters at zero.
    pub(crate) fn new(
        specs: &[VariableSpec],
        variant: Variant,
        storage: &StateStorage,
    ) -> Result<Self> {
        let layout = Layout::new(specs, CPU_CHUNK_LEN, usize::MAX, 1)?;
        let n = layout.total();
        let state = StateLayout::new(&layout, storage, 1);
        let slots = Slot::ALL.map(|s| {
            if variant.keeps(s) {
                SlotStore::zeroed(state.sizes(0), storage.dtype)
            } else {
                SlotStore::default()
            }
        });
        Ok(CpuEngine {
            params: if stores_16_bit(&variant) {
                Vec::new()
            } else {
                vec![0.0; n]
            },
            params_16: if stores_16_bit(&variant) {
                HalfVec::zeros(variant.params, n)
            } else {
                None
            },
            slots,
            state,
            layout,
            variant,
            counters: StepCounters::default(),
            loss_scaling: None,
            param_copy: variant.param_copy.and_then(|d| HalfVec::zeros(d, n)),
            rounding_seed: 0,
            external_clips: None,
            isa: Isa::process_default(),
        })
    }

    /// Tensor `t` of `role`, as f32 (16-bit parameters upcast, compact slots decoded).
    fn tensor_values(&self, role: Role, t: usize) -> Result<Vec<f32>> {
        let range = self.layout.tensor(t)?.range();
        match (role, &self.params_16) {
            (Role::Params, Some(p)) => Ok(p.range_to_f32(range)),
            (Role::Params, None) => Ok(self.params[range].to_vec()),
            (Role::Slot(s), _) => {
                let (place, len) = self.slot_place(s, t)?;
                Ok(self.slots[s as usize].read_raw(place, len).decode(s))
            }
        }
    }

    /// Tensor `t`'s one piece of the state layout (the CPU has one segment).
    fn slot_place(&self, slot: Slot, t: usize) -> Result<(StatePlace, usize)> {
        if !self.variant.keeps(slot) {
            return Err(Error::SlotNotKept(slot));
        }
        let len = self.layout.tensor(t)?.len;
        let place = match self.state.pieces(&self.layout, t).first() {
            Some(&(_, place, _, _)) => place,
            None => StatePlace {
                dtype: StateDtype::F32,
                at: 0,
            },
        };
        Ok((place, len))
    }

    /// Rounds the parameters `range` into the 16-bit copy, if there is one.
    fn refresh_param_copy(&mut self, range: std::ops::Range<usize>) {
        if let Some(copy) = self.param_copy.as_mut() {
            copy.slice_mut(range.clone())
                .round_from(&self.params[range]);
        }
    }

    /// Per-tensor sums of squared effective gradients, when this step clips by a norm.
    fn norm_sums(&self, s: &StepScalars, grads: &[Option<GradSlice<'_>>]) -> Option<Vec<f64>> {
        if !self.variant.clip.needs_norm() || s.is_update_step == 0 || self.external_clips.is_some()
        {
            return None;
        }
        let tensors = self.layout.tensors();
        let acc = &self.slots[Slot::Accumulator as usize];
        let accumulate = self.variant.accumulate;
        let isa = self.isa;
        let state = &self.state;
        let partial = |(buffer, acc_buffer): &mut (Vec<f32>, Vec<f32>), (k, c): (usize, &Chunk)| {
            let t = &tensors[c.tensor];
            let Some(g) = grads[c.tensor] else { return 0.0 };
            let start = c.offset - t.offset;
            g.range(start..start + c.len).with_f32(buffer, |g| {
                if accumulate {
                    let place = state.place(k);
                    acc.with_f32(Slot::Accumulator, place, c.len, acc_buffer, |a| {
                        isa::sum_of_squares::<true>(isa, g, a, s)
                    })
                } else {
                    isa::sum_of_squares::<false>(isa, g, &[], s)
                }
            })
        };
        let chunks = self.layout.chunks();
        let partials: Vec<f64> = if runs_alone(self.layout.total()) {
            let mut buffers = Default::default();
            chunks
                .iter()
                .enumerate()
                .map(|kc| partial(&mut buffers, kc))
                .collect()
        } else {
            chunks
                .par_iter()
                .enumerate()
                .map_init(Default::default, partial)
                .collect()
        };
        Some(
            tensors
                .iter()
                .map(|t| {
                    partials[t.first_chunk..t.first_chunk + t.chunk_count]
                        .iter()
                        .sum()
                })
                .collect(),
        )
    }

    /// Per-tensor clip factors from the norm sums (no clipping by norm: none).
    fn clip_factors(&self, s: &StepScalars, sums: Option<&[f64]>) -> Vec<ClipFactors> {
        let n = self.layout.tensors().len();
        if let (Some(clips), true) = (&self.external_clips, self.variant.clip.needs_norm()) {
            return clips.clone();
        }
        let Some(sums) = sums else {
            return vec![ClipFactors::NONE; n];
        };
        clip_factors(self.variant.clip, sums, s)
    }

    /// One step with the numbers `s` (a tensor of group `g > 0` with
    /// `with_group(s, groups[g - 1])`); `false` when the non-finite guard or loss scaling
    /// skips it (nothing changes then): a gradient is non-finite when it is after
    /// dividing by `check.loss_scale` (`loss_scale_factor`; with loss scaling, 1: Keras
    /// checks the gradients as they arrive, before the dynamic scale divides them).
    fn run_step(
        &mut self,
        s: &StepScalars,
        groups: &[GroupScalars],
        check: &StepScalars,
        grads: &[Option<GradSlice<'_>>],
        table: &TensorTable,
    ) -> bool {
        let sums = self.norm_sums(s, grads);
        if self.variant.skips_non_finite() {
            // NaN or infinity in a gradient makes its sum of squares non-finite, so a
            // finite sum proves the step clean; a non-finite one may be a finite
            // overflow, which the exact scan tells apart.
            let proven_finite = sums
                .as_ref()
                .is_some_and(|sums| sums.iter().all(|x| x.is_finite()));
            let alone = runs_alone(self.layout.total());
            if !proven_finite && has_non_finite(self.isa, grads, check, alone) {
                return false;
            }
        }
        let clips = self.clip_factors(s, sums.as_deref());
        let tensors = self.layout.tensors();
        let chunks = self.layout.chunks();
        let places: Vec<_> = (0..chunks.len())
            .map(|k| (self.state.place(k), chunks[k].len))
            .collect();
        let mut pieces: Vec<_> = self
            .slots
            .iter_mut()
            .zip(Slot::ALL)
            .map(|(store, slot)| store.pieces(self.variant.keeps(slot), &places).into_iter())
            .collect();
        let mut params = split_chunks(&mut self.params, chunks).into_iter();
        let mut params_16 = self
            .params_16
            .as_mut()
            .map(|p| p.split(chunks.iter().map(|c| c.len)).into_iter());
        let mut copies = self
            .param_copy
            .as_mut()
            .map(|c| c.split(chunks.iter().map(|c| c.len)).into_iter());
        let plans: Vec<StepScalars> = std::iter::once(*s)
            .chain(groups.iter().map(|g| with_group(s, g)))
            .collect();
        let mut jobs = Vec::with_capacity(chunks.len());
        for c in chunks {
            let t = &tensors[c.tensor];
            let Some(param) = params.next() else { break };
            let slots: [SlotPiece<'_>; 5] =
                std::array::from_fn(|k| pieces[k].next().unwrap_or_default());
            let param_copy = copies.as_mut().and_then(Iterator::next);
            let chunk_params_16 = params_16.as_mut().and_then(Iterator::next);
            let rule = table.rule(c.tensor);
            if rule.frozen {
                // Phase::Frozen: nothing moves, so no job
                continue;
            }
            let start = c.offset - t.offset;
            let grad = grads[c.tensor].map(|g| g.range(start..start + c.len));
            jobs.push(PendingJob {
                tensor: c.tensor as u32,
                first: (c.offset - t.offset) as u32,
                group: rule.group,
                param_copy,
                params_16: chunk_params_16,
                grad: grad.unwrap_or_default(),
                slots,
                arrays: ChunkArrays {
                    param,
                    grad: &[],
                    velocity: &mut [],
                    momentum: &mut [],
                    average_gradient: &mut [],
                    ema: &mut [],
                    accumulator: &mut [],
                },
                step: TensorStep {
                    phase: Phase::of(grad.is_some(), false, s),
                    decay: self.variant.weight_decay && rule.decay,
                    clip: clips[c.tensor],
                },
            });
        }
        let v = self.variant;
        let isa = self.isa;
        let alone = runs_alone(self.layout.total());
        let coding = SlotCoding {
            stochastic: v.state_stochastic,
            isa,
        };
        macro_rules! go {
            ($($k:literal),*) => {
                match v.checked_kernel() {
                    $($k => {
                        let run = |job: PendingJob<'_>| {
                            let s = &plans[job.group as usize];
                            kernels::with_task_buffers(|buffers| job.run::<$k>(buffers, s, coding))
                        };
                        if alone {
                            jobs.into_iter().for_each(run)
                        } else {
                            jobs.into_par_iter().for_each(run)
                        }
                    })*
                    // `Variant::kernel` makes only valid words (`kernel::is_valid`), and
                    // a test checks `kernel_words!` against them
                    other => unreachable!("no CPU loops for kernel flags {other:#x}"),
                }
            };
        }
        kernel_words!(go);
        true
    }
}

impl Engine for CpuEngine {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn variant(&self) -> Variant {
        self.variant
    }

    fn step(
        &mut self,
        config: &RmsPropConfig,
        grads: Gradients<'_>,
        table: &TensorTable,
    ) -> Result<()> {
        let Gradients::Host(grads) = grads else {
            return Err(Error::NeedsGpuBackend("apply_device_gradients"));
        };
        let s = StepScalars {
            param_storage: self.variant.param_storage(),
            rounding_seed: self.rounding_seed,
            ..plan_step(config, self.counters.raw())
        };
        let groups = plan_groups(config, self.counters.raw());
        let applied = match self.loss_scaling {
            None => self.run_step(&s, &groups, &s, grads, table),
            Some(ls) => {
                // divided by the dynamic scale as it is before this step
                let scaled = StepScalars {
                    loss_scale: ls.state.scale,
                    ..s
                };
                let applied = self.run_step(&scaled, &groups, &s, grads, table);
                self.loss_scaling = Some(LossScaling {
                    state: next_loss_scale(ls.state, applied, ls.growth_steps),
                    ..ls
                });
                applied
            }
        };
        self.counters.record(applied);
        Ok(())
    }

    fn finalize(&mut self) -> Result<()> {
        if self.variant.ema {
            // each parameter assigned its EMA (rounded to nearest when stored in 16 bits)
            for t in 0..self.layout.tensors().len() {
                let ema = self.tensor_values(Role::Slot(Slot::Ema), t)?;
                self.write_tensor(Role::Params, t, &ema)?;
            }
        }
        Ok(())
    }

    fn read(&self, role: Role) -> Result<Staged<Vec<Vec<f32>>>> {
        let values = (0..self.layout.tensors().len())
            .map(|t| self.tensor_values(role, t))
            .collect::<Result<_>>()?;
        Ok(Staged::ready(values))
    }

    fn read_tensor(&self, role: Role, tensor: usize) -> Result<Staged<Vec<f32>>> {
        Ok(Staged::ready(self.tensor_values(role, tensor)?))
    }

    fn write_tensor(&mut self, role: Role, tensor: usize, values: &[f32]) -> Result<()> {
        let t = self.layout.tensor(tensor)?;
        match (role, self.params_16.as_mut()) {
            // an assignment to a variable stored in 16 bits rounds (to nearest)
            (Role::Params, Some(p)) => p.slice_mut(t.range()).round_from(values),
            (Role::Params, None) => self.params[t.range()].copy_from_slice(values),
            (Role::Slot(s), _) => {
                let (place, _) = self.slot_place(s, tensor)?;
                let raw = RawSlot::encode(place.dtype, s, values);
                self.write_slot_raw(s, tensor, &raw)?;
            }
        }
        if role == Role::Params {
            self.refresh_param_copy(t.range());
        }
        Ok(())
    }

    fn read_param_copy(&self) -> Result<Staged<Vec<Vec<f32>>>> {
        let copy = self.param_copy.as_ref().ok_or(Error::NoParamCopy)?;
        Ok(Staged::ready(
            self.layout
                .split(&copy.range_to_f32(0..self.layout.total())),
        ))
    }

    fn read_slots_raw(&self, slot: Slot) -> Result<Staged<Vec<RawSlot>>> {
        let raws = (0..self.layout.tensors().len())
            .map(|t| {
                let (place, len) = self.slot_place(slot, t)?;
                Ok(self.slots[slot as usize].read_raw(place, len))
            })
            .collect::<Result<_>>()?;
        Ok(Staged::ready(raws))
    }

    fn write_slot_raw(&mut self, slot: Slot, tensor: usize, raw: &RawSlot) -> Result<()> {
        let (place, len) = self.slot_place(slot, tensor)?;
        check_raw(slot, tensor, place.dtype, len, raw)?;
        self.slots[slot as usize].write_raw(place, raw);
        Ok(())
    }

    fn set_external_clips(&mut self, clips: Option<Vec<ClipFactors>>) {
        self.external_clips = clips;
    }

    fn state_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.bytes() as u64).sum()
    }

    fn raw_iterations(&self) -> u64 {
        self.counters.raw()
    }

    fn skipped_steps(&self) -> SkippedSteps {
        self.counters.report()
    }

    fn set_counters(&mut self, raw: u64, skipped: u64) -> Result<()> {
        self.counters = StepCounters::new(raw, skipped);
        Ok(())
    }

    fn set_non_finite_guard(&mut self, enabled: bool) -> Result<()> {
        self.variant.guard = enabled;
        Ok(())
    }

    fn set_rounding_seed(&mut self, seed: u32) {
        self.rounding_seed = seed;
    }

    fn set_loss_scaling(&mut self, scaling: Option<LossScaling>) -> Result<()> {
        self.variant.loss_scaling = scaling.is_some();
        self.loss_scaling = scaling;
        Ok(())
    }

    fn loss_scaling(&self) -> Option<LossScaling> {
        self.loss_scaling
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn synchronize_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn cpu_level(&self) -> Option<CpuLevel> {
        Some(self.isa.level())
    }

    fn set_cpu_level(&mut self, level: CpuLevel) -> Result<()> {
        self.isa = Isa::new(level).ok_or(Error::CpuLevelUnsupported(level))?;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// True when any present gradient, divided by the loss scale, is NaN or infinite
/// (`alone`: on the calling thread, see [`runs_alone`]).
fn has_non_finite(isa: Isa, grads: &[Option<GradSlice<'_>>], s: &StepScalars, alone: bool) -> bool {
    let bad = |g: &GradSlice<'_>| g.with_f32(&mut Vec::new(), |g| isa::any_non_finite(isa, g, s));
    if alone {
        return grads.iter().flatten().any(bad);
    }
    grads.par_iter().flatten().any(|g| {
        let pieces = g.len().div_ceil(CPU_CHUNK_LEN);
        (0..pieces)
            .into_par_iter()
            .any(|k| bad(&g.range(k * CPU_CHUNK_LEN..((k + 1) * CPU_CHUNK_LEN).min(g.len()))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 slots coded inside the fused loop give the bits of the decode, run, encode
    /// passes (int8's route), for every slot, phase and parameter: several variants,
    /// missing gradients, a NaN and an infinity, EMA, accumulation, another dialect.
    /// The model is one chunk, which runs on the calling thread, the one whose
    /// [`kernels::BF16_IN_PASSES`] is set.
    #[test]
    fn bf16_slots_coded_in_the_loop_are_the_passes_bits() {
        use crate::{Backend, RmsProp, StateDtype, StateStorage, Variable};
        let run = |config: &RmsPropConfig, passes: bool| {
            kernels::BF16_IN_PASSES.set(passes);
            let mut seed = 7u32;
            let mut next = move || {
                seed = crate::math::hash32(seed);
                seed as f32 / u32::MAX as f32 - 0.5
            };
            let vars: Vec<Variable> = [20_000usize, 5, 1000, 9000]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    Variable::new(format!("v{i}"), &[n], (0..n).map(|_| next()).collect()).unwrap()
                })
                .collect();
            let mut opt =
                RmsProp::with_backend(config.clone(), vars.clone(), Backend::Cpu).unwrap();
            for step in 0..7 {
                let mut grads: Vec<Vec<f32>> = vars
                    .iter()
                    .map(|v| (0..v.values.len()).map(|_| 3.0 * next()).collect())
                    .collect();
                if step == 3 {
                    grads[0][5] = f32::NAN;
                    grads[3][7] = f32::INFINITY;
                }
                let refs: Vec<Option<&[f32]>> = grads
                    .iter()
                    .enumerate()
                    .map(|(i, g)| ((i + step) % 4 != 3).then_some(&g[..]))
                    .collect();
                opt.apply_gradients(&refs).unwrap();
            }
            kernels::BF16_IN_PASSES.set(false);
            let mut bits: Vec<u32> = opt
                .variables()
                .unwrap()
                .concat()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            for slot in Slot::ALL {
                for v in opt.slot(slot).unwrap().unwrap_or_default() {
                    bits.extend(v.iter().map(|x| x.to_bits()));
                }
            }
            bits
        };
        for config in [
            RmsPropConfig::default()
                .with_momentum(0.9)
                .with_centered(true),
            RmsPropConfig::default(),
            RmsPropConfig::default()
                .with_use_ema(true)
                .with_weight_decay(0.01),
            RmsPropConfig::default()
                .with_gradient_accumulation_steps(2)
                .with_momentum(0.5),
            RmsPropConfig::torch()
                .with_momentum(0.9)
                .with_centered(true),
        ] {
            let config = config.with_state(StateStorage::new(StateDtype::Bf16).with_min_size(16));
            let (in_loop, passes) = (run(&config, false), run(&config, true));
            assert_eq!(in_loop.len(), passes.len());
            let first = in_loop.iter().zip(&passes).position(|(a, b)| a != b);
            assert_eq!(first, None, "{config:?}: first differing element");
        }
    }

    #[test]
    fn detects_nan_and_infinity_after_unscaling() {
        let s = plan_step(&RmsPropConfig::default(), 0);
        let isa = Isa::process_default();
        // both ways: on the calling thread and in parallel
        let has_non_finite = |g: &[Option<&[f32]>], s: &StepScalars| {
            let g: Vec<_> = g.iter().map(|g| g.map(GradSlice::F32)).collect();
            let alone = has_non_finite(isa, &g, s, true);
            assert_eq!(alone, has_non_finite(isa, &g, s, false));
            alone
        };
        let fine = vec![1.0f32; 100_000];
        let mut bad = fine.clone();
        bad[77_777] = f32::NAN;
        assert!(!has_non_finite(&[Some(&fine), None], &s));
        assert!(has_non_finite(&[Some(&fine), Some(&bad)], &s));
        bad[77_777] = f32::NEG_INFINITY;
        assert!(has_non_finite(&[Some(&bad)], &s));
        // a finite gradient that overflows when unscaled counts as non-finite
        let tiny = RmsPropConfig::default().with_loss_scale_factor(1e-30);
        let s = plan_step(&tiny, 0);
        assert!(has_non_finite(&[Some(&[1e10f32][..])], &s));
        assert!(!has_non_finite(&[None, Some(&[][..])], &s));
    }

    /// The accumulator-aware norm equals the sum written out element by element.
    #[test]
    fn kernel_words_are_every_valid_word() {
        macro_rules! list {
            ($($k:literal),*) => { [$($k),*] };
        }
        let listed: Vec<u32> = kernel_words!(list).to_vec();
        let valid: Vec<u32> = (0..=crate::math::kernel::ALL)
            .filter(|&k| crate::math::kernel::is_valid(k))
            .collect();
        assert_eq!(listed, valid);
    }

    #[test]
    fn sum_of_squares_matches_the_effective_gradients() {
        let c = RmsPropConfig::default()
            .with_loss_scale_factor(2.0)
            .with_gradient_accumulation_steps(3);
        let s = plan_step(&c, 2);
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = g
            .iter()
            .zip(&a)
            .map(|(&g, &a)| ((g / 2.0 + a) / 3.0) as f64)
            .map(|e| e * e)
            .sum();
        let fast = kernels::sum_of_squares::<true>(&g, &a, &s);
        assert!((fast - exact).abs() <= 1e-5 * exact, "{fast} vs {exact}");
        let plain = kernels::sum_of_squares::<false>(&g, &[], &s);
        let exact: f64 = g.iter().map(|&g| ((g / 2.0) as f64).powi(2)).sum();
        assert!((plain - exact).abs() <= 1e-5 * exact, "{plain} vs {exact}");
    }
}
