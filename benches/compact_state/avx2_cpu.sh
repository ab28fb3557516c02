#!/usr/bin/env bash
# As before_after_cpu.sh, with both builds held at AVX2 (`--cpu-level avx2`): the AVX2
# int8 encoder, for processors without AVX-512.
#
#   OLD=/tmp/before26-target/release/examples/throughput bash benches/compact_state/avx2_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example throughput >&2
NEW=target/release/examples/throughput
for round in 1 2; do
  for variant in plain centered-momentum; do
    for state in f32 int8; do
      for which in OLD NEW; do
        bin=${!which}
        "$bin" --backend cpu --variant "$variant" --params 16777216 --tensors 1 --cpu-level avx2 \
          --state-dtype "$state" --samples 5 --json | sed "s/^{/{\"build\":\"$which\",/"
      done
    done
  done
done
