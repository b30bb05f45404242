"""MNIST from the original IDX files: ordered pixel (784 × 1), permuted pixel (784 × 1) and rows (28 × 28).

Files (gzip as distributed, or unzipped): `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, in the data directory (`data_dir`, else
$NRNN_DATA, each with or without an `mnist/` sub-folder, else ~/.cache/nrnn_jax/mnist). Gzip files are
checked against the published md5 values. Pixels are scaled to [0, 1].

Validation split (docs/theory.md §7, as in the public code): 2,000 training images held out, chosen by
`numpy.random.RandomState(1234).permutation(60000)` (the last 2,000 of it); 58,000 remain for training.

Permuted pixel MNIST uses the fixed permutation `numpy.random.RandomState(12008).permutation(784)`,
the same in every run and process (the public PyTorch code draws its permutation with torch's generator
and seed 12008, which NumPy cannot reproduce; the task is the same, the permutation differs).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np

from .base import Dataset
from ..validation import check_choice
from .files import DataFileError, download, resolve_dir, verify_file

FILES = {
    # name: (bytes, md5, item count, kind)
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873", 60000, "images"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432", 60000, "labels"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3", 10000, "images"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c", 10000, "labels"),
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
HOW_TO_GET = ("Get the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the MNIST distribution, or call "
              "load_mnist(..., download=True) with a network, and put them in the data directory (argument "
              "data_dir, or $NRNN_DATA, or ~/.cache/nrnn_jax), alone or in an 'mnist/' sub-folder.")
PERMUTATION_SEED = 12008
VALIDATION_SEED, N_VALIDATION = 1234, 2000


def permutation() -> np.ndarray:
    """The fixed pixel permutation of permuted MNIST."""
    return np.random.RandomState(PERMUTATION_SEED).permutation(784)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a uint8 array; clear errors for bad files."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFileError(f"Data file {path} cannot be read ({e}); truncated or corrupted. {HOW_TO_GET}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFileError(f"Data file {path} is not an IDX file of unsigned bytes (bad magic number). {HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"Data file {path} is truncated inside its header. {HOW_TO_GET}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataFileError(f"Data file {path} holds {len(raw)} bytes of IDX data; its header {shape} needs "
                            f"{expected} (truncated or corrupted). {HOW_TO_GET}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory: Path, name: str, verify: bool) -> Path:
    size, md5, _, _ = FILES[name]
    gz = directory / name
    if gz.exists():
        if verify:
            verify_file(gz, size=size, digest=md5, algorithm="md5", how_to_get=HOW_TO_GET)
        return gz
    plain = directory / name[: -len(".gz")]
    if plain.exists():
        return plain
    raise DataFileError(f"Data file {gz} (or {plain.name}) is missing. {HOW_TO_GET}")


def load_mnist_arrays(data_dir=None, *, verify: bool = True, download_missing: bool = False):
    """(train images (60000, 28, 28), train labels, test images (10000, 28, 28), test labels), uint8."""
    directory = resolve_dir(data_dir, "mnist", tuple(FILES) + tuple(n[:-3] for n in FILES))
    if download_missing:
        for name, (size, md5, _, _) in FILES.items():
            if not (directory / name).exists() and not (directory / name[:-3]).exists():
                download([m + name for m in MIRRORS], directory / name, md5=md5, algorithm="md5")
    arrays = {}
    for name, (_, _, count, kind) in FILES.items():
        path = _find(directory, name, verify)
        a = read_idx(path)
        want = (count, 28, 28) if kind == "images" else (count,)
        if a.shape != want:
            raise DataFileError(f"Data file {path} holds an array of shape {a.shape}; expected {want}. {HOW_TO_GET}")
        arrays[name] = a
    names = list(FILES)
    return tuple(arrays[n] for n in names)


def validation_split(n: int = 60000) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of the public code's split: 2,000 held out, seed 1234."""
    order = np.random.RandomState(VALIDATION_SEED).permutation(n)
    return order[: n - N_VALIDATION], order[n - N_VALIDATION :]


def load_mnist(
    data_dir=None,
    *,
    view: Literal["pixel", "permuted", "rows"] = "rows",
    verify: bool = True,
    download: bool = False,
) -> Dataset:
    """MNIST as sequences. `view`: "pixel" (784 × 1), "permuted" (784 × 1, fixed permutation) or "rows"
    (28 × 28). `download=True` fetches missing files from public mirrors and checks their md5."""
    if view not in ("pixel", "permuted", "rows"):
        check_choice("", "view", view, ("pixel", "permuted", "rows"))
    x_tr, y_tr, x_te, y_te = load_mnist_arrays(data_dir, verify=verify, download_missing=download)

    def as_seq(images):
        x = images.astype(np.float32) / 255.0
        if view == "rows":
            return x
        x = x.reshape(x.shape[0], 784)
        if view == "permuted":
            x = x[:, permutation()]
        return x[:, :, None]

    train_idx, val_idx = validation_split(x_tr.shape[0])
    x_all = as_seq(x_tr)
    return Dataset(
        name=f"mnist_{view}",
        x_train=x_all[train_idx], y_train=y_tr[train_idx].astype(np.int32),
        x_val=x_all[val_idx], y_val=y_tr[val_idx].astype(np.int32),
        x_test=as_seq(x_te), y_test=y_te.astype(np.int32),
        num_classes=10,
        description=f"MNIST ({view}), 58000/2000/10000",
    )
