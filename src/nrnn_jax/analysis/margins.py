"""Classification margins (docs/theory.md (4.4)–(4.5)): output margins and DeepFool input-space margins."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..evaluate import predict_logits
from ..validation import check_inputs, check_labels
from .adversarial import deepfool


def output_margins(model, x, y, batch_size: int = 500) -> np.ndarray:
    """logit_y − max_{j≠y} logit_j per example (negative: misclassified)."""
    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)
    logits = predict_logits(model, x, batch_size)
    y = np.asarray(y)
    true = logits[np.arange(len(y)), y]
    others = np.where(np.arange(logits.shape[1])[None, :] == y[:, None], -np.inf, logits)
    return true - others.max(axis=1)


def input_margins(model, x, max_iter: int = 50, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """DeepFool L2 distance to the nearest decision boundary per example, and whether it was found."""
    dists, found = [], []
    for start in range(0, len(x), batch_size):
        r, ok = deepfool(model, jnp.asarray(x[start : start + batch_size]), max_iter=max_iter)
        dists.append(np.sqrt(np.sum(np.asarray(r) ** 2, axis=(1, 2))))
        found.append(np.asarray(ok))
    return np.concatenate(dists), np.concatenate(found)
