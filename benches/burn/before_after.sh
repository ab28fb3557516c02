#!/usr/bin/env bash
# BurnRmsProp against Burn's RmsProp before and after a change: examples/burn_mlp of an
# earlier commit (OLD, built elsewhere) and of this tree, interleaved, on Burn's wgpu
# backend (lavapipe here), the MLP at 10 and 1,000 parameter tensors. One JSON line per
# run, with "build" first. Issue 25: cb692e8 before the step gave Burn back its
# gradients and replaced values in one operation each.
#
#   git worktree add /tmp/beforecb6 cb692e8
#   (cd /tmp/beforecb6 && CARGO_TARGET_DIR=/tmp/beforecb6-target cargo build --release --features burn --example burn_mlp)
#   OLD=/tmp/beforecb6-target/release/examples/burn_mlp bash benches/burn/before_after.sh > out.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --features burn --example burn_mlp >&2
NEW=target/release/examples/burn_mlp
export FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER=1
for round in $(seq "${ROUNDS:-3}"); do
  for tensors in ${TENSORS:-10 1000}; do
    for which in OLD NEW; do
      bin=${!which}
      "$bin" --backend "${BACKEND:-gpu}" --tensors "$tensors" --steps 30 --json \
        | sed "s/^{/{\"build\":\"$which\",/"
    done
  done
done
