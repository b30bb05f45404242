"""Run directories: what `train_and_evaluate` / `nrnn-train` write, and how a run is read back.

    RUN/config.json        {"model": NRNNConfig, "train": TrainConfig, ["sweep": Sweep], "dataset": text}
    RUN/metrics.jsonl      one JSON record per finished epoch
    RUN/summary.json       final metrics (a sweep: one entry per member)
    RUN/train_time.json    {"sessions": [{"first_step", "last_step", "train_time_s"}, ...]}: the training time
                           of every session (process) that worked on the run, up to its last checkpoint
    RUN/checkpoints/       orbax checkpoints of {"state": TrainState, "sums": metric sums}, each with a
                           manifest of its files' sizes and CRC-32s (`nrnn_jax.checkpoint`)
    RUN/tensorboard/       TensorBoard event files of the epoch records (`nrnn_jax._tensorboard`; a sweep:
                           one sub-directory per member), unless TrainConfig(tensorboard=False)
    RUN/.writer.lock       held (fcntl.flock) by the one process writing the run; removed when it lets go
    RUN/damaged/           what a resume set aside: damaged checkpoints, damaged lines of metrics.jsonl

`load_run(run_dir)` returns the trained model; `read_run_config`, `read_run_sweep` and `load_run_dataset`
return its configuration, sweep and data set. `start_run` and `resume_run` are the loop's side of it.

One writer at a time: whatever writes a run (`train_and_evaluate`, `nrnn-train`, `nrnn-from-public`) holds
`writer(run_dir)`, an exclusive `fcntl.flock` on RUN/.writer.lock that the operating system releases when
the process ends, also by SIGKILL; a second writer gets `RunBusyError` at once, naming the process that
holds it. Readers (`load_run`, the analyses) take no lock: every file is replaced atomically or appended.

A write that fails (no space, permission, read-only filesystem, quota) raises `RunWriteError` naming the
file; what was written before it stays intact (a record cut off is removed, an unfinished checkpoint too),
and the message says what the run keeps and how to continue it (`--resume`). A resume starts from the
newest intact checkpoint, setting damaged ones aside, or from the beginning when there is none.

Reading a run directory imports no code by itself. A run of user code records its import paths
(`recorded_code`: a user cell's `cell_factory`, a user diffusion's `model.diffusion`); they are imported
only when the caller says so (`trust_code=True`, `--trust-code`), otherwise the caller passes the objects
(`cell=`, `diffusion=`) or gets a `ValueError` naming each path before anything is imported. Checkpoints are
arrays read by orbax (no unpickling); the JSON files are data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from . import checkpoint, host
from .config import BUILT_IN_CELLS, ImportPath, NRNNConfig, Sweep, TrainConfig, Unimportable, resolve_import_path
from .data import Dataset, load_dataset
from .errors import CheckpointError, RunBusyError, RunDamageWarning, RunWriteError, writing
from .model import NoisyRNN
from .state import (TrainState, checkpoint_layouts, init_model_state, init_sweep_states, make_optimizer, metric_names,
                    unstack, zero_sums)
from .validation import fail

LOCK_FILE = ".writer.lock"


@dataclasses.dataclass
class _Hold:
    """This process's hold on a run directory: the locked file's descriptor (None where the filesystem has no
    locks, or for a process other than the first of a multi-process job), the thread holding it, how many
    nested `writer` blocks hold it, and the folders its taking created (removed again if left empty)."""

    fd: int | None
    thread: int
    created: list[Path]
    depth: int = 0


_held: dict[str, _Hold] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def writer(run_dir: str | Path):
    """Hold `run_dir` as its one writer for the duration of the block.

    **Arguments:**

    - `run_dir`: the run directory (created, with missing parents, if absent; removed again at the end if
      the block wrote nothing into it).

    **Returns:** a context manager. Entering takes an exclusive, non-blocking `fcntl.flock` on
    RUN/.writer.lock and records this process in it (pid, host, start time, command); the lock goes with the
    process, also when it is killed. A run held by another process, or by another thread of this one, raises
    `RunBusyError` naming it; the same thread may nest blocks. A run directory that cannot be written raises
    `RunWriteError` before anything else is done. A `RunWriteError` leaving the block gets what the run
    keeps and how to continue it added to its message. In a multi-process JAX job, the first process holds
    the lock for the job."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    try:
        with _held_guard:
            hold = _held.get(key)
            if hold is not None and hold.thread != threading.get_ident():
                raise RunBusyError(f"{run_dir} is being written by another thread of this process (pid "
                                   f"{os.getpid()}); one writer per run directory at a time: wait for it to finish.")
            if hold is None:
                hold = _held[key] = _take(run_dir)
            hold.depth += 1
        try:
            yield
        finally:
            with _held_guard:
                hold.depth -= 1
                if hold.depth == 0:
                    del _held[key]
                    _let_go(run_dir, hold)
    except RunWriteError as e:
        if not getattr(e, "continued", False):
            e.message += ". " + _how_to_continue(run_dir, e)
            e.continued = True
        raise


def writes_run(fn: Callable) -> Callable:
    """`fn`, run holding `writer(run_dir)` when its argument `run_dir` is not None."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def holding(*args, **kwargs):
        run_dir = signature.bind(*args, **kwargs).arguments.get("run_dir")
        if run_dir is None:
            return fn(*args, **kwargs)
        with writer(run_dir):
            return fn(*args, **kwargs)

    return holding


def _take(run_dir: Path) -> _Hold:
    """Create `run_dir` if needed and lock it (see `writer`)."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    hold = _Hold(None, threading.get_ident(), missing)
    with writing(run_dir, "the run directory"):
        run_dir.mkdir(parents=True, exist_ok=True)
    if not host.is_primary():
        return hold
    path = run_dir / LOCK_FILE
    try:
        while True:
            with writing(path, "the run's lock file"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunBusyError(f"{run_dir} is being written by another process ({holder}); one process writes a "
                                   "run at a time. Wait for it to finish (or stop it), then continue the run with "
                                   f"`nrnn-train --resume {run_dir}`; reading the run (load_run, nrnn-robustness) "
                                   "needs no wait.") from None
            except OSError as e:  # a filesystem without locks: the run is written unguarded, with a warning
                os.close(fd)
                warnings.warn(f"{path}: the filesystem offers no file locks ({e.strerror}); nothing stops a second "
                              "process from writing this run at the same time.", RuntimeWarning, stacklevel=4)
                return hold
            try:  # the file locked must still be the one at `path`: a holder letting go removes it
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        hold.fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": " ".join(sys.argv)}
        with writing(path, "the run's lock file"):
            os.ftruncate(fd, 0)
            _write_all(fd, json.dumps(me).encode())
    except BaseException:
        _let_go(run_dir, hold)
        raise
    return hold


def _holder(fd: int) -> str:
    """Who holds a lock file, from what it recorded: 'pid P[ on host H], since T: COMMAND'."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "a process that has just started"
    host = info.get("host")
    where = "" if host in (None, socket.gethostname()) else f" on host {host}"
    return f"pid {info['pid']}{where}, since {info.get('since', '?')}: {info.get('command', '?')}"


def _let_go(run_dir: Path, hold: _Hold) -> None:
    """Release the lock (removing its file) and the folders `_take` created, if still empty."""
    if hold.fd is not None:
        path = run_dir / LOCK_FILE
        try:
            if os.path.samestat(os.fstat(hold.fd), os.stat(path)):
                path.unlink()
        except OSError:
            pass
        os.close(hold.fd)  # the lock is released with the descriptor
        hold.fd = None
    for folder in hold.created:  # innermost first; stops at the first that holds something
        try:
            folder.rmdir()
        except OSError:
            break


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _how_to_continue(run_dir: Path, error: RunWriteError) -> str:
    """What a run keeps after a failed write and how to continue it (for `RunWriteError`'s message)."""
    fix = ("free space" if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG) else
           "restore write access" if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "fix the cause")
    if not (run_dir / "config.json").exists():
        return (f"No run was started in {run_dir}: {fix} (or choose another run directory) and start it again.")
    resume = f"`nrnn-train --resume {run_dir}` (train_and_evaluate(..., resume=True))"
    try:
        step = checkpoint.newest_intact(run_dir / "checkpoints")[0]
    except CheckpointError:
        step = None
    if step is None:
        return (f"{run_dir} holds the run's configuration and no complete checkpoint: {fix}, then {resume} starts it "
                "from the beginning.")
    epochs = sum(1 for r in _records(run_dir) if "event" not in r and r["step"] <= step)
    return (f"{run_dir} keeps its last complete checkpoint, step {step}, and the {epochs} epoch record(s) up to it: "
            f"{fix}, then {resume} continues from there and ends as an uninterrupted run would.")


def _lines(run_dir: Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, record or None if the line is damaged, text) for each line of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines() if path.exists() else [], 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            record = None
        out.append((n, record, line))
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The intact records of metrics.jsonl (epoch records and events) in order; `resume_run` reports the
    damaged lines (a line cut off by a kill is the last one, its epoch redone)."""
    return [record for _, record, _ in _lines(run_dir) if record is not None]


def _write_atomic(path: Path, text: str, what: str) -> None:
    """Write `text` to `path` atomically (a temporary file of this process, then a rename): a reader never
    sees a partial file, also while other processes write the same path; a failed write leaves the old file
    and no temporary one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path, what):
            tmp.write_text(text)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any, what: str = "") -> None:
    """Write `obj` as JSON atomically (`_write_atomic`); a failed write raises `RunWriteError` naming the
    file and `what` it holds."""
    _write_atomic(Path(path), json.dumps(obj, indent=2, sort_keys=True), what)


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to metrics.jsonl. A failed write raises `RunWriteError` and cuts the file back to
    the records before it."""
    path = Path(run_dir) / "metrics.jsonl"
    with writing(path, "the epoch records"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, (json.dumps(record) + "\n").encode())
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def check_new_run(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse to start a run in `run_dir` if it already holds one, unless `overwrite` (`start_run`'s check; in a
    multi-process job every process makes it before process 0 writes)."""
    if (run_dir / "config.json").exists() and not overwrite:
        raise ValueError(f"run_dir={str(run_dir)!r} already holds a run; resume it (resume=True, "
                         "nrnn-train --resume) or pass overwrite=True (--overwrite) to replace it.")


def start_run(run_dir: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Create a fresh run directory holding `config` (refused if it already holds a run, unless `overwrite`)."""
    check_new_run(run_dir, overwrite=overwrite)
    with writing(run_dir, "the run directory"):
        for old in ("checkpoints", "damaged"):  # the replaced run's
            if (run_dir / old).exists():
                shutil.rmtree(run_dir / old)
        (run_dir / TRAIN_TIME).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config, "the run's configuration")
    _write_atomic(run_dir / "metrics.jsonl", "", "the epoch records")


def _set_aside(run_dir: Path, path: Path, name: str) -> Path:
    """Move `path` into RUN/damaged/ as `name` (numbered if taken); returns where it went."""
    folder = run_dir / "damaged"
    dest, n = folder / name, 1
    while dest.exists():
        n += 1
        dest = folder / f"{name}-{n}"
    with writing(dest, "the damaged files set aside"):
        folder.mkdir(exist_ok=True)
        path.rename(dest)
    return dest


# What a non-finite loss or gradient does from now on: stop (TrainingDiverged) or roll back, and how many
# rollbacks are allowed. A run stopped by a divergence is resumed under "rollback", as the error suggests; the
# rollbacks a run has made are read from its metrics.jsonl whatever the policy now (the learning-rate factor
# and clip of a rollback, `rollback_lr_factor` / `rollback_grad_clip`, set the optimizer after one, so they stay
# fixed).
DIVERGENCE_POLICY_FIELDS = ("on_divergence", "max_rollbacks")

# Training settings that a resumed run may change: they cannot change what was already trained. `epochs`
# may only grow (the learning-rate decay boundaries are epochs, not fractions of the total, so a longer
# run has the same past); `data_dir` says where the files are now; `eval_batch_size` is memory only (the
# validation loss may move by float rounding); `eval_white_noise` only adds columns to the final summary;
# `checkpoint_every` only says when to save; `DIVERGENCE_POLICY_FIELDS` say what a later divergence does. The
# new values are recorded in config.json.
RESUMABLE_TRAIN_FIELDS = ("epochs", "data_dir", "eval_batch_size", "eval_white_noise", "checkpoint_every",
                          *DIVERGENCE_POLICY_FIELDS)


def resume_run(run_dir: Path, config: dict[str, Any], state: TrainState, sums: dict,
               log: Callable[[str], None] | None = None, layouts: list | None = None, write: bool = True):
    """(state, sums, history) restored from the newest intact checkpoint of `run_dir`, which must have been
    made with the same configuration except for `RESUMABLE_TRAIN_FIELDS` (`epochs` may only grow); records of
    epochs after that checkpoint are dropped (they are redone). `layouts`: the layouts a checkpoint of `state`
    may hold (`state.checkpoint_layouts`); default: `state`'s own.

    Unfinished checkpoint writes are removed. A damaged checkpoint is moved to RUN/damaged/ and the next older
    one is tried (a `RunDamageWarning` names the file and why); a run with no intact checkpoint starts from
    the beginning (`state`, `sums` as given) with its recorded configuration, said through `log`. A damaged
    line of metrics.jsonl before the checkpoint cannot be rebuilt (a checkpoint holds only the sums of the
    epoch in progress): it is copied to RUN/damaged/metrics.jsonl and reported with a `RunDamageWarning`.

    `write=False` (the processes other than 0 of a multi-process job) reads the same and changes no file:
    the unfinished writes and damaged files are left to the writing process, and no warning is given."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it holds no run ({path} is missing).")
    saved = json.loads(path.read_text())
    if saved.get("model", {}).get("cell") == "custom" and saved.get("cell_factory"):
        saved["model"]["cell"] = saved["cell_factory"]  # a user cell as older runs record it: its factory beside
    wanted = json.loads(json.dumps(config))  # as it would be written (tuples become lists)
    defaults = {"model": NRNNConfig().to_dict(), "train": json.loads(json.dumps(TrainConfig().to_dict()))}
    for part in ("model", "train", "sweep"):
        # fields added to the library after the run was written take their defaults
        old = {**defaults.get(part, {}), **saved[part]} if part in saved else {}
        new = wanted.get(part, {})
        free = RESUMABLE_TRAIN_FIELDS if part == "train" else ()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in free)
        if diff:
            raise ValueError(f"Cannot resume {str(run_dir)!r}: it was made with a different {part} "
                             f"configuration (fields differing: {diff}). Use the same settings or a new run_dir.")
    old_epochs, new_epochs = saved["train"].get("epochs", TrainConfig().epochs), wanted["train"]["epochs"]
    if new_epochs < old_epochs:
        raise ValueError(f"Cannot resume {str(run_dir)!r} with epochs={new_epochs}: the run was configured for "
                         f"{old_epochs} epochs, and epochs may only grow on resume.")
    ckpt_dir = run_dir / "checkpoints"
    leftovers = []
    if write:
        with writing(ckpt_dir, "unfinished checkpoint writes"):
            leftovers = checkpoint.remove_unfinished(ckpt_dir)
    if leftovers and log:
        log(f"removed the unfinished checkpoint write(s) {', '.join(leftovers)} from {ckpt_dir}")
    restored, found, damage = {"state": state, "sums": sums}, None, []
    for s in reversed(checkpoint.steps(ckpt_dir)):
        try:
            restored, found = _restore(ckpt_dir, s, layouts or [(state, lambda r: r)], sums)
            break
        except CheckpointError as e:
            if not e.damaged:
                raise
            if write:
                damage.append(f"{e}; set aside as {_set_aside(run_dir, ckpt_dir / str(s), f'checkpoint-{s}')}")
    start = (f"from checkpoint step {found}" if found is not None else
             "from the beginning, with its recorded configuration")
    for message in damage:
        warnings.warn(f"{message}. The run resumes {start}.", RunDamageWarning, stacklevel=2)
    if found is None and not damage and log:
        log(f"{run_dir} has no complete checkpoint: starting it {start}")
    step = found or 0
    state = restored["state"] if isinstance(restored["state"], TrainState) else TrainState(*restored["state"])
    # epoch records up to the checkpoint; rollback events strictly before it (an event at the checkpoint's own
    # step happened after that checkpoint was written, so it is redone)
    lines = _lines(run_dir)
    keep = lambda r: r is not None and (r["step"] < step or (r["step"] == step and "event" not in r))
    last = max((i for i, (_, r, _) in enumerate(lines) if keep(r)), default=-1)
    lost = [(n, text) for n, r, text in lines[:last + 1] if r is None]
    kept = [r for _, r, _ in lines if keep(r)]
    if lost and write:
        metrics = run_dir / "metrics.jsonl"
        copy = run_dir / "damaged" / "metrics.jsonl"
        with writing(copy, "the damaged lines set aside"):
            copy.parent.mkdir(exist_ok=True)
            with open(copy, "a") as f:
                f.writelines(json.dumps({"line": n, "text": text}) + "\n" for n, text in lost)
        epochs = sorted(r["epoch"] for r in kept if "event" not in r)
        missing = sorted(set(range(1, epochs[-1] + 1)) - set(epochs)) if epochs else []
        warnings.warn(f"{metrics}: line(s) {[n for n, _ in lost]} are damaged (not a JSON record) and come before "
                      f"checkpoint step {step}; they cannot be rebuilt (a checkpoint holds only the metric sums of "
                      f"the epoch in progress), so the run's history lacks them"
                      + (f" (epoch(s) {missing} have no record)" if missing else "")
                      + f". Their text is kept in {copy}.", RunDamageWarning, stacklevel=2)
    if write:
        _write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept), "the epoch records")
    changed = {k: wanted["train"][k] for k in RESUMABLE_TRAIN_FIELDS if saved["train"].get(k) != wanted["train"][k]}
    if changed and write:  # record the new settings (other keys, such as the data set's description, are kept)
        write_json(path, {**saved, "train": {**saved["train"], **changed}}, "the run's configuration")
    return state, restored["sums"], [r for r in kept if "event" not in r]


def _restore(ckpt_dir: Path, step: int | None, layouts: list, sums: dict) -> tuple[dict[str, Any], int]:
    """({"state", "sums"}, step) of checkpoint `step` (None: the newest), restored into the first of `layouts`
    ((target state, conversion to the current layout), `state.checkpoint_layouts`) that it holds; a checkpoint
    that holds none raises the error of the first."""
    first = None
    for target, convert in layouts:
        try:
            restored, step = checkpoint.restore_checkpoint(ckpt_dir, {"state": target, "sums": sums}, step)
        except CheckpointError as e:
            if e.damaged:
                raise
            first = first or e
            continue
        state = restored["state"] if isinstance(restored["state"], TrainState) else TrainState(*restored["state"])
        return {"state": convert(state), "sums": restored["sums"]}, step
    raise first


def read_rollbacks(run_dir: Path) -> list[dict[str, Any]]:
    """The divergence rollbacks recorded in a run's metrics.jsonl up to its newest intact checkpoint (the ones
    the checkpointed optimizer has seen, where a resume starts), oldest first."""
    step = checkpoint.newest_intact(run_dir / "checkpoints")[0]
    if step is None:
        return []
    return [r for r in _records(run_dir) if r.get("event") == "rollback" and r["step"] < step]


def previous_train_time(run_dir: Path) -> float:
    """The `train_time_s` of the run's summary.json (0 when none was written, e.g. a killed first session)."""
    path = Path(run_dir) / "summary.json"
    return float(json.loads(path.read_text()).get("train_time_s", 0.0)) if path.exists() else 0.0


TRAIN_TIME = "train_time.json"


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The training sessions recorded in RUN/train_time.json, oldest first, each {"first_step", "last_step",
    "train_time_s"}. A run written before that file existed gives one entry, its summary.json's
    `train_time_s` (`previous_train_time`); so does an unreadable file, with a warning naming it."""
    path = Path(run_dir) / TRAIN_TIME
    if path.exists():
        try:
            sessions = json.loads(path.read_text())["sessions"]
            if all(isinstance(s["train_time_s"], (int, float)) for s in sessions):
                return sessions
            raise ValueError("a train_time_s is not a number")
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path} cannot be read ({e}); the training time of the earlier sessions is taken from "
                          "summary.json instead", stacklevel=2)
    previous = previous_train_time(run_dir)
    return [{"train_time_s": previous, "recorded_in": "summary.json"}] if previous else []


def write_sessions(run_dir: Path, sessions: list[dict[str, Any]]) -> None:
    """Record the training sessions of the run in RUN/train_time.json (atomically)."""
    write_json(Path(run_dir) / TRAIN_TIME, {"sessions": sessions})


def _run_json(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing.")
    return json.loads(path.read_text())


def recorded_code(run_dir: str | Path) -> dict[str, str]:
    """The user code a run directory names by import path; reading it imports nothing.

    **Arguments:**

    - `run_dir`: a run directory (its config.json is read as JSON).

    **Returns:** `{field: "module:name"}` with `"cell_factory"` (the factory of a user cell, for a run with
    `model.cell` not a built-in cell) and `"model.diffusion"` (a user diffusion) where the run has them; empty for a run
    of built-in cells and noises, which needs no code of the user's."""
    return _recorded_code(run_dir, _run_json(run_dir))


def _recorded_code(run_dir, saved: dict[str, Any]) -> dict[str, str]:
    model = saved.get("model", {})
    code = {"cell_factory": saved.get("cell_factory") if model.get("cell", "lipschitz") not in BUILT_IN_CELLS else None,
            "model.diffusion": model.get("diffusion")}
    for field, path in code.items():
        if path is not None and not isinstance(path, str):
            raise ValueError(f"{Path(run_dir) / 'config.json'}: {field}={path!r} is invalid: expected an import "
                             "path 'module:name'.")
    return {field: path for field, path in code.items() if path is not None}


def refuse_code(run_dir, missing: dict[str, str], ways: str | None = None) -> None:
    """The ValueError of recorded user code imported without consent: names each path and the ways forward
    (`ways`; default: the Python API's)."""
    named = ", ".join(f"{field}={path!r}" for field, path in missing.items())
    if ways is None:
        objects = ", ".join("cell=factory" if field == "cell_factory" else "diffusion=sigma" for field in missing)
        ways = (f"pass the code yourself, load_run(run_dir, {objects}), or, if you trust this run directory and "
                "the code it names, import it with trust_code=True")
    raise ValueError(f"{run_dir} names user code by its import path: {named}. Reading a run directory imports "
                     f"no code by itself: {ways}.")


def unsupplied_code(run_dir, cell=None, diffusion=None) -> dict[str, str]:
    """The recorded import paths that reading `run_dir` with these objects would import: those of its user
    code not passed as objects (`cell`, `diffusion`)."""
    passed = {"cell_factory": cell, "model.diffusion": diffusion}
    return {field: path for field, path in recorded_code(run_dir).items() if passed[field] is None}


def _consent(run_dir, cell=None, diffusion=None, trust_code: bool = False) -> None:
    """Refuse (`refuse_code`, before anything is imported) to read `run_dir` if that would import recorded user
    code the caller neither passed nor trusted."""
    missing = unsupplied_code(run_dir, cell, diffusion)
    if missing and not trust_code:
        refuse_code(run_dir, missing)


def read_run_config(run_dir: str | Path, diffusion=None, trust_code: bool = False) -> tuple[NRNNConfig, TrainConfig]:
    """The model and training configurations of a run directory, importing nothing unless told to.

    **Arguments:**

    - `run_dir`: a run directory.
    - `diffusion`: the user diffusion σ(h, z) the run was trained with, for a run that has one (refused for a
      run without).
    - `trust_code`: import a user diffusion from the run's recorded import path.

    **Returns:** `(NRNNConfig, TrainConfig)`. A user diffusion that is neither passed nor trusted stays its
    recorded import path, `NRNNConfig.diffusion = ImportPath("module:name")`: the configuration can be read
    and compared, and a model of it is refused. A user cell is `cell="module:factory"` (or `"custom"` in older runs; its factory:
    `recorded_code`)."""
    cfg = _run_json(run_dir)
    model = dict(cfg["model"])
    recorded = _recorded_code(run_dir, cfg).get("model.diffusion")
    if diffusion is not None:
        if recorded is None:
            fail("", "diffusion", diffusion, f"{run_dir} was trained without a user diffusion; pass none")
        model["diffusion"] = diffusion
    elif recorded is not None:  # a plain string is imported by NRNNConfig; an ImportPath is kept as text
        model["diffusion"] = recorded if trust_code else ImportPath(recorded)
    return NRNNConfig.from_dict(model), TrainConfig.from_dict(cfg["train"])


def _read_train_config(run_dir: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(_run_json(run_dir)["train"])


def read_run_sweep(run_dir: str | Path) -> Sweep | None:
    """The `Sweep` of a run directory, or None for a single-model run."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    return Sweep.from_dict(cfg["sweep"]) if "sweep" in cfg else None


def run_data_dir(run_dir: str | Path, data_dir: str | Path | None = None) -> str | None:
    """Where a run's data is read from: `data_dir` if given (an override, made absolute), else the run's
    stored `data_dir` if it exists, else None ($NRNN_DATA, else ~/.cache/nrnn_jax).

    Runs store an absolute `data_dir` (made absolute when the run starts). A relative one, written by older
    versions, is taken as given if it exists from here, else relative to the run directory's ancestors."""
    if data_dir is not None:
        return str(Path(data_dir).expanduser().resolve())
    tcfg = _read_train_config(run_dir)
    stored = tcfg.data_dir
    if stored is None:
        return None
    path = Path(stored).expanduser()
    if path.exists():
        return str(path.resolve())
    if not path.is_absolute():
        for parent in Path(run_dir).resolve().parents:
            if (parent / path).exists():
                return str(parent / path)
    return None  # moved or on another machine: $NRNN_DATA, else the default directory


def load_run_dataset(run_dir: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """The data set a run was trained on (a named task; reading its configuration imports nothing).

    **Arguments:**

    - `run_dir`: the run directory.
    - `data_dir`: overrides the run's stored data directory (e.g. after the data moved). None: the stored
      directory, or `$NRNN_DATA` when it no longer exists.

    **Returns:** the `Dataset`, loaded with the run's data options.
    """
    tcfg = _read_train_config(run_dir)
    where = run_data_dir(run_dir, data_dir)
    try:
        return load_dataset(tcfg.dataset, where, **dict(tcfg.data_options))
    except (FileNotFoundError, ValueError) as e:
        if where is None and tcfg.data_dir is not None:
            raise type(e)(f"{e} (the run's data_dir {tcfg.data_dir!r} does not exist from here; pass "
                          "data_dir= / --data-dir or set $NRNN_DATA)") from None
        raise


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A configuration file for a new run: JSON holding {"model": {...}, "train": {...}} and optionally
    "sweep" (every part optional; a run's own config.json qualifies, its "dataset" description is ignored).
    Fields are checked against the configuration classes. A relative `train.data_dir` is taken relative to
    the file's directory, so that the file means the same from any working directory. A user diffusion named
    in the file is returned as an `ImportPath` (text; nothing is imported)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid JSON ({e}); only JSON is read") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {str(path)!r} must hold a JSON object with keys 'model', 'train', 'sweep'")
    unknown = sorted(set(cfg) - {"model", "train", "sweep", "dataset"})
    if unknown:
        raise ValueError(f"config file {str(path)!r} has unknown key(s) {unknown}; expected 'model', 'train' "
                         "and optionally 'sweep'")
    out = {}
    for part, cls in (("model", NRNNConfig), ("train", TrainConfig), ("sweep", Sweep)):
        if part in cfg:
            if not isinstance(cfg[part], dict):
                raise ValueError(f"config file {str(path)!r}: {part!r} must be a JSON object")
            cls._check_names(cfg[part])
            out[part] = dict(cfg[part])
    if isinstance(out.get("model", {}).get("diffusion"), str):  # the file's text: imported only with consent
        out["model"]["diffusion"] = ImportPath(out["model"]["diffusion"])
    data_dir = out.get("train", {}).get("data_dir")
    if data_dir is not None and not Path(data_dir).expanduser().is_absolute():
        out["train"]["data_dir"] = str((path.resolve().parent / data_dir).resolve())
    return out


def run_cell_factory(run_dir: str | Path, cell=None, trust_code: bool = False):
    """The cell factory a run needs: None for a built-in cell; for a user cell (`model.cell` its factory's import path, or `"custom"`) the given
    `cell`, else, with `trust_code`, the one recorded in config.json, imported (a factory defined in a
    notebook or a script's `__main__` cannot be imported: pass it). Without either, a ValueError names the
    recorded path."""
    saved = _run_json(run_dir)
    name = saved["model"].get("cell", "lipschitz")
    if name in BUILT_IN_CELLS:
        if cell is not None:
            fail("", "cell", cell, f"{run_dir} was trained with the built-in cell {name!r}; pass no cell")
        return None
    if cell is not None:
        return cell
    path = _recorded_code(run_dir, saved).get("cell_factory")
    if path is None:
        fail("", "cell", None, f"{run_dir} was trained with a user cell; pass its factory: load_run(run_dir, cell=factory)")
    if not trust_code:
        refuse_code(run_dir, {"cell_factory": path})
    try:
        return resolve_import_path(path)
    except Unimportable as e:
        raise ValueError(f"{run_dir} was trained with a user cell ({path}) that cannot be imported from here ({e}); "
                         "pass the same factory: load_run(run_dir, cell=factory)") from None


def load_run(run_dir: str | Path, member: int | None = None, cell=None, diffusion=None,
             trust_code: bool = False) -> NoisyRNN:
    """The trained model of a run directory written by `train_and_evaluate` / `nrnn-train`.

    **Arguments:**

    - `run_dir`: the run directory.
    - `member`: for a sweep, the member to return (with its own noise levels in its configuration); required
      there, and None for a single-model run.
    - `cell`: for a run of a user cell, the factory it was trained with (`train_and_evaluate(..., cell=factory)`).
    - `diffusion`: for a run of a user diffusion, the function σ(h, z) it was trained with.
    - `trust_code`: import the user code the run records (`recorded_code`) instead, for what `cell` /
      `diffusion` do not give. Only for run directories whose code you trust: importing a module runs it.

    **Returns:** the `NoisyRNN` with the newest checkpoint's parameters. A run of built-in cells and noises
    needs none of `cell`, `diffusion`, `trust_code`; for one with user code that is neither passed nor trusted
    a ValueError names each recorded import path before anything is imported or restored. A damaged newest
    checkpoint raises `CheckpointError` naming the file and the intact one a resume would continue from."""
    _consent(run_dir, cell, diffusion, trust_code)
    cell = run_cell_factory(run_dir, cell, trust_code)
    mcfg, tcfg = read_run_config(run_dir, diffusion, trust_code)
    sweep = read_run_sweep(run_dir)
    rollbacks = len(read_rollbacks(Path(run_dir)))
    tx = make_optimizer(tcfg, 1, rollbacks)  # the optimizer state's structure
    if sweep is None:
        if member is not None:
            fail("", "member", member, f"{run_dir} holds a single model, not a sweep")
        graphdef, target = init_model_state(mcfg, tx, tcfg.seed, cell)  # the structure, shapes and dtypes to restore into
    else:
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < sweep.size:
            fail("", "member", member, f"{run_dir} holds a sweep of {sweep.size} models; pass member=0..{sweep.size - 1}")
        graphdef, target = init_sweep_states(mcfg, tx, sweep, cell)
    sums = zero_sums(metric_names(tcfg), None if sweep is None else sweep.size)
    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        restored, _ = _restore(ckpt_dir, None, checkpoint_layouts(target, tcfg, 1, rollbacks), sums)
    except CheckpointError as e:
        if not e.damaged:
            raise
        older = checkpoint.newest_intact(ckpt_dir, before=e.step)[0]
        how = (f"checkpoint step {older} is intact: `nrnn-train --resume {run_dir}` sets the damaged one aside and "
               "continues the run from it" if older is not None else
               f"no intact checkpoint remains: `nrnn-train --resume {run_dir}` trains the run again from the beginning")
        raise CheckpointError(f"{e}. {how}.", path=e.path, step=e.step, damaged=True) from None
    params = restored["state"].params
    if sweep is None:
        return nnx.merge(graphdef, params)
    model = nnx.merge(graphdef, unstack(params, sweep.size)[member])
    model.cfg = sweep.member_config(mcfg, member)
    return model
