"""Markdown table of benches/portability/before_after.sh's JSON lines (stdin)."""
import collections
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
by = collections.OrderedDict()
for r in rows:
    by.setdefault(r["case"], {}).setdefault(r["build"], []).append(r)
print("| case | before ms (a / b) | after ms (a / b) | after / before | before ratio | after ratio | dispatches |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for case, d in by.items():
    old = [x["step_seconds"] * 1e3 for x in d["old"]]
    new = [x["step_seconds"] * 1e3 for x in d["new"]]
    name = (case.replace("--backend ", "").replace("--params 4194304 ", "4M ")
            .replace("--params 16777216 ", "16M ").replace("--samples 5 ", "")
            .replace("--samples 7 ", "").replace("--variant ", ""))

    def ratio(xs):
        key = "shader_ratio" if xs[0].get("shader_ratio") is not None else "ratio"
        return " / ".join("%.2f" % x[key] for x in xs)

    disp = "%s / %s" % (d["old"][0].get("dispatches_per_step"), d["new"][0].get("dispatches_per_step"))
    print(f"| {name} | {old[0]:.1f} / {old[1]:.1f} | {new[0]:.1f} / {new[1]:.1f} | "
          f"{sum(new) / sum(old):.2f} | {ratio(d['old'])} | {ratio(d['new'])} | {disp} |")
