//! Variables and the flat arena layout both backends share: an offset table (one
//! entry per tensor) and a chunk table (contiguous pieces of at most `chunk_len`
//! elements that never cross a tensor or segment boundary).
//!
//! The arena holds every tensor back to back, row-major, in variable order, with no
//! padding: tensor `i` occupies `offset(i) .. offset(i) + len(i)`. The GPU path may
//! split the arena into segments (to respect `max_storage_buffer_binding_size`); a
//! chunk then belongs to exactly one segment.

use crate::error::{Error, Result};

/// A variable's name and shape (`[]` is a scalar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableSpec {
    /// The name, matched by `exclude_from_weight_decay` substrings.
    pub name: String,
    /// The shape; the element count is its product (1 for `[]`).
    pub shape: Vec<usize>,
}

impl VariableSpec {
    /// A spec from a name and shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        VariableSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Number of elements (saturating; an absurd shape is refused by [`Layout::new`]).
    pub fn len(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// True when the shape has a zero dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A variable with its starting values (flat, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    /// Name and shape.
    pub spec: VariableSpec,
    /// The values; `values.len() == spec.len()`.
    pub values: Vec<f32>,
}

impl Variable {
    /// A variable; fails when `values` does not fill `shape`.
    ///
    /// ```
    /// use fused_rmsprop::Variable;
    /// assert!(Variable::new("w", &[2, 2], vec![1.0; 4]).is_ok());
    /// assert!(Variable::new("w", &[2, 2], vec![1.0; 3]).is_err());
    /// ```
    pub fn new(name: impl Into<String>, shape: &[usize], values: Vec<f32>) -> Result<Self> {
        let spec = VariableSpec::new(name, shape);
        check_len(&spec, values.len())?;
        Ok(Variable { spec, values })
    }

    /// A variable from an `ndarray` array (any dimensionality).
    pub fn from_array(name: impl Into<String>, array: ndarray::ArrayViewD<'_, f32>) -> Self {
        Variable {
            spec: VariableSpec::new(name, array.shape()),
            values: array.iter().copied().collect(),
        }
    }
}

/// Fails with [`Error::ValueLength`] when `found` does not match the spec.
pub(crate) fn check_len(spec: &VariableSpec, found: usize) -> Result<()> {
    if spec.len() != found {
        return Err(Error::ValueLength {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            expected: spec.len(),
            found,
        });
    }
    Ok(())
}

/// Largest model (in elements) this crate accepts: 2^34, i.e. 64 GiB per f32 array.
pub const MAX_ELEMENTS: usize = 1 << 34;

/// One tensor's place in the arena and its run of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorEntry {
    /// First element in the arena.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Index of its first chunk.
    pub first_chunk: usize,
    /// Number of chunks (0 for an empty tensor).
    pub chunk_count: usize,
}

/// A contiguous piece of one tensor, the unit of parallel work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
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
pub struct Layout {
    tensors: Vec<TensorEntry>,
    chunks: Vec<Chunk>,
    total: usize,
    segment_len: usize,
}

impl Layout {
    /// Lays out `specs` back to back, cut into chunks of at most `chunk_len` elements
    /// that never cross a multiple of `segment_len`.
    pub fn new(specs: &[VariableSpec], chunk_len: usize, segment_len: usize) -> Result<Self> {
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
                .ok_or_else(|| {
                    Error::invalid(
                        "variables",
                        format!(
                            "variable `{}` of shape {:?} takes the model past {MAX_ELEMENTS} elements",
                            spec.name, spec.shape
                        ),
                    )
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
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The chunk table, in arena order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Total number of elements.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Elements per segment (the last may be shorter).
    pub fn segment_len(&self) -> usize {
        self.segment_len
    }

    /// Number of segments holding at least one element (at least 1).
    pub fn segment_count(&self) -> usize {
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
            Err(Error::InvalidConfig { .. })
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
