"""MNIST-1D (Greydanus, 2020), generated offline by the `mnist1d` package with its default arguments:
40-step, 1-feature sequences of 10 classes (4,000 train / 1,000 test); the last 500 training sequences
(fixed order) are held out for validation."""

from __future__ import annotations

import numpy as np

from .base import Dataset


def load_mnist1d(*, seed: int = 42, num_samples: int = 5000) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    x_tr = np.asarray(d["x"], np.float32)[:, :, None]
    y_tr = np.asarray(d["y"], np.int32)
    n_val = len(y_tr) // 8
    return Dataset(
        name="mnist1d",
        x_train=x_tr[:-n_val], y_train=y_tr[:-n_val],
        x_val=x_tr[-n_val:], y_val=y_tr[-n_val:],
        x_test=np.asarray(d["x_test"], np.float32)[:, :, None], y_test=np.asarray(d["y_test"], np.int32),
        num_classes=10,
        description=f"MNIST-1D generated offline (seed {seed}, {num_samples} samples), 40 steps x 1",
    )
