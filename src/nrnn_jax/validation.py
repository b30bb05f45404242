"""Input checks shared by every public entry point: each failure is a ValueError or TypeError naming the
field, the value and what is allowed (never an XLA shape error)."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def _shape_of(a):
    return tuple(getattr(a, "shape", np.shape(a)))


def _dtype_of(a):
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def _is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def check_inputs(x, input_dim: int, *, name: str = "x") -> None:
    """x must be a real array of shape (batch, T, input_dim) with batch, T ≥ 1 and no NaN/Inf."""
    shape = _shape_of(x)
    if len(shape) != 3 or shape[2] != input_dim or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{name} has shape {shape}; expected (batch, T, input_dim) = (B ≥ 1, T ≥ 1, {input_dim})."
        )
    dtype = _dtype_of(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} has dtype {dtype}; expected a real (float or integer) array.")
    # Lazy containers (data.PaddedSequences) check finiteness at construction; arrays are checked here.
    if isinstance(x, (np.ndarray, jax.Array)) and not _is_tracer(x):
        finite = np.isfinite(np.asarray(x))
        if not finite.all():
            raise ValueError(f"{name} contains {finite.size - int(finite.sum())} NaN or Inf value(s); "
                             "inputs must be finite.")


def check_noise(xi, batch: int, steps: int, noise_dim: int, *, name: str = "noise") -> None:
    shape = _shape_of(xi)
    if shape != (batch, steps, noise_dim):
        raise ValueError(
            f"{name} has shape {shape}; expected (batch, T, noise_dim) = ({batch}, {steps}, {noise_dim}) "
            "(noise_dim is NRNNConfig.noise_dim: hidden for diagonal noise, hidden + 1 for scalar noise, "
            "2 * hidden for the reference convention)."
        )


def check_labels(y, batch: int, num_classes: int, *, name: str = "y") -> None:
    shape = _shape_of(y)
    if shape != (batch,):
        raise ValueError(f"{name} has shape {shape}; expected ({batch},) integer class labels.")
    dtype = _dtype_of(y)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} has dtype {dtype}; expected integer class labels in [0, {num_classes}).")
    if not _is_tracer(y):
        arr = np.asarray(y)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} has labels in [{arr.min()}, {arr.max()}]; expected labels in [0, {num_classes})."
            )
