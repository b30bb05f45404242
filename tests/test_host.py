"""nrnn_jax.host: importing the package changes nothing outside it; `host.configure()` gives JAX one CPU
device per host core and makes glibc keep XLA:CPU's large freed buffers; user choices are respected; bad
values and a device count asked for after JAX started are refused with clear messages; the command-line
programs configure their own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nrnn_jax import host

SCRIPT = """
import json, resource, sys
{before}
import nrnn_jax, jax, jax.numpy as jnp
from nrnn_jax import host
{call}
# a jitted function whose program needs a 64 MiB temporary buffer and returns a small result: after
# warm-up calls, the minor page faults of one call tell whether that buffer is new memory
f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c + 1, c), x, None, length=64)[1].sum(axis=0)[::1024])
x = jnp.ones(2**18, jnp.float32)
for _ in range(4):
    f(x).block_until_ready()
faults = []
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({{"count": jax.local_device_count(), "status": host.status(), "faults": min(faults)}}))
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # pages of the 64 MiB buffer
glibc = pytest.mark.skipif(host._libc() is None, reason="the C library is not glibc")


def _run(call: str = "", before: str = "", **env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", host.DEVICES_ENV, host.ALLOCATOR_ENV)}
    env.update(JAX_PLATFORMS="cpu", **env_overrides)
    return subprocess.run([sys.executable, "-c", SCRIPT.format(before=before, call=call)], env=env,
                          capture_output=True, text=True, timeout=300)


def _report(call: str = "", before: str = "", **env):
    proc = _run(call, before, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_import_changes_nothing_and_configure_sets_up_the_host():
    # import alone: JAX's default device count, and glibc maps the buffer afresh on every call
    out = _report()
    assert out["count"] == 1 and out["status"] == {"devices": "not configured", "allocator": "not configured"}
    assert out["faults"] > 0.9 * PAGES, (out["faults"], PAGES)
    # configure(): one device per core, and the buffer is reused (the fewest faults of one call: the kernel
    # may still page out idle memory now and then)
    out = _report("host.configure()")
    assert out["count"] == host.host_cores()
    assert out["status"]["devices"].startswith(f"{host.host_cores()} CPU device(s)")
    assert out["status"]["allocator"].startswith("keeps freed memory")
    assert out["faults"] < 0.1 * PAGES, (out["faults"], PAGES)
    # each setting can be left alone
    out = _report("host.configure(devices='system', allocator='system')")
    assert out["count"] == 1 and out["faults"] > 0.9 * PAGES
    assert out["status"] == {"devices": "JAX's default (configure(devices)=system)",
                             "allocator": "glibc's defaults (configure(allocator)=system)"}


def test_user_choices_are_respected():
    assert _report("host.configure(devices=3)")["count"] == 3
    out = _report("host.configure()", **{host.DEVICES_ENV: "system"})
    assert out["count"] == 1 and host.DEVICES_ENV in out["status"]["devices"]
    assert _report("host.configure()", **{host.DEVICES_ENV: "3"})["count"] == 3
    out = _report("host.configure()", XLA_FLAGS="--xla_force_host_platform_device_count=5")
    assert out["count"] == 5 and "XLA_FLAGS" in out["status"]["devices"]
    out = _report("host.configure()", JAX_NUM_CPU_DEVICES="4")
    assert out["count"] == 4 and "already set" in out["status"]["devices"]


def test_configure_after_jax_started_is_refused():
    proc = _run("host.configure()", before="import jax; jax.numpy.ones(1).block_until_ready()")
    assert proc.returncode != 0
    assert "HostConfigError" in proc.stderr and "JAX has already started" in proc.stderr
    assert "before any JAX computation" in proc.stderr
    # asking for what JAX already has is fine
    out = _report("host.configure(devices=1)", before="import jax; jax.numpy.ones(1).block_until_ready()")
    assert out["count"] == 1


def test_bad_values_are_refused_before_anything_changes():
    before = host.status()
    with pytest.raises(ValueError, match=r"configure\(devices\)='two' is invalid: expected 'auto'"):
        host.configure(devices="two")
    with pytest.raises(ValueError, match=r"configure\(devices\)=0 is invalid"):
        host.configure(devices=0)
    with pytest.raises(ValueError, match=r"configure\(allocator\)='tcmalloc' is invalid: expected one of 'keep', "
                                         r"'system'"):
        host.configure(devices="system", allocator="tcmalloc")
    proc = _run("host.configure()", **{host.DEVICES_ENV: "two"})
    assert proc.returncode != 0 and "NRNN_JAX_HOST_DEVICES='two' is invalid" in proc.stderr
    assert host.status() == before


def test_command_line_programs_configure_their_process(tmp_path):
    """`nrnn-train` in a fresh process: one CPU device per core unless --host-devices says otherwise."""
    code = ("import sys, jax\nfrom nrnn_jax.cli import train_main\nrc = train_main(sys.argv[1:])\n"
            "from nrnn_jax import host\nprint(jax.local_device_count(), host.status()['allocator'][:5])\n"
            "sys.exit(rc)")
    base = ["--dataset", "digits", "--epochs", "0", "--hidden", "4", "--no-progress", "--eval-white-noise", ""]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", host.DEVICES_ENV)}
    for flags, expected in (([], f"{host.host_cores()} keeps"), (["--host-devices", "system", "--host-allocator",
                                                                   "system"], "1 glibc")):
        proc = subprocess.run([sys.executable, "-c", code, *base, "--out", str(tmp_path / str(len(flags))), *flags],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == expected
