//! The flat arena layout both backends share: an offset table (one entry per tensor),
//! a segment table, and a chunk table (contiguous pieces of at most `chunk_len`
//! elements that never cross a tensor or segment boundary).
//!
//! Tensors sit in variable order, row-major, each starting at a multiple of `align`
//! elements (the GPU passes the device's `min_storage_buffer_offset_alignment`, so every
//! tensor can be bound as a storage-buffer range; the CPU passes 1). The gaps between
//! tensors are padding that nothing reads or writes.
//!
//! Segments (one set of GPU buffers each, within `max_storage_buffer_binding_size`) hold
//! whole tensors: a tensor that does not fit in the rest of the current segment starts
//! the next one. Only a tensor longer than a whole segment is split across segments, at
//! multiples of `segment_len`.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::variable::VariableSpec;

/// Largest model (in elements) this crate accepts: 2^34, i.e. 64 GiB per f32 array
/// (2^28, 1 GiB, where addresses have 32 bits: wasm32).
pub(crate) const MAX_ELEMENTS: usize = if usize::BITS >= 64 {
    (1u64 << 34) as usize
} else {
    1 << 28
};

/// One tensor's place in the arena and its run of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    /// First element in the arena (a multiple of the layout's alignment).
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Index of its first chunk.
    pub first_chunk: usize,
    /// Number of chunks (0 for an empty tensor).
    pub chunk_count: usize,
}

impl TensorEntry {
    /// Its elements in the arena.
    pub(crate) fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// A contiguous piece of one tensor, the unit of parallel work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// The tensor it belongs to.
    pub tensor: usize,
    /// First element in the arena.
    pub offset: usize,
    /// Number of elements (> 0).
    pub len: usize,
    /// The segment holding it.
    pub segment: usize,
}

/// The offset, segment and chunk tables of an arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    tensors: Vec<TensorEntry>,
    chunks: Vec<Chunk>,
    /// Arena elements of each segment (at least one, possibly empty).
    segments: Vec<Range<usize>>,
    total: usize,
    align: usize,
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Layout {
    /// Lays out `specs` with every tensor at a multiple of `align` elements, in segments
    /// of at most `segment_len` elements (rounded down to a multiple of `align`), cut
    /// into chunks of at most `chunk_len` elements. The total (and so every segment's
    /// end) is padded to a multiple of `align` too.
    pub(crate) fn new(
        specs: &[VariableSpec],
        chunk_len: usize,
        segment_len: usize,
        align: usize,
    ) -> Result<Self> {
        let align = align.max(1);
        let chunk_len = chunk_len.max(1);
        let segment_len = (segment_len / align).max(1) * align;
        let mut tensors = Vec::with_capacity(specs.len());
        let mut chunks = Vec::new();
        let mut starts = vec![0usize];
        let mut offset = 0usize;
        for (t, spec) in specs.iter().enumerate() {
            let len = spec.len();
            let too_large = || Error::ModelTooLarge {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                limit: MAX_ELEMENTS,
            };
            let start = round_up(offset, align);
            let end = start
                .checked_add(len)
                .filter(|&e| e <= MAX_ELEMENTS)
                .ok_or_else(too_large)?;
            let mut segment_start = *starts.last().unwrap_or(&0);
            if len > 0 && end > segment_start.saturating_add(segment_len) && start > segment_start {
                // does not fit in the rest of this segment: it opens the next one
                starts.push(start);
                segment_start = start;
            }
            // longer than a segment: split at multiples of segment_len
            while end > segment_start.saturating_add(segment_len) {
                segment_start += segment_len;
                starts.push(segment_start);
            }
            let first_chunk = chunks.len();
            let mut at = start;
            while at < end {
                let segment = starts.partition_point(|&s| s <= at) - 1;
                let segment_end = starts[segment].saturating_add(segment_len);
                let stop = end.min(at + chunk_len).min(segment_end);
                chunks.push(Chunk {
                    tensor: t,
                    offset: at,
                    len: stop - at,
                    segment,
                });
                at = stop;
            }
            tensors.push(TensorEntry {
                offset: start,
                len,
                first_chunk,
                chunk_count: chunks.len() - first_chunk,
            });
            offset = end;
        }
        let total = round_up(offset, align);
        let segments = starts
            .iter()
            .enumerate()
            .map(|(k, &s)| s..starts.get(k + 1).copied().unwrap_or(total))
            .collect();
        Ok(Layout {
            tensors,
            chunks,
            segments,
            total,
            align,
        })
    }

    /// The offset table.
    pub(crate) fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Tensor `i`'s entry; [`Error::NoSuchVariable`] when there is none.
    pub(crate) fn tensor(&self, i: usize) -> Result<TensorEntry> {
        self.tensors.get(i).copied().ok_or(Error::NoSuchVariable(i))
    }

    /// The chunk table, in arena order.
    pub(crate) fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Total number of elements, padding included (a multiple of the alignment).
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// The segments' element ranges, in order (at least one).
    pub(crate) fn segments(&self) -> &[Range<usize>] {
        &self.segments
    }

    /// The alignment of every tensor and segment, in elements.
    #[cfg(test)]
    pub(crate) fn align(&self) -> usize {
        self.align
    }

    /// Cuts a flat array laid out like this arena into one `Vec` per tensor.
    pub(crate) fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.tensors
            .iter()
            .map(|t| flat[t.range()].to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(lens: &[usize]) -> Vec<VariableSpec> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| VariableSpec::new(format!("t{i}"), &[n]))
            .collect()
    }

    #[test]
    fn absurd_shapes_are_refused() {
        let specs = vec![VariableSpec::new("huge", &[1 << 20, 1 << 20, 1 << 20])];
        assert!(matches!(
            Layout::new(&specs, 4, 8, 1),
            Err(Error::ModelTooLarge { .. })
        ));
    }

    /// Every chunk lies inside its tensor and its segment, the chunks of a tensor cover
    /// it exactly, in order, and segments tile the arena.
    fn check(l: &Layout, chunk_len: usize) {
        for (i, t) in l.tensors().iter().enumerate() {
            assert_eq!(t.offset % l.align(), 0, "tensor {i} misaligned");
            let mut at = t.offset;
            for c in &l.chunks()[t.first_chunk..t.first_chunk + t.chunk_count] {
                assert_eq!((c.tensor, c.offset), (i, at));
                assert!(c.len > 0 && c.len <= chunk_len);
                let s = &l.segments()[c.segment];
                assert!(s.start <= c.offset && c.offset + c.len <= s.end);
                at += c.len;
            }
            assert_eq!(at, t.offset + t.len);
        }
        let mut at = 0;
        for s in l.segments() {
            assert_eq!((s.start, s.start % l.align()), (at, 0));
            at = s.end;
        }
        assert_eq!((at, l.total() % l.align()), (l.total(), 0));
    }

    #[test]
    fn unaligned_layout_packs_tensors_back_to_back() {
        let l = Layout::new(&specs(&[5, 0, 1, 9]), 4, usize::MAX, 1).unwrap();
        check(&l, 4);
        let offsets: Vec<usize> = l.tensors().iter().map(|t| t.offset).collect();
        assert_eq!(offsets, [0, 5, 5, 6]);
        assert_eq!((l.total(), l.segments().len()), (15, 1));
    }

    #[test]
    fn aligned_layout_starts_every_tensor_on_a_boundary() {
        let sizes = [0, 1, 3, 4, 5, 63, 64, 65];
        let l = Layout::new(&specs(&sizes), 32, usize::MAX, 64).unwrap();
        check(&l, 32);
        let offsets: Vec<usize> = l.tensors().iter().map(|t| t.offset).collect();
        assert_eq!(offsets, [0, 0, 64, 128, 192, 256, 320, 384]);
        assert_eq!(l.total(), 512);
    }

    #[test]
    fn segments_hold_whole_tensors_unless_one_is_longer_than_a_segment() {
        // segments of 64: [30, 30] fit, 10 opens the next, 150 spans three
        let l = Layout::new(&specs(&[30, 30, 10, 150, 3]), 16, 64, 4).unwrap();
        check(&l, 16);
        let segments: Vec<(usize, usize)> = l.segments().iter().map(|s| (s.start, s.end)).collect();
        assert_eq!(
            segments,
            [(0, 64), (64, 76), (76, 140), (140, 204), (204, 232)]
        );
        let segment_of = |t: usize| {
            let e = l.tensors()[t];
            let c = &l.chunks()[e.first_chunk..e.first_chunk + e.chunk_count];
            c.iter().map(|c| c.segment).collect::<Vec<_>>()
        };
        assert_eq!(segment_of(2), [1]);
        assert_eq!(segment_of(3), [2, 2, 2, 2, 3, 3, 3, 3, 4, 4]);
        // the tail of the long tensor shares its last segment with the next tensor
        assert_eq!(segment_of(4), [4]);
        // a segment length that is not a multiple of the alignment is rounded down
        let l = Layout::new(&specs(&[100]), 16, 4096 + 7, 64).unwrap();
        check(&l, 16);
    }
}
