"""ECG5000 (UCR archive): 140-sample heartbeats, normal (class 1) vs abnormal (classes 2..5).

The paper's split (docs/theory.md §7): the 500 UCR training rows for training; the 4,500 UCR test rows split
into 500 for validation and 4,000 for testing. By default (`val_rows="shuffled"`) the test rows are first
put in a fixed order (a permutation drawn with seed 0), because the shared `.npz` copy is sorted by label
and its first 500 rows are all normal, which would make a useless validation set; `val_rows="first"`
takes the first 500 rows as stored. Inputs have shape (N, 140, 1) as stored
(the UCR series are already z-normalised).

Files read, from the data directory (`data_dir`, else $NRNN_DATA, each with or without an `ecg5000/`
sub-folder, else ~/.cache/nrnn_jax/ecg5000):

- the UCR text files `ECG5000_TRAIN.txt` / `ECG5000_TEST.txt` (label then 140 values; whitespace, comma
  or tab separated), or `.tsv`, or `.arff` (label last);
- or `ecg5000_train.npz` (`x64`, `y` in 1..5) with `ecg5000_test_signals_binary_labels.npz` (`x64`,
  `y_abnormal`), the form kept in this project's shared data folder (binary test labels only).

The `.npz` files are read with `allow_pickle=False`: an array of Python objects (whose unpickling could run
code) is refused with a `DataFileError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from .base import Dataset
from ..validation import check_choice
from .files import DataFileError, file_digest, resolve_dir

SEQ_LEN = 140
N_TRAIN, N_VAL, N_TEST = 500, 500, 4000
HOW_TO_GET = (
    "Get ECG5000 from the UCR time series archive (www.timeseriesclassification.com, data set 'ECG5000'; "
    "files ECG5000_TRAIN.txt and ECG5000_TEST.txt) and put it in the data directory (argument data_dir, "
    "or $NRNN_DATA, or ~/.cache/nrnn_jax), alone or in an 'ecg5000/' sub-folder."
)
# sha256 of the files in the project's shared data folder (see its README).
KNOWN_SHA256 = {
    "ECG5000_TRAIN.txt": "0d96aff193311a6dc6111bf0dbd2f7d2313987fbf7a1da4a383d92563876057b",
    "ecg5000_train.npz": "66d6f34994c3971bb810dddbf774c012928e94248a3315c3cea5534218460483",
    "ecg5000_test_signals_binary_labels.npz": "f78c5f342f629e64a4dd5cc9870aaaa0d35729785897f7261a4386b3c26262af",
}
_PROBE = ("ECG5000_TRAIN.txt", "ECG5000_TRAIN.tsv", "ECG5000_TRAIN.arff", "ecg5000_train.npz")


def read_ucr_text(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows 'label v1 … vT' separated by whitespace, commas or tabs; returns (values (N, T), labels)."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append([float(v) for v in re.split(r"[,\s]+", line)])
            except ValueError as e:
                raise DataFileError(f"{path}, line {lineno}: cannot parse a number ({e}). {HOW_TO_GET}") from None
    return _rows_to_arrays(path, rows, label_first=True)


def read_ucr_arff(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """UCR .arff: header up to '@data', then comma-separated rows with the class label last."""
    rows, in_data = [], False
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("%"):
                continue
            if not in_data:
                in_data = line.lower().startswith("@data")
                continue
            try:
                rows.append([float(v) for v in line.split(",")])
            except ValueError as e:
                raise DataFileError(f"{path}, line {lineno}: cannot parse a number ({e}). {HOW_TO_GET}") from None
    if not in_data:
        raise DataFileError(f"{path}: no '@data' section; not an ARFF file. {HOW_TO_GET}")
    return _rows_to_arrays(path, rows, label_first=False)


def _rows_to_arrays(path, rows, *, label_first):
    if not rows:
        raise DataFileError(f"{path} holds no rows. {HOW_TO_GET}")
    lengths = {len(r) for r in rows}
    if lengths != {SEQ_LEN + 1}:
        bad = next(i for i, r in enumerate(rows) if len(r) != SEQ_LEN + 1)
        raise DataFileError(f"{path}: row {bad + 1} has {len(rows[bad])} values; expected {SEQ_LEN + 1} "
                            f"(label and {SEQ_LEN} samples). {HOW_TO_GET}")
    a = np.asarray(rows, np.float64)
    labels, values = (a[:, 0], a[:, 1:]) if label_first else (a[:, -1], a[:, :-1])
    if not np.all(np.isin(labels, [1, 2, 3, 4, 5])):
        raise DataFileError(f"{path}: labels {sorted(set(labels.tolist()))[:10]} are not ECG5000's classes 1..5. "
                            f"{HOW_TO_GET}")
    return values, labels.astype(np.int64)


def _read_split(directory: Path, split: str):
    for ext, reader in ((".txt", read_ucr_text), (".tsv", read_ucr_text), (".arff", read_ucr_arff)):
        path = directory / f"ECG5000_{split}{ext}"
        if path.exists():
            return reader(path)
    return None


def _load_npz(path: Path, keys: tuple[str, ...], verify: bool):
    if not path.exists():
        raise DataFileError(f"Data file {path} is missing. {HOW_TO_GET}")
    if verify and path.name in KNOWN_SHA256:
        digest = file_digest(path, "sha256")
        if digest != KNOWN_SHA256[path.name]:
            raise DataFileError(f"Data file {path} has sha256 {digest}; expected {KNOWN_SHA256[path.name]} "
                                f"(corrupted or wrong file). {HOW_TO_GET}")
    try:
        with np.load(path, allow_pickle=False) as f:  # arrays only: pickled objects are refused
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataFileError(f"{path} lacks the array(s) {missing}; expected {list(keys)}. {HOW_TO_GET}")
            return tuple(np.asarray(f[k]) for k in keys)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, DataFileError):
            raise
        raise DataFileError(f"Data file {path} cannot be read as .npz ({e}); truncated or corrupted. "
                            f"{HOW_TO_GET}") from None


def load_ecg5000(
    data_dir: str | Path | None = None,
    *,
    labels: Literal["binary", "multiclass"] = "binary",
    verify: bool = True,
    val_rows: Literal["shuffled", "first"] = "shuffled",
) -> Dataset:
    """Load ECG5000 with the paper's 500 / 500 / 4,000 split.

    **Arguments:**

    - `data_dir`: directory with the files (see the module docstring); default $NRNN_DATA or
      ~/.cache/nrnn_jax.
    - `labels`: `"binary"` (0 = normal class 1, 1 = abnormal classes 2..5; the paper's task) or
      `"multiclass"` (classes 1..5 as 0..4; needs the UCR test file, which carries them).
    - `verify`: check the sha256 of known files.
    - `val_rows`: `"shuffled"` (validation = the first 500 test rows after a fixed permutation with seed
      0; default) or `"first"` (the first 500 rows as stored).

    **Returns:** a `Dataset` with inputs (N, 140, 1) float32.
    """
    if labels not in ("binary", "multiclass"):
        check_choice("", "labels", labels, ("binary", "multiclass"))
    if val_rows not in ("shuffled", "first"):
        check_choice("", "val_rows", val_rows, ("shuffled", "first"))
    directory = resolve_dir(data_dir, "ecg5000", _PROBE)
    train = _read_split(directory, "TRAIN")
    if train is None:
        x_tr, y_tr = _load_npz(directory / "ecg5000_train.npz", ("x64", "y"), verify)
    else:
        x_tr, y_tr = train
    test = _read_split(directory, "TEST")
    if test is not None:
        x_te, y_te_cls = test
        y_te = y_te_cls if labels == "multiclass" else (y_te_cls != 1).astype(np.int64)
    else:
        if labels == "multiclass":
            raise DataFileError(f"labels='multiclass' needs the UCR test file ECG5000_TEST.txt (5-class labels) "
                                f"in {directory}; the .npz test file has binary labels only. {HOW_TO_GET}")
        x_te, y_te = _load_npz(directory / "ecg5000_test_signals_binary_labels.npz", ("x64", "y_abnormal"), verify)
    if x_tr.shape != (N_TRAIN, SEQ_LEN) or x_te.shape != (N_VAL + N_TEST, SEQ_LEN):
        raise DataFileError(f"ECG5000 in {directory}: train {x_tr.shape}, test {x_te.shape}; expected "
                            f"({N_TRAIN}, {SEQ_LEN}) and ({N_VAL + N_TEST}, {SEQ_LEN}). {HOW_TO_GET}")
    if val_rows == "shuffled":
        perm = np.random.default_rng(0).permutation(x_te.shape[0])
        x_te, y_te = x_te[perm], y_te[perm]
    y_tr = (y_tr - 1) if labels == "multiclass" else (y_tr != 1)
    y_te = (y_te - 1) if (labels == "multiclass") else y_te
    as_x = lambda a: a.astype(np.float32)[:, :, None]
    return Dataset(
        name="ecg5000",
        x_train=as_x(x_tr), y_train=y_tr.astype(np.int32),
        x_val=as_x(x_te[:N_VAL]), y_val=y_te[:N_VAL].astype(np.int32),
        x_test=as_x(x_te[N_VAL:]), y_test=y_te[N_VAL:].astype(np.int32),
        num_classes=5 if labels == "multiclass" else 2,
        description=f"ECG5000 ({labels}), 140 steps x 1, 500/500/4000 split, from {directory}",
    )
