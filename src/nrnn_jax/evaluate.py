"""Evaluation: loss and accuracy with noise off over fixed-shape padded batches (the one evaluation loop),
logits for a whole data set, the summary of a trained model, and the test-time input perturbations evaluation
applies (docs/theory.md (6.1)–(6.3)).

A perturbation is `perturb(x_batch, y_batch, rng) -> x_batch'` for a NumPy generator `rng`, applied batch by
batch, so that evaluation draws it lazily (no copy of a whole test set) and reproducibly from a seed. The labels
are used by the adversarial perturbations of `nrnn_jax.analysis.robustness` and ignored by the random ones here
(`white_noise`, `multiplicative_noise`, `salt_and_pepper`)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import TrainConfig
from .data import Dataset, batches
from .losses import correct, cross_entropy
from .model import NoisyRNN
from .validation import check_inputs, check_labels, check_real

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


@partial(jax.jit, static_argnums=0)
def eval_step(graphdef, params, x, y, mask):
    """Sums over the real examples of a padded batch: (loss sum, correct count, count)."""
    model = nnx.merge(graphdef, params)
    logits = model(x)
    mask = mask.astype(logits.dtype)
    return jnp.sum(cross_entropy(logits, y) * mask), jnp.sum(correct(logits, y) * mask), jnp.sum(mask)


def evaluate(
    model: NoisyRNN,
    x,
    y: np.ndarray,
    batch_size: int = 500,
    *,
    perturb: Perturbation | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Loss and accuracy of `model` (noise off) on (x, y), in fixed-shape batches.

    **Arguments:**

    - `model`: a `NoisyRNN`.
    - `x`: inputs (N, T, input_dim); `y`: integer labels (N,).
    - `batch_size`: examples per compiled call (the last batch is padded and masked).
    - `perturb`: `perturb(x_batch, y_batch, rng)` (e.g. `white_noise`) is applied to each batch with
      a generator seeded by `seed`, so perturbed evaluation needs no copy of the whole data set.

    **Returns:** `{"loss": mean cross-entropy, "acc": accuracy}` as Python floats.
    """
    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)
    graphdef, params = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    rng = np.random.default_rng(seed)
    totals = np.zeros(3)
    for b in batches(x, y, batch_size):
        xb = b.x if perturb is None else perturb(b.x, b.y, rng)
        totals += np.array([float(v) for v in eval_step(graphdef, params, xb, b.y, b.mask)])
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2])}


@partial(jax.jit, static_argnums=0)
def _logits_step(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def predict_logits(model: NoisyRNN, x, batch_size: int = 500) -> np.ndarray:
    """Logits (noise off) for every example of x, in fixed-shape batches.

    **Arguments:**

    - `model`: a `NoisyRNN`.
    - `x`: inputs (N, T, input_dim).
    - `batch_size`: examples per compiled call (the last batch is padded and its padding dropped).

    **Returns:** a NumPy array (N, num_classes).
    """
    check_inputs(x, model.cfg.input_dim)
    graphdef, params = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    y = np.zeros(x.shape[0], np.int32)
    out = [np.asarray(_logits_step(graphdef, params, b.x))[b.mask > 0] for b in batches(x, y, batch_size)]
    return np.concatenate(out)



def summarize(model: NoisyRNN, data: Dataset, tcfg: TrainConfig) -> dict[str, Any]:
    """Final clean validation / test metrics and test accuracy under white input noise."""
    val = evaluate(model, data.x_val, data.y_val, tcfg.eval_batch_size)
    test = evaluate(model, data.x_test, data.y_test, tcfg.eval_batch_size)
    out = {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"]}
    for std in tcfg.eval_white_noise:
        out[f"test_acc_white_{std:g}"] = evaluate(model, data.x_test, data.y_test, tcfg.eval_batch_size,
                                                  perturb=white_noise(std), seed=tcfg.seed)["acc"]
    return out

