"""One XLA:CPU device per host core, so that a long-sequence CPU train step can split its batch over the cores.

**Why.** XLA:CPU runs a `while` loop's body on one thread: the recurrence's 784 small matrix products per
direction (pixel MNIST) run one after another on one core, and the second core of a 2-core machine idles
through both loops of the train step, the larger part of it (README, "Where the CPU time goes"). JAX shows
the host as one CPU device by default. With one CPU device per core, a data-parallel train step
(`nrnn_jax.train.make_train_step(..., devices=n)`) runs each half of the batch through its own loops on its
own core, and sums the gradients once at the end.

**What this does.** At `import nrnn_jax`, before JAX initializes its backends, `apply_default()` sets JAX's
`jax_num_cpu_devices` to the number of cores this process may run on (`os.sched_getaffinity`). Nothing else
changes: computations still run on the first device unless they are sharded, and JAX's thread pool is
shared by the devices. `train_and_evaluate(devices="auto")` (the default) uses the devices only where the
split pays (`nrnn_jax.train.default_devices`).

It leaves the count alone where the user has chosen one: `XLA_FLAGS=--xla_force_host_platform_device_count=N`,
`JAX_NUM_CPU_DEVICES=N` or `jax.config.update("jax_num_cpu_devices", N)` before importing `nrnn_jax`; and
where JAX's backends are already initialized (then it cannot change). Set the environment variable
`NRNN_JAX_HOST_DEVICES` to `system` to leave JAX's default (one CPU device), or to a positive integer for
that many devices. `status()` says what was done.
"""

from __future__ import annotations

import os

ENV = "NRNN_JAX_HOST_DEVICES"
FLAG = "--xla_force_host_platform_device_count"

_status = "not applied"


def host_cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _requested() -> int | None:
    """The device count `NRNN_JAX_HOST_DEVICES` asks for (None: `system`); raises on a bad value."""
    raw = os.environ.get(ENV, "cores")
    if raw == "system":
        return None
    if raw == "cores":
        return host_cores()
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1 or str(n) != raw.strip():
        raise ValueError(f"the environment variable {ENV}={raw!r} is invalid: expected 'cores' (the default: one "
                         "CPU device per host core), 'system' (JAX's default) or a positive integer.")
    return n


def status() -> str:
    """What `import nrnn_jax` did to JAX's CPU device count, in words."""
    return _status


def apply_default() -> int | None:
    """What `import nrnn_jax` calls (see the module docstring). Returns the CPU device count it set, or None
    where it set none."""
    global _status
    n = _requested()
    if n is None:
        _status = f"not applied: {ENV}=system"
        return None
    import jax

    if FLAG in os.environ.get("XLA_FLAGS", ""):
        _status = f"not applied: XLA_FLAGS sets {FLAG}"
        return None
    if jax.config.jax_num_cpu_devices != -1:
        _status = f"not applied: jax_num_cpu_devices was already set to {jax.config.jax_num_cpu_devices}"
        return None
    try:
        from jax._src import xla_bridge

        initialized = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without this private function: try, and report a refusal
        initialized = False
    if initialized:
        _status = "not applied: JAX's backends were initialized before nrnn_jax was imported"
        return None
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except (RuntimeError, ValueError, AttributeError) as e:
        _status = f"not applied: {e}"
        return None
    _status = f"applied: {n} CPU device(s), one per host core" if os.environ.get(ENV, "cores") == "cores" else (
        f"applied: {n} CPU device(s) ({ENV}={n})")
    return n
