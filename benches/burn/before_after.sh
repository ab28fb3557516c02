#!/usr/bin/env bash
# BurnRmsProp against Burn's RmsProp before and after a change: examples/burn_mlp of an
# earlier commit (OLD, built elsewhere) and of this tree, interleaved, on Burn's wgpu
# backend (lavapipe here), the MLP at 10 and 1,000 parameter tensors. One JSON line per
# run, with "build" first (TENSORS="10 1000 10000" adds the largest; 8 steps there).
# Issue 25: cb692e8 before the step gave Burn back its gradients and replaced values in
# one operation each; ee7f0a6 before the new values left the arena in one copy per run.
# Build the old commit with this tree's examples/burn_mlp.rs, so that both report the
# step the same way (the median of the steps after the first):
#
#   git worktree add /tmp/before ee7f0a6 && cp examples/burn_mlp.rs /tmp/before/examples/
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release --features burn --example burn_mlp)
#   OLD=/tmp/before-target/release/examples/burn_mlp bash benches/burn/before_after.sh > out.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --features burn --example burn_mlp >&2
NEW=target/release/examples/burn_mlp
export FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER=1
for round in $(seq "${ROUNDS:-3}"); do
  for tensors in ${TENSORS:-10 1000}; do
    for which in OLD NEW; do
      bin=${!which}
      steps=30
      [ "$tensors" -ge 10000 ] && steps=8
      "$bin" --backend "${BACKEND:-gpu}" --tensors "$tensors" --steps "$steps" --json \
        | sed "s/^{/{\"build\":\"$which\",/"
    done
  done
done
