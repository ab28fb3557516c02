#!/usr/bin/env python3
"""Records what torch.optim.RMSprop and optax.rmsprop do, as `rmsprop-trace/1` JSON.

The same format as the Keras traces (tests/keras/FORMAT.md), with the dialect's own
config: `{"dialect": "torch"}` or `{"dialect": "optax"}` plus that library's
constructor keyword arguments under its own names, every one written (optax's
`momentum=None` is `null`; `weight_decay` for optax is `optax.add_decayed_weights`
chained before the rmsprop, with `exclude_from_weight_decay` as its mask) and
`param_groups`: `[{"variables": [names], <arguments that differ>}]` (PyTorch: one param
group per entry, the ungrouped tensors in a first group with the constructor's
arguments; optax: `optax.partition` of one rmsprop per group). Gradients
are data, so the Rust tests (tests/dialects.rs) replay them without autodiff.

Regenerate the committed traces (byte for byte) from the repository root:

    python3 -m venv /tmp/dialects-env
    /tmp/dialects-env/bin/pip install "torch==2.9.1" "jax[cpu]==0.10.2" "optax==0.2.8" "numpy==2.4.6"
    /tmp/dialects-env/bin/python tests/dialects/record_traces.py tests/dialects
    git diff --stat tests/dialects    # nothing: the files are what the libraries write

(PyPI's torch 2.9.1 wheel pulls CUDA libraries it needs to import; it runs on the CPU
here. Checked on 2026-11-30 on x86-64 Linux: every file identical.)
"""
import argparse
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

torch.set_num_threads(1)

KERNEL_AND_BIAS = ((3, 4), (4,))
FOUR = ((3, 4), (4,), (4, 2), (2,))
MANY = ((5, 3), (3,), (), (2, 2, 2), (7,), (1, 6), (4, 4), (2,), (3, 1), (9,), (6, 2), (1,))


@dataclasses.dataclass
class Case:
    """One recorded run."""

    name: str
    dialect: str  # "torch" or "optax"
    config: dict  # the constructor's keyword arguments that differ from its defaults
    steps: int
    seed: int
    shapes: tuple = KERNEL_AND_BIAS
    description: str = ""
    grad_scale: float = 1.0  # gradients are standard normal times this
    missing: frozenset = frozenset()  # (step, variable) pairs with no gradient
    plant: object = None  # (step, variable, gradient) -> gradient, to plant special values
    exclude: list = None  # optax: no weight decay on variables whose name contains these
    groups: list = None  # param groups: {"variables": [indices], keyword arguments that differ}


TORCH_DEFAULTS = {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                  "centered": False, "maximize": False}
OPTAX_DEFAULTS = {"learning_rate": None, "decay": 0.9, "eps": 1e-8, "initial_scale": 0.0,
                  "eps_in_sqrt": True, "centered": False, "momentum": None, "nesterov": False,
                  "bias_correction": False, "weight_decay": None}


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


def number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def full_config(case):
    """Every constructor argument, defaults filled in, in the signature's order, and the
    param groups (`variables` by name, then the arguments that differ)."""
    defaults = TORCH_DEFAULTS if case.dialect == "torch" else OPTAX_DEFAULTS
    unknown = set(case.config) - set(defaults)
    assert not unknown, unknown
    config = {"dialect": case.dialect}
    for k, d in defaults.items():
        config[k] = number(case.config.get(k, d))
    if case.groups:
        names = variable_names(case.shapes)
        config["param_groups"] = []
        for g in case.groups:
            assert not set(g) - set(defaults) - {"variables"}, g
            entry = {"variables": [names[i] for i in g["variables"]]}
            entry.update({k: number(v) for k, v in g.items() if k != "variables"})
            config["param_groups"].append(entry)
    return config


def group_indices(config, names):
    """Each param group's tensor indices and its own arguments (the config's, then the
    group's), the ungrouped tensors first with the config's."""
    base = {k: v for k, v in config.items() if k not in ("dialect", "param_groups")}
    groups = config.get("param_groups", [])
    grouped = {n for g in groups for n in g["variables"]}
    out = [([i for i, n in enumerate(names) if n not in grouped], base)]
    for g in groups:
        own = dict(base)
        own.update({k: v for k, v in g.items() if k != "variables"})
        out.append(([names.index(n) for n in g["variables"]], own))
    return [(idx, kw) for idx, kw in out if idx]


class TorchRun:
    def __init__(self, config, start, names, exclude):
        assert not exclude, "torch excludes through param groups"
        self.params = [torch.nn.Parameter(torch.tensor(v)) for v in start]
        groups = [dict(kw, params=[self.params[i] for i in idx])
                  for idx, kw in group_indices(config, names)]
        self.opt = torch.optim.RMSprop(groups, foreach=False)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else torch.tensor(g)
        self.opt.step()

    def values(self):
        return [p.detach().numpy() for p in self.params]


class OptaxRun:
    def __init__(self, config, start, names, exclude):
        def transform(kw):
            inner = optax.rmsprop(**{k: v for k, v in kw.items() if k != "weight_decay"})
            if kw["weight_decay"] is not None:
                mask = [not any(e in n for e in (exclude or [])) for n in names]
                inner = optax.chain(optax.add_decayed_weights(kw["weight_decay"], mask=mask), inner)
            return inner
        groups = group_indices(config, names)
        if len(groups) == 1:
            self.tx = transform(groups[0][1])
        else:
            # one rmsprop per group, each on its own tensors: optax.partition
            assert not exclude, "a mask inside a partition sees only its group"
            labels = [None] * len(names)
            for g, (idx, _) in enumerate(groups):
                for i in idx:
                    labels[i] = f"group{g}"
            self.tx = optax.partition({f"group{g}": transform(kw) for g, (_, kw) in enumerate(groups)},
                                      labels)
        self.params = [jnp.asarray(v) for v in start]
        self.state = self.tx.init(self.params)

    def step(self, grads):
        assert all(g is not None for g in grads), "optax has no missing gradients"
        grads = [jnp.asarray(g) for g in grads]
        updates, self.state = self.tx.update(grads, self.state, self.params)
        self.params = optax.apply_updates(self.params, updates)

    def values(self):
        return [np.asarray(p) for p in self.params]


def record(case):
    """Runs the library on the case and returns the trace as a dict."""
    rng = np.random.default_rng(case.seed)
    names = variable_names(case.shapes)
    start = [rng.normal(size=s).astype(np.float32) for s in case.shapes]
    config = full_config(case)
    run = (TorchRun if case.dialect == "torch" else OptaxRun)(config, start, names, case.exclude)
    steps = []
    for t in range(case.steps):
        grads = []
        for i, shape in enumerate(case.shapes):
            if (t, i) in case.missing:
                grads.append(None)
                continue
            g = (rng.normal(size=shape) * case.grad_scale).astype(np.float32)
            if case.plant is not None:
                g = np.asarray(case.plant(t, i, g), dtype=np.float32)
            grads.append(g)
        steps.append([None if g is None else flat(g) for g in grads])
        run.step(grads)
    reference = (f"torch {torch.__version__} (CPU, foreach=False), float32" if case.dialect == "torch"
                 else f"optax {optax.__version__}, jax {jax.__version__} (CPU), float32")
    if case.groups:
        reference += (", one param group per entry (the ungrouped tensors first)" if case.dialect == "torch"
                      else ", optax.partition of one rmsprop per group")
    trace = {
        "format": "rmsprop-trace/1",
        "name": case.name,
        "description": case.description,
        "reference": reference,
        "config": config,
        "variables": [{"name": n, "shape": list(s), "value": flat(v)}
                      for n, s, v in zip(names, case.shapes, start)],
        "steps": steps,
        "finalize": False,
        "expected": {
            "variables": [flat(v) for v in run.values()],
            "iterations": case.steps,
        },
    }
    if case.exclude:
        trace["exclude_from_weight_decay"] = {"var_names": list(case.exclude)}
    return trace


def non_finite(t, i, g):
    """A NaN and an infinity on a few steps: both libraries let them through."""
    if (t, i) in ((1, 0), (3, 1)):
        g = g.copy()
        g.reshape(-1)[0] = np.nan if t == 1 else np.inf
    return g


def torch_set():
    t = "torch"
    return [
        Case("torch_defaults", t, {}, steps=5, seed=100, description="torch.optim.RMSprop's defaults."),
        Case("torch_momentum", t, {"momentum": 0.9}, steps=6, seed=101),
        Case("torch_centered", t, {"centered": True}, steps=6, seed=102),
        Case("torch_centered_momentum", t, {"centered": True, "momentum": 0.5, "alpha": 0.8}, steps=6,
             seed=103),
        Case("torch_weight_decay", t, {"weight_decay": 0.1, "lr": 0.05}, steps=5, seed=104,
             description="L2 weight decay: added to the gradient."),
        Case("torch_maximize", t, {"maximize": True, "momentum": 0.5}, steps=5, seed=105),
        Case("torch_everything", t, {"lr": 0.02, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.05,
                                     "momentum": 0.7, "centered": True, "maximize": True},
             steps=7, seed=106, description="Every argument away from its default."),
        Case("torch_tiny_velocity", t, {"lr": 0.001}, steps=6, seed=107, grad_scale=1e-7,
             description="Gradients near 1e-7: epsilon outside the root dominates the step."),
        Case("torch_tiny_velocity_centered", t, {"lr": 0.001, "centered": True, "momentum": 0.9},
             steps=6, seed=108, grad_scale=1e-6),
        Case("torch_non_finite", t, {"momentum": 0.9}, steps=5, seed=109, plant=non_finite,
             description="A NaN and an infinity reach the parameters, as PyTorch lets them."),
        Case("torch_many_tensors", t, {"lr": 0.005, "momentum": 0.5, "weight_decay": 0.01},
             steps=5, seed=110, shapes=MANY, description="Twelve tensors, a scalar among them."),
        Case("torch_missing_gradients", t, {"momentum": 0.9, "centered": True}, steps=6, seed=111,
             missing=frozenset({(1, 0), (2, 1), (4, 0)}),
             description="A parameter whose .grad is None is not stepped."),
        Case("torch_large_gradients", t, {"lr": 0.1, "alpha": 0.5}, steps=5, seed=112, grad_scale=1e3),
        Case("torch_param_groups", t, {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01}, steps=6,
             seed=113, shapes=FOUR,
             groups=[{"variables": [1, 3], "lr": 0.05, "weight_decay": 0.0},
                     {"variables": [2], "alpha": 0.8, "eps": 1e-4, "momentum": 0.5}],
             description="Param groups: the biases with their own lr and no decay, one kernel "
             "with its own alpha, eps and momentum."),
        Case("torch_param_groups_centered", t, {"centered": True, "maximize": True, "alpha": 0.9},
             steps=6, seed=114, shapes=FOUR, missing=frozenset({(2, 0), (3, 2)}),
             groups=[{"variables": [0], "lr": 0.001, "eps": 1e-3},
                     {"variables": [1, 2], "alpha": 0.5, "weight_decay": 0.1}],
             description="Param groups with centered, maximize and missing gradients."),
    ]


def optax_set():
    o = "optax"
    return [
        Case("optax_defaults", o, {"learning_rate": 0.01}, steps=5, seed=200,
             description="optax.rmsprop's defaults (eps inside the root)."),
        Case("optax_eps_outside", o, {"learning_rate": 0.01, "eps_in_sqrt": False}, steps=5, seed=201),
        Case("optax_centered", o, {"learning_rate": 0.01, "centered": True}, steps=6, seed=202),
        Case("optax_momentum", o, {"learning_rate": 0.01, "momentum": 0.9}, steps=6, seed=203),
        Case("optax_nesterov", o, {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True}, steps=6,
             seed=204),
        Case("optax_bias_correction", o, {"learning_rate": 0.01, "bias_correction": True}, steps=6,
             seed=205),
        Case("optax_bias_correction_centered", o, {"learning_rate": 0.01, "bias_correction": True,
                                                   "centered": True, "decay": 0.8}, steps=6, seed=206),
        Case("optax_initial_scale", o, {"learning_rate": 0.01, "initial_scale": 1.0}, steps=5, seed=207,
             description="The velocity starts at 1 (TF1's choice)."),
        Case("optax_everything", o, {"learning_rate": 0.02, "decay": 0.85, "eps": 1e-6,
                                     "initial_scale": 0.5, "eps_in_sqrt": False, "centered": True,
                                     "momentum": 0.7, "nesterov": True, "bias_correction": True},
             steps=7, seed=208, description="Every argument away from its default."),
        Case("optax_tiny_velocity", o, {"learning_rate": 0.001, "eps_in_sqrt": False}, steps=6,
             seed=209, grad_scale=1e-7),
        Case("optax_tiny_velocity_in_sqrt", o, {"learning_rate": 0.001}, steps=6, seed=210,
             grad_scale=1e-7, description="Gradients near 1e-7: epsilon inside the root dominates."),
        Case("optax_non_finite", o, {"learning_rate": 0.01, "momentum": 0.9}, steps=5, seed=211,
             plant=non_finite),
        Case("optax_many_tensors", o, {"learning_rate": 0.005, "momentum": 0.5, "centered": True},
             steps=5, seed=212, shapes=MANY),
        Case("optax_weight_decay", o, {"learning_rate": 0.05, "weight_decay": 0.1}, steps=5, seed=213,
             exclude=["bias"], description="optax.chain(add_decayed_weights(0.1, mask), rmsprop): "
             "no decay on the bias."),
        Case("optax_large_gradients", o, {"learning_rate": 0.1, "decay": 0.5, "bias_correction": True},
             steps=5, seed=214, grad_scale=1e3),
        Case("optax_param_groups", o, {"learning_rate": 0.01, "momentum": 0.9, "bias_correction": True},
             steps=6, seed=215, shapes=FOUR,
             groups=[{"variables": [1, 3], "learning_rate": 0.05, "decay": 0.7},
                     {"variables": [2], "eps": 1e-3, "momentum": 0.5, "weight_decay": 0.1}],
             description="optax.partition of three rmsprops: the biases with their own learning "
             "rate and decay (their own bias correction), one kernel with its own eps, momentum "
             "and add_decayed_weights."),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder that gets torch/ and optax/")
    args = parser.parse_args()
    for folder, cases in (("torch", torch_set()), ("optax", optax_set())):
        path = os.path.join(args.out, folder)
        os.makedirs(path, exist_ok=True)
        for case in cases:
            trace = record(case)
            with open(os.path.join(path, case.name + ".json"), "w") as f:
                json.dump(trace, f, indent=1)
                f.write("\n")
            print(f"{folder}/{case.name}.json")


if __name__ == "__main__":
    main()
