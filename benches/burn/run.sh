#!/usr/bin/env bash
# BurnRmsProp against Burn's own RmsProp, one JSON line per run of examples/burn_mlp.rs:
# the MLP at 10, 1,000 and 10,000 parameter tensors of the same ~1.07M parameters, and
# the small convolutional net (6 tensors), on Burn's ndarray or flex backend (this
# crate's CPU path through the host) and on Burn's wgpu backend (a software adapter
# such as lavapipe included).
#
#   bash benches/burn/run.sh [out.jsonl] [backends...]     (default: cpu gpu)
#   MODELS="conv" bash benches/burn/run.sh ...              (default: mlp conv)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-benches/burn/runs_$(date +%F).jsonl}"
shift || true
backends=("${@:-cpu gpu}")
models="${MODELS:-mlp conv}"
cargo build --release --features burn --example burn_mlp
bin=target/release/examples/burn_mlp
export FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER=1
for backend in ${backends[@]}; do
  for model in $models; do
    if [ "$model" = conv ]; then
      "$bin" --backend "$backend" --model conv --steps 30 --json | tee -a "$out"
      continue
    fi
    for tensors in 10 1000 10000; do
      steps=30
      [ "$tensors" -ge 10000 ] && steps=8
      "$bin" --backend "$backend" --tensors "$tensors" --steps "$steps" --json | tee -a "$out"
    done
  done
done
