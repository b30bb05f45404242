"""Where the time of one train step goes, at the paper shape (T 784, hidden 128, batch 128; implicit mode, scan
backend): the step's matrix products alone (the floor of any implementation under this compiler's dot),
drawing the injected noise (threefry2x32 through `jax.random.normal` and through the library's fused
`nrnn_jax.prng.normal`, and philox4x32), the forward recurrence alone, forward and backward
with fixed noise, and the whole train step. The parts take turns (interleaved repeats) in one process.

    PYTHONPATH=src python scripts/step_breakdown.py [--repeats 7] [--shape paper|ecg|small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import SHAPES, build_jax  # noqa: E402

from nrnn_jax import NoisyRNN, NRNNConfig, prng  # noqa: E402
from nrnn_jax.losses import cross_entropy, masked_mean  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default: 7)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper", help="the benchmark shape (default: paper)")
    args = parser.parse_args()
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
        run()  # compile and warm up
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
    parts = {
        f"matrix products alone ({flops / 1e9:.1f} GFLOP: forward, backward, ∂L/∂M)": timed(products_only, h0, h0 @ M.T),
        "noise draw, threefry2x32, jax.random.normal": timed(normal, jax.random.key(0, impl="threefry2x32")),
        "noise draw, threefry2x32, nrnn_jax.prng.normal (the library's; the same numbers)":
            timed(fused, jax.random.key(0, impl="threefry2x32")),
        "noise draw, philox4x32": timed(normal, jax.random.key(0, impl="philox4x32")),
        "forward recurrence (fixed noise)": timed(forward, params, x, xi),
        "forward + backward (fixed noise)": timed(grad, params, x, y, mask, xi),
        "whole train step, threefry2x32": build_jax(sh, "scan", "implicit")[0],
        "whole train step, philox4x32": build_jax(sh, "scan", "implicit", prng="philox4x32")[0],
    }
    times = {k: [] for k in parts}
    for _ in range(args.repeats):
        for k, run in parts.items():
            times[k].append(run())
    print(f"shape {args.shape} (T {T}, hidden {d}, batch {B}); median of {args.repeats}, parts interleaved; "
          f"{jax.devices()[0].platform}, load average {os.getloadavg()[0]:.2f}")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
