"""Where the time of one train step goes, at the paper shape (T 784, hidden 128, batch 128; implicit mode, scan
backend): the step's matrix products alone (the floor of any implementation under this compiler's dot),
the same products through PyTorch's CPU matrix product (oneDNN/MKL; when torch is installed), each kind of
product alone under both, drawing the
injected noise (threefry2x32 through `jax.random.normal` and through the library's fused
`nrnn_jax.prng.normal`, and philox4x32), the forward recurrence alone, forward and backward
with fixed noise, and the whole train step. The parts take turns (interleaved repeats) in one process. All
run on one device, and so does the whole step; where `train_and_evaluate` would split the batch over the
host's cores (`nrnn_jax.train._default_devices`), that step is timed too.

With torch installed it also times the eager-PyTorch baseline's whole step (benchmarks/benchmark_torch.py, in a
worker process, taking turns with the parts) and prints the floor of ANY implementation that draws the
library's noise: the products at the faster of the two matrix-product rates plus the library's noise draw,
against half the PyTorch step (what "2x faster than eager PyTorch" needs).

    PYTHONPATH=src python -m benchmarks.step_breakdown [--repeats 7] [--shape paper|ecg|small]   # from the repository root
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import benchmark_torch
from benchmarks.benchmark import SHAPES, auto_devices, build_jax
from nrnn_jax import NoisyRNN, NRNNConfig, host, prng
from nrnn_jax.losses import cross_entropy, masked_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default: 7)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper", help="the benchmark shape (default: paper)")
    args = parser.parse_args()
    host.configure()  # before any JAX computation: one CPU device per core, the keeping allocator
    sh = SHAPES[args.shape]
    B, T, n, d = sh["batch"], sh["T"], sh["input_dim"], sh["hidden"]
    mcfg = NRNNConfig(input_dim=n, hidden=d, num_classes=sh["num_classes"], dt=sh["dt"], eps_add=0.02,
                      eps_mult=0.02, backend="scan")
    graphdef, params = nnx.split(NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, n))
    y = jnp.arange(B) % sh["num_classes"]
    mask = jnp.ones(B)
    normal = jax.jit(lambda k: jax.random.normal(k, (B, T, mcfg.noise_dim), jnp.float32))
    fused = jax.jit(lambda k: prng.normal(k, (B, T, mcfg.noise_dim), jnp.float32))  # the same numbers
    xi = normal(jax.random.key(0))
    forward = jax.jit(lambda p, x, xi: nnx.merge(graphdef, p)(x, noise=xi))
    loss = lambda p, x, y, mask, xi: masked_mean(cross_entropy(nnx.merge(graphdef, p)(x, noise=xi), y), mask)
    grad = jax.jit(jax.grad(loss))

    def timed(f, *a):
        def run():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            return time.perf_counter() - t0
        for _ in range(3):  # compile and warm up (the host heap reaches its steady size)
            run()
        return run

    # The step's matrix products alone, with nothing else: per step the forward products M h (B x d by d x 2d),
    # per step the backward products Mᵀ μ (B x 2d by 2d x d), and after the loop ∂L/∂M as one product over all
    # steps and examples (2d x TB by TB x d). What any implementation of this recurrence must multiply.
    M = jax.random.normal(jax.random.PRNGKey(1), (2 * d, d)) / d

    @jax.jit
    def products_only(h0, mu0):
        h_fin, hs = jax.lax.scan(lambda h, _: (jnp.tanh((h @ M.T)[:, :d]), h), h0, None, length=T)
        def back(mu, _):  # μ (B, 2d) -> Mᵀ-product (B, d) -> the next μ (B, 2d)
            lam = jnp.tanh(mu @ M)
            return jnp.concatenate([lam, lam], 1), mu

        mu_fin, mus = jax.lax.scan(back, mu0, None, length=T)
        return h_fin, mu_fin, mus.reshape(-1, 2 * d).T @ hs.reshape(-1, d)

    h0 = jax.random.normal(jax.random.PRNGKey(2), (B, d))
    flops = 3 * 2 * B * d * 2 * d * T
    products_label = f"matrix products alone ({flops / 1e9:.1f} GFLOP: forward, backward, ∂L/∂M)"
    torch_label = "the same products as bare torch.mm calls (PyTorch's CPU GEMM, no other work)"
    noise_label = "noise draw, threefry2x32, nrnn_jax.prng.normal (the library's; the same numbers)"
    parts = {products_label: timed(products_only, h0, h0 @ M.T)}
    torch_products = _torch_products(B, T, d)
    if torch_products is not None:
        parts[torch_label] = torch_products
    # each kind of product alone, under XLA and as bare torch.mm calls: where the GEMM rates differ
    hs = jax.random.normal(jax.random.PRNGKey(3), (T, B, d))
    mus = jax.random.normal(jax.random.PRNGKey(4), (T, B, 2 * d))
    forward_only = jax.jit(lambda h0: jax.lax.scan(lambda h, _: (jnp.tanh((h @ M.T)[:, :d]), None), h0, None,
                                                   length=T)[0])
    backward_only = jax.jit(lambda mu0: jax.lax.scan(
        lambda mu, _: (jnp.tile(jnp.tanh(mu @ M), (1, 2)), None), mu0, None, length=T)[0])
    outer_only = jax.jit(lambda mus, hs: mus.reshape(-1, 2 * d).T @ hs.reshape(-1, d))
    kinds = {f"{T} forward products (B x d by d x 2d)": timed(forward_only, h0),
             f"{T} backward products (B x 2d by 2d x d)": timed(backward_only, h0 @ M.T),
             "∂L/∂M (2d x TB by TB x d)": timed(outer_only, mus, hs)}
    for name, run in kinds.items():
        parts[f"{name}, XLA"] = run
        if torch_products is not None:
            parts[f"{name}, torch.mm"] = _torch_products(B, T, d, only=name.split()[1] if name[0].isdigit()
                                                           else "outer")
    worker = benchmark_torch.TorchWorker.start(sh)
    step_label = "eager-PyTorch train step (benchmarks/benchmark_torch.py, worker process)"
    if worker is not None:
        parts[step_label] = worker.run_one
    parts |= {
        "noise draw, threefry2x32, jax.random.normal": timed(normal, jax.random.key(0, impl="threefry2x32")),
        noise_label: timed(fused, jax.random.key(0, impl="threefry2x32")),
        "noise draw, philox4x32": timed(normal, jax.random.key(0, impl="philox4x32")),
        "forward recurrence (fixed noise)": timed(forward, params, x, xi),
        "forward + backward (fixed noise)": timed(grad, params, x, y, mask, xi),
        "whole train step, threefry2x32": build_jax(sh, "scan", "implicit")[0],
        "whole train step, philox4x32": build_jax(sh, "scan", "implicit", prng="philox4x32")[0],
    }
    n_dev = auto_devices(sh)
    if n_dev > 1:  # what train_and_evaluate runs by default here: the batch split over the host's cores
        parts[f"whole train step, threefry2x32, {n_dev} devices (the default)"] = build_jax(
            sh, "scan", "implicit", devices=n_dev)[0]
    times = {k: [] for k in parts}
    faults = {k: [] for k in parts}  # minor page faults of this process per call (0 for the PyTorch worker's)
    for _ in range(args.repeats):
        for k, run in parts.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[k].append(run())
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"shape {args.shape} (T {T}, hidden {d}, batch {B}); median of {args.repeats}, parts interleaved; "
          f"{jax.devices()[0].platform}, load average {os.getloadavg()[0]:.2f}; host allocator: "
          f"{host.status()}")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print("| part | median | minor page faults per call (median) |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} ms | {statistics.median(faults[k]):.0f} |")
    if worker is None:
        return
    print(f"PyTorch worker: {worker.memory()['threads']} threads")
    worker.close()
    torch_step = med[step_label]
    floor = min(med[products_label], med.get(torch_label, float("inf"))) + med[noise_label]
    print(f"floor of any implementation with the library's noise: products at the faster rate + noise draw = "
          f"{floor:.1f} ms; half the PyTorch step = {torch_step / 2:.1f} ms; the floor is "
          f"{torch_step / floor:.2f}x faster than PyTorch")


def _torch_products(B: int, T: int, d: int, only: str | None = None):
    """The products of `products_only` (same shapes and count) as bare `torch.mm` calls into preallocated
    outputs, no autograd and no elementwise work: this machine's fastest CPU matrix product on them (the
    best case of the GEMM alone; values are fixed, since only the rate is measured). `only`: "forward",
    "backward" or "outer" for one kind. None without torch."""
    try:
        import torch
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2 * d, d, generator=g) / d
    MT = M.T.contiguous()
    h, mu = torch.randn(B, d, generator=g), torch.randn(B, 2 * d, generator=g)
    hs, mus = torch.randn(T * B, d, generator=g), torch.randn(2 * d, T * B, generator=g)
    out_f, out_b, out_m = torch.empty(B, 2 * d), torch.empty(B, d), torch.empty(2 * d, d)

    @torch.no_grad()
    def run():
        t0 = time.perf_counter()
        if only in (None, "forward"):
            for _ in range(T):
                torch.mm(h, MT, out=out_f)
        if only in (None, "backward"):
            for _ in range(T):
                torch.mm(mu, M, out=out_b)
        if only in (None, "outer"):
            torch.mm(mus, hs, out=out_m)
        return time.perf_counter() - t0

    for _ in range(3):  # warm up
        run()
    return run


if __name__ == "__main__":
    main()
