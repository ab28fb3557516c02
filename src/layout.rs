//! The flat arena layout both backends share: an offset table (one entry per tensor)
//! and a chunk table (contiguous pieces of at most `chunk_len` elements that never
//! cross a tensor or segment boundary).
//!
//! The arena holds every tensor back to back, row-major, in variable order, with no
//! padding: tensor `i` occupies `offset(i) .. offset(i) + len(i)`. The GPU path may
//! split the arena into segments (to respect `max_storage_buffer_binding_size`); a
//! chunk then belongs to exactly one segment.

use crate::error::{Error, Result};
use crate::variable::VariableSpec;

/// Largest model (in elements) this crate accepts: 2^34, i.e. 64 GiB per f32 array.
pub(crate) const MAX_ELEMENTS: usize = 1 << 34;

/// One tensor's place in the arena and its run of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    /// First element in the arena.
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
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
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
    /// The segment holding it (`offset / segment_len`).
    pub segment: usize,
}

/// The offset table and chunk table of an arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    tensors: Vec<TensorEntry>,
    chunks: Vec<Chunk>,
    total: usize,
    segment_len: usize,
}

impl Layout {
    /// Lays out `specs` back to back, cut into chunks of at most `chunk_len` elements
    /// that never cross a multiple of `segment_len`.
    pub(crate) fn new(
        specs: &[VariableSpec],
        chunk_len: usize,
        segment_len: usize,
    ) -> Result<Self> {
        let chunk_len = chunk_len.max(1);
        let segment_len = segment_len.max(1);
        let mut tensors = Vec::with_capacity(specs.len());
        let mut chunks = Vec::new();
        let mut offset = 0usize;
        for (t, spec) in specs.iter().enumerate() {
            let len = spec.len();
            let end = offset
                .checked_add(len)
                .filter(|&e| e <= MAX_ELEMENTS)
                .ok_or_else(|| Error::ModelTooLarge {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    limit: MAX_ELEMENTS,
                })?;
            let first_chunk = chunks.len();
            let mut at = offset;
            while at < end {
                let segment = at / segment_len;
                let segment_end = (segment + 1).saturating_mul(segment_len);
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
                offset,
                len,
                first_chunk,
                chunk_count: chunks.len() - first_chunk,
            });
            offset = end;
        }
        Ok(Layout {
            tensors,
            chunks,
            total: offset,
            segment_len,
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

    /// Total number of elements.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Number of segments holding at least one element (at least 1).
    pub(crate) fn segment_count(&self) -> usize {
        self.total.div_ceil(self.segment_len).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_shapes_are_refused() {
        let specs = vec![VariableSpec::new("huge", &[1 << 20, 1 << 20, 1 << 20])];
        assert!(matches!(
            Layout::new(&specs, 4, 8),
            Err(Error::ModelTooLarge { .. })
        ));
    }

    #[test]
    fn chunks_cover_every_tensor_and_respect_boundaries() {
        let specs = vec![
            VariableSpec::new("a", &[5]),
            VariableSpec::new("empty", &[0, 3]),
            VariableSpec::new("s", &[]),
            VariableSpec::new("b", &[3, 3]),
        ];
        let l = Layout::new(&specs, 4, 8).unwrap();
        assert_eq!(l.total(), 15);
        assert_eq!(l.tensors()[1].chunk_count, 0);
        assert_eq!(l.tensors()[2].offset, 5);
        let mut covered = 0;
        for c in l.chunks() {
            assert!(c.len <= 4 && c.len > 0);
            assert_eq!(c.offset, covered);
            assert_eq!(
                c.offset / 8,
                (c.offset + c.len - 1) / 8,
                "crosses a segment"
            );
            covered += c.len;
        }
        assert_eq!(covered, 15);
        assert_eq!(l.segment_count(), 2);
    }
}
