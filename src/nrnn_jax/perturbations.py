"""Test-time input perturbations (docs/theory.md (6.1)–(6.3)), applied batch by batch.

Each constructor returns `perturb(x_batch, y_batch, rng) -> x_batch'` for a NumPy generator `rng`, so
that evaluation draws them lazily (no copy of a whole test set) and reproducibly from a seed. The labels
are used by the adversarial perturbations of `nrnn_jax.analysis.robustness` and ignored here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .validation import check_real

Perturbation = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def white_noise(std: float) -> Perturbation:
    """x + std · N(0, 1)."""
    check_real("", "std", std, 0.0)
    return lambda x, y, rng: (x + std * rng.standard_normal(x.shape)).astype(x.dtype)


def multiplicative_noise(std: float) -> Perturbation:
    """x ⊙ (1 + std · N(0, 1))."""
    check_real("", "std", std, 0.0)
    return lambda x, y, rng: (x * (1.0 + std * rng.standard_normal(x.shape))).astype(x.dtype)


def salt_and_pepper(fraction: float, low: float, high: float) -> Perturbation:
    """A fraction of the entries set to `low` or `high` (the data's min and max) with equal chance."""
    check_real("", "fraction", fraction, 0.0, 1.0)

    def perturb(x, y, rng):
        hit = rng.random(x.shape) < fraction
        value = np.where(rng.random(x.shape) < 0.5, low, high)
        return np.where(hit, value, x).astype(x.dtype)

    return perturb

