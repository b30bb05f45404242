"""nrnn_jax.host_memory: after `import nrnn_jax`, XLA:CPU's large per-execution buffers are reused instead of
page-faulted in again on every call; NRNN_JAX_HOST_MALLOC=system leaves glibc's malloc alone; a bad value is
refused with the variable, the value and the choices named."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nrnn_jax import host_memory

# A jitted function whose compiled program needs a 64 MiB temporary buffer (the scan's stacked outputs) and
# returns a small result; after warm-up calls, the minor page faults of each call tell whether that buffer is
# new memory.
PROBE = """
import resource
import nrnn_jax
from nrnn_jax import host_memory
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c + 1, c), x, None, length=64)[1].sum(axis=0)[::1024])
x = jnp.ones(2**18, jnp.float32)
for _ in range(4):
    f(x).block_until_ready()
faults = []
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(host_memory.status())
print(min(faults))
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # pages of the 64 MiB buffer

glibc = pytest.mark.skipif(host_memory._libc() is None, reason="the C library is not glibc")


def _probe(choice: str | None):
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    if choice is not None:
        env[host_memory.ENV] = choice
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    status, faults = out.stdout.strip().splitlines()[-2:]
    return status, float(faults)


@glibc
def test_import_keeps_xla_buffers_mapped():
    # The fewest faults of one call: the kernel may still page out idle memory now and then (a host's
    # proactive reclaim), so some calls fault even with the settings; without them every call does.
    status, faults = _probe(None)
    assert status.startswith("applied"), status
    assert faults < 0.1 * PAGES, (faults, PAGES)
    status, faults = _probe("system")
    assert status == f"not applied: {host_memory.ENV}=system"
    # glibc maps the buffer afresh on every call: at least its pages fault in again, every time
    assert faults > 0.9 * PAGES, (faults, PAGES)


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "tcmalloc")
    with pytest.raises(ValueError, match=r"NRNN_JAX_HOST_MALLOC='tcmalloc' is invalid: expected one of 'keep', "
                                         r"'system'"):
        host_memory.apply_default()


def test_status_reports_the_opt_out(monkeypatch):
    before = host_memory._status
    try:
        monkeypatch.setenv(host_memory.ENV, "system")
        assert host_memory.apply_default() is False
        assert host_memory.status() == f"not applied: {host_memory.ENV}=system"
    finally:
        host_memory._status = before
