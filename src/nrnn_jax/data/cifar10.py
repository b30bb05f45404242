"""CIFAR-10 from the python pickle batches: pixel sequence (1024 × 3), rows (32 × 96) and noise-padded rows.

Files: `data_batch_1` … `data_batch_5` and `test_batch` (each a pickled dict with b"data", uint8
(10000, 3072) in R, G, B planes, and b"labels"), in `cifar-10-batches-py/` under the data directory
(`data_dir`, else $NRNN_DATA, else ~/.cache/nrnn_jax), or in the directory itself. Pixels are scaled to
[0, 1]. Views:

- "pixel": 1,024 steps of the (R, G, B) values of one pixel, row-major.
- "rows": 32 steps, one image row each, 96 features = 32 pixels × (R, G, B).
- "noise_padded": the 32 rows followed by 968 steps of fixed Gaussian noise (one draw, seed
  `noise_seed`, shared by all images): 1,000 steps × 96, the task of the Lipschitz and antisymmetric RNN
  papers. The padded sequences are assembled batch by batch (`PaddedSequences`), never all at once.

Validation: 2,000 training images held out as in the public code (RandomState(1234).permutation(50000),
the last 2,000).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from .base import Dataset, PaddedSequences
from ..validation import check_choice
from .files import DataFileError, default_data_dir
from .mnist import N_VALIDATION, VALIDATION_SEED

HOW_TO_GET = ("Get CIFAR-10 'python version' (cifar-10-python.tar.gz from the CIFAR-10 page of the University of "
              "Toronto), unpack it, and put the folder cifar-10-batches-py in the data directory (argument "
              "data_dir, or $NRNN_DATA, or ~/.cache/nrnn_jax).")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PAD_STEPS = 968


def _directory(data_dir) -> Path:
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    for candidate in (base, base / "cifar-10-batches-py", base / "cifar10" / "cifar-10-batches-py"):
        if (candidate / "test_batch").exists():
            return candidate
    return base / "cifar-10-batches-py"


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: images (N, 32, 32, 3) uint8 and labels (N,)."""
    if not path.exists():
        raise DataFileError(f"Data file {path} is missing. {HOW_TO_GET}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int64)
    except Exception as e:  # truncated pickle, wrong file, missing keys
        raise DataFileError(f"Data file {path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                            f"truncated or corrupted. {HOW_TO_GET}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataFileError(f"Data file {path} holds data {data.shape} and labels {labels.shape}; expected "
                            f"(N, 3072) and (N,). {HOW_TO_GET}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFileError(f"Data file {path} has labels outside 0..9. {HOW_TO_GET}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(
    data_dir=None,
    *,
    view: Literal["pixel", "rows", "noise_padded"] = "rows",
    noise_seed: int = 0,
) -> Dataset:
    if view not in ("pixel", "rows", "noise_padded"):
        check_choice("", "view", view, ("pixel", "rows", "noise_padded"))
    directory = _directory(data_dir)
    parts = [read_batch(directory / name) for name in TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_batch(directory / "test_batch")

    def as_seq(images):
        x = images.astype(np.float32) / 255.0
        return x.reshape(x.shape[0], 1024, 3) if view == "pixel" else x.reshape(x.shape[0], 32, 96)

    order = np.random.RandomState(VALIDATION_SEED).permutation(x_tr.shape[0])
    n_val = min(N_VALIDATION, x_tr.shape[0] // 2)
    train_idx, val_idx = order[: x_tr.shape[0] - n_val], order[x_tr.shape[0] - n_val :]
    x_all, x_test = as_seq(x_tr), as_seq(x_te)
    splits = [x_all[train_idx], x_all[val_idx], x_test]
    if view == "noise_padded":
        pad = np.random.default_rng(noise_seed).standard_normal((PAD_STEPS, 96)).astype(np.float32)
        splits = [PaddedSequences(s, pad) for s in splits]
    return Dataset(
        name=f"cifar10_{view}",
        x_train=splits[0], y_train=y_tr[train_idx].astype(np.int32),
        x_val=splits[1], y_val=y_tr[val_idx].astype(np.int32),
        x_test=splits[2], y_test=y_te.astype(np.int32),
        num_classes=10,
        description=f"CIFAR-10 ({view}) from {directory}",
    )
