"""Data sets as sequences, with fixed-shape batching. `load_dataset(name, data_dir=None, **options)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import Batch, Dataset, batches, default_data_dir, epoch_order
from .digits import load_digits
from .ecg5000 import load_ecg5000
from .files import DataFileError

LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda data_dir=None, **kw: load_digits(**kw),
    "ecg5000": load_ecg5000,
}


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> Dataset:
    """Load a named task. Names: see `LOADERS` ("digits" is embedded and needs no files)."""
    if name not in LOADERS:
        raise ValueError(f"dataset={name!r} is invalid: expected one of {sorted(LOADERS)}.")
    return LOADERS[name](data_dir, **options)


__all__ = ["Batch", "DataFileError", "Dataset", "LOADERS", "batches", "default_data_dir", "epoch_order",
           "load_dataset", "load_digits", "load_ecg5000"]
