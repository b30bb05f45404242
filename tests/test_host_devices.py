"""nrnn_jax.host_devices: `import nrnn_jax` gives JAX one CPU device per host core, unless the user chose a
count (XLA_FLAGS, JAX_NUM_CPU_DEVICES, NRNN_JAX_HOST_DEVICES) or JAX's backends were already initialized; a bad
value is refused naming the variable, the value and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nrnn_jax import host_devices

REPORT = """
import json, sys
{before}
import nrnn_jax, jax
from nrnn_jax import host_devices
print(json.dumps({{"count": jax.device_count(), "kind": jax.default_backend(), "status": host_devices.status()}}))
"""


def _run(before: str = "", **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", host_devices.ENV)}
    env.update(JAX_PLATFORMS="cpu", **env_overrides)
    proc = subprocess.run([sys.executable, "-c", REPORT.format(before=before)], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc


def _report(before: str = "", **env):
    proc = _run(before, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_device_per_core_by_default():
    out = _report()
    assert out["count"] == host_devices.host_cores()
    assert out["status"].startswith(f"applied: {host_devices.host_cores()} CPU device(s)")


def test_user_choices_are_respected():
    assert _report(**{host_devices.ENV: "system"}) == {"count": 1, "kind": "cpu",
                                                       "status": f"not applied: {host_devices.ENV}=system"}
    out = _report(**{host_devices.ENV: "3"})
    assert out["count"] == 3 and "NRNN_JAX_HOST_DEVICES=3" in out["status"]
    out = _report(XLA_FLAGS="--xla_force_host_platform_device_count=5")
    assert out["count"] == 5 and "XLA_FLAGS" in out["status"]
    out = _report(JAX_NUM_CPU_DEVICES="4")
    assert out["count"] == 4 and "already set to 4" in out["status"]
    # JAX used before nrnn_jax is imported: the count can no longer change, and the status says why
    out = _report(before="import jax; jax.numpy.ones(1).block_until_ready()")
    assert out["count"] == 1 and "initialized before" in out["status"]


def test_bad_value_is_refused():
    proc = _run(**{host_devices.ENV: "two"})
    assert proc.returncode != 0
    assert "NRNN_JAX_HOST_DEVICES='two' is invalid" in proc.stderr and "'system'" in proc.stderr
    assert "is invalid" in _run(**{host_devices.ENV: "0"}).stderr
