"""TensorBoard event files of a run: the per-epoch record of `metrics.jsonl`, written as scalars.

    RUN/tensorboard/events.out.tfevents.*            a single run
    RUN/tensorboard/m<i>_seed<s>_add<a>_mult<m>/...   a sweep: one directory (one TensorBoard run) per member

`tensorboard --logdir RUN/tensorboard` (or `--logdir runs/`) shows them. Every numeric entry of an epoch
record is written at step = the epoch number: `train_loss` as `train/loss`, `val_acc` as `val/acc` (the
first `_` of a `train_` / `val_` key becomes `/`), anything `on_epoch_end` adds under its own name, the
learning rate of the epoch as `train/lr`, and the epoch's wall time as `time_s`.

The writer library is tensorboardX (pure Python on protobuf, MIT): it writes TensorBoard's event format
without TensorFlow or PyTorch. flax's `clu.metric_writers` was the alternative, but its TensorBoard writer
(`clu.metric_writers.SummaryWriter`) imports TensorFlow and its other one (`TorchTensorboardWriter`)
imports PyTorch.

A resumed run appends a new event file in the same directory, which begins with a purge marker at its first
epoch: TensorBoard then drops the epochs of earlier files from that epoch on (redone after the resume), so
no epoch is shown twice.
"""

from __future__ import annotations

import shutil
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .config import NRNNConfig, Sweep, TrainConfig
from .errors import writing
from .state import epoch_lr

SUBDIR = "tensorboard"
_NOT_SCALARS = ("epoch", "step")


def tag_of(key: str) -> str:
    """The TensorBoard tag of an epoch-record key: `train_loss` → `train/loss`, `val_acc` → `val/acc`;
    other keys (those of `on_epoch_end`, `time_s`) unchanged."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix):]
    return key


def member_dirs(sweep: Sweep, mcfg: NRNNConfig) -> list[str]:
    """One sub-directory name per sweep member, naming its index, seed and noise levels."""
    seeds, levels = sweep.member_seeds(), sweep.noise_levels(mcfg)
    width = len(str(sweep.size - 1))
    return [f"m{i:0{width}d}_seed{seeds[i]}_add{levels[i, 0]:g}_mult{levels[i, 1]:g}" for i in range(sweep.size)]


class EpochLog:
    """The TensorBoard event files of one training session; `write(record)` after each epoch's record.

    `EpochLog.open(run_dir, mcfg, tcfg, sweep, resume=...)` returns None when there is nothing to write
    (`run_dir` is None or `tcfg.tensorboard` is False). A fresh run (not `resume`) removes event files left
    by an earlier run in the same directory (`overwrite=True`).

    Writing is synchronous: each epoch is on disk (flushed, fsync'ed) when `write` returns, so a run killed
    later loses none of it. (tensorboardX's `SummaryWriter` queues events to a background thread, and its
    `flush()` does not wait for that queue: a run killed seconds after an epoch lost that epoch's events. So
    this uses tensorboardX's synchronous `EventsWriter` and its `summary.scalar` protobufs.) A failed write
    raises `RunWriteError` naming the folder."""

    def __init__(self, logdirs: list[Path], tcfg: TrainConfig, *, purge_step: int | None):
        self.tcfg = tcfg
        self.logdirs = logdirs
        self.purge_step = purge_step
        self.writers: list = []  # opened at the first write: a session with no epoch left writes no file
        self._finalizer = weakref.finalize(self, EpochLog._close_all, self.writers)

    def _open_writers(self) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        # A random file-name suffix: the file name's timestamp has one-second resolution, and two sessions in
        # the same second (a quick resume) must not write to (and truncate) the same file.
        suffix = "." + uuid.uuid4().hex[:8]
        for d in self.logdirs:
            with writing(d, "TensorBoard events"):
                d.mkdir(parents=True, exist_ok=True)
                w = EventsWriter(str(d / "events"), suffix)
                self.writers.append(w)
                if self.purge_step is not None:
                    # TensorBoard drops the events of earlier files at steps >= purge_step (redone after a resume)
                    w.write_event(Event(step=self.purge_step, wall_time=time.time(),
                                        session_log=SessionLog(status=SessionLog.START)))

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

    def write(self, record: dict[str, Any], rollbacks: int = 0) -> None:
        """Write the numeric entries of one epoch record (one value per member for a sweep) and the learning
        rate at step = the epoch, and flush them to disk; close after the last epoch of training."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

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
        lr = epoch_lr(self.tcfg, epoch, rollbacks)
        now = time.time()
        for d, w, row in zip(self.logdirs, self.writers, rows):
            with writing(d, "TensorBoard events"):
                for tag, v in row + [("train/lr", lr)]:
                    w.write_event(Event(wall_time=now, step=epoch, summary=scalar(tag, v)))
                w.flush()
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
