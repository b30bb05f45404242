"""TensorBoard event files of a run: the per-epoch record of `metrics.jsonl`, written as scalars.

    RUN/tensorboard/events.out.tfevents.*            a single run
    RUN/tensorboard/m<i>_seed<s>_add<a>_mult<m>/...   a sweep: one directory (one TensorBoard run) per member

`tensorboard --logdir RUN/tensorboard` (or `--logdir runs/`) shows them. Every numeric entry of an epoch
record is written at step = the epoch number: `train_loss` as `train/loss`, `val_acc` as `val/acc` (the
first `_` of a `train_` / `val_` key becomes `/`), anything `on_epoch_end` adds under its own name, the
learning rate of the epoch as `train/lr`, and the epoch's wall time as `time_s`.

The event files are written here, in a few lines of the standard library: TensorBoard's format is a
TFRecord file (each record: its length, a masked CRC-32C of the length, the bytes, a masked CRC-32C of the
bytes) of `Event` protocol buffers, and the fields written here (wall time, step, file version, session log,
scalar summaries) are encoded by hand. So writing a run's events imports neither TensorFlow nor PyTorch nor
any package that might import them (tensorboardX, the usual writer, imports PyTorch whenever it is installed,
so a run, or its resume, would depend on PyTorch importing cleanly).

A resumed run appends a new event file in the same directory, which begins with a purge marker at its first
epoch: TensorBoard then drops the epochs of earlier files from that epoch on (redone after the resume), so
no epoch is shown twice.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .config import NRNNConfig, Sweep, TrainConfig
from .errors import writing

SUBDIR = "tensorboard"
_NOT_SCALARS = ("epoch", "step")


def tag_of(key: str) -> str:
    """The TensorBoard tag of an epoch-record key: `train_loss` → `train/loss`, `val_acc` → `val/acc` (an
    `on_epoch_end` key too: `val_reg` → `val/reg`); other keys (`time_s`) unchanged."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix):]
    return key


def member_dirs(sweep: Sweep, mcfg: NRNNConfig) -> list[str]:
    """One sub-directory name per sweep member, naming its index, seed and noise levels."""
    seeds, levels = sweep.member_seeds(), sweep.noise_levels(mcfg)
    width = len(str(sweep.size - 1))
    return [f"m{i:0{width}d}_seed{seeds[i]}_add{levels[i, 0]:g}_mult{levels[i, 1]:g}" for i in range(sweep.size)]


# ------------------------------------------------------------------------------------------------------
# The event file format (tensorflow/core/util/event.proto, summary.proto; TFRecord framing).
# ------------------------------------------------------------------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length (uint64), its masked CRC-32C, the data, the data's masked CRC-32C (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """A protocol-buffer field: its key, then the payload (wire type 2 is length-delimited)."""
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: list[tuple[str, float]] = (), session_start: bool = False) -> bytes:
    """A serialised `Event`: wall_time (1, double), step (2, int64), file_version (3, string), summary (5:
    one `Summary.Value` per scalar, tag (1) and simple_value (2, float32)), session_log (7: status START)."""
    out = _field(1, 1, struct.pack("<d", wall_time))
    if step:
        out += _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars)
        out += _field(5, 2, values)
    if session_start:
        out += _field(7, 2, _field(1, 0, _varint(1)))
    return out


class _EventFile:
    """An event file written synchronously: each `write` is flushed and fsync'ed before it returns."""

    def __init__(self, directory: Path, suffix: str):
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{suffix}"
        self.file = open(directory / name, "wb")
        self.write(event(time.time(), file_version="brain.Event:2"))

    def write(self, *events: bytes) -> None:
        """Append serialised `Event`s, then flush and fsync."""
        self.file.write(b"".join(tfrecord(e) for e in events))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class EpochLog:
    """The TensorBoard event files of one training session; `write(record)` after each epoch's record.

    `EpochLog.open(run_dir, mcfg, tcfg, sweep, resume=...)` returns None when there is nothing to write
    (`run_dir` is None or `tcfg.tensorboard` is False). A fresh run (not `resume`) removes event files left
    by an earlier run in the same directory (`overwrite=True`).

    Writing is synchronous: each epoch is on disk (flushed, fsync'ed) when `write` returns, so a run killed
    later loses none of it (a writer that queues events to a background thread, as tensorboardX's
    `SummaryWriter` does, loses the epochs still queued). A failed write raises `RunWriteError` naming
    the folder."""

    def __init__(self, logdirs: list[Path], tcfg: TrainConfig, *, purge_step: int | None):
        self.tcfg = tcfg
        self.logdirs = logdirs
        self.purge_step = purge_step
        self.writers: list = []  # opened at the first write: a session with no epoch left writes no file
        self._finalizer = weakref.finalize(self, EpochLog._close_all, self.writers)

    def _open_writers(self) -> None:
        # A random file-name suffix: the file name's timestamp has one-second resolution, and two sessions in
        # the same second (a quick resume) must not write to (and truncate) the same file.
        suffix = "." + uuid.uuid4().hex[:8]
        for d in self.logdirs:
            with writing(d, "TensorBoard events"):
                w = _EventFile(d, suffix)
                if self.purge_step is not None:
                    # TensorBoard drops the events of earlier files at steps >= purge_step (redone after a resume)
                    w.write(event(time.time(), self.purge_step, session_start=True))
            self.writers.append(w)

    @classmethod
    def open(cls, run_dir: str | Path | None, mcfg: NRNNConfig, tcfg: TrainConfig, sweep: Sweep | None = None, *,
             resume: bool = False, first_epoch: int = 1) -> "EpochLog | None":
        """The log of a session whose first written epoch is `first_epoch` (a resumed run: the epoch after
        its checkpoint), or None if TensorBoard logging is off or there is no run directory."""
        if run_dir is None or not tcfg.tensorboard:
            return None
        root = Path(run_dir) / SUBDIR
        if not resume and root.exists():
            shutil.rmtree(root)
        logdirs = [root] if sweep is None else [root / name for name in member_dirs(sweep, mcfg)]
        return cls(logdirs, tcfg, purge_step=first_epoch if resume else None)

    def write(self, record: dict[str, Any], learning_rate) -> None:
        """Write the numeric entries of one epoch record (one value per member for a sweep) and the epoch's
        `learning_rate` (read from the optimizer state, `state.learning_rate`; one per member for a sweep) at
        step = the epoch, and flush them to disk; close after the last epoch of training."""
        epoch = int(record["epoch"])
        if not self.writers:
            self._open_writers()
        n = len(self.writers)
        rows: list[list[tuple[str, float]]] = [[] for _ in range(n)]
        for key, value in record.items():
            if key in _NOT_SCALARS:
                continue
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n  # shared (time_s)
            if len(values) != n or not all(_is_number(v) for v in values):
                continue  # not a per-member scalar (e.g. a string): metrics.jsonl keeps it
            for row, v in zip(rows, values):
                row.append((tag_of(key), float(v)))
        rates = np.broadcast_to(np.asarray(learning_rate, np.float64), (n,))
        now = time.time()
        for d, w, row, lr in zip(self.logdirs, self.writers, rows, rates):
            with writing(d, "TensorBoard events"):
                w.write(*(event(now, epoch, scalars=[(tag, v)]) for tag, v in row + [("train/lr", float(lr))]))
        if epoch >= self.tcfg.epochs:
            self.close()

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _close_all(writers) -> None:
        for w in writers:
            try:
                w.close()
            except OSError:  # a failed write, already raised as RunWriteError by `write`
                pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
