#!/usr/bin/env bash
# BurnRmsProp against Burn's own RmsProp, one JSON line per (backend, tensors) from
# examples/burn_mlp.rs: 10, 1,000 and 10,000 parameter tensors of the same ~1.07M
# parameters, on Burn's ndarray backend (this crate's CPU path through the host) and on
# Burn's wgpu backend (a software adapter such as lavapipe included).
#
#   bash benches/burn/run.sh [out.jsonl] [backends...]     (default: cpu gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-benches/burn/runs_$(date +%F).jsonl}"
shift || true
backends=("${@:-cpu gpu}")
cargo build --release --features burn --example burn_mlp
bin=target/release/examples/burn_mlp
for backend in ${backends[@]}; do
  for tensors in 10 1000 10000; do
    steps=30
    [ "$tensors" -ge 10000 ] && steps=8
    FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER=1 "$bin" --backend "$backend" --tensors "$tensors" \
      --steps "$steps" --json | tee -a "$out"
  done
done
