"""The `Dataset` container and fixed-shape batching shared by every loader."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ..validation import check_choice, check_int, describe_bad_labels, describe_nonfinite


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification task on sequences: inputs (N, T, input_dim) float32, labels (N,) int32.

    Checked at construction (`validate`), before anything trains on it: every split (train, val, test)
    non-empty, inputs of shape (N, T, input_dim) with one input_dim, real and finite, and integer labels in
    [0, num_classes). An error names the split, the field, the first offending indices and values, and what
    is allowed.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    description: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` (`TypeError` for a wrong dtype) unless every split is usable: at least one
        example; x (N, T, input_dim) real and finite, with the training split's input_dim; y (N,) integer
        labels in [0, num_classes)."""
        own = f"Dataset {self.name!r}"
        check_int("Dataset", "num_classes", self.num_classes, 1)
        for split in ("train", "val", "test"):
            fx, fy = f"x_{split}", f"y_{split}"
            x, y = getattr(self, fx), getattr(self, fy)
            for field, a in ((fx, x), (fy, y)):
                if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                    raise TypeError(f"{own}: {field} is a {type(a).__name__}; expected an array.")
            if len(x.shape) != 3 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"Dataset {self.name!r}: x_{split} {x.shape} / y_{split} {y.shape}; expected "
                                 "(N, T, input_dim) and (N,).")
            if x.shape[0] == 0:
                raise ValueError(f"{own}: the {split} split is empty ({fx} has shape {tuple(x.shape)}); every "
                                 "split (train, val, test) needs at least one example.")
            if x.shape[2] != self.x_train.shape[2]:
                raise ValueError(f"{own}: {fx} has input_dim {x.shape[2]} (shape {tuple(x.shape)}); expected "
                                 f"the training split's {self.x_train.shape[2]}.")
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                raise TypeError(f"{own}: {fx} has dtype {x.dtype}; expected real (float or integer) inputs.")
            if not np.issubdtype(y.dtype, np.integer):
                raise TypeError(f"{own}: {fy} has dtype {y.dtype}; expected integer class labels in "
                                f"[0, num_classes={self.num_classes}).")
            bad = describe_bad_labels(y, self.num_classes, fy)
            if bad is not None:
                raise ValueError(f"{own}, {split} split: {bad}; expected integer class labels in "
                                 f"[0, num_classes={self.num_classes}).")
            if not isinstance(x, PaddedSequences):  # checks its own finiteness at construction
                bad = describe_nonfinite(x, fx)
                if bad is not None:
                    raise ValueError(f"{own}, {split} split: {bad}; inputs must be finite.")

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def seq_len(self) -> int:
        return int(self.x_train.shape[1])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("train", "val", "test"):
            check_choice("", "split", name, ("train", "val", "test"))
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


class PaddedSequences:
    """Sequences (N, T, F) followed by the same fixed `pad` (P, F) for every example, assembled on
    indexing: `seqs[idx]` is (len(idx), T + P, F). Stands in for an array that would not fit in memory
    (noise-padded CIFAR-10: 50,000 × 1,000 × 96)."""

    def __init__(self, base: np.ndarray, pad: np.ndarray):
        if base.ndim != 3 or pad.ndim != 2 or pad.shape[1] != base.shape[2]:
            raise ValueError(f"PaddedSequences: base {base.shape} and pad {pad.shape} must be (N, T, F) and (P, F).")
        if not (np.all(np.isfinite(base)) and np.all(np.isfinite(pad))):
            raise ValueError("PaddedSequences: base and pad must be finite.")
        self.base, self.pad = base, pad
        self.shape = (base.shape[0], base.shape[1] + pad.shape[0], base.shape[2])
        self.dtype = base.dtype
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        head = self.base[idx]
        if head.ndim == 2:
            return np.concatenate([head, self.pad], axis=0)
        return np.concatenate([head, np.broadcast_to(self.pad, (head.shape[0],) + self.pad.shape)], axis=1)


class Batch(NamedTuple):
    """A fixed-shape batch: `mask` is 1 for real examples and 0 for padding."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch `epoch` for seed `seed`: a pure function, so a resumed run can
    recompute the order of any epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    order: np.ndarray | None = None,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """Fixed-shape batches in the given order (default: as stored).

    Training drops the last partial batch (`drop_remainder=True`, every example is still seen across
    epochs because the order changes); evaluation pads it with copies of the first example and masks
    them out, so that every batch has the same shape and one compiled step serves all.
    """
    check_int("", "batch_size", batch_size, 1)
    idx = np.arange(x.shape[0]) if order is None else np.asarray(order)
    n = idx.shape[0]
    stop = (n // batch_size) * batch_size if drop_remainder else n
    if drop_remainder and stop == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} training examples; "
                         "use a batch_size <= the number of examples.")
    for start in range(0, stop, batch_size):
        take = idx[start : start + batch_size]
        mask = np.ones(batch_size, np.float32)
        if take.shape[0] < batch_size:
            mask[take.shape[0]:] = 0.0
            take = np.concatenate([take, np.full(batch_size - take.shape[0], idx[0])])
        yield Batch(x[take], y[take], mask)


def prefetch(iterator: Iterator[Batch], size: int = 2, sharding=None) -> Iterator[Batch]:
    """Move batches to the device `size` steps ahead of their use (`jax.device_put` is asynchronous, so the
    copy overlaps the running step). `sharding` (a `jax.sharding.Sharding`, e.g. a mesh split over the
    batch axis) places each batch across devices for data-parallel training."""
    import collections

    import jax

    queue: collections.deque = collections.deque()

    def place(a):
        if sharding is None:
            return jax.device_put(a)
        # Every process holds the same global batch (the data order is a pure function of seed and epoch);
        # each places only the shards of its own devices, which is also what several hosts need.
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def put(b: Batch) -> Batch:
        return Batch(*(place(a) for a in b))

    for b in iterator:
        queue.append(put(b))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def default_data_dir() -> Path:
    """Where data lives when no directory is given: $NRNN_DATA, else ~/.cache/nrnn_jax."""
    env = os.environ.get("NRNN_DATA")
    return Path(env) if env else Path.home() / ".cache" / "nrnn_jax"
