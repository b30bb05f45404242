"""Flatness of the training loss in the parameters (docs/theory.md (4.1)–(4.3)): Hessian spectra by Lanczos and
the Hessian trace by Hutchinson's estimator, both from Hessian-vector products (forward-over-reverse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from ..losses import cross_entropy
from ..validation import check_inputs, check_labels


def _loss_and_hvp(model, x, y):
    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)
    graphdef, params = nnx.split(model)
    flat, unravel = ravel_pytree(params)

    def loss(theta):
        return jnp.mean(cross_entropy(nnx.merge(graphdef, unravel(theta))(x), y))

    hvp = jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])
    return flat, hvp


def hessian_lanczos(model, x, y, num_steps: int = 20, seed: int = 0) -> np.ndarray:
    """Ritz values (ascending) of the parameter Hessian of the mean loss on (x, y) after `num_steps`
    Lanczos steps with full reorthogonalisation; the largest approximates the top eigenvalue."""
    flat, hvp = _loss_and_hvp(model, x, y)
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


def hessian_top_eigenvalue(model, x, y, num_steps: int = 20, seed: int = 0) -> float:
    return float(hessian_lanczos(model, x, y, num_steps, seed)[-1])


def hessian_trace(model, x, y, num_samples: int = 50, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate E[zᵀ H z] with Rademacher z: (mean, standard error)."""
    flat, hvp = _loss_and_hvp(model, x, y)
    key = jax.random.PRNGKey(seed)
    samples = []
    for k in jax.random.split(key, num_samples):
        z = jax.random.rademacher(k, flat.shape, flat.dtype)
        samples.append(float(z @ hvp(z)))
    s = np.asarray(samples)
    return float(s.mean()), float(s.std(ddof=1) / np.sqrt(len(s)))
