"""Experiment (not part of the library): the train step with its matrix products sent to OpenBLAS's sgemm
through an XLA FFI custom call, against XLA:CPU's own dot and eager PyTorch, the three taking turns in one run.

It answers what the "next lever" of the README's "Where the CPU time goes" would give: the per-step products
at a BLAS library's rate inside the compiled step. It compiles `openblas_gemm_ffi.cc` with g++ against
jaxlib's FFI headers and calls the OpenBLAS that NumPy bundles (`scipy_cblas_sgemm64_`), loaded at run time;
it patches `nrnn_jax.recurrence`'s products and ∂L/∂M and the diffrax solver's carried products. It first
checks that the patched model gives XLA's loss and gradients (float32 rounding).

    PYTHONPATH=src python scripts/experiments/openblas_gemm_ffi.py [--shape paper] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import benchmark_torch  # noqa: E402
from benchmark import SHAPES, build_jax, time_interleaved  # noqa: E402
from nrnn_jax import NoisyRNN, NRNNConfig, recurrence, solvers  # noqa: E402
from nrnn_jax.losses import cross_entropy  # noqa: E402


def load() -> None:
    """Compile the handler, load NumPy's OpenBLAS into it and register the FFI target `nrnn_gemm`."""
    out = os.path.join(tempfile.mkdtemp(), "libgemm.so")
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                    os.path.join(HERE, "openblas_gemm_ffi.cc"), "-o", out, "-ldl"], check=True)
    lib = ctypes.CDLL(out)
    blas = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas64_*.so"))[0]
    if lib.nrnn_load_blas(blas.encode(), b"scipy_cblas_sgemm64_") != 0:
        raise RuntimeError(f"cannot load scipy_cblas_sgemm64_ from {blas}")
    jax.ffi.register_ffi_target("nrnn_gemm", jax.ffi.pycapsule(lib.NrnnGemm), platform="cpu")


def gemm(a, b, trans_a=False, trans_b=False):
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return jax.ffi.ffi_call("nrnn_gemm", jax.ShapeDtypeStruct((m, n), a.dtype))(a, b, trans_a=trans_a,
                                                                                 trans_b=trans_b)


def patch() -> None:
    """Route the adjoint's per-step products, its ∂L/∂M and the diffrax solver's carried products to gemm."""
    recurrence._products = lambda s, M: gemm(s.reshape(-1, s.shape[-1]), M, trans_b=True).reshape(
        s.shape[:-1] + (M.shape[0],))
    recurrence._outer_sum = lambda a, b: gemm(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), trans_a=True)
    solvers._CarryProducts.products = lambda self, h, M: gemm(h.reshape(self.batch, -1), M, trans_b=True).reshape(
        h.shape[:-1] + (-1,))


def loss_and_grads(shape: dict, backend: str):
    cfg = NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                     dt=shape["dt"], eps_add=0.02, eps_mult=0.02, backend=backend)
    graphdef, params = nnx.split(NoisyRNN(cfg, rngs=nnx.Rngs(0)))
    B, T = 32, shape["T"]
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, shape["input_dim"]))
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.noise_dim))
    y = jnp.arange(B) % shape["num_classes"]
    loss = lambda p: jnp.mean(cross_entropy(nnx.merge(graphdef, p)(x, noise=xi), y))
    return jax.jit(jax.value_and_grad(loss))(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    load()
    runners = {}
    worker = benchmark_torch.TorchWorker.start(shape)
    if worker is not None:
        runners["eager PyTorch (loop-enc)"] = worker.run_one
    reference = {b: loss_and_grads(shape, b) for b in ("scan", "diffrax")}
    for b in ("scan", "diffrax"):
        runners[f"{b} (XLA dot)"] = build_jax(shape, b, "implicit")[0]
    patch()
    for b in ("scan", "diffrax"):
        (v0, g0), (v1, g1) = reference[b], loss_and_grads(shape, b)
        rel = max(float(jnp.max(jnp.abs(u - w)) / (jnp.max(jnp.abs(u)) + 1e-30))
                  for u, w in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
        print(f"{b}: loss {float(v0):.7f} (XLA) against {float(v1):.7f} (OpenBLAS); largest relative gradient "
              f"difference {rel:.1e}")
        runners[f"{b} (OpenBLAS sgemm via FFI)"] = build_jax(shape, b, "implicit")[0]
    times = {k: statistics.median(v) for k, v in time_interleaved(runners, args.repeats).items()}
    if worker is not None:
        worker.close()
    print(f"shape {args.shape}: median of {args.repeats} steps, all taking turns; {jax.devices()[0].platform}")
    print("| variant | median step | vs PyTorch |")
    print("|---|---|---|")
    base = times.get("eager PyTorch (loop-enc)")
    for k, t in times.items():
        print(f"| {k} | {t * 1e3:.1f} ms | {f'{base / t:.2f}x' if base else ''} |")


if __name__ == "__main__":
    main()
