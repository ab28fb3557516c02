#!/usr/bin/env bash
# Compact state on the GPU (lavapipe here) before and after a change: the `throughput`
# example of an earlier commit (OLD, built elsewhere) and of this tree, interleaved, 4M
# parameters in one tensor, f32 / bf16 / int8 state, four variants. One JSON object per
# run (`shader_ratio`: GB/s of the bytes each state actually moves, over a minimal WGSL
# copy's in the same run). Issue 26: 764d34b before int8 blocks were reduced by one
# invocation on software adapters.
#
#   git worktree add /tmp/before764 764d34b
#   (cd /tmp/before764 && CARGO_TARGET_DIR=/tmp/before764-target cargo build --release --example throughput)
#   OLD=/tmp/before764-target/release/examples/throughput bash benches/compact_state/before_after_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example throughput >&2
NEW=target/release/examples/throughput
export FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER=1
for round in $(seq "${ROUNDS:-2}"); do
  for variant in plain momentum centered-momentum centered-momentum+ema; do
    for state in ${STATES:-f32 bf16 int8}; do
      for which in OLD NEW; do
        bin=${!which}
        "$bin" --backend gpu --variant "$variant" --params 4194304 --tensors 1 \
          --state-dtype "$state" --samples 5 --json | sed "s/^{/{\"build\":\"$which\",/"
      done
    done
  done
done
