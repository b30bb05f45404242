"""Locating and verifying data files: clear errors for missing, truncated or corrupted files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .base import default_data_dir


class DataFileError(ValueError):
    """A data file is missing, truncated or corrupted; the message names the file and the remedy."""


def resolve_dir(data_dir: str | Path | None, subdir: str, probe: tuple[str, ...]) -> Path:
    """The directory holding a data set: `data_dir` itself if it holds one of the `probe` files, else
    `data_dir/subdir`; with no `data_dir`, $NRNN_DATA/subdir or ~/.cache/nrnn_jax/subdir."""
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    for candidate in (base, base / subdir):
        if any((candidate / name).exists() for name in probe):
            return candidate
    return base / subdir


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, *, size: int | None, digest: str | None, algorithm: str, how_to_get: str) -> None:
    """Raise DataFileError unless `path` exists with the expected size and checksum."""
    if not path.exists():
        raise DataFileError(f"Data file {path} is missing. {how_to_get}")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DataFileError(
            f"Data file {path} has {actual_size} bytes; expected {size} (truncated or wrong file). {how_to_get}"
        )
    if digest is not None:
        actual = file_digest(path, algorithm)
        if actual != digest:
            raise DataFileError(
                f"Data file {path} has {algorithm} {actual}; expected {digest} (corrupted or wrong file). "
                f"{how_to_get}"
            )
