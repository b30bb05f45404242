"""Data sets as sequences, with fixed-shape batching. `load_dataset(name, data_dir=None, **options)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import Batch, Dataset, PaddedSequences, batches, default_data_dir, epoch_order, prefetch
from .cifar10 import load_cifar10
from .digits import load_digits
from .ecg5000 import load_ecg5000
from .files import DataFileError, DataFileWarning
from .mnist import load_mnist
from .mnist1d import load_mnist1d
from ..validation import check_choice

LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda data_dir=None, **kw: load_digits(**kw),
    "mnist1d": lambda data_dir=None, **kw: load_mnist1d(**kw),
    "ecg5000": load_ecg5000,
    "mnist_rows": lambda data_dir=None, **kw: load_mnist(data_dir, view="rows", **kw),
    "mnist_pixel": lambda data_dir=None, **kw: load_mnist(data_dir, view="pixel", **kw),
    "mnist_permuted": lambda data_dir=None, **kw: load_mnist(data_dir, view="permuted", **kw),
    "cifar10_pixel": lambda data_dir=None, **kw: load_cifar10(data_dir, view="pixel", **kw),
    "cifar10_rows": lambda data_dir=None, **kw: load_cifar10(data_dir, view="rows", **kw),
    "cifar10_noise_padded": lambda data_dir=None, **kw: load_cifar10(data_dir, view="noise_padded", **kw),
}


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> Dataset:
    """Load a named task.

    **Arguments:**

    - `name`: one of `LOADERS`: "digits" (embedded, no files), "mnist1d", "ecg5000", "mnist_rows",
      "mnist_pixel", "mnist_permuted", "cifar10_rows", "cifar10_pixel", "cifar10_noise_padded".
    - `data_dir`: the folder with the data files; None: `$NRNN_DATA`, else `~/.cache/nrnn_jax`.
    - `options`: the loader's keyword options (e.g. `permutation=`, `pixel_scale=` for MNIST).

    **Returns:** a `Dataset`. An unknown name is a ValueError listing the names; missing or corrupted files
    raise an error naming the file.
    """
    if name not in LOADERS:
        check_choice("", "dataset", name, sorted(LOADERS))
    return LOADERS[name](data_dir, **options)


__all__ = ["Batch", "DataFileError", "DataFileWarning", "Dataset", "LOADERS", "PaddedSequences", "batches",
           "default_data_dir", "epoch_order", "load_cifar10", "prefetch", "load_dataset", "load_digits",
           "load_ecg5000", "load_mnist", "load_mnist1d"]
