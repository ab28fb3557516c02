#!/usr/bin/env bash
# Param groups (issue 24, item 3): the `throughput` example of commit 6ef4a00 (OLD: before
# param groups, built elsewhere), of this tree without groups (NEW) and of this tree with
# four param groups, every tensor in one (GROUPS: each chunk patches its group's numbers
# into the step's), interleaved on the same shapes in the same run. One JSON object per run.
#
#   git worktree add /tmp/base-groups 6ef4a00
#   (cd /tmp/base-groups && CARGO_TARGET_DIR=/tmp/base-groups-target cargo build --release --example throughput)
#   OLD=/tmp/base-groups-target/release/examples/throughput bash benches/param_groups/before_after.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example throughput >&2
NEW=target/release/examples/throughput
run() { # build, extra flags, throughput flags...
  local which=$1 extra=$2 bin
  shift 2
  if [ "$which" = OLD ]; then bin=$OLD; else bin=$NEW; fi
  # shellcheck disable=SC2086
  "$bin" "$@" $extra --json | sed "s/^{/{\"build\":\"$which\",/"
}
for variant in plain centered-momentum+clip+ema; do
  for tensors in 1 10000; do
    for round in 1 2 3; do
      run OLD "" --backend cpu --variant "$variant" --params 16777216 --tensors "$tensors"
      run NEW "" --backend cpu --variant "$variant" --params 16777216 --tensors "$tensors"
      run GROUPS "--groups 4" --backend cpu --variant "$variant" --params 16777216 --tensors "$tensors"
    done
  done
  # the GPU path on lavapipe (4M parameters: a software adapter is slow)
  for tensors in 1 1000; do
    for round in 1 2; do
      run OLD "" --backend gpu --variant "$variant" --params 4194304 --tensors "$tensors" --samples 5
      run NEW "" --backend gpu --variant "$variant" --params 4194304 --tensors "$tensors" --samples 5
      run GROUPS "--groups 4" --backend gpu --variant "$variant" --params 4194304 --tensors "$tensors" --samples 5
    done
  done
done
