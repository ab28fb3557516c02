#!/usr/bin/env bash
# Compact state on the CPU before and after a change: the `throughput` example of an
# earlier commit (OLD, built elsewhere) and of this tree, interleaved, 16M parameters in
# one tensor, f32 / bf16 / int8 state. One JSON object per run. LEVEL=avx2 holds both
# builds at AVX2 (`--cpu-level`, bf16 left out): the AVX2 int8 encoder, for processors
# without AVX-512. Issue 26: 71b81d6 before the slots were coded at the loops' level
# (first part); 2d9bd76 before bf16 slots were coded inside the fused loop; 4280811
# before the arithmetic int8 guess and the passes in L1.
#
#   git worktree add /tmp/before26 71b81d6
#   (cd /tmp/before26 && CARGO_TARGET_DIR=/tmp/before26-target cargo build --release --example throughput)
#   OLD=/tmp/before26-target/release/examples/throughput bash benches/compact_state/before_after_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example throughput >&2
NEW=target/release/examples/throughput
states="f32 bf16 int8"
level=()
if [ -n "${LEVEL:-}" ]; then
  states="f32 int8"
  level=(--cpu-level "$LEVEL")
fi
for round in 1 2; do
  for variant in plain centered-momentum; do
    for state in $states; do
      for which in OLD NEW; do
        bin=${!which}
        "$bin" --backend cpu --variant "$variant" --params 16777216 --tensors 1 "${level[@]}" \
          --state-dtype "$state" --samples 5 --json | sed "s/^{/{\"build\":\"$which\",/"
      done
    done
  done
done
