#!/usr/bin/env bash
# Builds the stripped binaries the real-GPU report runs (profile `dist`) and gathers
# them with the report scripts in one folder (default target/gpu-report) that fits
# 64 MiB, to copy to a machine with a GPU and no Rust toolchain:
#   bash benches/gpu_report/build.sh [OUT]
#   (there) python3 OUT/run.py --bin OUT --out OUT/results
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-target/gpu-report}"
cargo build --profile dist --example throughput --example train_mlp
mkdir -p "$out"
cp target/dist/examples/throughput target/dist/examples/train_mlp "$out/"
cp benches/gpu_report/run.py benches/gpu_report/torch_rmsprop.py "$out/"
bytes=$(du -cb "$out"/throughput "$out"/train_mlp | tail -1 | cut -f1)
echo "binaries: $bytes bytes in $out"
if [ "$bytes" -gt $((64 << 20)) ]; then
  echo "error: the binaries exceed 64 MiB" >&2
  exit 1
fi
