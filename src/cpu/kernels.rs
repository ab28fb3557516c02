//! The CPU path's per-chunk loops: the fused update, the norm's sum of squares and the
//! non-finite scan. All are `#[inline(always)]`, so that `isa` compiles each into one
//! clone per instruction-set level; none of them branches on an option per element.

use crate::cpu::isa::{self, Isa};
use crate::cpu::slots::{SlotKeys, SlotPiece};
use crate::dtype::{Dtype, GradSlice, HalfSliceMut};
use crate::math::{
    effective_gradient, element_key, kernel, unscale_gradient, update_element, ElementState, Phase,
    StepScalars, TensorStep, STORE_BF16, STORE_BF16_STOCHASTIC, STORE_F16, STORE_F16_STOCHASTIC,
    STORE_F32,
};
use crate::quant::store_bf16_slot;
use crate::slot::Slot;
use crate::state::MAX_BLOCK_SIZE;
use crate::state_layout::Coded;

/// How the fused loop holds a slot's elements: f32, or bf16 bits coded in the loop
/// itself ([`Bf16Bits`]), with no pass of their own.
pub(crate) trait SlotElement: Copy + Send + Sync {
    /// The value.
    fn load(self) -> f32;
    /// `x` as stored.
    fn store(x: f32) -> Self;
    /// Whether the loop holds slots so beside parameters stored in 16 bits too (else
    /// only beside f32 parameters, and its loops for the other storages are not built).
    const BESIDE_16_BIT_PARAMS: bool;
}

impl SlotElement for f32 {
    const BESIDE_16_BIT_PARAMS: bool = true;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
}

/// A bf16 slot element's bits: upcast as every decoder of the format
/// ([`crate::state_layout::SlotRef::decode_into`]), rounded to nearest (ties to even) as
/// every encoder ([`store_bf16_slot`]), so the bytes are those of the decode-run-encode
/// passes. Slots rounded stochastically take those passes (their keys need the
/// element's index and slot), and so do slots beside 16-bit parameters (rarer: the
/// loops are not built twice for each parameter storage).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub(crate) struct Bf16Bits(u16);

impl SlotElement for Bf16Bits {
    const BESIDE_16_BIT_PARAMS: bool = false;
    #[inline(always)]
    fn load(self) -> f32 {
        Dtype::Bf16.upcast_bits(self.0)
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        Bf16Bits(store_bf16_slot::<false>(x, 0))
    }
}

/// One chunk's work: its arrays (slots held as `E`) and what the step does to its
/// tensor.
pub(crate) struct ChunkJob<'a, E: SlotElement = f32> {
    pub arrays: ChunkArrays<'a, E>,
    pub step: TensorStep,
    /// The chunk's tensor, and the index in it of the chunk's first element (the keys
    /// of stochastic rounding).
    pub tensor: u32,
    pub first: u32,
}

/// A chunk's work before its gradient and state are f32: the gradient in its own dtype
/// (empty when the tensor has none this step), the slots in their storage.
pub(crate) struct PendingJob<'a> {
    /// The arrays, with an empty `grad` and empty slots (`slots` holds them).
    pub arrays: ChunkArrays<'a>,
    pub grad: GradSlice<'a>,
    /// The chunk's piece of each slot, in [`Slot::ALL`] order.
    pub slots: [SlotPiece<'a>; 5],
    pub step: TensorStep,
    /// The chunk's piece of the 16-bit parameter copy, rewritten after the update.
    pub param_copy: Option<HalfSliceMut<'a>>,
    /// The chunk's parameters when they are stored in 16 bits (`arrays.param` is then
    /// empty): upcast before the update, stored back after it (exactly: every
    /// assignment rounded them to the type).
    pub params_16: Option<HalfSliceMut<'a>>,
    pub tensor: u32,
    pub first: u32,
    /// The tensor's group in the per-tensor table (which plan the chunk runs with).
    pub group: u32,
}

/// A task's f32 buffers for the chunks it runs: the gradient, the parameters and each
/// slot, when they are stored in another type.
#[derive(Default)]
pub(crate) struct TaskBuffers {
    grad: Vec<f32>,
    param: Vec<f32>,
    slots: [Vec<f32>; 5],
}

thread_local! {
    /// Each thread's buffers, kept from step to step: made afresh per task, each
    /// step allocated and freed blocks of 128 KiB, which the allocator maps and unmaps
    /// (page faults and TLB shootdowns that cost compact state more than its coding).
    static TASK_BUFFERS: std::cell::RefCell<TaskBuffers> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's [`TaskBuffers`] (a task never starts another inside).
pub(crate) fn with_task_buffers<R>(f: impl FnOnce(&mut TaskBuffers) -> R) -> R {
    TASK_BUFFERS.with(|b| f(&mut b.borrow_mut()))
}

/// Elements of a chunk coded, run and coded back at a time when its slots take passes
/// of their own: their f32 slots stay in L1 (a multiple of every int8 block size, so
/// a pass starts at a block). 16M parameters with int8 state at 2 threads: 37 ms a step
/// in passes of a whole chunk (32,768 elements), 33 ms in passes of 2,048 (BENCHMARKS.md).
const PASS_LEN: usize = 2048;
const _: () = assert!(PASS_LEN.is_multiple_of(MAX_BLOCK_SIZE));

/// What compact slots need besides the step and their format: whether bf16 slots
/// round stochastically.
#[derive(Clone, Copy)]
pub(crate) struct SlotCoding {
    pub stochastic: bool,
    /// The level the decoders and encoders run at (the loops' own).
    pub isa: Isa,
}

/// True when a chunk in `phase` reads and writes `slot` (as [`sweep`] cuts them).
fn touches(slot: Slot, phase: Phase) -> bool {
    match slot {
        Slot::Velocity | Slot::Momentum | Slot::AverageGradient => phase == Phase::Update,
        Slot::Ema => phase != Phase::Frozen,
        Slot::Accumulator => matches!(phase, Phase::Accumulate | Phase::Update),
    }
}

impl PendingJob<'_> {
    /// Runs the fused loop of kernel flags `K` on the job, at `coding.isa`'s level, with
    /// its gradient and parameters as f32 (upcast into the task's `buffers` when stored
    /// otherwise) and its slots as the loop holds them: f32, bf16 bits coded in the loop
    /// (rounded to nearest), or decoded into `buffers` (int8, stochastically rounded
    /// bf16) and stored back after it; then stores 16-bit parameters back and rounds the
    /// chunk's parameters into its piece of the copy, while they are in cache.
    #[inline]
    pub(crate) fn run<const K: u32>(
        self,
        buffers: &mut TaskBuffers,
        s: &StepScalars,
        coding: SlotCoding,
    ) {
        let PendingJob {
            arrays,
            grad,
            mut slots,
            step,
            param_copy,
            params_16,
            tensor,
            first,
            group: _,
        } = self;
        let TaskBuffers {
            grad: buffer,
            param: param_buffer,
            slots: slot_buffers,
        } = buffers;
        let param: &mut [f32] = match &params_16 {
            Some(p) => {
                p.upcast_into(param_buffer);
                param_buffer
            }
            None => arrays.param,
        };
        let n = param.len();
        let in_loop = !coding.stochastic
            && s.param_storage as u8 == STORE_F32
            && !bf16_in_passes()
            && slots
                .iter()
                .any(|p| matches!(p, SlotPiece::Kept(Coded::Bf16(_))));
        if in_loop {
            let views: Vec<&mut [Bf16Bits]> = slots
                .iter_mut()
                .zip(Slot::ALL)
                .map(|(piece, slot)| match piece {
                    SlotPiece::Kept(Coded::Bf16(bits)) if touches(slot, step.phase) => {
                        bytemuck::cast_slice_mut(bits)
                    }
                    _ => &mut [],
                })
                .collect();
            run_with::<K, _>(views, param, grad, buffer, step, tensor, first, coding, s);
        } else {
            // compact slots: a pass of PASS_LEN elements at a time, so that their decoded
            // values stay in L1 from their decoding through the loop to their encoding
            // (f32 slots: one pass)
            let pass_len = if slots.iter().any(SlotPiece::is_compact) {
                PASS_LEN
            } else {
                n.max(1)
            };
            let keys = coding.stochastic.then_some(SlotKeys { s, tensor, first });
            let mut rest = (slots, &mut *param);
            let mut start = 0;
            while start < n {
                let len = pass_len.min(n - start);
                let (slots, tail) = rest;
                let mut pieces: [SlotPiece<'_>; 5] = Default::default();
                let mut later: [SlotPiece<'_>; 5] = Default::default();
                for ((piece, head), rest) in slots.into_iter().zip(&mut pieces).zip(&mut later) {
                    (*head, *rest) = piece.split_at(len);
                }
                let (param, tail) = tail.split_at_mut(len);
                rest = (later, tail);
                let grad = if grad.len() == 0 {
                    grad
                } else {
                    grad.range(start..start + len)
                };
                let views: Vec<&mut [f32]> = pieces
                    .iter_mut()
                    .zip(slot_buffers.iter_mut())
                    .zip(Slot::ALL)
                    .map(|((piece, buf), slot)| match piece {
                        SlotPiece::Kept(Coded::F32(values)) => &mut **values,
                        compact if compact.is_compact() && touches(slot, step.phase) => {
                            isa::decode_piece(coding.isa, compact, slot, buf);
                            &mut buf[..len]
                        }
                        _ => &mut [],
                    })
                    .collect();
                let at = first + start as u32;
                run_with::<K, _>(views, param, grad, buffer, step, tensor, at, coding, s);
                let keys = keys.map(|k| SlotKeys { first: at, ..k });
                for ((piece, buf), slot) in
                    pieces.into_iter().zip(slot_buffers.iter()).zip(Slot::ALL)
                {
                    if piece.is_compact() && touches(slot, step.phase) {
                        isa::store_piece(coding.isa, piece, slot, &buf[..len], keys);
                    }
                }
                start += len;
            }
        }
        if let Some(copy) = param_copy {
            copy.round_from(param);
        }
        if let Some(stored) = params_16 {
            stored.round_from(param);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: this thread codes bf16 slots in passes of their own, as int8 slots are
    /// (the reference the loop's own coding must equal, bit for bit).
    pub(crate) static BF16_IN_PASSES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether bf16 slots are coded in passes of their own (only ever in tests).
#[inline(always)]
fn bf16_in_passes() -> bool {
    #[cfg(test)]
    return BF16_IN_PASSES.get();
    #[cfg(not(test))]
    false
}

/// The fused loop of kernel flags `K` over one chunk whose slots (in [`Slot::ALL`]
/// order) are `views`, its gradient upcast into `buffer` when it is not f32.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run_with<const K: u32, E: SlotElement>(
    views: Vec<&mut [E]>,
    param: &mut [f32],
    grad: GradSlice<'_>,
    buffer: &mut Vec<f32>,
    step: TensorStep,
    tensor: u32,
    first: u32,
    coding: SlotCoding,
    s: &StepScalars,
) {
    let Ok([velocity, momentum, average_gradient, ema, accumulator]) =
        <[&mut [E]; 5]>::try_from(views)
    else {
        return;
    };
    grad.with_f32(buffer, |grad| {
        let job = ChunkJob {
            arrays: ChunkArrays {
                param,
                grad,
                velocity,
                momentum,
                average_gradient,
                ema,
                accumulator,
            },
            step,
            tensor,
            first,
        };
        isa::run_chunk::<K, E>(coding.isa, job, s)
    });
}

/// One chunk's slice of every array, its slots held as `E`; unused slots, and the
/// gradient of a tensor without one this step, are empty.
pub(crate) struct ChunkArrays<'a, E: SlotElement = f32> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub velocity: &'a mut [E],
    pub momentum: &'a mut [E],
    pub average_gradient: &'a mut [E],
    pub ema: &'a mut [E],
    pub accumulator: &'a mut [E],
}

/// Sum of squared [`effective_gradient`]s (`A`: averaged with the accumulator `acc`):
/// f32 squares summed in eight f32 lanes over blocks of 256 elements (so the loop
/// vectorizes), blocks summed in f64. The lanes fix the order of every addition, so the
/// sum is the same bits at any vector width.
#[inline(always)]
pub(crate) fn sum_of_squares<const A: bool>(g: &[f32], acc: &[f32], s: &StepScalars) -> f64 {
    const BLOCK: usize = 256;
    let mut total = 0.0f64;
    for (b, block) in g.chunks(BLOCK).enumerate() {
        let acc = if A {
            &acc[b * BLOCK..][..block.len()]
        } else {
            &[][..]
        };
        let at = |k: usize| if A { acc[k] } else { 0.0 };
        let mut lanes = [0.0f32; 8];
        let mut eights = block.chunks_exact(8);
        for (j, c) in (&mut eights).enumerate() {
            for k in 0..8 {
                let e = effective_gradient::<A>(c[k], at(8 * j + k), s);
                lanes[k] += e * e;
            }
        }
        let done = block.len() / 8 * 8;
        for (k, &x) in eights.remainder().iter().enumerate() {
            let e = effective_gradient::<A>(x, at(done + k), s);
            lanes[k] += e * e;
        }
        total += lanes.iter().map(|&l| l as f64).sum::<f64>();
    }
    total
}

/// The fused pass over one chunk: its [`Phase`] picked once, then the loop. `K`: the
/// [`kernel`] flags. A phase without an update reads only the EMA and accumulation
/// flags, so its loops are instantiated for those alone (shared by every `K`).
#[inline(always)]
pub(crate) fn run_chunk<const K: u32, E: SlotElement>(job: ChunkJob<'_, E>, s: &StepScalars) {
    const EMA: u32 = kernel::EMA;
    const ACC: u32 = kernel::ACCUMULATE;
    macro_rules! no_update {
        ($p:expr) => {
            match (kernel::has(K, EMA), kernel::has(K, ACC)) {
                (false, false) => sweep::<0, { $p }, _>(job, s),
                (false, true) => sweep::<ACC, { $p }, _>(job, s),
                (true, false) => sweep::<EMA, { $p }, _>(job, s),
                (true, true) => sweep::<{ EMA | ACC }, { $p }, _>(job, s),
            }
        };
    }
    match job.step.phase {
        Phase::NoGradient => no_update!(NO_GRADIENT),
        Phase::Accumulate => no_update!(ACCUMULATE),
        Phase::Update => sweep::<K, UPDATE, _>(job, s),
        // nothing moves (the driver makes no job for a frozen chunk)
        Phase::Frozen => {}
    }
}

/// [`Phase`]s as numbers, so that a chunk's phase is a constant inside [`sweep`].
const NO_GRADIENT: u8 = 0;
const ACCUMULATE: u8 = 1;
const UPDATE: u8 = 2;

/// Which optional slots the [`kernel`] flags `k` keep: the average gradient (centered),
/// momentum, EMA, accumulator.
#[inline(always)]
const fn slots_kept(k: u32) -> [bool; 4] {
    [
        kernel::has(k, kernel::CENTERED),
        kernel::has(k, kernel::MOMENTUM),
        kernel::has(k, kernel::EMA),
        kernel::has(k, kernel::ACCUMULATE),
    ]
}

/// Every element of a chunk through [`update_element`] in phase `P`: loads what the
/// phase reads, stores what it writes.
#[inline(always)]
fn sweep<const K: u32, const P: u8, E: SlotElement>(job: ChunkJob<'_, E>, s: &StepScalars) {
    let [c, m, e, a] = slots_kept(K);
    let t = TensorStep {
        phase: match P {
            NO_GRADIENT => Phase::NoGradient,
            ACCUMULATE => Phase::Accumulate,
            _ => Phase::Update,
        },
        ..job.step
    };
    let update = P == UPDATE;
    let has_gradient = P != NO_GRADIENT;
    let all = job.arrays;
    let n = all.param.len();
    // the slices this phase touches, cut to the chunk's length so indexing is checked once
    let mut arrays = ChunkArrays {
        param: all.param,
        grad: if has_gradient { &all.grad[..n] } else { &[] },
        velocity: if update {
            &mut all.velocity[..n]
        } else {
            &mut []
        },
        momentum: if update && m {
            &mut all.momentum[..n]
        } else {
            &mut []
        },
        average_gradient: if update && c {
            &mut all.average_gradient[..n]
        } else {
            &mut []
        },
        ema: if e { &mut all.ema[..n] } else { &mut [] },
        accumulator: if a && has_gradient {
            &mut all.accumulator[..n]
        } else {
            &mut []
        },
    };
    // One copy of the loop per value of the per-tensor decay flag (update steps only)
    // and of the per-step EMA overwrite flag (EMA only), so that inside each they are
    // constants: LLVM does not reliably take both out of the vectorized loop by itself.
    let overwrite = e && s.ema_overwrite_enabled != 0;
    let s_with = |overwrite: bool| StepScalars {
        ema_overwrite_enabled: overwrite as u32,
        ..*s
    };
    let t_with = |decay: bool| TensorStep { decay, ..t };
    // and one per parameter storage (the rounding of every assignment)
    let decay = update && t.decay;
    let key_of = (job.tensor, job.first);
    macro_rules! storage {
        ($s:expr) => {
            by_flags::<K, P, { $s }, _>(&mut arrays, t_with, s_with, decay, overwrite, key_of)
        };
    }
    if !E::BESIDE_16_BIT_PARAMS {
        // `PendingJob::run` holds such slots only beside f32 parameters
        return storage!(STORE_F32);
    }
    match s.param_storage as u8 {
        STORE_BF16 => storage!(STORE_BF16),
        STORE_F16 => storage!(STORE_F16),
        STORE_BF16_STOCHASTIC => storage!(STORE_BF16_STOCHASTIC),
        STORE_F16_STOCHASTIC => storage!(STORE_F16_STOCHASTIC),
        STORE_F32 => storage!(STORE_F32),
        // `Variant::param_storage` gives one of the five
        other => unreachable!("no parameter storage has code {other}"),
    }
}

/// [`each_element`] with the decay and overwrite flags as constants.
#[inline(always)]
fn by_flags<const K: u32, const P: u8, const S: u8, E: SlotElement>(
    arrays: &mut ChunkArrays<'_, E>,
    t_with: impl Fn(bool) -> TensorStep,
    s_with: impl Fn(bool) -> StepScalars,
    decay: bool,
    overwrite: bool,
    key_of: (u32, u32),
) {
    // one call per arm, so that inside each the flags are constants
    match (decay, overwrite) {
        (false, false) => each_element::<K, P, S, _>(arrays, t_with(false), &s_with(false), key_of),
        (false, true) => each_element::<K, P, S, _>(arrays, t_with(false), &s_with(true), key_of),
        (true, false) => each_element::<K, P, S, _>(arrays, t_with(true), &s_with(false), key_of),
        (true, true) => each_element::<K, P, S, _>(arrays, t_with(true), &s_with(true), key_of),
    }
}

/// The loop of [`sweep`] over the arrays it cut (those its phase leaves alone are
/// empty): load, [`update_element`], store. `(tensor, first)`: the chunk's tensor and
/// the index in it of its first element, for stochastic rounding's keys.
#[inline(always)]
fn each_element<const K: u32, const P: u8, const S: u8, E: SlotElement>(
    arrays: &mut ChunkArrays<'_, E>,
    t: TensorStep,
    s: &StepScalars,
    (tensor, first): (u32, u32),
) {
    let update = P == UPDATE;
    let has_gradient = P != NO_GRADIENT;
    let [c, m, e, a] = slots_kept(K);
    let ChunkArrays {
        param,
        grad,
        velocity: vel,
        momentum: mom,
        average_gradient: avg,
        ema,
        accumulator: acc,
    } = arrays;
    for i in 0..param.len() {
        let before = ElementState {
            param: param[i],
            velocity: if update { vel[i].load() } else { 0.0 },
            momentum: if update && m { mom[i].load() } else { 0.0 },
            average_gradient: if update && c { avg[i].load() } else { 0.0 },
            ema: if e { ema[i].load() } else { 0.0 },
            accumulator: if a && has_gradient {
                acc[i].load()
            } else {
                0.0
            },
        };
        let raw = if has_gradient { grad[i] } else { 0.0 };
        let key = if S >= STORE_BF16_STOCHASTIC {
            element_key(s, tensor, first + i as u32)
        } else {
            0
        };
        let after = update_element::<K, S>(raw, before, &t, s, key);
        if update || e {
            param[i] = after.param;
        }
        if update {
            vel[i] = E::store(after.velocity);
        }
        if update && m {
            mom[i] = E::store(after.momentum);
        }
        if update && c {
            avg[i] = E::store(after.average_gradient);
        }
        if e {
            ema[i] = E::store(after.ema);
        }
        if a && has_gradient {
            acc[i] = E::store(after.accumulator);
        }
    }
}

/// True when any gradient of `chunk`, divided by the loss scale, is NaN or infinite.
#[inline(always)]
pub(crate) fn any_non_finite(chunk: &[f32], s: &StepScalars) -> bool {
    // a fold rather than a short-circuit, so the loop vectorizes
    chunk
        .iter()
        .fold(false, |bad, &x| bad | !unscale_gradient(x, s).is_finite())
}
