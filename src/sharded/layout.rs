//! How a model is cut into shards: the tensors back to back in one flat space, each
//! starting at a multiple of [`SHARD_ALIGN`] elements, the space padded to a multiple
//! of `ranks * SHARD_ALIGN`, and rank `r` owning the `r`-th of `ranks` equal runs. So
//! shards are balanced by elements (not by whole tensors), every shard and every piece
//! of a tensor starts on a multiple of 256 elements from its tensor's start (int8
//! blocks of one process line up), and the reduce-scatter and all-gather move equal
//! blocks.

use std::ops::Range;

use crate::variable::{Variable, VariableSpec};

/// Shards and tensors start on multiples of this many elements.
pub(crate) const SHARD_ALIGN: usize = 256;

/// One tensor's part of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    /// The tensor.
    pub tensor: usize,
    /// Its elements in the tensor.
    pub elements: Range<usize>,
    /// Where they sit in the shard.
    pub at: usize,
}

impl Piece {
    /// The shard's variable for this piece of the tensor named `name` whose values are
    /// `tensor` (flat, under the tensor's own name, so exclusions match it).
    pub(crate) fn variable(&self, name: &str, tensor: &[f32]) -> crate::Result<Variable> {
        Variable::new(
            name,
            &[self.elements.len()],
            tensor[self.elements.clone()].to_vec(),
        )
    }
}

/// The flat space and the shards of a model over `ranks` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardLayout {
    /// Each tensor's first element in the flat space.
    pub offsets: Vec<usize>,
    /// Each tensor's length.
    pub lens: Vec<usize>,
    /// Elements per shard (a multiple of `SHARD_ALIGN`).
    pub shard_len: usize,
    /// The number of ranks.
    pub ranks: usize,
}

impl ShardLayout {
    /// The layout of `specs` over `ranks` ranks.
    pub(crate) fn new(specs: &[VariableSpec], ranks: usize) -> Self {
        let ranks = ranks.max(1);
        let mut offsets = Vec::with_capacity(specs.len());
        let mut at = 0usize;
        for s in specs {
            offsets.push(at);
            at += s.len().next_multiple_of(SHARD_ALIGN);
        }
        let shard_len = at.div_ceil(ranks * SHARD_ALIGN).max(1) * SHARD_ALIGN;
        ShardLayout {
            offsets,
            lens: specs.iter().map(VariableSpec::len).collect(),
            shard_len,
            ranks,
        }
    }

    /// Elements of the flat space (all shards).
    pub(crate) fn total(&self) -> usize {
        self.shard_len * self.ranks
    }

    /// Rank `r`'s elements of the flat space.
    pub(crate) fn shard(&self, r: usize) -> Range<usize> {
        r * self.shard_len..(r + 1) * self.shard_len
    }

    /// The pieces of rank `r`'s shard, in tensor order.
    pub(crate) fn pieces(&self, r: usize) -> Vec<Piece> {
        let shard = self.shard(r);
        self.offsets
            .iter()
            .zip(&self.lens)
            .enumerate()
            .filter_map(|(t, (&off, &len))| {
                let lo = off.max(shard.start);
                let hi = (off + len).min(shard.end);
                (lo < hi).then(|| Piece {
                    tensor: t,
                    elements: lo - off..hi - off,
                    at: lo - shard.start,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_equal_aligned_and_cover_every_element_once() {
        let specs: Vec<VariableSpec> = [1000usize, 1, 0, 70_000, 300]
            .iter()
            .enumerate()
            .map(|(i, &n)| VariableSpec::new(format!("t{i}"), &[n]))
            .collect();
        for ranks in 1..=5 {
            let l = ShardLayout::new(&specs, ranks);
            assert_eq!(l.shard_len % SHARD_ALIGN, 0);
            let mut seen = vec![0usize; specs.len()];
            for r in 0..ranks {
                for p in l.pieces(r) {
                    assert_eq!(p.elements.start % SHARD_ALIGN, 0, "{p:?}");
                    assert!(p.at + p.elements.len() <= l.shard_len);
                    seen[p.tensor] += p.elements.len();
                }
            }
            assert_eq!(seen, [1000, 1, 0, 70_000, 300], "{ranks} ranks");
            // balanced: no shard holds more than its share plus one alignment unit
            let padded: usize = specs.iter().map(|s| s.len().next_multiple_of(256)).sum();
            assert!(l.shard_len <= padded / ranks + SHARD_ALIGN);
        }
    }
}
