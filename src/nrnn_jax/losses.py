"""Per-example and batch losses (cross-entropy of the decoded final state, docs/theory.md (1.5))."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from .validation import ArrayLike


def cross_entropy(logits: Float[Array, "... c"], y: Int[ArrayLike, "..."]) -> Float[Array, "..."]:
    """Per-example cross-entropy ℓ = −log softmax(logits)_y."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def masked_mean(values: Float[Array, " b"], mask: Float[ArrayLike, " b"] | None) -> Float[Array, ""]:
    """Mean over the real examples of a padded batch (mask 1 = real, 0 = padding)."""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def correct(logits: Float[Array, "b c"], y: Int[ArrayLike, " b"]) -> Float[Array, " b"]:
    pred = jnp.argmax(logits, axis=-1)
    return (pred == jnp.asarray(y).astype(pred.dtype)).astype(logits.dtype)  # int64 argmax under jax_enable_x64
