#!/usr/bin/env bash
# The PyTorch dialect against torch.optim.RMSprop(foreach=True) on the same CPU cores,
# in the same run: 16M parameters in 1 tensor and in 10,000, plain and
# centered-momentum with global-norm clipping (torch: clip_grad_norm_(1.0, foreach)),
# lr=1e-3, alpha=0.9, eps=1e-7, momentum=0.9 on both sides. Interleaved, so drift on a
# shared machine hits both. Prints one JSON object per run.
#
#   PYTHON=/tmp/dialects-env/bin/python bash benches/dialects/torch_cpu.sh > out.jsonl
#
# (torch 2.9.1 from PyPI: see tests/dialects/record_traces.py for the environment.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
cargo build --release --example throughput >&2
for spec in plain:16777216:1 plain:16777216:10000 \
    centered-momentum+clip:16777216:1 centered-momentum+clip:16777216:10000; do
  IFS=: read -r variant params tensors <<< "$spec"
  for round in 1 2; do
    target/release/examples/throughput --backend cpu --dialect torch --variant "$variant" \
      --params "$params" --tensors "$tensors" --json
    "$PY" benches/gpu_report/torch_rmsprop.py --device cpu "$spec"
  done
done
