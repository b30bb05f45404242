"""The errors and warnings of run directories: a run another process is writing (`RunBusyError`), a write
that failed (`RunWriteError`), a checkpoint that cannot be read (`CheckpointError`), damage found and
worked around (`RunDamageWarning`).

`writing(path, what)` turns the `OSError` of a write (no space, permission, read-only filesystem, quota)
into a `RunWriteError` that names the file."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


class RunBusyError(RuntimeError):
    """Another process (or another thread of this one) is writing the run directory; the message names the
    run and the process holding it."""


class RunWriteError(OSError):
    """A file of a run directory could not be written (no space, permission, read-only filesystem, quota).

    `errno`, `strerror`, `filename`: those of the failed write; `what`: the part of the run it was writing
    (e.g. "checkpoint step 45"). The message names the file and the reason; where the run had started, the
    training loop adds what the run keeps and how to continue it."""

    def __init__(self, code: int | None, strerror: str, filename: str | Path, what: str, message: str | None = None):
        super().__init__(code, strerror, str(filename))
        self.what = what
        self.message = message or (f"could not write {filename}{f' ({what})' if what else ''}: {strerror}"
                                   + (f" [Errno {code}]" if code is not None else ""))

    def __str__(self) -> str:
        return self.message


class CheckpointError(ValueError):
    """A checkpoint cannot be read. The message names the file (`path`) and why; `step` is the checkpoint's
    step; `damaged` is True when its files are damaged (missing, empty, truncated, altered) rather than
    unreadable for another reason (permission, a different model structure)."""

    def __init__(self, message: str, *, path: str | Path, step: int | None, damaged: bool):
        super().__init__(message)
        self.path, self.step, self.damaged = Path(path), step, damaged


class RunDamageWarning(UserWarning):
    """Damage found in a run directory and worked around (a damaged checkpoint set aside, a damaged record
    of metrics.jsonl); the message names the file."""


@contextlib.contextmanager
def writing(path: str | Path, what: str):
    """Within the block, an `OSError` becomes a `RunWriteError` naming `path` (unless the error names
    another file) and `what` was being written."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as e:
        raise RunWriteError(e.errno, e.strerror or str(e), e.filename or path, what) from None


def os_error_of(exc: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) of a failed file operation reported by `exc` or its causes: an `OSError`, or an error
    of tensorstore (orbax's array writer) carrying `os_error_code='N'`; None when none of them reports one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno is not None or exc.strerror):
            return exc.errno, exc.strerror or str(exc)
        code = re.search(r"os_error_code='?(\d+)", str(exc))
        if code is not None:
            return int(code.group(1)), os.strerror(int(code.group(1)))
        exc = exc.__cause__ or exc.__context__
    return None
