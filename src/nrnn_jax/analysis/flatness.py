"""Flatness of the training loss in the parameters (docs/theory.md (4.1)–(4.3)): Hessian spectra by Lanczos and
the Hessian trace by Hutchinson's estimator, both from Hessian-vector products (forward-over-reverse).

The Hessian-vector product of the mean loss is evaluated over chunks of `batch_size` examples: the mean loss
is the sum over chunks of (Σ_{i∈chunk} ℓ_i)/N, so its Hessian-vector product is the sum of the chunks' (the same
numbers up to the order of the floating-point sums). A chunk's compiled product keeps every step's residuals
of the forward pass, in memory linear in batch_size · T · hidden, so the chunk, not the number of examples,
bounds the memory.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from ..data import batches
from ..losses import cross_entropy
from ..validation import check_inputs, check_int, check_labels


@partial(jax.jit, static_argnums=0)
def chunk_hvp(graphdef, params, v, x, y, w):
    """∇²L(θ) v for L(θ) = Σ_i w_i ℓ_i(θ) over one chunk (x, y) with per-example weights w (1/N for the real
    examples of a padded chunk of an N-example mean, 0 for its padding); θ = `params`, v a tangent of the
    same structure."""

    def loss(theta):
        return jnp.sum(cross_entropy(nnx.merge(graphdef, theta)(x), y) * w)

    return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def _loss_and_hvp(model, x, y, batch_size: int):
    """The flat parameters θ and v ↦ ∇²(mean loss on (x, y)) v as flat vectors, summed over chunks."""
    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)
    check_int("", "batch_size", batch_size, 1)
    graphdef, params = nnx.split(model)
    flat, unravel = ravel_pytree(params)
    n = x.shape[0]
    x, y = np.asarray(x), np.asarray(y)
    chunks = [(b.x, b.y, jnp.asarray(b.mask / n, flat.dtype)) for b in batches(x, y, min(batch_size, n))]

    def hvp(v):
        tangent = unravel(v)
        total = None
        for xb, yb, wb in chunks:
            hv = ravel_pytree(chunk_hvp(graphdef, params, tangent, xb, yb, wb))[0]
            total = hv if total is None else total + hv
        return total

    return flat, hvp


def hessian_lanczos(model, x, y, num_steps: int = 20, seed: int = 0, *, batch_size: int = 64) -> np.ndarray:
    """Ritz values (ascending) of the parameter Hessian of the mean loss on (x, y) after `num_steps`
    Lanczos steps with full reorthogonalisation; the largest approximates the top eigenvalue.
    `batch_size`: examples per compiled Hessian-vector product (the module docstring)."""
    flat, hvp = _loss_and_hvp(model, x, y, batch_size)
    n = flat.shape[0]
    k = min(num_steps, n)
    rng = np.random.default_rng(seed)
    V = np.zeros((k, n))
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    alphas, betas = [], []
    for j in range(k):
        V[j] = v
        w = np.asarray(hvp(jnp.asarray(v, flat.dtype)), np.float64)
        alpha = float(w @ v)
        w = w - alpha * v - (betas[-1] * V[j - 1] if j else 0.0)
        w -= V[: j + 1].T @ (V[: j + 1] @ w)  # full reorthogonalisation
        beta = float(np.linalg.norm(w))
        alphas.append(alpha)
        if j == k - 1 or beta < 1e-10:
            break
        betas.append(beta)
        v = w / beta
    T = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    return np.linalg.eigvalsh(T)


def hessian_top_eigenvalue(model, x, y, num_steps: int = 20, seed: int = 0, *, batch_size: int = 64) -> float:
    return float(hessian_lanczos(model, x, y, num_steps, seed, batch_size=batch_size)[-1])


def hessian_trace(model, x, y, num_samples: int = 50, seed: int = 0, *,
                  batch_size: int = 64) -> tuple[float, float]:
    """Hutchinson's estimate E[zᵀ H z] with Rademacher z: (mean, standard error). `batch_size`: examples per
    compiled Hessian-vector product (the module docstring)."""
    flat, hvp = _loss_and_hvp(model, x, y, batch_size)
    key = jax.random.PRNGKey(seed)
    samples = []
    for k in jax.random.split(key, num_samples):
        z = jax.random.rademacher(k, flat.shape, flat.dtype)
        samples.append(float(z @ hvp(z)))
    s = np.asarray(samples)
    return float(s.mean()), float(s.std(ddof=1) / np.sqrt(len(s)))
