#!/usr/bin/env bash
# Same-run, interleaved before/after table of the throughput example: two binaries
# (OLD and NEW, built from two commits), each case run old, new, old, new.
#   benches/portability/before_after.sh OLD_BIN NEW_BIN > rows.jsonl
# Prints one JSON line per run with "build": "old" | "new" added.
set -euo pipefail
old=$1
new=$2
gpu4m="--backend gpu --params 4194304 --samples 5"
cases=(
  "$gpu4m --variant plain"
  "$gpu4m --variant plain+clip"
  "$gpu4m --variant momentum"
  "$gpu4m --variant centered-momentum"
  "$gpu4m --variant centered-momentum+clip+ema"
  "$gpu4m --variant plain --guard"
  "$gpu4m --variant centered-momentum+clip+ema --guard"
  "$gpu4m --variant plain --gradient-dtype bf16"
  "$gpu4m --variant plain --param-dtype bf16"
  "$gpu4m --variant plain --param-dtype bf16 --stochastic-rounding"
  "$gpu4m --variant plain --param-copy bf16"
  "$gpu4m --variant plain --param-remainders"
  "$gpu4m --variant centered-momentum --state-dtype bf16"
  "$gpu4m --variant plain --state-dtype int8"
  "$gpu4m --variant centered-momentum --state-dtype int8"
  "--backend gpu --params 4194304 --tensors 1000 --samples 5 --variant plain"
  "--backend cpu --params 16777216 --samples 7 --variant plain"
  "--backend cpu --params 16777216 --samples 7 --variant centered-momentum"
)
for c in "${cases[@]}"; do
  for round in 1 2; do
    for build in old new; do
      bin=$old
      [ "$build" = new ] && bin=$new
      # shellcheck disable=SC2086
      line=$($bin $c --json 2>/dev/null | tail -1)
      echo "${line%\}},\"build\":\"$build\",\"round\":$round,\"case\":\"$c\"}"
    done
  done
done
