//! The CPU's slot arrays, in the places of the [`StateLayout`]: f32, or compact (bf16
//! bits, or dynamic 8-bit codes with one f32 scale per block). A chunk's bf16 slots rounded to
//! nearest are coded inside the fused loop; its other compact slots are decoded into
//! per-task f32 buffers before the loop and encoded after it, while the chunk is in
//! cache ([`crate::cpu::kernels::PendingJob::run`]).

use std::ops::Range;

use crate::math::StepScalars;
use crate::quant::{encode_blocks, slot_bits, state_key, store_bf16_slot, CodeMap};
use crate::slot::Slot;
use crate::state::StateDtype;
use crate::state_layout::{Coded, RawSlot, SlotMut, SlotRef, StatePlace};

/// One slot's arrays (all empty for a slot the variant does not keep).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotStore {
    /// Tensors with f32 slots.
    pub f32s: Vec<f32>,
    /// bf16 slots, as bits.
    pub half: Vec<u16>,
    /// Dynamic 8-bit slots: one code per element, one scale per block.
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// One chunk's piece of a slot: unused, or its elements as stored.
#[derive(Debug, Default)]
pub(crate) enum SlotPiece<'a> {
    /// The slot is not kept.
    #[default]
    Unused,
    Kept(SlotMut<'a>),
}

/// Cuts `ranges` (increasing, disjoint; `None`: an empty piece) out of `buf`.
fn cut<T>(buf: &mut [T], ranges: impl Iterator<Item = Option<Range<usize>>>) -> Vec<&mut [T]> {
    let mut rest = buf;
    let mut consumed = 0;
    ranges
        .map(|r| {
            let Some(r) = r else {
                return Default::default();
            };
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - consumed);
            let (head, tail) = tail.split_at_mut(r.len());
            rest = tail;
            consumed = r.end;
            head
        })
        .collect()
}

impl SlotStore {
    /// A zeroed store for one segment's sizes (`(f32, compact)` elements).
    pub(crate) fn zeroed(sizes: (usize, usize), dtype: StateDtype) -> Self {
        let (f, c) = sizes;
        let f32s = vec![0.0; f];
        match dtype {
            StateDtype::F32 => SlotStore {
                f32s,
                ..SlotStore::default()
            },
            StateDtype::Bf16 => SlotStore {
                f32s,
                half: vec![0; c],
                ..SlotStore::default()
            },
            StateDtype::Dynamic8 { block_size } => SlotStore {
                f32s,
                codes: vec![0; c],
                absmax: vec![0.0; c / block_size],
                ..SlotStore::default()
            },
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        4 * self.f32s.len() + 2 * self.half.len() + self.codes.len() + 4 * self.absmax.len()
    }

    /// One piece per chunk (`(place, len)` in chunk order); `kept` false: all unused.
    pub(crate) fn pieces(
        &mut self,
        kept: bool,
        chunks: &[(StatePlace, usize)],
    ) -> Vec<SlotPiece<'_>> {
        if !kept {
            return chunks.iter().map(|_| SlotPiece::Unused).collect();
        }
        // each array's ranges, in chunk order (a chunk has one in its format's arrays)
        let of = |code: u32| {
            move |&(p, len): &(StatePlace, usize)| {
                (p.dtype.code() == code).then(|| p.at..p.at + len)
            }
        };
        let mut f32s = cut(
            &mut self.f32s,
            chunks.iter().map(of(StateDtype::F32.code())),
        )
        .into_iter();
        let mut half = cut(
            &mut self.half,
            chunks.iter().map(of(StateDtype::Bf16.code())),
        )
        .into_iter();
        let mut codes = cut(
            &mut self.codes,
            chunks.iter().map(of(StateDtype::DYNAMIC8.code())),
        )
        .into_iter();
        let blocks = chunks.iter().map(|&(p, len)| {
            p.dtype
                .block_size()
                .map(|block| p.at / block..(p.at + len).div_ceil(block))
        });
        let mut absmax = cut(&mut self.absmax, blocks).into_iter();
        chunks
            .iter()
            .map(|(p, _)| {
                let (f, h, c, a) = (f32s.next(), half.next(), codes.next(), absmax.next());
                SlotPiece::Kept(match p.dtype {
                    StateDtype::F32 => Coded::F32(f.unwrap_or_default()),
                    StateDtype::Bf16 => Coded::Bf16(h.unwrap_or_default()),
                    StateDtype::Dynamic8 { block_size } => Coded::Dynamic8 {
                        codes: c.unwrap_or_default(),
                        absmax: a.unwrap_or_default(),
                        block_size,
                    },
                })
            })
            .collect()
    }

    /// `len` elements at `place`, as stored.
    pub(crate) fn view(&self, place: StatePlace, len: usize) -> SlotRef<'_> {
        let r = place.at..place.at + len;
        match place.dtype {
            StateDtype::F32 => Coded::F32(&self.f32s[r]),
            StateDtype::Bf16 => Coded::Bf16(&self.half[r]),
            StateDtype::Dynamic8 { block_size } => Coded::Dynamic8 {
                codes: &self.codes[r],
                absmax: &self.absmax[place.at / block_size..(place.at + len).div_ceil(block_size)],
                block_size,
            },
        }
    }

    /// `len` elements at `place`, as stored, to be written.
    fn view_mut(&mut self, place: StatePlace, len: usize) -> SlotMut<'_> {
        let r = place.at..place.at + len;
        match place.dtype {
            StateDtype::F32 => Coded::F32(&mut self.f32s[r]),
            StateDtype::Bf16 => Coded::Bf16(&mut self.half[r]),
            StateDtype::Dynamic8 { block_size } => Coded::Dynamic8 {
                codes: &mut self.codes[r],
                absmax: &mut self.absmax
                    [place.at / block_size..(place.at + len).div_ceil(block_size)],
                block_size,
            },
        }
    }

    /// `len` elements from `place`, as f32, to `f` (decoded into `buffer` when compact).
    pub(crate) fn with_f32<R>(
        &self,
        slot: Slot,
        place: StatePlace,
        len: usize,
        buffer: &mut Vec<f32>,
        f: impl FnOnce(&[f32]) -> R,
    ) -> R {
        match self.view(place, len) {
            Coded::F32(values) => f(values),
            compact => {
                compact.decode_into(slot, buffer);
                f(buffer)
            }
        }
    }

    /// `len` elements at `place`, as stored.
    pub(crate) fn read_raw(&self, place: StatePlace, len: usize) -> RawSlot {
        self.view(place, len).to_raw()
    }

    /// Stores `raw` (in `place`'s format and length, checked by the caller) at `place`.
    pub(crate) fn write_raw(&mut self, place: StatePlace, raw: &RawSlot) {
        self.view_mut(place, raw.len()).copy_from(raw.view());
    }
}

/// The keys of stochastic rounding of a chunk's bf16 slots: the step's numbers, the
/// tensor, the index of the chunk's first element in it.
#[derive(Clone, Copy)]
pub(crate) struct SlotKeys<'s> {
    pub s: &'s StepScalars,
    pub tensor: u32,
    pub first: u32,
}

impl<'a> SlotPiece<'a> {
    /// The piece's first `mid` elements, and the rest (`mid` a multiple of the block
    /// size, or past the end: then the rest is empty).
    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        let SlotPiece::Kept(piece) = self else {
            return (SlotPiece::Unused, SlotPiece::Unused);
        };
        let (head, rest) = match piece {
            Coded::F32(v) => {
                let (a, b) = v.split_at_mut(mid.min(v.len()));
                (Coded::F32(a), Coded::F32(b))
            }
            Coded::Bf16(h) => {
                let (a, b) = h.split_at_mut(mid.min(h.len()));
                (Coded::Bf16(a), Coded::Bf16(b))
            }
            Coded::Dynamic8 {
                codes,
                absmax,
                block_size,
            } => {
                debug_assert!(mid.is_multiple_of(block_size) || mid >= codes.len());
                let (c, d) = codes.split_at_mut(mid.min(codes.len()));
                let (a, b) = absmax.split_at_mut(mid.div_ceil(block_size).min(absmax.len()));
                (
                    Coded::Dynamic8 {
                        codes: c,
                        absmax: a,
                        block_size,
                    },
                    Coded::Dynamic8 {
                        codes: d,
                        absmax: b,
                        block_size,
                    },
                )
            }
        };
        (SlotPiece::Kept(head), SlotPiece::Kept(rest))
    }

    /// True for a kept piece stored in another format than f32.
    pub(crate) fn is_compact(&self) -> bool {
        match self {
            SlotPiece::Unused => false,
            SlotPiece::Kept(piece) => piece.dtype() != StateDtype::F32,
        }
    }

    /// Decodes the piece into `out` (its elements; nothing for an unused slot).
    /// Inlined, so that `isa::decode_piece` compiles it at each level.
    #[inline(always)]
    pub(crate) fn decode(&self, slot: Slot, out: &mut Vec<f32>) {
        match self {
            SlotPiece::Unused => out.clear(),
            SlotPiece::Kept(piece) => piece.view().decode_into(slot, out),
        }
    }

    /// Stores `values` into the piece: f32 as they are, bf16 rounded (stochastically
    /// with `keys`), int8 as blocks with their new scales. Inlined, so that
    /// `isa::store_piece` compiles it at each level.
    #[inline(always)]
    pub(crate) fn store(self, slot: Slot, values: &[f32], keys: Option<SlotKeys<'_>>) {
        let SlotPiece::Kept(piece) = self else {
            return;
        };
        match piece {
            Coded::F32(f) => f.copy_from_slice(values),
            Coded::Bf16(h) => match keys {
                None => {
                    for (b, &x) in h.iter_mut().zip(values) {
                        *b = store_bf16_slot::<false>(x, 0);
                    }
                }
                Some(k) => {
                    for (i, (b, &x)) in h.iter_mut().zip(values).enumerate() {
                        let key = state_key(k.s, k.tensor, k.first + i as u32);
                        *b = store_bf16_slot::<true>(x, slot_bits(key, slot as u32));
                    }
                }
            },
            Coded::Dynamic8 {
                codes,
                absmax,
                block_size,
            } => encode_blocks(values, codes, absmax, block_size, CodeMap::for_slot(slot)),
        }
    }
}
