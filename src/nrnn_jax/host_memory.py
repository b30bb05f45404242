"""Host memory for XLA:CPU: large freed blocks are kept and reused instead of returned to the kernel.

**Why.** On every execution XLA:CPU allocates the compiled program's temporary buffer (and every result) with
`posix_memalign`, from its worker threads, and frees it afterwards. glibc serves a block above 32 MiB (its
largest mmap threshold) with a fresh `mmap` — from a worker thread always, since a thread's own arena cannot
hold it — and unmaps it on `free`. So every step touches its whole temporary buffer as new pages: at the
pixel-MNIST shape (T 784, hidden 128, batch 128) with a 393 MiB buffer, that was about 100 000 minor page
faults and 0.2 s of kernel time per train step, a third of the step on a 2-core CPU (75 000 faults and a
fifth of the step with the present 295 MiB buffer; README, "Where the CPU time goes").

**What this does.** At `import nrnn_jax`, before JAX starts its CPU threads, `keep_freed_memory()` sets
glibc's malloc (through `mallopt`) so that every thread allocates from the main heap (`M_ARENA_MAX` 1), that
heap serves large blocks too (`M_MMAP_MAX` 0: no per-block `mmap`) and keeps up to 2 GiB of freed memory at
its top (`M_TRIM_THRESHOLD`). The buffer of the first step is then reused by every later one: no page faults,
the same numbers. The cost: the process keeps its peak heap (up to 2 GiB more than it uses), as PyTorch's and
JAX's own GPU allocators do, and threads share one malloc arena.

The settings are process-wide and take effect only for threads that have not allocated yet: import
`nrnn_jax` before running JAX computations (a training script does), or start the process with the same
settings, `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
Set the environment variable `NRNN_JAX_HOST_MALLOC=system` to leave glibc's malloc as it is. Only Linux
with glibc is affected; elsewhere this is a no-op. `status()` says what was done.

This module imports nothing from JAX, so that `nrnn_jax/__init__.py` can apply it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "NRNN_JAX_HOST_MALLOC"
CHOICES = ("keep", "system")
# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest, 2 GiB
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}")

_status = "not applied"


def _libc():
    """glibc's shared library, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep large freed blocks for reuse (see the module docstring); returns whether
    the settings were applied (False where the C library is not glibc)."""
    global _status
    libc = _libc()
    if libc is None:
        _status = "not applied: the C library is not glibc"
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    _status = ("applied: glibc malloc keeps freed memory (arena_max 1, mmap_max 0, trim_threshold 2 GiB)" if ok
               else "not applied: glibc's mallopt refused a setting")
    return ok


def status() -> str:
    """What `import nrnn_jax` did to the host allocator, in words."""
    return _status


def apply_default() -> bool:
    """What `import nrnn_jax` calls: `keep_freed_memory()` unless `NRNN_JAX_HOST_MALLOC=system`."""
    global _status
    choice = os.environ.get(ENV, "keep")
    if choice not in CHOICES:
        raise ValueError(f"the environment variable {ENV}={choice!r} is invalid: expected one of "
                         + ", ".join(repr(c) for c in CHOICES) + ".")
    if choice == "system":
        _status = f"not applied: {ENV}=system"
        return False
    return keep_freed_memory()
