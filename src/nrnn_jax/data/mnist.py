"""MNIST from the original IDX files: ordered pixel (784 × 1), permuted pixel (784 × 1) and rows (28 × 28).

Files (gzip as distributed, or unzipped): `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, in the data directory (`data_dir`, else
$NRNN_DATA, each with or without an `mnist/` sub-folder, else ~/.cache/nrnn_jax/mnist). Gzip files are
checked against the published md5 values.

Pixel scale (`pixel_scale`): "unit" (default) divides the bytes by 255, giving [0, 1] for every view;
"raw" keeps them in 0–255 (as float32). The public PyTorch code scales ordered MNIST to [0, 1] but reads
permuted MNIST as raw bytes, so its permuted-task hyper-parameters were tuned for inputs 255 times larger;
"raw" reproduces that, "unit" is the consistent default (docs/theory.md §7).

Validation split (docs/theory.md §7, as in the public code): 2,000 training images held out, chosen by
`numpy.random.RandomState(1234).permutation(60000)` (the last 2,000 of it); 58,000 remain for training.

Permuted pixel MNIST (`permutation`): "public" (default) is the public code's permutation,
`torch.manual_seed(12008); torch.randperm(784)`, embedded as the package file
`pmnist_permutation_torch_seed12008.txt` (784 indices, sha256-checked when read; NumPy cannot regenerate
torch's generator); "numpy" is `numpy.random.RandomState(12008).permutation(784)`, the permutation
nrnn_jax used before (same task, a different fixed permutation).
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
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
PERMUTATIONS = ("public", "numpy")
PIXEL_SCALES = ("unit", "raw")
PUBLIC_PERMUTATION_FILE = "pmnist_permutation_torch_seed12008.txt"
PUBLIC_PERMUTATION_SHA256 = "f81cefd4e00c638b0dfa4d99c999b70541ca4160b15b04dc28114723f6d26948"
VALIDATION_SEED, N_VALIDATION = 1234, 2000


def public_permutation() -> np.ndarray:
    """The public code's permutation (`torch.manual_seed(12008); torch.randperm(784)`), read from the
    package file and checked against its sha256 and for being a permutation of 0..783."""
    raw = resources.files(__package__).joinpath(PUBLIC_PERMUTATION_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PUBLIC_PERMUTATION_SHA256:
        raise DataFileError(f"The package file {PUBLIC_PERMUTATION_FILE} has sha256 {digest}; expected "
                            f"{PUBLIC_PERMUTATION_SHA256} (corrupted installation: reinstall nrnn_jax).")
    p = np.array(raw.split(), dtype=np.int64)
    if p.shape != (784,) or not np.array_equal(np.sort(p), np.arange(784)):
        raise DataFileError(f"The package file {PUBLIC_PERMUTATION_FILE} is not a permutation of 0..783.")
    return p


def permutation(kind: Literal["public", "numpy"] = "public") -> np.ndarray:
    """The fixed pixel permutation of permuted MNIST: "public" (the public code's torch permutation,
    default) or "numpy" (`numpy.random.RandomState(12008).permutation(784)`, nrnn_jax's former one)."""
    check_choice("", "permutation", kind, PERMUTATIONS)
    if kind == "public":
        return public_permutation()
    return np.random.RandomState(PERMUTATION_SEED).permutation(784)


_permutation_of = permutation  # for `load_mnist`, whose `permutation` argument shadows the function


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
    permutation: Literal["public", "numpy"] = "public",
    pixel_scale: Literal["unit", "raw"] = "unit",
) -> Dataset:
    """MNIST as sequences. `view`: "pixel" (784 × 1), "permuted" (784 × 1, fixed permutation) or "rows"
    (28 × 28). `permutation` (permuted view only): "public" (the public code's torch permutation, default)
    or "numpy" (nrnn_jax's former NumPy one). `pixel_scale`: "unit" ([0, 1], default) or "raw" (0–255, what
    the public code feeds its permuted task). `download=True` fetches missing files from public mirrors and
    checks their md5."""
    check_choice("", "view", view, ("pixel", "permuted", "rows"))
    check_choice("", "permutation", permutation, PERMUTATIONS)
    check_choice("", "pixel_scale", pixel_scale, PIXEL_SCALES)
    perm = _permutation_of(permutation) if view == "permuted" else None
    x_tr, y_tr, x_te, y_te = load_mnist_arrays(data_dir, verify=verify, download_missing=download)

    def as_seq(images):
        x = images.astype(np.float32)
        if pixel_scale == "unit":
            x = x / 255.0
        if view == "rows":
            return x
        x = x.reshape(x.shape[0], 784)
        if perm is not None:
            x = x[:, perm]
        return x[:, :, None]

    train_idx, val_idx = validation_split(x_tr.shape[0])
    x_all = as_seq(x_tr)
    return Dataset(
        name=f"mnist_{view}",
        x_train=x_all[train_idx], y_train=y_tr[train_idx].astype(np.int32),
        x_val=x_all[val_idx], y_val=y_tr[val_idx].astype(np.int32),
        x_test=as_seq(x_te), y_test=y_te.astype(np.int32),
        num_classes=10,
        description=(f"MNIST ({view}{f', {permutation} permutation' if perm is not None else ''}, pixels "
                     f"{'in [0, 1]' if pixel_scale == 'unit' else '0-255'}), 58000/2000/10000"),
    )
