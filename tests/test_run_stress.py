"""Run directories under stress: one writer at a time, a full disk, damaged checkpoints and records, a resume
that always has somewhere to start. Every recovered run is compared with one uninterrupted run (`reference`):
parameters bit for bit, the epoch records, the final test metrics."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nrnn_jax import checkpoint, load_run, runs
from nrnn_jax.cli import train_main
from nrnn_jax.errors import CheckpointError, RunBusyError, RunDamageWarning

ARGS = ["--dataset", "digits", "--hidden", "16", "--dt", "0.5", "--backend", "scan", "--batch-size", "64",
        "--lr", "0.01", "--mode", "implicit", "--eps-add", "0.1", "--eps-mult", "0.1", "--checkpoint-every", "5",
        "--epochs", "3", "--eval-white-noise", "", "--no-progress", "--seed", "2"]
# 1258 training examples: 19 steps an epoch; checkpoints at 5, 10, 15, 19, 20, 25, ..., 55, 57 (two kept)
CLI = [sys.executable, "-m", "nrnn_jax.cli"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_main(ARGS + ["--out", str(run)]) == 0
    return run


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run, reference):
    """`run` ended where the uninterrupted run ends: every epoch recorded once, the same numbers."""
    assert [r["epoch"] for r in _records(run)] == [1, 2, 3]
    assert _records(run) == _records(reference)
    for a, b in zip(jax.tree.leaves(nnx.state(load_run(run))), jax.tree.leaves(nnx.state(load_run(reference)))):
        np.testing.assert_array_equal(a, b)
    s_run, s_ref = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert (s_run["test_acc"], s_run["test_loss"]) == (s_ref["test_acc"], s_ref["test_loss"])


def _copy(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


# --- one writer at a time --------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_at_once_and_the_lock_goes_with_its_process(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path)
    holder = subprocess.Popen(CLI[:1] + ["-c", "import sys, time; from nrnn_jax.runs import writer; "
                                         "held = writer(sys.argv[1]); held.__enter__(); print('held', flush=True); "
                                         "time.sleep(300)",
                                         str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert json.loads((run / runs.LOCK_FILE).read_text())["pid"] == holder.pid
        t0 = time.perf_counter()
        assert train_main(["--resume", str(run), "--epochs", "4", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert time.perf_counter() - t0 < 10  # refused at once, not after training
        assert err.startswith(f"nrnn-train: error: {run} is being written by another process (pid {holder.pid}")
        assert "--resume" in err and err.count("\n") == 1
        assert train_main(ARGS + ["--out", str(run), "--overwrite"]) == 2  # a fresh start is refused alike
        assert f"pid {holder.pid}" in capsys.readouterr().err
        with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
            with runs.writer(run):
                pass
        load_run(run)  # readers take no lock
        assert _records(run) == _records(reference)  # the refused writers changed nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runs.writer(run):  # SIGKILL released it
        assert json.loads((run / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (run / runs.LOCK_FILE).exists()

    # another thread of this process is refused as well; the holding thread may nest
    held, done = threading.Event(), threading.Event()

    def hold():
        with runs.writer(run):
            with runs.writer(run):
                held.set()
                done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(RunBusyError, match="another thread of this process"):
            with runs.writer(run):
                pass
    finally:
        done.set()
        thread.join()
    with runs.writer(run):
        pass


def test_two_trainings_started_at_once_one_is_refused(tmp_path):
    """The same run resumed twice at the same moment: one trains, the other is refused before writing."""
    run = tmp_path / "run"
    assert train_main(ARGS + ["--epochs", "1", "--out", str(run)]) == 0
    cmd = CLI + ["--resume", str(run), "--epochs", "6", "--no-progress"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    winner, loser = (procs.index(p) for p in sorted(procs, key=lambda p: p.returncode))
    assert f"is being written by another process (pid {procs[winner].pid}" in outs[loser][1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records] == [19 * e for e in range(1, 7)]


# --- a full disk -------------------------------------------------------------------------------------------------

def _inject_checkpoint_failure(monkeypatch):
    """orbax writes a checkpoint's _METADATA from its writer thread (etils' path.write_text): the fifth one,
    that of step 20 (epoch 2), finds no space."""
    from etils import epath

    cls = type(epath.Path("/"))
    real, count = cls.write_text, [0]

    def write_text(self, *args, **kwargs):
        if self.name == "_METADATA":
            count[0] += 1
            if count[0] == 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "write_text", write_text)
    return "checkpoints/20 (checkpoint step 20)", 19


def _inject_record_failure(monkeypatch):
    """The record of epoch 2 is cut off by a full disk after half its bytes."""
    real = runs._write_all

    def write_all(fd, data):
        if data.startswith(b'{"epoch": 2,'):
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(runs, "_write_all", write_all)
    return "metrics.jsonl (the epoch records)", 35


def _inject_tensorboard_failure(monkeypatch):
    """The TensorBoard events of epoch 2 find no space."""
    from nrnn_jax._tensorboard import _EventFile

    real, count = _EventFile.write, [0]

    def write(self, *events):
        count[0] += 1
        if count[0] == 3:  # 1: the file version, 2: epoch 1, 3: epoch 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, *events)

    monkeypatch.setattr(_EventFile, "write", write)
    return "tensorboard (TensorBoard events)", 35


@pytest.mark.parametrize("inject", [_inject_checkpoint_failure, _inject_record_failure, _inject_tensorboard_failure])
def test_full_disk_stops_with_one_line_and_resume_completes_the_run(inject, reference, tmp_path, monkeypatch,
                                                                      capsys, caplog):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        what, kept_step = inject(m)
        assert train_main(ARGS + ["--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"nrnn-train: error: could not write {run}/{what}: No space left on device [Errno 28]. ")
    assert (f"keeps its last complete checkpoint, step {kept_step}, and the 1 epoch record(s) up to it: free space, "
            f"then `nrnn-train --resume {run}`") in err
    # nothing else was reported (orbax's writer threads log the error with its traceback)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # what was written before the failure is intact: the checkpoints, every whole record, no unfinished write
    assert checkpoint.newest_intact(run / "checkpoints") == (kept_step, [])
    assert [r["epoch"] for r in _records(run)][:1] == [1]
    assert all(line.endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())
    assert not list((run / "checkpoints").glob(f"*{checkpoint.UNFINISHED}*"))
    assert not (run / runs.LOCK_FILE).exists()

    assert train_main(["--resume", str(run), "--no-progress"]) == 0
    assert f"resumed at epoch 2, step {kept_step}" in capsys.readouterr().out
    assert_same_run(run, reference)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def test_late_orbax_task_reports_after_a_failure_are_not_printed(caplog):
    """After a failed write has been reported as our error, a task of orbax's that finishes later with the same
    error is not reported again by asyncio when it is collected (that broke the one-line error of the full-disk
    run below at interpreter exit); asyncio's other reports still pass."""
    late = ("Task exception was never retrieved\nfuture: <Task finished name='Task-9' coro=<async_serialize_from_"
            "host() done, defined at /site-packages/orbax/checkpoint/_src/serialization/serialization.py:126> "
            "exception=ValueError('RESOURCE_EXHAUSTED: No space left on device')>")
    other = "Task exception was never retrieved\nfuture: <Task finished name='Task-10' coro=<fetch() done>>"
    with pytest.raises(OSError):
        with checkpoint._held_back():
            raise OSError(errno.ENOSPC, "No space left on device")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        logging.getLogger("asyncio").error(late)
        logging.getLogger("asyncio").error(other)
    assert [r.getMessage() for r in caplog.records] == [other]


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and tmpfs (a private mount namespace)")
def test_full_disk_of_a_small_filesystem(reference, tmp_path):
    """The run directory on a 200 KiB tmpfs (in a private mount namespace): training stops with one line when
    the disk is full; once the filesystem grows, --resume completes the run as if nothing happened."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    quote = lambda args: " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    script = f"""
        mount -t tmpfs -o size=200k tmpfs {mnt}
        {quote(CLI + ARGS + ["--out", str(mnt / "run")])} > {out}.train.out 2> {out}.train.err
        echo $? > {out}.train.rc
        mount -o remount,size=16m {mnt}
        {quote(CLI + ["--resume", str(mnt / "run"), "--no-progress"])} > {out}.resume.out 2> {out}.resume.err
        echo $? > {out}.resume.rc
        cp -r {mnt / "run"} {out}
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), check=True, timeout=900)
    read = lambda part: Path(f"{out}.{part}").read_text()
    err = read("train.err")
    assert read("train.rc").strip() == "2", err
    assert err.count("\n") == 1 and err.startswith(f"nrnn-train: error: could not write {mnt}/run/"), err
    assert "No space left on device [Errno 28]" in err and "--resume" in err, err
    assert read("resume.rc").strip() == "0", read("resume.err")
    assert_same_run(out, reference)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import nrnn_jax.cli as cli

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the run directory was checked")

    monkeypatch.setattr(cli, "load_dataset", no_data)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert train_main(ARGS + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"nrnn-train: error: could not write {out} (the run directory): Not a directory [Errno 20]. "
                   f"No run was started in {out}: fix the cause (or choose another run directory) and start it "
                   "again.\n")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert train_main(ARGS + ["--out", str(locked / "run")]) == 2
        assert "Permission denied [Errno 13]" in capsys.readouterr().err


# --- a resume that always has somewhere to start -----------------------------------------------------------------

def test_resume_without_a_complete_checkpoint_starts_from_the_beginning(reference, tmp_path, capsys):
    """A run killed (or out of space) before its first checkpoint: its configuration, an unfinished write."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text("")
    unfinished = run / "checkpoints" / f"5{checkpoint.UNFINISHED}" / "default"
    unfinished.mkdir(parents=True)
    (unfinished / "_METADATA").write_text('{"tree_meta')
    assert train_main(["--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"removed the unfinished checkpoint write(s) 5{checkpoint.UNFINISHED}" in out
    assert f"{run} has no complete checkpoint: starting it from the beginning, with its recorded configuration" in out
    assert_same_run(run, reference)


def _biggest_data_file(step_dir):
    return max((p for p in (step_dir / "default").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
               key=lambda p: p.stat().st_size)


def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _truncate_to_100(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("target,damage,manifest,why", [
    (lambda s: s / "default" / "_METADATA", _cut_in_half, True, r"\d+ bytes where \d+ were written \(truncated\)"),
    (lambda s: s / "default" / "manifest.ocdbt", _empty, True, r"0 bytes where \d+ were written \(empty\)"),
    (_biggest_data_file, _truncate_to_100, True, r"100 bytes where \d+ were written \(truncated\)"),
    (lambda s: s / "default" / "_METADATA", _cut_in_half, False, "not valid JSON"),
    (lambda s: s / "default" / "manifest.ocdbt", _empty, False, r"Error decoding manifest: .* \[DATA_LOSS\]"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_as_uninterrupted(
        target, damage, manifest, why, reference, tmp_path, capsys):
    run = _copy(reference, tmp_path)
    ckpts = run / "checkpoints"
    assert checkpoint.steps(ckpts) == [55, 57]
    if not manifest:  # checkpoints written before manifests existed
        for p in ckpts.glob(f"*/{checkpoint.MANIFEST}"):
            p.unlink()
    path = target(ckpts / "57")
    damage(path)
    with pytest.raises(CheckpointError, match="checkpoint step 55 is intact") as e:
        load_run(run)
    assert str(e.value).startswith(f"checkpoint step 57 is damaged: {path}: ")

    assert train_main(["--resume", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("nrnn-train: warning:")]
    assert len(warning) == 1 and "Traceback" not in captured.err, captured.err
    assert warning[0].startswith(f"nrnn-train: warning: checkpoint step 57 is damaged: {path}: ")
    assert re.search(why, warning[0]), warning[0]
    assert warning[0].endswith(f"set aside as {run}/damaged/checkpoint-57. The run resumes from checkpoint step 55.")
    assert "resumed at epoch 3, step 55" in captured.out
    assert (run / "damaged" / "checkpoint-57").is_dir()
    assert_same_run(run, reference)


def test_a_damaged_record_is_reported_and_kept(reference, tmp_path):
    run = _copy(reference, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    damaged = lines[1][:40] + "\x00\x00\x00"
    # line 2 damaged in place; a last line cut off by a kill (no newline) is redone silently
    (run / "metrics.jsonl").write_text("\n".join([lines[0], damaged, lines[2]]) + '\n{"epoch": 4, "st')
    with pytest.warns(RunDamageWarning) as caught:
        from nrnn_jax import load_dataset, read_run_config, train_and_evaluate

        mcfg, tcfg = read_run_config(run)
        train_and_evaluate(mcfg, tcfg, run, data=load_dataset("digits"), resume=True, log=None, progress=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{run}/metrics.jsonl: line(s) [2] are damaged (not a JSON record) and come before "
                              "checkpoint step 57")
    assert "(epoch(s) [2] have no record)" in message and f"kept in {run}/damaged/metrics.jsonl" in message
    assert [json.loads(line) for line in (run / "damaged" / "metrics.jsonl").read_text().splitlines()] == [
        {"line": 2, "text": damaged}]
    assert [r["epoch"] for r in _records(run)] == [1, 3]


# --- every checkpoint-read error names the file ------------------------------------------------------------------

@pytest.fixture
def two_checkpoints(tmp_path):
    import jax.numpy as jnp

    tree = {"state": {"w": jnp.arange(20000.0), "b": jnp.ones((3, 4))}, "sums": {"loss": jnp.zeros(())}}
    ckpts = tmp_path / "checkpoints"
    for step in (3, 6):
        checkpoint.save_checkpoint(ckpts, step, tree)
    return ckpts, tree


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize("name,damage", [
    ("default/_METADATA", _cut_in_half), ("default/_METADATA", _empty), ("_CHECKPOINT_METADATA", _cut_in_half),
    ("default/array_metadatas/process_0", _empty), ("default/manifest.ocdbt", _truncate_to_100),
    ("data", _truncate_to_100), ("data", _empty),
    ("data", lambda p: p.write_bytes(bytes(p.stat().st_size))),  # zeroed in place: same size
])
def test_every_checkpoint_read_error_names_the_file(name, damage, manifest, two_checkpoints, capfd, caplog):
    ckpts, tree = two_checkpoints
    if not manifest:
        for p in ckpts.glob(f"*/{checkpoint.MANIFEST}"):
            p.unlink()
    path = _biggest_data_file(ckpts / "6") if name == "data" else ckpts / "6" / name
    damage(path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_checkpoint(ckpts, tree)
    named = ckpts / "6" / "default" if name == "data" and not manifest else path
    assert e.value.damaged and e.value.step == 6 and e.value.path == named
    assert str(e.value).startswith(f"checkpoint step 6 is damaged: {named}"), str(e.value)
    assert "\n" not in str(e.value)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert checkpoint.restore_checkpoint(ckpts, tree, 3)[1] == 3  # the older one is intact
    # without a manifest, damage inside tensorstore's binary files shows only when the data is read
    found_unread = not manifest and (name == "data" or name.endswith(".ocdbt"))
    assert checkpoint.newest_intact(ckpts)[0] == (6 if found_unread else 3)


def test_a_checkpoint_of_another_model_is_not_called_damaged(two_checkpoints):
    import jax.numpy as jnp

    ckpts, _ = two_checkpoints
    other = {"state": {"w": jnp.arange(5.0), "b": jnp.ones((3, 4))}, "sums": {"loss": jnp.zeros(())}}
    with pytest.raises(CheckpointError, match=rf"checkpoint step 6 \({ckpts / '6'}\) cannot be restored into this "
                                              "model") as e:
        checkpoint.restore_checkpoint(ckpts, other)
    assert not e.value.damaged
