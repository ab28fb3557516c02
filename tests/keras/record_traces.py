#!/usr/bin/env python3
"""Records what keras.optimizers.RMSprop does, as the JSON traces in this folder.

Every trace is one run of Keras 3 (JAX backend, float32) on random starting values and
a fixed sequence of random gradients; FORMAT.md describes the files. The gradients are
data, not functions of the variables, so the Rust tests replay them without autodiff.

Regenerate the committed traces (byte for byte) from the repository root:

    python3 -m venv /tmp/keras-env
    /tmp/keras-env/bin/pip install "keras==3.15.1" "jax[cpu]==0.10.2" "numpy==2.4.6"
    /tmp/keras-env/bin/python tests/keras/record_traces.py --set public tests/keras/traces
    /tmp/keras-env/bin/python tests/keras/record_traces.py --set loss_scale tests/keras/loss_scale
    git diff --stat tests/keras    # nothing: the files are what Keras writes

(Checked on 2026-11-25 with those versions on x86-64 Linux: all 23 files identical.)

Each set runs in its own process: Keras names optimizers from a per-process counter
(`rm_sprop`, `rm_sprop_1`, ...), and the traces record those names. To add a case,
append a `Case` to a set (appending keeps the names of the existing ones).
"""
import argparse
import dataclasses
import json
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras.optimizers import schedules  # noqa: E402

# Two variables, a kernel and a bias, unless a case says otherwise.
KERNEL_AND_BIAS = ((3, 4), (4,))


@dataclasses.dataclass
class Case:
    """One recorded run."""

    name: str
    config: dict  # keras.optimizers.RMSprop arguments
    steps: int
    seed: int
    shapes: tuple = KERNEL_AND_BIAS
    description: str = ""
    grad_scale: float = 1.0  # gradients are standard normal times this
    missing: frozenset = frozenset()  # (step, variable) pairs with no gradient
    plant: object = None  # (step, variable, gradient) -> gradient, to plant special values
    start: list = None  # starting values instead of random ones (the RNG is still drawn)
    finalize: bool = False  # call finalize_variable_values after the last step
    exclude: list = None  # exclude_from_weight_decay(var_names=...)
    loss_scale_optimizer: dict = None  # wrap in keras.optimizers.LossScaleOptimizer(**this)


def encode(x):
    """A float32 as a JSON value: a number, or "NaN" / "Infinity" / "-Infinity"."""
    x = float(x)
    if np.isnan(x):
        return "NaN"
    if np.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def flat(a):
    return [encode(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


def variable_names(shapes):
    return [f"layer{i}/{'bias' if len(s) == 1 else 'kernel'}" for i, s in enumerate(shapes)]


def apply_step(optimizer, grads, variables, wrapped):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not wrapped:
            pairs = [(None if g is None else keras.ops.convert_to_tensor(g), v)
                     for g, v in zip(grads, variables)]
            optimizer.apply_gradients(pairs)
            return
        # LossScaleOptimizer: the stateless path, as Keras' JAX trainer takes it (its
        # eager `apply` cannot trace the stateful cond on this backend)
        new_vars, new_opt = optimizer.stateless_apply(
            [v.value for v in optimizer.variables],
            [keras.ops.convert_to_tensor(g) for g in grads],
            [v.value for v in variables])
        for v, x in zip(variables, new_vars):
            v.assign(x)
        for v, x in zip(optimizer.variables, new_opt):
            v.assign(x)


def record(case):
    """Runs Keras on the case and returns the trace as a dict (in the file's key order)."""
    rng = np.random.default_rng(case.seed)
    names = variable_names(case.shapes)
    start = [rng.normal(size=s).astype(np.float32) for s in case.shapes]
    if case.start is not None:
        start = [np.asarray(v, dtype=np.float32).reshape(s) for v, s in zip(case.start, case.shapes)]
    variables = [keras.Variable(v, name=n.split("/")[1]) for v, n in zip(start, names)]
    rmsprop = optimizer = keras.optimizers.RMSprop(**case.config)
    if case.exclude:
        rmsprop.exclude_from_weight_decay(var_names=case.exclude)
    wrapped = case.loss_scale_optimizer is not None
    if wrapped:
        optimizer = keras.optimizers.LossScaleOptimizer(rmsprop, **case.loss_scale_optimizer)
    optimizer.build(variables)

    steps = []
    for t in range(case.steps):
        grads = []
        for i, shape in enumerate(case.shapes):
            if (t, i) in case.missing:
                grads.append(None)
                continue
            g = (rng.normal(size=shape) * case.grad_scale).astype(np.float32)
            if case.plant is not None:
                g = case.plant(t, i, g).astype(np.float32)
            grads.append(g)
        steps.append([None if g is None else flat(g) for g in grads])
        apply_step(optimizer, grads, variables, wrapped)
    if case.finalize:
        optimizer.finalize_variable_values(variables)

    trace = {
        "format": "rmsprop-trace/1",
        "name": case.name,
        "description": case.description,
        "reference": f"keras {keras.__version__}, backend {keras.backend.backend()}, float32",
        "config": rmsprop.get_config(),
        "variables": [{"name": n, "shape": list(s), "value": flat(v)}
                      for n, s, v in zip(names, case.shapes, start)],
        "steps": steps,
        "finalize": case.finalize,
        "expected": {
            "variables": [flat(np.asarray(v)) for v in variables],
            "iterations": int(np.asarray(optimizer.iterations)),
        },
    }
    if case.exclude:
        trace["exclude_from_weight_decay"] = {"var_names": list(case.exclude)}
    if wrapped:
        lso = optimizer.get_config()
        trace["loss_scale_optimizer"] = {k: lso[k] for k in ("initial_scale", "dynamic_growth_steps")}
        trace["expected"]["loss_scale"] = encode(np.asarray(optimizer.dynamic_scale))
    return trace


def fp16_overflows(t, i, g):
    """Non-finite scaled gradients on a few steps, as an fp16 overflow makes them."""
    if (t, i) in ((1, 0), (4, 1), (5, 0)):
        g = g.copy()
        g.reshape(-1)[0] = np.nan if t == 4 else np.inf
    return g


def public_set():
    """One case per Keras option: the conformance traces (tests/conformance.rs)."""
    return [
        Case("doc_example", {"learning_rate": 0.1}, steps=1, seed=0, shapes=((),),
             plant=lambda t, i, g: np.array(10.0), start=[10.0],
             description="The documented example: one step of lr=0.1 on var=10 with grad=var; Keras gives 9.683772."),
        Case("defaults", {}, steps=5, seed=1, description="All defaults."),
        Case("momentum", {"learning_rate": 0.01, "momentum": 0.9}, steps=6, seed=2),
        Case("centered", {"learning_rate": 0.01, "centered": True}, steps=6, seed=3),
        Case("centered_momentum", {"learning_rate": 0.01, "centered": True, "momentum": 0.5, "rho": 0.8},
             steps=6, seed=4),
        Case("clipnorm", {"learning_rate": 0.05, "clipnorm": 0.5}, steps=5, seed=5, grad_scale=3.0),
        Case("clipvalue", {"learning_rate": 0.05, "clipvalue": 0.2}, steps=5, seed=6),
        Case("global_clipnorm", {"learning_rate": 0.05, "global_clipnorm": 1.0}, steps=5, seed=7,
             grad_scale=2.0),
        Case("weight_decay", {"learning_rate": 0.05, "weight_decay": 0.1}, steps=5, seed=8),
        Case("ema_overwrite", {"learning_rate": 0.05, "use_ema": True, "ema_momentum": 0.9,
                               "ema_overwrite_frequency": 3}, steps=7, seed=9),
        Case("ema_finalize", {"learning_rate": 0.05, "use_ema": True, "ema_momentum": 0.8},
             steps=5, seed=10, finalize=True),
        Case("exponential_decay",
             {"learning_rate": schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)},
             steps=6, seed=11),
        Case("piecewise_constant",
             {"learning_rate": schedules.PiecewiseConstantDecay([2, 4], [0.1, 0.05, 0.01])},
             steps=6, seed=12),
        Case("polynomial_decay",
             {"learning_rate": schedules.PolynomialDecay(0.1, decay_steps=4, end_learning_rate=0.01,
                                                         power=2.0)},
             steps=6, seed=13),
        Case("inverse_time_decay",
             {"learning_rate": schedules.InverseTimeDecay(0.1, decay_steps=2, decay_rate=0.5)},
             steps=6, seed=14),
        Case("cosine_decay_warmup",
             {"learning_rate": schedules.CosineDecay(0.01, decay_steps=4, alpha=0.1, warmup_target=0.1,
                                                     warmup_steps=2)},
             steps=8, seed=15),
        Case("cosine_decay_restarts",
             {"learning_rate": schedules.CosineDecayRestarts(0.1, first_decay_steps=2, t_mul=2.0,
                                                             m_mul=0.5, alpha=0.1)},
             steps=8, seed=16),
        Case("loss_scale", {"learning_rate": 0.05, "loss_scale_factor": 128.0}, steps=4, seed=17,
             grad_scale=128.0),
        Case("grad_accumulation", {"learning_rate": 0.05, "gradient_accumulation_steps": 3},
             steps=7, seed=18),
        Case("missing_gradient", {"learning_rate": 0.05, "momentum": 0.5}, steps=4, seed=19,
             missing=frozenset({(1, 0), (2, 1)}),
             description="Some steps have no gradient (null) for one variable: that variable and its slots are left as they are for that step."),
        Case("exclude_bias_from_decay", {"learning_rate": 0.05, "weight_decay": 0.2}, steps=4, seed=20,
             exclude=["bias"]),
    ]


def loss_scale_set():
    """RMSprop inside keras.optimizers.LossScaleOptimizer (dynamic loss scaling)."""
    return [
        Case("lso_basic", {"learning_rate": 0.05}, steps=8, seed=30, grad_scale=2.0 ** 10,
             plant=fp16_overflows,
             loss_scale_optimizer={"initial_scale": 2.0 ** 10, "dynamic_growth_steps": 3},
             description="Dynamic loss scaling: a non-finite step is skipped and halves the scale; 3 finite steps in a row double it."),
        Case("lso_momentum_clip", {"learning_rate": 0.02, "momentum": 0.9, "global_clipnorm": 1.0},
             steps=9, seed=31, grad_scale=2.0 ** 8, plant=fp16_overflows,
             loss_scale_optimizer={"initial_scale": 2.0 ** 8, "dynamic_growth_steps": 2}),
    ]


SETS = {"public": public_set, "loss_scale": loss_scale_set}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write NAME.json files into")
    parser.add_argument("--set", choices=sorted(SETS), default="public")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for case in SETS[args.set]():
        path = os.path.join(args.out_dir, case.name + ".json")
        with open(path, "w") as f:
            json.dump(record(case), f, allow_nan=False)
        print(path)


if __name__ == "__main__":
    main()
