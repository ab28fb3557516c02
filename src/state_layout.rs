//! Where the slots live: per chunk, its state dtype and its first element in its
//! segment's store of that dtype.
//!
//! With f32 state (the default) a slot is laid out as the arena is (a chunk's slot
//! elements sit at its own offset in the segment). With compact state every piece of a
//! tensor in a segment gets a region of its own: f32 for tensors under the size
//! threshold (packed, at the arena's alignment), else one compact region (bf16 at
//! multiples of 4 elements, int8 at multiples of the block size, so that blocks count
//! from the tensor's start and never straddle two tensors). A region's padding stays
//! zero, which is 0.0 in every format.

use crate::dtype::Dtype;
use crate::layout::Layout;
use crate::quant::{decode_blocks, encode_blocks, store_bf16_slot, CodeMap};
use crate::slot::Slot;
use crate::state::{StateDtype, StateStorage};

/// Where one chunk's slot elements live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatePlace {
    /// The store: f32, or the compact dtype.
    pub dtype: StateDtype,
    /// The chunk's first element in its segment's store of `dtype`.
    pub at: usize,
}

/// The places of every chunk and the size of every segment's stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateLayout {
    places: Vec<StatePlace>,
    /// Per segment: elements of the f32 store, of the compact store.
    sizes: Vec<(usize, usize)>,
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl StateLayout {
    /// The places for `layout` under `storage` (`align`: the arena's alignment).
    pub(crate) fn new(layout: &Layout, storage: &StateStorage, align: usize) -> Self {
        let chunks = layout.chunks();
        let segments = layout.segments();
        if storage.dtype == StateDtype::F32 {
            let places = chunks
                .iter()
                .map(|c| StatePlace {
                    dtype: StateDtype::F32,
                    at: c.offset - segments[c.segment].start,
                })
                .collect();
            return StateLayout {
                places,
                sizes: segments.iter().map(|s| (s.len(), 0)).collect(),
            };
        }
        let unit = storage.dtype.block_size().unwrap_or(4);
        let mut sizes = vec![(0usize, 0usize); segments.len()];
        let mut places = Vec::with_capacity(chunks.len());
        // the current piece: (tensor, segment, its first arena element, its place)
        let mut piece: Option<(usize, usize, usize, StatePlace)> = None;
        for (k, c) in chunks.iter().enumerate() {
            let same = matches!(piece, Some((t, s, _, _)) if t == c.tensor && s == c.segment);
            if !same {
                let len: usize = chunks[k..]
                    .iter()
                    .take_while(|d| d.tensor == c.tensor && d.segment == c.segment)
                    .map(|d| d.len)
                    .sum();
                let dtype = storage.dtype_for(layout.tensors()[c.tensor].len);
                let (f32_len, compact_len) = &mut sizes[c.segment];
                let at = if dtype == StateDtype::F32 {
                    let at = round_up(*f32_len, align);
                    *f32_len = at + round_up(len, 4);
                    at
                } else {
                    let at = round_up(*compact_len, unit);
                    *compact_len = at + round_up(len, unit);
                    at
                };
                piece = Some((c.tensor, c.segment, c.offset, StatePlace { dtype, at }));
            }
            let (_, _, first, base) = piece.expect("set above");
            places.push(StatePlace {
                at: base.at + (c.offset - first),
                ..base
            });
        }
        for (f, _) in &mut sizes {
            *f = round_up(*f, align);
        }
        StateLayout { places, sizes }
    }

    /// Chunk `k`'s place.
    pub(crate) fn place(&self, k: usize) -> StatePlace {
        self.places[k]
    }

    /// Elements of segment `s`'s f32 store and of its compact store (per slot).
    pub(crate) fn sizes(&self, s: usize) -> (usize, usize) {
        self.sizes[s]
    }

    /// Tensor `t`'s pieces: runs of its chunks in one segment, as (segment, place of
    /// the first chunk, elements, offset in the tensor).
    pub(crate) fn pieces(
        &self,
        layout: &Layout,
        t: usize,
    ) -> Vec<(usize, StatePlace, usize, usize)> {
        let e = layout.tensors()[t];
        let mut out: Vec<(usize, StatePlace, usize, usize)> = Vec::new();
        for k in e.first_chunk..e.first_chunk + e.chunk_count {
            let c = layout.chunks()[k];
            match out.last_mut() {
                Some((s, _, len, _)) if *s == c.segment => *len += c.len,
                _ => out.push((c.segment, self.places[k], c.len, c.offset - e.offset)),
            }
        }
        out
    }
}

/// How [`Coded`] holds a slot's arrays: owned ([`Owned`]), borrowed ([`Shared`]) or
/// borrowed to be written ([`Exclusive`]).
pub(crate) trait Holding {
    /// f32 values.
    type Values;
    /// bf16 bits.
    type Halves;
    /// 8-bit codes.
    type Codes;
    /// One f32 scale per block of codes.
    type Scales;
}

/// [`Coded`]'s arrays as `Vec`s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Owned;

/// [`Coded`]'s arrays as shared slices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shared<'a>(std::marker::PhantomData<&'a ()>);

/// [`Coded`]'s arrays as exclusive slices.
#[derive(Debug, PartialEq)]
pub(crate) struct Exclusive<'a>(std::marker::PhantomData<&'a mut ()>);

impl Holding for Owned {
    type Values = Vec<f32>;
    type Halves = Vec<u16>;
    type Codes = Vec<u8>;
    type Scales = Vec<f32>;
}

impl<'a> Holding for Shared<'a> {
    type Values = &'a [f32];
    type Halves = &'a [u16];
    type Codes = &'a [u8];
    type Scales = &'a [f32];
}

impl<'a> Holding for Exclusive<'a> {
    type Values = &'a mut [f32];
    type Halves = &'a mut [u16];
    type Codes = &'a mut [u8];
    type Scales = &'a mut [f32];
}

/// Elements of one slot in the format they are stored in, however they are held: what
/// each [`StateDtype`] stores, one variant each. f32 values, bf16 bits, or dynamic
/// 8-bit codes of the slot's [`CodeMap`] with one f32 scale per block of `block_size`
/// (the last block may be short). Every match over it is exhaustive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Coded<H: Holding> {
    F32(H::Values),
    Bf16(H::Halves),
    Dynamic8 {
        codes: H::Codes,
        absmax: H::Scales,
        block_size: usize,
    },
}

/// One tensor's slot as it is stored, owned (what readbacks and checkpoints hold).
pub(crate) type RawSlot = Coded<Owned>;

/// Some elements of one slot as they are stored (borrowed): [`SlotRef::decode_into`] is
/// the one decoder of every format on the host.
pub(crate) type SlotRef<'a> = Coded<Shared<'a>>;

/// Some elements of one slot as they are stored, to be written (a CPU chunk's).
pub(crate) type SlotMut<'a> = Coded<Exclusive<'a>>;

impl<H: Holding> Coded<H>
where
    H::Values: AsRef<[f32]>,
    H::Halves: AsRef<[u16]>,
    H::Codes: AsRef<[u8]>,
    H::Scales: AsRef<[f32]>,
{
    /// The same elements, borrowed.
    pub(crate) fn view(&self) -> SlotRef<'_> {
        match self {
            Coded::F32(v) => Coded::F32(v.as_ref()),
            Coded::Bf16(h) => Coded::Bf16(h.as_ref()),
            Coded::Dynamic8 {
                codes,
                absmax,
                block_size,
            } => Coded::Dynamic8 {
                codes: codes.as_ref(),
                absmax: absmax.as_ref(),
                block_size: *block_size,
            },
        }
    }

    /// Its format.
    pub(crate) fn dtype(&self) -> StateDtype {
        match self {
            Coded::F32(_) => StateDtype::F32,
            Coded::Bf16(_) => StateDtype::Bf16,
            Coded::Dynamic8 { block_size, .. } => StateDtype::Dynamic8 {
                block_size: *block_size,
            },
        }
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Coded::F32(v) => v.as_ref().len(),
            Coded::Bf16(h) => h.as_ref().len(),
            Coded::Dynamic8 { codes, .. } => codes.as_ref().len(),
        }
    }

    /// The f32 values (exactly what the kernels decode).
    pub(crate) fn decode(&self, slot: Slot) -> Vec<f32> {
        let mut out = Vec::new();
        self.view().decode_into(slot, &mut out);
        out
    }
}

impl RawSlot {
    /// `values` stored as `dtype`: bf16 rounded to nearest (ties to even), dynamic 8-bit
    /// in blocks with their scales.
    pub(crate) fn encode(dtype: StateDtype, slot: Slot, values: &[f32]) -> RawSlot {
        match dtype {
            StateDtype::F32 => RawSlot::F32(values.to_vec()),
            StateDtype::Bf16 => RawSlot::Bf16(
                values
                    .iter()
                    .map(|&x| store_bf16_slot::<false>(x, 0))
                    .collect(),
            ),
            StateDtype::Dynamic8 { block_size } => {
                let mut codes = vec![0u8; values.len()];
                let mut absmax = vec![0.0f32; values.len().div_ceil(block_size)];
                encode_blocks(
                    values,
                    &mut codes,
                    &mut absmax,
                    block_size,
                    CodeMap::for_slot(slot),
                );
                RawSlot::Dynamic8 {
                    codes,
                    absmax,
                    block_size,
                }
            }
        }
    }
}

impl SlotRef<'_> {
    /// The elements, owned.
    pub(crate) fn to_raw(self) -> RawSlot {
        match self {
            Coded::F32(v) => Coded::F32(v.to_vec()),
            Coded::Bf16(h) => Coded::Bf16(h.to_vec()),
            Coded::Dynamic8 {
                codes,
                absmax,
                block_size,
            } => Coded::Dynamic8 {
                codes: codes.to_vec(),
                absmax: absmax.to_vec(),
                block_size,
            },
        }
    }
}

impl SlotMut<'_> {
    /// Stores `raw` here (of this format and length, checked by the caller).
    pub(crate) fn copy_from(self, raw: SlotRef<'_>) {
        match (self, raw) {
            (Coded::F32(to), Coded::F32(from)) => to.copy_from_slice(from),
            (Coded::Bf16(to), Coded::Bf16(from)) => to.copy_from_slice(from),
            (
                Coded::Dynamic8 { codes, absmax, .. },
                Coded::Dynamic8 {
                    codes: from_codes,
                    absmax: from_absmax,
                    ..
                },
            ) => {
                codes.copy_from_slice(from_codes);
                absmax.copy_from_slice(from_absmax);
            }
            (to, from) => unreachable!("a {} slot stored into a {} one", from.dtype(), to.dtype()),
        }
    }
}

impl SlotRef<'_> {
    /// The values as f32 into `out` (resized to them): bf16 upcast as the kernels do
    /// (`Dtype::upcast_bits`), dynamic 8-bit blocks through `slot`'s code map.
    #[inline(always)]
    pub(crate) fn decode_into(self, slot: Slot, out: &mut Vec<f32>) {
        out.clear();
        match self {
            SlotRef::F32(v) => out.extend_from_slice(v),
            SlotRef::Bf16(bits) => {
                // indexed stores into a sized buffer: the loop vectorizes
                out.resize(bits.len(), 0.0);
                for (x, &b) in out.iter_mut().zip(bits) {
                    *x = Dtype::Bf16.upcast_bits(b);
                }
            }
            SlotRef::Dynamic8 {
                codes,
                absmax,
                block_size,
            } => {
                out.resize(codes.len(), 0.0);
                decode_blocks(codes, absmax, out, block_size, CodeMap::for_slot(slot));
            }
        }
    }
}

/// Refuses a stored slot in another format (block size included) or of another length
/// than `dtype` and `len` elements.
pub(crate) fn check_raw(
    slot: Slot,
    tensor: usize,
    dtype: StateDtype,
    len: usize,
    raw: &RawSlot,
) -> crate::error::Result<()> {
    let scales_ok = match raw {
        RawSlot::Dynamic8 {
            absmax, block_size, ..
        } => absmax.len() == len.div_ceil(*block_size),
        RawSlot::F32(_) | RawSlot::Bf16(_) => true,
    };
    if raw.dtype() != dtype || raw.len() != len || !scales_ok {
        return Err(crate::error::Error::StateMismatch(format!(
            "slot `{slot}` of variable {tensor} is stored as {dtype} ({len} elements); got {} ({} elements)",
            raw.dtype(),
            raw.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variable::VariableSpec;

    fn specs(lens: &[usize]) -> Vec<VariableSpec> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| VariableSpec::new(format!("t{i}"), &[n]))
            .collect()
    }

    #[test]
    fn small_tensors_pack_f32_and_large_ones_start_on_blocks() {
        let layout = Layout::new(&specs(&[10, 300, 5, 1000]), 256, usize::MAX, 8).unwrap();
        let storage = StateStorage::new(StateDtype::Dynamic8 { block_size: 64 }).with_min_size(100);
        let s = StateLayout::new(&layout, &storage, 8);
        let first = |t: usize| s.place(layout.tensors()[t].first_chunk);
        assert_eq!(
            first(0),
            StatePlace {
                dtype: StateDtype::F32,
                at: 0
            }
        );
        assert_eq!(
            first(1),
            StatePlace {
                dtype: StateDtype::Dynamic8 { block_size: 64 },
                at: 0
            }
        );
        assert_eq!(
            first(2),
            StatePlace {
                dtype: StateDtype::F32,
                at: 16
            }
        );
        // 300 elements take 5 blocks of 64
        assert_eq!(
            first(3),
            StatePlace {
                dtype: StateDtype::Dynamic8 { block_size: 64 },
                at: 320
            }
        );
        assert_eq!(s.sizes(0), (24, 320 + 1024));
        // the chunks of a tensor follow each other in its region
        let t = layout.tensors()[3];
        let ats: Vec<usize> = (0..t.chunk_count)
            .map(|k| s.place(t.first_chunk + k).at)
            .collect();
        assert_eq!(ats, [320, 576, 832, 1088]);
        assert_eq!(s.pieces(&layout, 3), [(0, first(3), 1000, 0)]);
        // f32 state: the arena's own offsets
        let s = StateLayout::new(&layout, &StateStorage::default(), 8);
        assert_eq!(
            s.place(layout.tensors()[3].first_chunk).at,
            layout.tensors()[3].offset
        );
    }
}
