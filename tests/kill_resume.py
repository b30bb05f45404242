"""SIGKILL in the middle of a command-line training, then `--resume`: the loop shared by the tests that compare
a killed-and-resumed run with an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "nrnn_jax.cli"]


def cpu_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def kill_after_checkpoint(cmd: list[str], run: Path, step: int, env: dict, timeout: float = 300) -> None:
    """Start the training `cmd` (writing the run directory `run`) and SIGKILL it once it has written a
    checkpoint of step ≥ `step`; the test fails if the training ends before that."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, deadline = run / "checkpoints", time.time() + timeout
    try:
        while time.time() < deadline:
            steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
            if steps and max(steps) >= step:
                break
            if proc.poll() is not None:
                pytest.fail("training finished before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint of step >= {step} within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()


def uninterrupted_and_resumed(args: list[str], tmp_path: Path, kill_step: int) -> tuple[Path, Path]:
    """`nrnn-train ARGS` run uninterrupted into tmp_path/full, and again into tmp_path/killed, killed once a
    checkpoint of step ≥ `kill_step` exists and finished with `--resume`: (full, killed)."""
    # The three trainings compile the same programs: one compilation cache of their own, written by each (they
    # run one after the other, so no process reads an entry another is writing; an entry cut short by the
    # kill fails to decompress and is compiled again).
    env = {**cpu_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(CLI + args + ["--out", str(full)], check=True, env=env, capture_output=True)
    kill_after_checkpoint(CLI + args + ["--out", str(killed)], killed, kill_step, env)
    rc = subprocess.run(CLI + ["--resume", str(killed), "--no-progress"], env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    return full, killed
