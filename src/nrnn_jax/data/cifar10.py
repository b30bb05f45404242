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

Reading a batch runs no code. The batches are pickles, and a pickle may name any Python callable to be
called while it loads; `read_batch` admits only the few NumPy names that rebuild an integer array (what a
genuine batch holds next to dicts, lists, bytes, str and numbers) and rebuilds that array itself from the
checked shape, dtype and bytes. Any other name (`os.system`, `eval`, a class of some module) is refused with
a `DataFileError` before it is imported or called. With `verify=True` each file is also compared with the
md5 of the official batch (`OFFICIAL_MD5`); a file that differs is read all the same, with a
`DataFileWarning` saying so.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import Dataset, PaddedSequences
from ..validation import check_bool, check_choice
from .files import DataFileError, DataFileWarning, default_data_dir
from .mnist import N_VALIDATION, VALIDATION_SEED

HOW_TO_GET = ("Get CIFAR-10 'python version' (cifar-10-python.tar.gz from the CIFAR-10 page of the University of "
              "Toronto), unpack it, and put the folder cifar-10-batches-py in the data directory (argument "
              "data_dir, or $NRNN_DATA, or ~/.cache/nrnn_jax).")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PAD_STEPS = 968
# md5 of the batches of cifar-10-python.tar.gz as distributed by the University of Toronto: the values
# torchvision's CIFAR10 data set checks every download against (torchvision/datasets/cifar.py).
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
ADMITTED = "dicts, lists, tuples, bytes, str, numbers and NumPy integer arrays"


def _directory(data_dir) -> Path:
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    for candidate in (base, base / "cifar-10-batches-py", base / "cifar10" / "cifar-10-batches-py"):
        if (candidate / "test_batch").exists():
            return candidate
    return base / "cifar-10-batches-py"


# Stands for `numpy.ndarray`, the subtype argument of `_reconstruct`: a bare object (no attributes to set).
_NDARRAY = object()


class _Dtype:
    """A NumPy integer dtype as the pickle describes it: `numpy.dtype(spec, align, copy)`, then its state
    (version, byte order, subarray, names, fields, …); `dtype()` is the checked `numpy.dtype`."""

    def __init__(self, refuse, spec, *_flags):
        self.refuse, self.order = refuse, None
        spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if not (isinstance(spec, str) and len(spec) == 2 and spec[0] in "iu" and spec[1] in "1248"):
            refuse(f"a NumPy array of dtype {spec!r}")
        self.spec = spec

    def __setstate__(self, state):
        ok = isinstance(state, tuple) and len(state) in (8, 9) and state[2:5] == (None, None, None)
        order = state[1] if ok else None
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order not in ("<", ">", "|", "="):
            self.refuse(f"a NumPy dtype {self.spec!r} with the state {state!r:.200}")
        self.order = order

    def dtype(self) -> np.dtype:
        if self.order is None:
            self.refuse(f"a NumPy dtype {self.spec!r} without its state")
        return np.dtype(("" if self.order == "|" else self.order) + self.spec)


def _array(refuse, raw, dtype, shape, order) -> np.ndarray:
    """The array of `shape` whose bytes are `raw`, after checking every part (a copy, writable)."""
    if not isinstance(dtype, _Dtype):
        refuse(f"a NumPy array whose dtype is {type(dtype).__name__}")
    ok_shape = isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in shape)
    if not ok_shape or order not in ("C", "F") or not isinstance(raw, (bytes, bytearray)):
        refuse(f"a NumPy array of shape {shape!r}, order {order!r} and data of type {type(raw).__name__}")
    dt = dtype.dtype()
    if len(raw) != dt.itemsize * math.prod(shape):
        refuse(f"a NumPy array of shape {shape} and dtype {dt} stored in {len(raw)} bytes")
    return np.frombuffer(raw, dt).reshape(shape, order=order).copy()


class _Array:
    """An array rebuilt by `numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")` and its state
    ([1,] shape, dtype, is_fortran, bytes); `array` is set by the state."""

    def __init__(self, refuse, subtype, *_args):
        if subtype is not _NDARRAY:
            refuse(f"a NumPy array of the subtype {subtype!r}")
        self.refuse, self.array = refuse, None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[2], (bool, int))):
            self.refuse(f"a NumPy array with the state of type {type(state).__name__}")
        shape, dtype, fortran, raw = state
        self.array = _array(self.refuse, raw, dtype, shape, "F" if fortran else "C")


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that admits the names of `ADMITTED` only (NumPy's array and dtype reconstruction, and the
    `_codecs.encode` of bytes in protocols 0–2 of Python 3) and maps them to the checked stand-ins above; any
    other name raises `DataFileError` naming it, before it is imported."""

    def __init__(self, raw: bytes, path: Path):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.path = path
        refuse = self.refuse
        reconstruct = lambda subtype, *args: _Array(refuse, subtype, *args)
        frombuffer = lambda buf, dtype, shape, order: _array(refuse, buf, dtype, shape, order)
        self.names = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): lambda *args: _Dtype(refuse, *args),
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("_codecs", "encode"): self._encode,
        }

    def refuse(self, what: str):
        raise DataFileError(f"Data file {self.path} holds {what}, which a CIFAR-10 batch does not; refused, "
                            f"nothing of it was imported or run (a batch holds only {ADMITTED}). {HOW_TO_GET}")

    def _encode(self, text, encoding):
        if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
            self.refuse(f"the call _codecs.encode({type(text).__name__}, {encoding!r})")
        return text.encode("latin1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.names:
            self.refuse(f"a reference to the Python object {module}.{name}")
        return self.names[(module, name)]

    def persistent_load(self, pid):
        self.refuse(f"a persistent reference {pid!r:.200}")


def read_batch(path: Path, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch, read without running any code of the file (see the module docstring).

    **Arguments:**

    - `path`: a batch file (`data_batch_1` … `data_batch_5`, `test_batch`): a pickled dict with b"data",
      an integer array (N, 3072) of bytes in R, G, B planes, and b"labels", N integers in 0..9.
    - `verify`: compare the file's md5 with the official batch of the same name (`OFFICIAL_MD5`); a file
      that differs gives a `DataFileWarning` and is read all the same.

    **Returns:** images (N, 32, 32, 3) uint8 and labels (N,) int64. A missing file, a truncated or malformed
    one, or one holding anything but `ADMITTED` (such as a reference to `os.system`) raises `DataFileError`.
    """
    verify = check_bool("", "verify", verify)
    if not path.exists():
        raise DataFileError(f"Data file {path} is missing. {HOW_TO_GET}")
    raw = path.read_bytes()
    if verify and path.name in OFFICIAL_MD5:
        digest = hashlib.md5(raw).hexdigest()
        if digest != OFFICIAL_MD5[path.name]:
            warnings.warn(DataFileWarning(
                f"Data file {path} has md5 {digest}; the official CIFAR-10 {path.name} has "
                f"{OFFICIAL_MD5[path.name]}. It is not the official file (re-packed, modified or corrupted) and is "
                "read all the same (its content is checked; reading it runs no code); verify=False silences this."),
                stacklevel=2)
    try:
        d = _BatchUnpickler(raw, path).load()
        data, labels = d[b"data"], d[b"labels"]
        data, labels = (np.asarray(v.array if isinstance(v, _Array) else v, dtype)
                        for v, dtype in ((data, np.uint8), (labels, np.int64)))
    except DataFileError:
        raise
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
    verify: bool = True,
) -> Dataset:
    """Load CIFAR-10 as sequences from the python batches, reading them without running code.

    **Arguments:**

    - `data_dir`: the directory with `cifar-10-batches-py/` (or the batches themselves); default
      $NRNN_DATA or ~/.cache/nrnn_jax.
    - `view`: `"pixel"` (1024 × 3), `"rows"` (32 × 96, default) or `"noise_padded"` (1000 × 96).
    - `noise_seed`: seed of the fixed padding noise (`"noise_padded"` only).
    - `verify`: compare each batch's md5 with the official one; a file that differs gives a
      `DataFileWarning` and is read all the same.

    **Returns:** a `Dataset` with pixels in [0, 1] (float32): 48,000 / 2,000 / 10,000 images for the
    official batches. A batch holding anything but plain data and integer arrays raises `DataFileError`.
    """
    if view not in ("pixel", "rows", "noise_padded"):
        check_choice("", "view", view, ("pixel", "rows", "noise_padded"))
    directory = _directory(data_dir)
    parts = [read_batch(directory / name, verify=verify) for name in TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_batch(directory / "test_batch", verify=verify)

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
