"""Explicit regularizer per cell: cost (ms per batch, value and parameter gradient, as explicit training needs
them) of each method, next to the noisy loss that implicit training differentiates, and agreement with
antithetic Monte Carlo at small and large noise.

    python -m benchmarks.cell_costs                   # B 32, T 140, hidden 32 (ECG5000-like), 5 repeats
    python -m benchmarks.cell_costs --batch 16 --hidden 16 --T 64 --methods implicit,exact,probe

(from the repository root, with the package installed or `PYTHONPATH=src`)

Cost: median of `--repeats` calls after compilation, cells and methods taking turns, in wall time or
(`--clock cpu`) in this process's CPU time. The methods: `implicit`,
the cross-entropy of one noisy forward pass (noise injection, no regularizer); `exact`, `probe` (one probe)
and `continuous`, the value of `explicit_regularizer` with that method. Monte Carlo: 20,000
antithetic pairs in float64 on a small problem (batch 4, T 8, hidden 4); ratio = mean(MC) / exact with its
standard error, at ε_add = ε_mult = 0.05 (agreement expected) and 2.0 (the expansion's bias visible).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nrnn_jax as nj
from benchmarks.benchmark import time_interleaved  # the cells and methods take turns


class GatedLeakyCell(nj.Cell):
    """The user cell of notebooks/04: dh/dt = −softplus(a) ⊙ h + s(G z) ⊙ tanh(W h + z)."""

    def __init__(self, cfg, *, rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) / d**0.5)
        self.G = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) / d**0.5)
        self.a = nnx.Param(jnp.zeros(d, dtype))

    def drift(self, h, z):
        return -jax.nn.softplus(self.a[...]) * h + jax.nn.sigmoid(self.G[...] @ z) * jnp.tanh(self.W[...] @ h + z)


CELLS = ("lipschitz", "antisymmetric", "tanh", "gru", "lstm", "user")
METHODS = ("implicit", "exact", "probe", "continuous")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_model(name: str, cfg: nj.NRNNConfig) -> nj.NoisyRNN:
    if name == "user":
        rngs = nnx.Rngs(0)
        return nj.NoisyRNN(cfg, rngs=rngs, cell=GatedLeakyCell(cfg, rngs=rngs))
    return nj.NoisyRNN(cfg.replace(cell=name), rngs=nnx.Rngs(0))


def cost_runner(name: str, method: str, args):
    cfg = nj.NRNNConfig(input_dim=1, hidden=args.hidden, num_classes=2, dt=0.1, eps_add=0.3, eps_mult=0.3,
                        backend="scan")
    model = make_model(name, cfg)
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.T, 1))
    y = jnp.arange(args.batch) % 2

    @jax.jit
    def value_and_grad(params, key):
        def value(params):
            m = nnx.merge(graphdef, params)
            if method == "implicit":
                return optax.softmax_cross_entropy_with_integer_labels(m(x, key=key), y).mean()
            return nj.explicit_regularizer(m, x, y, method=method, num_probes=1, key=key).value
        return jax.value_and_grad(value)(params)

    key = jax.random.PRNGKey(1)
    print(f"compiling {name} {method}", file=sys.stderr, flush=True)
    compiled = value_and_grad.lower(params, key).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if temp > args.max_temp_gib * 2**30:  # not run: XLA would ask for more memory than the limit
        return None, temp
    jax.block_until_ready(compiled(params, key))

    clock = CLOCKS[args.clock]

    def run():
        t = clock()
        jax.block_until_ready(compiled(params, key))
        return clock() - t

    return run, temp


def monte_carlo(name: str, scale: float, n: int):
    with jax.enable_x64(True):
        cfg = nj.NRNNConfig(input_dim=2, hidden=4, num_classes=3, dt=0.3, init_std=1.0, eps_add=scale,
                            eps_mult=scale, backend="scan", dtype="float64")
        model = make_model(name, cfg)
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2), jnp.float64)
        y = jnp.arange(4) % 3
        reg = nj.explicit_regularizer(model, x, y, method="exact")
        s = np.asarray(nj.antithetic_monte_carlo(model, x, y, n, jax.random.PRNGKey(1), reg.clean_loss))
        return s.mean() / float(reg.value), s.std(ddof=1) / np.sqrt(n) / float(reg.value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T", type=int, default=140)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--mc-samples", type=int, default=20000)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: wall time per call (default); cpu: this process's CPU time per call (on a machine "
                             "loaded by other work, what the call itself costs)")
    parser.add_argument("--max-temp-gib", type=float, default=4.0,
                        help="a (cell, method) whose compiled value and gradient need more XLA temporary memory "
                             "than this is reported, not run (default: 4)")
    args = parser.parse_args(argv)
    nj.host.configure()  # before any JAX computation: one CPU device per core, the keeping allocator
    cells = args.cells.split(",")
    methods = args.methods.split(",")
    built = {(c, m): cost_runner(c, m, args) for c in cells for m in methods}
    runners = {name: run for name, (run, _) in built.items() if run is not None}
    medians = {name: statistics.median(ts) for name, ts in time_interleaved(runners, args.repeats).items()}
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, T {args.T}, hidden {args.hidden}, float32, scan backend; "
          f"median of {args.repeats} (ms per batch, {args.clock} time, value + parameter gradient; not run: XLA temporary memory over "
          f"{args.max_temp_gib:g} GiB)\n")
    head = "| cell | path | " + " | ".join(f"{m} (ms)" for m in methods) + " | MC/exact at ε = 0.05 | MC/exact at ε = 2 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in cells:
        small, big = monte_carlo(c, 0.05, args.mc_samples), monte_carlo(c, 2.0, args.mc_samples)
        path = "fast" if isinstance(make_model(c, nj.NRNNConfig(hidden=4)).cell, nj.ProductCell) else "generic"
        cols = " | ".join(f"{1e3 * medians[(c, m)]:.1f}" if (c, m) in medians
                          else f"not run ({built[(c, m)][1] / 2**30:.1f} GiB)" for m in methods)
        print(f"| {c} | {path} | {cols} | {small[0]:.4f} ± {small[1]:.4f} | {big[0]:.3f} ± {big[1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
