#!/usr/bin/env python3
"""The Markdown table of before_after.sh's JSON lines:

    python3 benches/param_groups/table.py benches/param_groups/before_after_2026-11-30.jsonl

Every number is the median of the runs of a row (each run itself a median of samples).
"""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.startswith("{")]
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        key = (r["backend"], r["variant"], r["params"], r["tensors"])
        by[key][r["build"]].append((r["gbps"], r["ratio"]))
    print("| backend | variant | params | tensors | before: GB/s (ratio to copy) "
          "| after, no groups | after, 4 groups | no groups / before | 4 groups / before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (backend, variant, params, tensors), b in sorted(by.items()):
        med = {k: (statistics.median(g for g, _ in v), statistics.median(r for _, r in v))
               for k, v in b.items()}
        (old, old_r), (new, new_r), (grp, grp_r) = med["OLD"], med["NEW"], med["GROUPS"]
        print(f"| {backend} | {variant} | {params:,} | {tensors:,} | {old:.2f} ({old_r:.2f}) "
              f"| {new:.2f} ({new_r:.2f}) | {grp:.2f} ({grp_r:.2f}) | {new / old:.2f} "
              f"| {grp / old:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
