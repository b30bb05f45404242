"""Locating and verifying data files: clear errors for missing, truncated or corrupted files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .base import default_data_dir


class DataFileError(ValueError):
    """A data file is missing, truncated or corrupted; the message names the file and the remedy."""


class DataFileWarning(UserWarning):
    """A data file is readable but not the official one (its checksum differs); the message names the file."""


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


def download(urls: list[str] | tuple[str, ...], dest: Path, *, md5: str | None = None, sha256: str | None = None,
             algorithm: str = "md5") -> Path:
    """Fetch `dest` from the first URL that answers, verify its checksum, and move it into place atomically.

    Only called when the user asks for a download; tests never need the network."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = md5 if algorithm == "md5" else sha256
    errors = []
    for url in urls:
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            if digest is not None and file_digest(tmp, algorithm) != digest:
                raise DataFileError(f"{url} gave a file whose {algorithm} is not {digest}")
            tmp.replace(dest)
            return dest
        except Exception as e:  # try the next mirror
            errors.append(f"{url}: {e}")
            tmp.unlink(missing_ok=True)
    raise DataFileError(f"Could not download {dest.name}: " + "; ".join(errors))
