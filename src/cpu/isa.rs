//! Run-time dispatch of the CPU loops to an instruction-set level: the only `unsafe` in
//! the crate.
//!
//! Each loop of `kernels` is `#[inline(always)]`, so the `#[target_feature]` functions
//! below compile one clone of it per level (the baseline clone is the kernel itself).
//! Calling a `#[target_feature]` function is `unsafe` because running AVX2 or AVX-512
//! instructions on a processor without them is undefined behaviour.
//!
//! **Why it is sound:** the clones are called only through the dispatchers here, and
//! only with an [`Isa`], whose one constructor ([`Isa::new`]) checks at run time, with
//! `is_x86_feature_detected!`, every feature the clone enables. Nothing else about the
//! clones is unsafe: they are the same safe Rust as the kernels.
//!
//! The levels and their detection are in [`crate::cpu_level`]; hand-written rather than
//! the `multiversion` crate because a user must be able to force a lower level
//! (`FUSED_RMSPROP_CPU_LEVEL`, [`crate::RmsProp::set_cpu_level`]), which `multiversion`'s
//! automatic selection does not offer.

use std::sync::OnceLock;

use super::kernels::{self, ChunkJob};
use super::slots::{SlotKeys, SlotPiece};
use crate::cpu_level::CpuLevel;
use crate::math::StepScalars;
use crate::slot::Slot;

/// The environment variable that caps the process's default level.
pub(crate) const LEVEL_ENV: &str = "FUSED_RMSPROP_CPU_LEVEL";

/// A level this processor supports: the proof the dispatchers rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Isa(CpuLevel);

impl Isa {
    /// `level`, if this processor supports it.
    pub(crate) fn new(level: CpuLevel) -> Option<Isa> {
        level.is_supported().then_some(Isa(level))
    }

    /// The level every new CPU engine starts at: the best one, or a lower one asked for
    /// by `FUSED_RMSPROP_CPU_LEVEL`; chosen and logged (at debug level) once.
    pub(crate) fn process_default() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = CpuLevel::best();
            let level = match std::env::var(LEVEL_ENV) {
                Err(_) => best,
                Ok(asked) => match asked.parse::<CpuLevel>() {
                    Ok(asked) if asked <= best => asked,
                    Ok(asked) => {
                        log::warn!("fused-rmsprop: {LEVEL_ENV}={asked} is not supported here; using {best}");
                        best
                    }
                    Err(e) => {
                        log::warn!("fused-rmsprop: {LEVEL_ENV}: {e}; using {best}");
                        best
                    }
                },
            };
            log::debug!("fused-rmsprop: CPU loops run at {level} (best supported: {best})");
            Isa::new(level).unwrap_or(Isa(CpuLevel::Baseline))
        })
    }

    /// The level.
    pub(crate) fn level(self) -> CpuLevel {
        self.0
    }
}

/// [`kernels::run_chunk`] at `isa`'s level.
pub(crate) fn run_chunk<const K: u32>(isa: Isa, job: ChunkJob<'_>, s: &StepScalars) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::run_chunk_avx512::<K>(job, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::run_chunk_avx2::<K>(job, s) },
        _ => kernels::run_chunk::<K>(job, s),
    }
}

/// [`SlotPiece::decode`] at `isa`'s level: the 8-bit and bf16 decoders vectorize there
/// as the loops do (the same values at every level).
pub(crate) fn decode_piece(
    isa: Isa,
    piece: &SlotPiece<'_>,
    slot: Slot,
    block: usize,
    out: &mut Vec<f32>,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::decode_piece_avx512(piece, slot, block, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::decode_piece_avx2(piece, slot, block, out) },
        _ => piece.decode(slot, block, out),
    }
}

/// [`SlotPiece::store`] at `isa`'s level (the same bytes at every level).
pub(crate) fn store_piece(
    isa: Isa,
    piece: SlotPiece<'_>,
    slot: Slot,
    values: &[f32],
    block: usize,
    keys: Option<SlotKeys<'_>>,
) {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::store_piece_avx512(piece, slot, values, block, keys) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::store_piece_avx2(piece, slot, values, block, keys) },
        _ => piece.store(slot, values, block, keys),
    }
}

/// [`kernels::sum_of_squares`] at `isa`'s level.
pub(crate) fn sum_of_squares<const A: bool>(
    isa: Isa,
    g: &[f32],
    acc: &[f32],
    s: &StepScalars,
) -> f64 {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::sum_of_squares_avx512::<A>(g, acc, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::sum_of_squares_avx2::<A>(g, acc, s) },
        _ => kernels::sum_of_squares::<A>(g, acc, s),
    }
}

/// [`kernels::any_non_finite`] at `isa`'s level.
pub(crate) fn any_non_finite(isa: Isa, chunk: &[f32], s: &StepScalars) -> bool {
    match isa.0 {
        // SAFETY: an `Isa` holds only a level whose features were detected (`Isa::new`).
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => unsafe { x86::any_non_finite_avx512(chunk, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => unsafe { x86::any_non_finite_avx2(chunk, s) },
        _ => kernels::any_non_finite(chunk, s),
    }
}

/// The x86-64 clones: the kernels compiled with AVX2 + FMA, and with AVX-512.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::kernels::{self, ChunkJob};
    use crate::cpu::slots::{SlotKeys, SlotPiece};
    use crate::math::StepScalars;
    use crate::slot::Slot;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn decode_piece_avx2(
        piece: &SlotPiece<'_>,
        slot: Slot,
        block: usize,
        out: &mut Vec<f32>,
    ) {
        piece.decode(slot, block, out)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn decode_piece_avx512(
        piece: &SlotPiece<'_>,
        slot: Slot,
        block: usize,
        out: &mut Vec<f32>,
    ) {
        piece.decode(slot, block, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn store_piece_avx2(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        block: usize,
        keys: Option<SlotKeys<'_>>,
    ) {
        piece.store(slot, values, block, keys)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn store_piece_avx512(
        piece: SlotPiece<'_>,
        slot: Slot,
        values: &[f32],
        block: usize,
        keys: Option<SlotKeys<'_>>,
    ) {
        piece.store(slot, values, block, keys)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn run_chunk_avx2<const K: u32>(job: ChunkJob<'_>, s: &StepScalars) {
        kernels::run_chunk::<K>(job, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn run_chunk_avx512<const K: u32>(job: ChunkJob<'_>, s: &StepScalars) {
        kernels::run_chunk::<K>(job, s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_of_squares_avx2<const A: bool>(
        g: &[f32],
        acc: &[f32],
        s: &StepScalars,
    ) -> f64 {
        kernels::sum_of_squares::<A>(g, acc, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn sum_of_squares_avx512<const A: bool>(
        g: &[f32],
        acc: &[f32],
        s: &StepScalars,
    ) -> f64 {
        kernels::sum_of_squares::<A>(g, acc, s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn any_non_finite_avx2(chunk: &[f32], s: &StepScalars) -> bool {
        kernels::any_non_finite(chunk, s)
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) fn any_non_finite_avx512(chunk: &[f32], s: &StepScalars) -> bool {
        kernels::any_non_finite(chunk, s)
    }
}
