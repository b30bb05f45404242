"""The embedded default task: scikit-learn's 8×8 handwritten digits read row by row.

1,797 images ship inside scikit-learn (no download). Each image is a sequence of 8 rows of 8 pixels,
scaled to [0, 1]. The split is fixed: a permutation with seed 0, 20% test, 10% validation, the rest train.
"""

from __future__ import annotations

import numpy as np

from .base import Dataset


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as _sk_digits

    raw = _sk_digits()
    x = (raw.images.astype(np.float32) / 16.0).reshape(-1, 8, 8)
    y = raw.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    n_test = int(round(0.2 * len(perm)))
    n_val = int(round(0.1 * len(perm)))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Dataset(
        name="digits",
        x_train=x[train], y_train=y[train],
        x_val=x[val], y_val=y[val],
        x_test=x[test], y_test=y[test],
        num_classes=10,
        description="scikit-learn 8x8 digits, 8 rows x 8 pixels, embedded (no download)",
    )
