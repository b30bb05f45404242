"""Oracles shared by the test modules: the explicit regularizer's defining identity R = ½ tr ∇²_ξ L(0)
(docs/theory.md), computed by autodiff over the whole noise array of the model's own noisy loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nrnn_jax import explicit_regularizer
from nrnn_jax.losses import cross_entropy


def noise_loss(model, x, y):
    """L(v) = batch-mean cross-entropy of model(x, noise=v.reshape(B, T, noise_dim)), and len(v)."""
    shape = (x.shape[0], x.shape[1], model.noise_dim)
    return (lambda v: jnp.mean(cross_entropy(model(x, noise=v.reshape(shape)), y))), int(np.prod(shape))


def half_trace_hessian(L, n, mode="fwd"):
    """½ tr ∇²L(0) from the dense Hessian: forward-over-reverse ("fwd") or reverse-over-reverse ("rev")."""
    outer = jax.jacfwd if mode == "fwd" else jax.jacrev
    return 0.5 * jnp.trace(jax.jit(outer(jax.grad(L)))(jnp.zeros(n, jnp.float64)))  # jit: one compile, not eager


def noise_hessian_oracle(model, x, y):
    """(½ tr ∇²_ξ L(0), L(0)) of the model's noisy loss."""
    L, n = noise_loss(model, x, y)
    return half_trace_hessian(L, n), L(jnp.zeros(n, jnp.float64))


def assert_exact_regularizer_is_half_trace_of_noise_hessian(model, x, y, min_value):
    """The exact regularizer equals ½ tr ∇²_ξ L(0) (rtol 1e-10), its clean loss L(0) (rtol 1e-12), and it is
    above `min_value` (so the identity is not met by two zeros)."""
    reg = explicit_regularizer(model, x, y, method="exact")
    half_trace, clean = noise_hessian_oracle(model, x, y)
    np.testing.assert_allclose(half_trace, reg.value, rtol=1e-10)
    np.testing.assert_allclose(clean, reg.clean_loss, rtol=1e-12)
    assert float(reg.value) > min_value
    return reg
