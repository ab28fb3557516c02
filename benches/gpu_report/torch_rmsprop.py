"""Times torch.optim.RMSprop(foreach=True) per step on one device, on the shapes of
examples/throughput.rs (N parameters in K near-equal 1-D tensors), and a device copy
of the same bytes in the same run.

    python3 torch_rmsprop.py [--device cuda] VARIANT:PARAMS:TENSORS ...

VARIANT is plain, momentum, centered or centered-momentum, optionally +clip
(clip_grad_norm_ to 1.0, foreach). Prints one JSON object per spec. Keras' epsilon sits
inside the square root and PyTorch's outside; the work per element is the same.
"""
import argparse
import json
import statistics
import time

import torch

BYTES_PER_PARAM = {"plain": 20, "momentum": 28, "centered": 28, "centered-momentum": 36}


def model(params, tensors, device):
    base, extra = divmod(params, tensors)
    sizes = [base + (1 if i < extra else 0) for i in range(tensors)]
    ps = [torch.nn.Parameter(torch.randn(n, device=device) * 0.01) for n in sizes]
    for p in ps:
        p.grad = torch.randn_like(p) * 0.003
    return ps


def timed(fn, reps, samples, sync):
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def run(spec, device, samples):
    variant, params, tensors = spec.split(":")
    params, tensors = int(params), int(tensors)
    base = variant.replace("+clip", "")
    clip = "+clip" in variant
    ps = model(params, tensors, device)
    opt = torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-7,
                              momentum=0.9 if "momentum" in base else 0.0,
                              centered=base.startswith("centered"), foreach=True)

    def step():
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
        opt.step()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bytes_per_step = (BYTES_PER_PARAM[base] + 4 * clip) * params
    reps = max(1, min(50, (1 << 30) // bytes_per_step))
    with torch.no_grad():
        step_s = timed(step, reps, samples, sync)
        half = max(1, bytes_per_step // 8)
        src = torch.ones(half, device=device)
        dst = torch.empty_like(src)
        copy_s = timed(lambda: dst.copy_(src), reps, samples, sync)
    del ps, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "impl": "torch", "torch": torch.__version__, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "variant": variant, "params": params, "tensors": tensors,
        "bytes_per_step": bytes_per_step, "step_seconds": step_s,
        "gbps": bytes_per_step / step_s / 1e9,
        "copy_gbps": bytes_per_step / copy_s / 1e9,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=9)
    ap.add_argument("specs", nargs="+")
    a = ap.parse_args()
    for spec in a.specs:
        print(json.dumps(run(spec, a.device, a.samples)), flush=True)
