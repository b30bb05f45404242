"""Accuracy against perturbation strength (docs/theory.md §6): random noise and adversarial attacks.

`robustness_curve(model, x, y, kind, strengths)` evaluates the model under each strength with the one
evaluation loop (`nrnn_jax.evaluate`), perturbing batch by batch.
"""

from __future__ import annotations

import numpy as np


from ..evaluate import evaluate, multiplicative_noise, salt_and_pepper, white_noise
from ..validation import check_choice
from .adversarial import fgsm, pgd

KINDS = ("white", "multiplicative", "salt_pepper", "fgsm_linf", "fgsm_l2", "pgd_linf", "pgd_l2")


def make_perturbation(kind: str, strength: float, *, model=None, data_range=(0.0, 1.0), pgd_steps: int = 10):
    """The batch perturbation `perturb(x, y, rng)` of `kind` at `strength` (std, fraction or budget)."""
    check_choice("", "kind", kind, KINDS)
    if kind == "white":
        return white_noise(strength)
    if kind == "multiplicative":
        return multiplicative_noise(strength)
    if kind == "salt_pepper":
        return salt_and_pepper(strength, *data_range)
    attack, norm = kind.split("_")
    if attack == "fgsm":
        return lambda x, y, rng: np.asarray(fgsm(model, x, y, strength, norm))
    return lambda x, y, rng: np.asarray(pgd(model, x, y, strength, norm, steps=pgd_steps))


def robustness_curve(model, x, y, kind: str, strengths, *, seed: int = 0, batch_size: int = 500,
                     data_range=None, pgd_steps: int = 10) -> np.ndarray:
    """Test accuracy at each strength (strength 0 is the clean accuracy)."""
    if data_range is None:
        data_range = (float(np.min(x)), float(np.max(x))) if isinstance(x, np.ndarray) else (0.0, 1.0)
    accs = []
    for s in strengths:
        perturb = None if s == 0 else make_perturbation(kind, float(s), model=model, data_range=data_range,
                                                        pgd_steps=pgd_steps)
        accs.append(evaluate(model, x, y, batch_size, perturb=perturb, seed=seed)["acc"])
    return np.asarray(accs)
