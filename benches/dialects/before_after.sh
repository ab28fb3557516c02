#!/usr/bin/env bash
# Keras-dialect CPU throughput before and after the kernel flag word (issue 24, item 4):
# the `throughput` example of commit 865e38d (OLD, built elsewhere) and of this tree,
# interleaved on the same shapes in the same run. Prints one JSON object per run.
#
#   git worktree add /tmp/before 865e38d
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release --example throughput)
#   OLD=/tmp/before-target/release/examples/throughput bash benches/dialects/before_after.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example throughput >&2
NEW=target/release/examples/throughput
for variant in plain centered-momentum+clip+ema; do
  for tensors in 1 10000; do
    for round in 1 2 3; do
      for which in OLD NEW; do
        bin=${!which}
        "$bin" --backend cpu --variant "$variant" --params 16777216 --tensors "$tensors" --json \
          | sed "s/^{/{\"build\":\"$which\",/"
      done
    done
  done
  # the GPU path on lavapipe (4M parameters: a software adapter is slow)
  for round in 1 2; do
    for which in OLD NEW; do
      bin=${!which}
      "$bin" --backend gpu --variant "$variant" --params 4194304 --tensors 1 --samples 5 --json \
        | sed "s/^{/{\"build\":\"$which\",/"
    done
  done
done
