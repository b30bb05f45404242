"""Several processes (jax.distributed): two processes on this machine, each with two virtual CPU devices, joined
through a coordinator on 127.0.0.1 and JAX's gloo CPU collectives, train as one process with four devices does;
process 0 alone writes the run directory; a run whose process was killed resumes to the uninterrupted result; a
coordinator that cannot be reached, and bad flags, give a clear error."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nrnn_jax import host
from nrnn_jax.cli import compare_main, train_main

# A sweep of two seeds, trained data-parallel over four devices (the batch of 64 split in four).
SWEEP = ["--dataset", "digits", "--mode", "implicit", "--epochs", "1", "--batch-size", "64", "--hidden", "8",
         "--dt", "0.5", "--eps-add", "0.1", "--eps-mult", "0.1", "--backend", "scan", "--eval-white-noise=",
         "--no-progress", "--sweep-seeds", "0,1", "--checkpoint-every", "2"]
TRAIN = [sys.executable, "-m", "nrnn_jax.cli"]
COMPARE_CLI = [sys.executable, "-c", "import sys; from nrnn_jax.cli import compare_main; sys.exit(compare_main(sys.argv[1:]))"]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CACHE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The programs of this module's processes are compiled once: JAX's persistent compilation cache, shared by
    the processes the tests start (the same program on the same devices is the same computation)."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    _CACHE.clear()


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": _CACHE["dir"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(args: list[str], port: int, heartbeat: int = 100) -> list[subprocess.Popen]:
    """Both processes of a job (two CPU devices each), started with `args` and the coordinator's flags."""
    return [subprocess.Popen(TRAIN + args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                             "--process-id", str(i), "--distributed-timeout", "60",
                                             "--heartbeat-timeout", str(heartbeat)],
                             env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for the processes; each must succeed; what each printed (stdout, then stderr)."""
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:  # a job that hangs is ended here, not left running
        for p in procs:
            p.kill()
        raise
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    return [out + err for out, err in outs]


def _files(run: Path) -> list[str]:
    """The run's files, a TensorBoard event file by its folder (its name holds the time and host)."""
    names = (p.relative_to(run) for p in run.rglob("*") if p.is_file())
    return sorted((n.parent / "events" if n.name.startswith("events.out") else n).as_posix() for n in names)


def _same_results(run: Path, reference: Path) -> None:
    """The run's summary and epoch records equal the reference's: the same accuracies (the same examples are
    classified alike); losses and gradient norms within float32 tolerance (sums in another order)."""
    summary, ref = json.loads((run / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert len(summary["members"]) == len(ref["members"]) == 2
    for m, r in zip(summary["members"], ref["members"]):
        assert (m["seed"], m["test_acc"], m["val_acc"]) == (r["seed"], r["test_acc"], r["val_acc"])
        np.testing.assert_allclose([m["test_loss"], m["val_loss"]], [r["test_loss"], r["val_loss"]], rtol=1e-5)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    for r, q in zip(records, ref_records):
        assert r["train_acc"] == q["train_acc"] and r["val_acc"] == q["val_acc"]
        np.testing.assert_allclose(r["train_loss"] + r["train_grad_norm"] + r["val_loss"],
                                   q["train_loss"] + q["train_grad_norm"] + q["val_loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The sweep trained by one process with four CPU devices."""
    run = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run(TRAIN + SWEEP + ["--devices", "4", "--out", str(run)], env=_env(4), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_two_processes_train_a_sweep_as_one_process_with_four_devices_also_after_a_kill(reference, tmp_path):
    """Two processes × two devices train the sweep; process 1 is killed once a checkpoint is written, and
    process 0 ends by itself within the heartbeat timeout with JAX's message naming the lost task. Both
    restarted with --resume give the results of one process with four devices that was never interrupted,
    and process 0 alone has written: one run directory with the files of a single-process run (records,
    summary and TensorBoard events once; complete checkpoints with their manifests; no lock left)."""
    run = tmp_path / "run"
    procs = _start(SWEEP + ["--out", str(run)], _free_port(), heartbeat=3)
    deadline = time.time() + TIMEOUT
    ckpts = run / "checkpoints"
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert time.time() < deadline and procs[1].poll() is None, "no checkpoint before the end of training"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    out, err = procs[0].communicate(timeout=60)
    procs[1].communicate()
    # JAX ends it: the coordination service names the task that stopped sending heartbeats (or, should a
    # collective notice first, the closed connection to it)
    assert procs[0].returncode != 0, err[-2000:]
    assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b|Connection closed by peer", err), \
        err[-2000:]
    assert not (run / "summary.json").exists()
    printed = _finish(_start(["--resume", str(run), "--no-progress"], _free_port()))
    assert "process 1 of 2, coordinator 127.0.0.1:" in printed[1]
    assert all("resumed at epoch 1, step " in p for p in printed)
    _same_results(run, reference)
    files, ref_files = _files(run), _files(reference)
    plain = lambda names: sorted({f for f in names if not f.startswith("checkpoints/")})
    assert plain(files) == plain(ref_files)
    assert len(plain(f for f in files if f.startswith("tensorboard/"))) == 2  # a folder per sweep member
    steps = lambda r: sorted(p.name for p in (r / "checkpoints").iterdir())
    assert steps(run) == steps(reference)
    assert all((run / "checkpoints" / s / "nrnn_jax_manifest.json").exists() for s in steps(run))
    assert not (run / ".writer.lock").exists()


COMPARE = ["--dataset", "digits", "--seeds", "0", "--epochs", "1", "--modes", "implicit", "--batch-size", "64",
           "--hidden", "8", "--dt", "0.5", "--backend", "scan", "--analysis-examples", "4", "--curve-examples", "16"]


def test_two_processes_compare_as_one_process_with_four_devices(tmp_path):
    """A small `nrnn-compare` by two processes × two devices: process 0 alone writes one complete output (the
    files of a single-process comparison), whose test accuracies and robustness curves are those of one process
    with four devices, and whose losses and measurements agree within float32 tolerance."""
    single, two = tmp_path / "single", tmp_path / "two"
    proc = subprocess.run(COMPARE_CLI + COMPARE + ["--out", str(single)], env=_env(4), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = _free_port()
    _finish([subprocess.Popen(COMPARE_CLI + COMPARE + ["--out", str(two), "--coordinator", f"127.0.0.1:{port}",
                                                       "--num-processes", "2", "--process-id", str(i),
                                                       "--distributed-timeout", "60"],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)])
    # the same files; a checkpoint's orbax metadata has a file per process that wrote shards
    plain = lambda run: [f for f in _files(run) if "/checkpoints/" not in f]
    assert plain(two) == plain(single) and "summary.json" in plain(two) and "robustness.png" in plain(two)
    steps = lambda run: sorted(p.name for p in (run / "implicit" / "seed0" / "checkpoints").iterdir())
    assert steps(two) == steps(single)
    got, ref = (json.loads((d / "summary.json").read_text())["runs"]["implicit"][0] for d in (two, single))
    assert got["summary"]["test_acc"] == ref["summary"]["test_acc"]
    np.testing.assert_allclose(got["summary"]["test_loss"], ref["summary"]["test_loss"], rtol=1e-5)
    assert got["analysis"]["curves"] == ref["analysis"]["curves"]
    for name in ("hessian_top", "output_margin_median", "reg_value"):
        np.testing.assert_allclose(got["analysis"][name], ref["analysis"][name], rtol=1e-4, err_msg=name)


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path, capsys):
    """Process 1 of a job whose coordinator does not answer exits with an error naming its id and the address,
    within the timeout, having written nothing (in this process: the check fails before JAX is asked to join)."""
    port = _free_port()
    t0 = time.monotonic()
    assert train_main(SWEEP + ["--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "2"]) == 2
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert f"nrnn-train: error: process 1 could not reach the coordinator at 127.0.0.1:{port} within the timeout" in err
    assert 2 <= elapsed < 2 + 5
    assert not (tmp_path / "run").exists()
    with pytest.raises(host.DistributedError, match=f"process 3 could not reach the coordinator at 127.0.0.1:{port}"):
        host.initialize_distributed(f"127.0.0.1:{port}", 4, 3, timeout_s=1)


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator='127.0.0.1:1234' starts a manual launch, which needs all "
                                          "of --coordinator, --num-processes, --process-id; missing: --num-processes, "
                                          "--process-id"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "--coordinator='nohost' is invalid: "
                                                                              "expected HOST:PORT"),
    (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"], "--coordinator='h:70000' is invalid"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes=0 is invalid: expected a "
                                                                           "positive integer"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id=2 is invalid: expected an "
                                                                           "integer in [0, 1]"),
    (["--distributed", "--distributed-timeout", "0"], "--distributed-timeout=0 is invalid: expected a positive"),
])
def test_bad_distributed_flags_are_refused_before_any_work(argv, message, tmp_path, capsys):
    for main in (train_main, compare_main):
        assert main(["--dataset", "digits", "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_initialize_distributed_checks_its_arguments():
    with pytest.raises(ValueError, match="cpu_collectives='nccl' is invalid: expected one of 'gloo', 'mpi', 'none'"):
        host.initialize_distributed(cpu_collectives="nccl")
    with pytest.raises(ValueError, match="process_id=-1 is invalid"):
        host.initialize_distributed("127.0.0.1:1", 2, -1)
    with pytest.raises(ValueError, match="timeout_s=1.5 is invalid"):
        host.initialize_distributed(timeout_s=1.5)
