"""The real-GPU report: runs the prebuilt `throughput` and `train_mlp` binaries and
torch.optim.RMSprop(foreach=True) on the same GPU in the same run, and writes
report.json and report.md.

    python3 run.py --bin DIR --out DIR [--dry-run] [--sizes N ...] [--no-torch]

Needs Vulkan and Python (PyTorch with CUDA for the side-by-side timing; without it the
torch columns say "not run"); no Rust toolchain (build the binaries elsewhere with
benches/gpu_report/build.sh). The grid: every variant (4 bases, with and without
global_clipnorm and EMA), the non-finite guard off and on, at each size with one tensor
and at 16M parameters in 10,000 tensors; each row carries its same-run copy ratios
(`copy_buffer_to_buffer` and a minimal WGSL copy), dispatches and submissions per step
and the host's recording time. Compact optimizer state (`--state-dtype bf16|int8`,
issue 15) at each size for the variants in STATE_ROWS. Then the end-to-end step
latency at 1M parameters, `train_mlp` on the GPU (f32 and int8 state), and the
targets of issue 13 marked met or missed.

`--dry-run` runs the same path on small sizes and accepts a software adapter (CI runs
it on lavapipe); it fails on any error, where a real run records errors in the report.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BASES = ["plain", "momentum", "centered", "centered-momentum"]
VARIANTS = [b + m for b in BASES for m in ["", "+clip", "+ema", "+clip+ema"]]
# the dry run covers every stage with four variants
DRY_VARIANTS = ["plain", "momentum+clip", "centered+ema", "centered-momentum+clip+ema"]
# compact state (issue 15): (variant, state dtype), one tensor per size
STATE_ROWS = [("plain", "int8"), ("centered-momentum", "bf16"), ("centered-momentum", "int8")]
HERE = Path(__file__).resolve().parent


def run_json(cmd, timeout, env=None):
    """Runs cmd, returns (list of JSON lines, error or None)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout} s: {' '.join(map(str, cmd))}"
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0:
        return lines, f"exit {p.returncode}: {p.stderr.strip()[-400:]}"
    return lines, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="folder with throughput and train_mlp")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--variants", nargs="*")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    dry = a.dry_run
    sizes = a.sizes or ([1 << 16] if dry else [1 << 20, 16 << 20, 64 << 20, 256 << 20])
    many = (sizes[0], 1000) if dry else (16 << 20, 10_000)
    samples = a.samples or (3 if dry else 11)
    variants = a.variants or (DRY_VARIANTS if dry else VARIANTS)
    env = dict(os.environ)
    if dry:
        env["FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER"] = "1"
    a.out.mkdir(parents=True, exist_ok=True)
    errors = []
    started = time.time()

    rows = []
    shapes = [(n, 1) for n in sizes] + [many]
    for params, tensors in shapes:
        for variant in variants:
            for guard in [False, True]:
                cmd = [a.bin / "throughput", "--backend", "gpu", "--variant", variant,
                       "--params", str(params), "--tensors", str(tensors),
                       "--samples", str(samples), "--json"] + (["--guard"] if guard else [])
                out, err = run_json(cmd, 600, env)
                if err:
                    errors.append(err)
                    rows.append({"variant": variant, "params": params, "tensors": tensors,
                                 "guard": guard, "error": err})
                else:
                    rows.append(out[-1])
                print(json.dumps(rows[-1]), flush=True)
    for params in sizes:
        for variant, state in STATE_ROWS:
            cmd = [a.bin / "throughput", "--backend", "gpu", "--variant", variant,
                   "--params", str(params), "--samples", str(samples), "--json",
                   "--state-dtype", state]
            out, err = run_json(cmd, 600, env)
            if err:
                errors.append(err)
                rows.append({"variant": variant, "params": params, "tensors": 1, "guard": False,
                             "state_dtype": state, "error": err})
            else:
                rows.append(out[-1])
            print(json.dumps(rows[-1]), flush=True)
    adapter = next((r["adapter"] for r in rows if "adapter" in r), None)
    if not dry and adapter and "llvmpipe" in adapter.lower():
        errors.append(f"{adapter} is a software adapter: this is not a real-GPU report")

    latency_row = next((r for r in rows if r.get("variant") == "plain" and r.get("tensors") == 1
                        and r.get("params") == sizes[0] and "latency_seconds" in r), None)
    mlp_cmd = [a.bin / "train_mlp", "--backend", "gpu", "--json"]
    if dry:
        mlp_cmd += ["--steps", "50", "--batch", "32"]
    mlp, err = run_json(mlp_cmd, 600, env)
    if err:
        errors.append(err)
    mlp = mlp[-1] if mlp else {"error": err}
    mlp_int8, err = run_json(mlp_cmd + ["--state-dtype", "int8"], 600, env)
    if err:
        errors.append(err)
    mlp_int8 = mlp_int8[-1] if mlp_int8 else {"error": err}

    torch_rows, torch_note = [], None
    if a.no_torch:
        torch_note = "not run (--no-torch)"
    else:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            torch_note = "not run (PyTorch is not installed)"
        elif probe.stdout.strip() != "True" and not dry:
            torch_note = "not run (PyTorch sees no CUDA device)"
        else:
            device = "cuda" if probe.stdout.strip() == "True" else "cpu"
            bases = sorted({v.replace("+ema", "") for v in variants})
            specs = [f"{b}:{p}:{t}" for p, t in shapes for b in bases]
            torch_rows, err = run_json([sys.executable, HERE / "torch_rmsprop.py", "--device", device,
                                        "--samples", str(samples)] + specs, 1800)
            if err:
                errors.append(f"torch: {err}")

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry,
        "host": platform.node(),
        "adapter": adapter,
        "seconds": round(time.time() - started, 1),
        "throughput": rows,
        "latency_1m_seconds": latency_row and latency_row["latency_seconds"],
        "latency_params": latency_row and latency_row["params"],
        "train_mlp": mlp,
        "train_mlp_int8_state": mlp_int8,
        "torch": torch_rows,
        "torch_note": torch_note,
        "errors": errors,
    }
    report["targets"] = targets(rows, torch_rows, report["latency_1m_seconds"], sizes)
    (a.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (a.out / "report.md").write_text(markdown(report))
    print(f"wrote {a.out / 'report.json'} and {a.out / 'report.md'}", flush=True)
    if errors:
        print("errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        if dry:
            sys.exit(1)


def compact(r):
    return r.get("state_dtype", "f32") != "f32"


def torch_match(torch_rows, r):
    base = r["variant"].replace("+ema", "")
    if "+ema" in r["variant"] or r.get("guard") or compact(r):
        return None
    return next((t for t in torch_rows if t["variant"] == base and t["params"] == r["params"]
                 and t["tensors"] == r["tensors"]), None)


def targets(rows, torch_rows, latency, sizes):
    ok = [r for r in rows if "error" not in r]
    big = [r for r in ok if r["params"] >= (16 << 20) and r["tensors"] == 1 and not r["guard"]
           and not compact(r)]
    out = {"copy_ratio_at_16m_plus_min": min((r["ratio"] for r in big), default=None)}
    vs_big, vs_many = [], []
    for r in ok:
        t = torch_match(torch_rows, r)
        if t:
            (vs_many if r["tensors"] > 1 else vs_big if r["params"] >= (16 << 20) else []).append(
                t["step_seconds"] / r["step_seconds"])
    out["speedup_vs_torch_large_min"] = min(vs_big, default=None)
    out["speedup_vs_torch_many_tensors_min"] = min(vs_many, default=None)
    out["latency_1m_us"] = latency and latency * 1e6
    goals = {"copy_ratio_at_16m_plus_min": (0.9, ">="), "speedup_vs_torch_large_min": (2.2, ">="),
             "speedup_vs_torch_many_tensors_min": (10.0, ">="), "latency_1m_us": (100.0, "<")}
    out["met"] = {k: (None if out[k] is None else (out[k] >= g if op == ">=" else out[k] < g))
                  for k, (g, op) in goals.items()}
    return out


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(rep):
    lines = [f"# GPU report ({'dry run, ' if rep['dry_run'] else ''}{rep['date']})", "",
             f"Adapter: {rep['adapter']}. Host: {rep['host']}. Took {rep['seconds']} s.", "",
             "| variant | state | guard | params | tensors | step ms | GB/s | copy ratio | shader ratio | "
             "dispatches | host us | vs torch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["throughput"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r.get('state_dtype', 'f32')} | {r['guard']} | {r['params']} | "
                         f"{r['tensors']} | error: {r['error'][:60]} | | | | | | |")
            continue
        t = torch_match(rep["torch"], r)
        lines.append(
            f"| {r['variant'].replace('+guard', '')} | {r.get('state_dtype', 'f32')} | "
            f"{'on' if r['guard'] else 'off'} | {r['params']:,} | "
            f"{r['tensors']:,} | {r['step_seconds'] * 1e3:.3f} | {r['gbps']:.1f} | {r['ratio']:.2f} | "
            f"{fmt(r.get('shader_ratio'))} | {r.get('dispatches_per_step', '-')} | "
            f"{fmt(r.get('host_seconds_per_step') and r['host_seconds_per_step'] * 1e6, '.0f')} | "
            f"{fmt(t and t['step_seconds'] / r['step_seconds'])} |")
    m = rep["train_mlp"]
    tg = rep["targets"]
    lines += ["", f"End-to-end step latency at {rep['latency_params']} parameters: "
              f"{fmt(tg['latency_1m_us'], '.1f')} us.", "",
              f"train_mlp: {m.get('params')} parameters, loss {fmt(m.get('first_loss'), '.4f')} -> "
              f"{fmt(m.get('final_loss'), '.5f')} in {m.get('steps')} steps, "
              f"{fmt(m.get('steps_per_second'), '.1f')} steps/s, {m.get('dispatches_per_step')} dispatches "
              f"in {m.get('submissions_per_step')} submission per step.", "",
              f"train_mlp with int8 state: loss {fmt(rep['train_mlp_int8_state'].get('final_loss'), '.5f')} "
              f"at the end, {rep['train_mlp_int8_state'].get('state_bytes')} state bytes "
              f"(f32 state: {m.get('state_bytes')}).", ""]
    if rep["torch"]:
        lines += [f"torch.optim.RMSprop(foreach=True), {rep['torch'][0]['torch']} on "
                  f"{rep['torch'][0]['device_name']}, same run:", "",
                  "| variant | params | tensors | step ms | GB/s | copy ratio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for t in rep["torch"]:
            lines.append(f"| {t['variant']} | {t['params']:,} | {t['tensors']:,} | "
                         f"{t['step_seconds'] * 1e3:.3f} | {t['gbps']:.1f} | {t['gbps'] / t['copy_gbps']:.2f} |")
    else:
        lines.append(f"torch.optim.RMSprop: {rep['torch_note']}.")
    lines += ["", "| target (H100 class) | measured | met |", "| --- | ---: | --- |"]
    names = {"copy_ratio_at_16m_plus_min": ">= 0.9 of device copy at >= 16M (worst variant)",
             "speedup_vs_torch_large_min": ">= 2.2x torch foreach, large tensors (worst)",
             "speedup_vs_torch_many_tensors_min": ">= 10x torch foreach, 10,000 tensors (worst)",
             "latency_1m_us": "1M-parameter step < 100 us"}
    for k, name in names.items():
        lines.append(f"| {name} | {fmt(tg[k])} | {tg['met'][k]} |")
    if rep["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in rep["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
