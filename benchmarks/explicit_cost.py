"""The explicit train step's cost against the implicit one: the gradient of `nrnn_jax.step.loss_fn` (what
the train step differentiates) in each mode, on one device, with XLA's temporary memory of the compiled
gradient and its median time, the variants taking turns in one process, ratios against the implicit step.

    PYTHONPATH=src python -m benchmarks.explicit_cost --shape paper --clock cpu
    PYTHONPATH=src python -m benchmarks.explicit_cost --shape ecg --clock cpu --repeats 21

Variants: `deterministic` (no noise), `implicit` (noise injection), `probe` (explicit, the probe estimator,
one probe), `exact` (explicit, the exact covariance recursion). A variant whose compiled gradient needs more
than `--max-temp-gib` of temporary memory is reported and not run. `--clock cpu` times each call by this
process's CPU time (on a machine loaded by other work, what the call itself costs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.benchmark import SHAPES
from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig
from nrnn_jax.step import loss_fn

VARIANTS = {"deterministic": ("deterministic", "probe"), "implicit": ("implicit", "probe"),
            "probe": ("explicit", "probe"), "exact": ("explicit", "exact")}


def build(shape: dict, mode: str, reg_method: str):
    """The compiled gradient of the objective, its arguments and its XLA temporary memory in bytes."""
    cfg = NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                     dt=shape["dt"], eps_add=0.02, eps_mult=0.02, backend="scan")
    graphdef, params = nnx.split(NoisyRNN(cfg, rngs=nnx.Rngs(0)))
    tcfg = TrainConfig(mode=mode, reg_method=reg_method, num_probes=1)
    B, T = shape["batch"], shape["T"]
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, shape["input_dim"]))
    y = jnp.arange(B) % shape["num_classes"]
    mask = jnp.ones(B)
    key = jax.random.key(0, impl=tcfg.prng)
    objective = lambda p: loss_fn(graphdef, p, x, y, mask, key, tcfg)[0]
    compiled = jax.jit(jax.value_and_grad(objective)).lower(params).compile()
    return compiled, params, compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper")
    parser.add_argument("--variants", default="deterministic,implicit,probe,exact")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--max-temp-gib", type=float, default=4.0)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runners, memory = {}, {}
    for name in args.variants.split(","):
        compiled, params, temp = build(shape, *VARIANTS[name])
        memory[name] = temp
        if temp > args.max_temp_gib * 2**30:
            print(f"{name}: {temp / 2**30:.1f} GiB of temporary memory, over --max-temp-gib; not run")
            continue
        jax.block_until_ready(compiled(params))
        runners[name] = (compiled, params)
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, (compiled, params) in runners.items():
            t0 = clock()
            jax.block_until_ready(compiled(params))
            times[name].append(clock() - t0)
    ref_t = statistics.median(times["implicit"]) if "implicit" in times else None
    ref_m = memory.get("implicit")
    print(f"shape {args.shape}, {args.clock} time, median of {args.repeats}")
    print(f"{'variant':14s} {'time':>9s} {'/implicit':>9s} {'temp MiB':>9s} {'/implicit':>9s}")
    for name in memory:
        t = statistics.median(times[name]) if name in times else float("nan")
        rt = t / ref_t if ref_t else float("nan")
        rm = memory[name] / ref_m if ref_m else float("nan")
        print(f"{name:14s} {t:8.3f}s {rt:8.2f}x {memory[name] / 2**20:9.0f} {rm:8.2f}x")


if __name__ == "__main__":
    main()
