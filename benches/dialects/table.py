#!/usr/bin/env python3
"""Markdown tables from the JSON lines of torch_cpu.sh and before_after.sh.

    python3 benches/dialects/table.py torch benches/dialects/torch_cpu_2026-11-30.jsonl
    python3 benches/dialects/table.py before-after benches/dialects/before_after_2026-11-30.jsonl

Every number is the median of the runs of a row (each run itself a median of samples).
"""
import json
import statistics
import sys
from collections import defaultdict


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def torch_table(runs):
    by = defaultdict(lambda: {"ours": [], "torch": []})
    for r in runs:
        key = (r["variant"], r["params"], r["tensors"])
        by[key]["torch" if r.get("impl") == "torch" else "ours"].append(r["step_seconds"])
    print("| variant | params | tensors | torch foreach (ms) | torch dialect here (ms) | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (variant, params, tensors), t in sorted(by.items()):
        ours, theirs = statistics.median(t["ours"]), statistics.median(t["torch"])
        print(f"| {variant} | {params:,} | {tensors:,} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} "
              f"| {theirs / ours:.1f}x |")


def before_after_table(runs):
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        key = (r["backend"], r["variant"], r["params"], r["tensors"])
        by[key][r["build"]].append((r["gbps"], r.get("ratio")))
    print("| backend | variant | params | tensors | before GB/s (ratio to copy) "
          "| after GB/s (ratio to copy) | after / before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (backend, variant, params, tensors), b in sorted(by.items()):
        old = statistics.median(g for g, _ in b["OLD"])
        new = statistics.median(g for g, _ in b["NEW"])
        old_r = statistics.median(r for _, r in b["OLD"])
        new_r = statistics.median(r for _, r in b["NEW"])
        print(f"| {backend} | {variant} | {params:,} | {tensors:,} | {old:.2f} ({old_r:.2f}) "
              f"| {new:.2f} ({new_r:.2f}) | {new / old:.2f} |")


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    {"torch": torch_table, "before-after": before_after_table}[kind](rows(path))
