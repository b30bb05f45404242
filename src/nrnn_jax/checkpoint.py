"""Checkpoints with orbax: atomic (orbax writes to a temporary folder, then renames), step-numbered, checked
when read.

    CKPT/<step>/                          one checkpoint (orbax's files)
    CKPT/<step>/nrnn_jax_manifest.json    the size and CRC-32 of each of its files, written after orbax's save
    CKPT/<step>.orbax-checkpoint-tmp*     an unfinished write (a killed process, a full disk)

Every read error names the file: `verify` compares a checkpoint with its manifest (a checkpoint without one,
e.g. of an older version, has its JSON files and item folder checked), and an error of orbax's reader is
translated into a `CheckpointError` naming the file tensorstore names. A failed write (no space,
permission, read-only filesystem, quota) raises one `RunWriteError`, with the unfinished files removed and
the older checkpoints intact; the tracebacks that orbax's writer threads log for it are held back.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from . import host
from .errors import CheckpointError, RunWriteError, os_error_of

MANIFEST = "nrnn_jax_manifest.json"
UNFINISHED = ".orbax-checkpoint-tmp"


def _manager(ckpt_dir: str | Path, max_to_keep: int | None = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=options)


class _Held:
    failed = False


class _LateOrbaxReports(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of orbax's tasks. Installed on the asyncio
    logger once a failed write or read has been reported as our own error: a task of that operation still
    running when its block ended (orbax writes in parallel) finishes with the same error and is reported
    when it is collected, often at interpreter exit. Any other asyncio report passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


_LATE = _LateOrbaxReports()


@contextlib.contextmanager
def _held_back(pass_logs_on: bool = True):
    """orbax reports an error of its background threads twice: logged with a traceback by the thread, and
    raised by the call that waits for it; the futures, tasks and coroutines that a failed write or read
    leaves behind log or print more tracebacks when they are collected. Within the block, the error logs of
    orbax (absl) and asyncio and the unraisable exceptions are held back. The caller sets `failed` on the
    object yielded after turning the error into its own exception (and dropping the original, so that what
    it references can be collected); the block then ends with a collection and the held reports are
    dropped. Otherwise they are passed on (the logs only if `pass_logs_on`). An exception leaving the
    block counts as a failure."""
    held, logs, unraisable = _Held(), [], []
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            logs.append(record)
            return False
        return True

    for logger in loggers:
        logger.addFilter(hold)
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        yield held
    except BaseException:
        held.failed = True
        raise
    finally:
        if held.failed:
            gc.collect()  # what the failed operation left behind is finalized here, its reports held back
            logging.getLogger("asyncio").addFilter(_LATE)  # nor what finishes later (added once)
        sys.unraisablehook = hook
        for logger in loggers:
            logger.removeFilter(hold)
        if not held.failed:
            for record in logs if pass_logs_on else ():
                logging.getLogger(record.name).handle(record)
            for report in unraisable:
                hook(report)


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(step_dir: Path) -> None:
    """The size and CRC-32 of each file of a finished checkpoint, written atomically into it."""
    files = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"):
            files[p.relative_to(step_dir).as_posix()] = [p.stat().st_size, _crc(p)]
    tmp = step_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"files": files}))
        tmp.replace(step_dir / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir: str | Path, step: int, tree: Any, *, max_to_keep: int | None = 2) -> None:
    """Save a pytree of arrays as checkpoint `step`, with its manifest (older ones beyond `max_to_keep` are
    removed once it is complete).

    A write that fails (no space, permission, read-only filesystem, quota) raises `RunWriteError` naming
    the checkpoint and the reason; the unfinished files are removed and the older checkpoints stay intact."""
    ckpt_dir, step = Path(ckpt_dir), int(step)
    failure = None
    with _held_back() as held:
        try:
            with _manager(ckpt_dir, max_to_keep) as mngr:
                mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
                mngr.wait_until_finished()
            if host.is_primary():
                _write_manifest(ckpt_dir / str(step))
        except Exception as e:
            failure = os_error_of(e)
            if failure is None:
                raise
            held.failed = True
    if failure is not None:
        remove_unfinished(ckpt_dir, step)
        raise RunWriteError(*failure, ckpt_dir / str(step), f"checkpoint step {step}")


def remove_unfinished(ckpt_dir: str | Path, step: int | None = None) -> list[str]:
    """Remove the folders of unfinished checkpoint writes (of `step`, or all); returns their names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    pattern = f"*{UNFINISHED}*" if step is None else f"{step}{UNFINISHED}*"
    removed = []
    for p in sorted(ckpt_dir.glob(pattern)):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def steps(ckpt_dir: str | Path) -> list[int]:
    """The steps of the finished checkpoints in `ckpt_dir`, oldest first (none if it does not exist)."""
    if not Path(ckpt_dir).is_dir():
        return []
    with _held_back(pass_logs_on=False), _manager(ckpt_dir, create=False) as mngr:
        return sorted(mngr.all_steps())


def latest_step(ckpt_dir: str | Path) -> int | None:
    """The newest finished checkpoint's step (intact or not), or None."""
    found = steps(ckpt_dir)
    return found[-1] if found else None


def _damaged(step: int, path: Path, why: str, inside: str = "") -> CheckpointError:
    """`path`: the damaged file, or the folder holding `inside` (what tensorstore names)."""
    where = f"{path} ({inside})" if inside else path
    return CheckpointError(f"checkpoint step {step} is damaged: {where}: {why}", path=path, step=step, damaged=True)


def _unreadable(step: int, path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"checkpoint step {step}: {path} cannot be read: {e.strerror or e}", path=path, step=step,
                           damaged=isinstance(e, FileNotFoundError))


def _check_json(step: int, path: Path) -> None:
    text = path.read_text(errors="replace")
    if not text.strip():
        raise _damaged(step, path, "the file is empty")
    try:
        json.loads(text)
    except ValueError as e:
        raise _damaged(step, path, f"not valid JSON ({e})") from None


def verify(ckpt_dir: str | Path, step: int) -> None:
    """Raise `CheckpointError` (naming the file) unless checkpoint `step` is intact: every file listed in its
    manifest present with its size and CRC-32; without a manifest, its item folder present and its JSON
    files readable."""
    step_dir = Path(ckpt_dir) / str(step)
    manifest = step_dir / MANIFEST
    try:
        if manifest.exists():
            try:
                listed = json.loads(manifest.read_text())["files"]
                entries = [(rel, int(size), int(crc)) for rel, (size, crc) in listed.items()]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise _damaged(step, manifest, f"not a manifest ({e})") from None
            for rel, size, crc in entries:
                path = step_dir / rel
                if not path.is_file():
                    raise _damaged(step, path, "the file is missing")
                actual = path.stat().st_size
                if actual != size:
                    how = "empty" if actual == 0 else "truncated" if actual < size else "longer than written"
                    raise _damaged(step, path, f"{actual} bytes where {size} were written ({how})")
                if _crc(path) != crc:
                    raise _damaged(step, path, "its content differs from what was written (CRC-32 mismatch)")
            return
        item = step_dir / "default"
        if not item.is_dir():
            raise _damaged(step, item, "the folder is missing")
        for path in [step_dir / "_CHECKPOINT_METADATA", item / "_METADATA", *sorted(item.glob("array_metadatas/*"))]:
            if path.exists():
                _check_json(step, path)
    except OSError as e:
        raise _unreadable(step, Path(e.filename or step_dir), e) from None


def newest_intact(ckpt_dir: str | Path, before: int | None = None) -> tuple[int | None, list[CheckpointError]]:
    """(the newest checkpoint that `verify` passes, of a step below `before` if given, or None; the damage
    found in the newer ones, newest first). A checkpoint that cannot be read for another reason (e.g.
    permission) raises its error."""
    damaged = []
    for step in reversed([s for s in steps(ckpt_dir) if before is None or s < before]):
        try:
            verify(ckpt_dir, step)
            return step, damaged
        except CheckpointError as e:
            if not e.damaged:
                raise
            damaged.append(e)
    return None, damaged


# tensorstore's status codes of data that is not what was written
_DATA_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def _read_error(ckpt_dir: Path, step: int, exc: BaseException) -> CheckpointError:
    """The `CheckpointError` of an exception raised by orbax's restore, naming the file it concerns."""
    step_dir = ckpt_dir / str(step)
    chain, x = [], exc
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, json.JSONDecodeError):  # which JSON file: the first that does not read
            for path in sorted(step_dir.rglob("*")):
                if path.is_file() and (path.name.startswith("_") or path.parent.name == "array_metadatas"):
                    try:
                        _check_json(step, path)
                    except CheckpointError as e:
                        return e
            return _damaged(step, step_dir, f"a JSON file is not valid ({x})")
        if isinstance(x, OSError):
            return _unreadable(step, Path(x.filename or step_dir), x)
        text = str(x)
        status = re.search(rf"\b({'|'.join(_DATA_ERRORS)}): ", text)
        if status is not None:
            files = re.findall(r'local file "([^"]+)"', text)
            path = Path(files[-1]) if files else step_dir
            why = re.split(r'local file "[^"]+": ', text)[-1].splitlines()[0].split(" [tensorstore_spec")[0]
            key = re.search(r'Error reading "([^"/]+)', text)
            inside = f"the data of {key.group(1)}" if key is not None and path.is_dir() else ""
            return _damaged(step, path, f"{why} [{status.group(1)}]", inside)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(f"checkpoint step {step} ({step_dir}) cannot be restored into this model: "
                           f"{type(exc).__name__}: {first}", path=step_dir, step=step, damaged=False)


def restore_checkpoint(ckpt_dir: str | Path, target: Any, step: int | None = None) -> tuple[Any, int]:
    """Restore checkpoint `step` (default: the latest) into the structure, shapes and dtypes of `target`.

    **Arguments:**

    - `ckpt_dir`: the checkpoints folder.
    - `target`: a pytree of arrays with the structure, shapes and dtypes to restore into.
    - `step`: the checkpoint's step; None for the newest.

    **Returns:** `(restored pytree, step)`. A checkpoint that is damaged or cannot be read raises
    `CheckpointError` naming the file (`verify` before reading; orbax's own errors translated);
    `FileNotFoundError` if there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = latest_step(ckpt_dir)
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt_dir}.")
    verify(ckpt_dir, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    error = None
    with _held_back() as held:
        try:
            with _manager(ckpt_dir, create=False) as mngr:
                return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), step
        except Exception as e:
            error = _read_error(ckpt_dir, step, e)
            if not error.damaged:
                raise error from e
            held.failed = True
    raise error


def delete_after(ckpt_dir: str | Path, step: int) -> None:
    """Remove the checkpoints of steps after `step` (a trajectory abandoned by a divergence rollback)."""
    if not Path(ckpt_dir).exists():
        return
    with _manager(ckpt_dir) as mngr:
        for s in mngr.all_steps():
            if s > step:
                mngr.delete(s)
