//! The collectives a sharded step uses, on plain arrays, in a fixed order of additions
//! (so that a run repeats bit for bit for a given number of ranks).

use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};

/// Every rank's `mine` (all the same length), in rank order.
pub(crate) fn all_gather_bytes(comm: &SimpleCommunicator, mine: &[u8]) -> Vec<u8> {
    let mut all = vec![0u8; mine.len() * comm.size() as usize];
    comm.all_gather_into(mine, &mut all[..]);
    all
}

/// Every rank's `mine` (all the same length), in rank order.
pub(crate) fn all_gather_f32(comm: &SimpleCommunicator, mine: &[f32]) -> Vec<f32> {
    let mut all = vec![0.0f32; mine.len() * comm.size() as usize];
    comm.all_gather_into(mine, &mut all[..]);
    all
}

/// Every rank's `mine` (all the same length), in rank order.
pub(crate) fn all_gather_f64(comm: &SimpleCommunicator, mine: &[f64]) -> Vec<f64> {
    let mut all = vec![0.0f64; mine.len() * comm.size() as usize];
    comm.all_gather_into(mine, &mut all[..]);
    all
}

/// This rank's block (`block` elements; `flat` holds one per rank) of the mean of
/// every rank's `flat`: an all-to-all of the blocks, then the sum of what arrives in
/// rank order, divided by the number of ranks. The bytes on the wire are a
/// reduce-scatter's: `(ranks - 1) * block` floats out and in per rank.
pub(crate) fn reduce_scatter_mean(
    comm: &SimpleCommunicator,
    flat: &[f32],
    block: usize,
) -> Vec<f32> {
    let ranks = comm.size() as usize;
    let mut received = vec![0.0f32; block * ranks];
    comm.all_to_all_into(flat, &mut received[..]);
    let mut sum = received[..block].to_vec();
    for part in received.chunks(block).skip(1) {
        for (s, &x) in sum.iter_mut().zip(part) {
            *s += x;
        }
    }
    let n = ranks as f32;
    for s in &mut sum {
        *s /= n;
    }
    sum
}
