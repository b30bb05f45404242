"""Process set-up for fast CPU training, applied only when asked: `configure()`.

Importing `nrnn_jax` changes nothing outside the package. A program that trains on CPU calls
`nrnn_jax.host.configure()` once, before its first JAX computation, for two settings that make a
long-sequence CPU train step about twice as fast on a 2-core machine (docs/performance.md):

- **devices**: one XLA:CPU device per host core (`jax_num_cpu_devices`). XLA:CPU runs a `while` loop's
  body on one thread, so the recurrence's loops use one core; with one device per core, the data-parallel
  train step (`make_train_step(..., devices=n)`, picked by `train_and_evaluate(devices="auto")` for long
  sequences) runs each device's rows of the batch through its own loops on its own core.
- **allocator**: glibc's malloc keeps large freed blocks for reuse (`mallopt`: every thread allocates
  from the main heap, which also serves large blocks, and up to 2 GiB of freed memory is kept). XLA:CPU
  allocates each execution's temporary buffer afresh; without this, glibc maps and unmaps it on every
  call, and every step page-faults its whole buffer in again. The cost: the process keeps its peak heap.

The command-line programs call `configure` (their `--host-devices` and `--host-allocator` flags choose).
A script or notebook gets the same speed with

    import nrnn_jax
    nrnn_jax.host.configure()          # before any JAX computation

Both settings are process-wide. `status()` says what was done.

Several processes (several hosts, or one process per GPU) train one run or comparison together through JAX's
own multi-process runtime: each calls `initialize_distributed()` once, before any JAX computation (the
command-line programs do for `--distributed` or `--coordinator/--num-processes/--process-id`); `is_primary()`
says whether this process is the one that writes files (docs/guide/distributed.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import socket
import sys
import time

DEVICES_ENV = "NRNN_JAX_HOST_DEVICES"
ALLOCATOR_ENV = "NRNN_JAX_HOST_MALLOC"
ALLOCATORS = ("keep", "system")
DEVICE_FLAG = "--xla_force_host_platform_device_count"
# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest, 2 GiB
# The same allocator settings for a process started from outside (e.g. a PyTorch baseline).
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}")

_status = {"devices": "not configured", "allocator": "not configured"}


class HostConfigError(RuntimeError):
    """`configure` was asked for a device count after JAX had started."""


def host_cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def device_count(devices, where: str) -> int | None:
    """The CPU device count asked for (None: JAX's default); raises naming `where` on a bad value."""
    if devices == "system":
        return None
    if devices in ("auto", "cores"):
        return host_cores()
    n = devices
    if isinstance(devices, str):
        n = int(devices) if devices.strip().isdigit() else 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}={devices!r} is invalid: expected 'auto' (one CPU device per host core), "
                         "'system' (JAX's default) or a positive integer.")
    return n


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private function
        return False


def _configure_devices(n: int | None, devices, where: str, explicit: bool) -> str:
    """Set JAX's CPU device count to `n` (the count `devices`, given through `where`, asks for)."""
    if n is None:
        return f"JAX's default ({where}=system)"
    if DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return f"left as XLA_FLAGS sets it ({DEVICE_FLAG})"
    import jax

    current = jax.config.jax_num_cpu_devices
    if not explicit and current not in (-1, n):  # a count the user set (JAX_NUM_CPU_DEVICES, jax.config)
        return f"left at {current} (jax_num_cpu_devices was already set)"
    if _backends_started():
        if jax.default_backend() == "cpu" and jax.local_device_count() == n:
            return f"{n} CPU device(s)"
        raise HostConfigError(
            f"nrnn_jax.host.configure: {where}={devices!r} asks for {n} CPU device(s), but JAX has already started "
            f"(a computation ran or jax.devices() was called) with {jax.local_device_count()} "
            f"{jax.default_backend().upper()} device(s), which can no longer change. Call configure() before any "
            "JAX computation, or pass devices='system' to leave the count as it is.")
    jax.config.update("jax_num_cpu_devices", n)
    return f"{n} CPU device(s)" + (", one per host core" if devices in ("auto", "cores") else "")


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


def _check_allocator(allocator, where: str) -> None:
    if allocator not in ALLOCATORS:
        raise ValueError(f"{where}={allocator!r} is invalid: expected one of "
                         + ", ".join(repr(c) for c in ALLOCATORS) + ".")


def _configure_allocator(allocator: str, where: str) -> str:
    if allocator == "system":
        return f"glibc's defaults ({where}=system)"
    libc = _libc()
    if libc is None:
        return "unchanged: the C library is not glibc"
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return ("keeps freed memory (arena_max 1, mmap_max 0, trim_threshold 2 GiB)" if ok
            else "unchanged: glibc's mallopt refused a setting")


def configure(devices: int | str | None = None, allocator: str | None = None) -> dict[str, str]:
    """Set up this process for fast CPU training (see the module docstring). Call it before any JAX
    computation.

    **Arguments:**

    - `devices`: `"auto"` (one CPU device per host core), a positive integer, or `"system"` (leave JAX's
      default). None: the environment variable `NRNN_JAX_HOST_DEVICES` if set, else `"auto"`. A count set
      through `XLA_FLAGS=--xla_force_host_platform_device_count=N` is left alone.
    - `allocator`: `"keep"` (glibc's malloc keeps large freed blocks) or `"system"` (leave it). None: the
      environment variable `NRNN_JAX_HOST_MALLOC` if set, else `"keep"`. Only Linux with glibc is affected.

    **Returns:** what was done, `{"devices": ..., "allocator": ...}` in words (also `status()`).

    **Raises:** `ValueError` for a bad value (naming it and what is allowed); `HostConfigError` when a device
    count other than JAX's present one is asked for after JAX has started.
    """
    if devices is None:
        devices, dwhere = os.environ.get(DEVICES_ENV, "auto"), f"the environment variable {DEVICES_ENV}"
    else:
        dwhere = "configure(devices)"
    if allocator is None:
        allocator, awhere = os.environ.get(ALLOCATOR_ENV, "keep"), f"the environment variable {ALLOCATOR_ENV}"
    else:
        awhere = "configure(allocator)"
    n = device_count(devices, dwhere)  # both values checked before anything changes
    _check_allocator(allocator, awhere)
    # The allocator first: its settings reach only threads that have not allocated yet.
    _status["allocator"] = _configure_allocator(allocator, awhere)
    _status["devices"] = _configure_devices(n, devices, dwhere, explicit=dwhere.startswith("configure"))
    return dict(_status)


def status() -> dict[str, str]:
    """What `configure` did in this process, in words (`"not configured"` before it is called)."""
    return dict(_status)


CPU_COLLECTIVES = ("gloo", "mpi", "none")


class DistributedError(RuntimeError):
    """`initialize_distributed` could not join the job: the coordinator could not be reached in time."""


def _parse_address(coordinator: str, where: str) -> tuple[str, int]:
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{where}={coordinator!r} is invalid: expected HOST:PORT, the address of process 0 and a "
                         "free port on it (PORT in 1..65535), e.g. 10.0.0.1:12345 or 127.0.0.1:12345 on one machine.")
    return host.strip("[]"), int(port)


def _positive_int(value, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} is invalid: expected {what}.")
    return value


def check_distributed(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, *, timeout_s: int = 300, heartbeat_timeout_s: int = 100,
                      cpu_collectives: str = "gloo", names: dict[str, str] | None = None) -> None:
    """Raise `ValueError` (naming the argument, its value and what is allowed) unless the arguments of
    `initialize_distributed` are valid; `names` maps argument names to the flags the user typed."""
    name = lambda arg: (names or {}).get(arg, arg)
    manual = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    given = [k for k, v in manual.items() if v is not None]
    if given and len(given) < 3:
        missing = ", ".join(name(k) for k in manual if manual[k] is None)
        raise ValueError(f"{name(given[0])}={manual[given[0]]!r} starts a manual launch, which needs all of "
                         f"{', '.join(name(k) for k in manual)}; missing: {missing}. Without any of them the cluster's "
                         "environment (SLURM, Open MPI) is read.")
    if given:
        _parse_address(coordinator, name("coordinator"))
        _positive_int(num_processes, name("num_processes"), "a positive integer, the number of processes of the job")
        if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"{name('process_id')}={process_id!r} is invalid: expected an integer in "
                             f"[0, {num_processes - 1}] ({name('num_processes')}={num_processes}), each process its own.")
    _positive_int(timeout_s, name("timeout_s"), "a positive whole number of seconds")
    _positive_int(heartbeat_timeout_s, name("heartbeat_timeout_s"), "a positive whole number of seconds")
    if cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"{name('cpu_collectives')}={cpu_collectives!r} is invalid: expected one of "
                         + ", ".join(repr(c) for c in CPU_COLLECTIVES) + ".")


def _wait_for_coordinator(host: str, port: int, process_id: int, deadline: float) -> None:
    """Return once a TCP connection to the coordinator succeeds; raise `DistributedError` at `deadline`."""
    error = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise DistributedError(
        f"process {process_id} could not reach the coordinator at {host}:{port} within the timeout "
        f"({error.strerror or error}): start process 0 with the same --coordinator (it serves that address), check "
        "the host name and port and that no firewall blocks it, or raise the timeout.")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: int = 300, heartbeat_timeout_s: int = 100,
                           cpu_collectives: str = "gloo", log=None) -> dict[str, int]:
    """Join a multi-process JAX job (`jax.distributed.initialize`); call it once per process, before any JAX
    computation. Training then runs data-parallel over the devices of all processes, and only process 0
    writes files (`is_primary`).

    **Arguments:**

    - `coordinator`, `num_processes`, `process_id`: a manual launch ("HOST:PORT" of process 0, which serves
      the coordinator there; the number of processes; this one's id in [0, num_processes)). All three, or
      none: the launcher's environment (SLURM's `srun`, Open MPI's `mpirun`) is read by JAX.
    - `timeout_s`: how long to wait for the coordinator and for every process to join. A process other than
      0 that cannot open a connection to the coordinator in this time raises `DistributedError` naming its
      id and the address.
    - `heartbeat_timeout_s`: a process whose peer stops answering for this long is ended by JAX, with a
      message naming the peer (its checkpoints stay; `--resume` continues).
    - `cpu_collectives`: how CPU devices of different processes exchange data (`jax_cpu_collectives_implementation`:
      "gloo", "mpi" or "none"); accelerators use their own.
    - `log`: called with one line saying what is joined (None: silent).

    **Returns:** `{"process_id", "num_processes", "devices", "local_devices"}` of the job.

    **Raises:** `ValueError` for a bad argument (naming it, its value and what is allowed), before anything is
    done, or when no launcher's environment is found; `DistributedError` as above. A process joined to a coordinator whose other processes do not all
    arrive within `timeout_s` is ended by JAX (DEADLINE_EXCEEDED at RegisterTask).
    """
    check_distributed(coordinator, num_processes, process_id, timeout_s=timeout_s,
                      heartbeat_timeout_s=heartbeat_timeout_s, cpu_collectives=cpu_collectives)
    import jax

    deadline = time.monotonic() + timeout_s
    if coordinator is not None and process_id != 0:
        _wait_for_coordinator(*_parse_address(coordinator, "coordinator"), process_id, deadline)
    previous = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if log is not None:
        who = (f"process {process_id} of {num_processes}, coordinator {coordinator}" if coordinator is not None
               else "the launcher's environment")
        log(f"joining a multi-process JAX job ({who}; waiting up to {timeout_s} s for every process)")
    left = max(1, math.ceil(deadline - time.monotonic()))
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=left,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except BaseException as e:
        jax.config.update("jax_cpu_collectives_implementation", previous)  # nothing joined: nothing changed
        if coordinator is not None or not isinstance(e, ValueError):
            raise
        raise ValueError(f"joining a multi-process job from the launcher's environment found none to read (JAX: {e}): "
                         "start the processes with SLURM's srun or Open MPI's mpirun, or give the coordinator, the "
                         "number of processes and this process's id (--coordinator, --num-processes, "
                         "--process-id).") from None
    return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def is_primary() -> bool:
    """Whether this process writes the files of a run or comparison: process 0 of a multi-process job
    (`initialize_distributed`), or the one process otherwise."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """In a multi-process job, wait until every process has reached the barrier `name` (the processes
    call the same barriers in the same order); in a single process, nothing."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
