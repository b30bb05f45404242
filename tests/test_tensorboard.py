"""TensorBoard event files: the scalars read back by TensorBoard's own reader equal metrics.jsonl per epoch,
for a single run, a sweep (one directory per member) and a resumed run (no epoch twice); none when off."""

import json

import numpy as np
import pytest

from nrnn_jax import NRNNConfig, Sweep, TrainConfig, load_dataset, train_and_evaluate
from nrnn_jax._tensorboard import tag_of

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = dict(input_dim=8, num_classes=10, hidden=16, dt=0.5, backend="scan")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {epoch: value}} as TensorBoard reads the directory (all its event files, purges applied)."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: an epoch written twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def records(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_matches(tb: dict, recs: list[dict], tcfg: TrainConfig, member: int | None = None):
    keys = [k for k in recs[0] if k not in ("epoch", "step")]
    assert set(tb) == {tag_of(k) for k in keys} | {"train/lr"}
    for rec in recs:
        for k in keys:
            value = rec[k][member] if isinstance(rec[k], list) else rec[k]  # time_s: one for all members
            # event files hold float32: equal to the JSON float rounded to float32
            assert tb[tag_of(k)][rec["epoch"]] == np.float32(value), (k, rec["epoch"])
        # the step-decay schedule: the base rate times lr_decay for each decay epoch before this one
        decays = sum(1 for d in tcfg.lr_decay_epochs if d < rec["epoch"])
        assert tb["train/lr"][rec["epoch"]] == np.float32(tcfg.lr * tcfg.lr_decay**decays)
    assert all(sorted(v) == [r["epoch"] for r in recs] for v in tb.values())


def test_scalars_equal_metrics_jsonl(digits, tmp_path):
    tcfg = TrainConfig(mode="explicit", epochs=2, batch_size=64, lr=1e-2, lr_decay_epochs=(1,), lr_decay=0.5,
                       eval_white_noise=())
    run = tmp_path / "run"
    train_and_evaluate(NRNNConfig(**TINY, eps_add=0.1, eps_mult=0.1), tcfg, run, data=digits, progress=False,
                       log=None, on_epoch_end=lambda epoch, model: {"probe": 10.0 * epoch})
    tb = scalars(run / "tensorboard")
    recs = records(run)
    assert len(recs) == 2
    assert {"train/loss", "train/acc", "train/grad_norm", "train/reg", "val/loss", "val/acc", "probe"} <= set(tb)
    assert_matches(tb, recs, tcfg)
    assert tb["train/lr"] == {1: pytest.approx(1e-2), 2: pytest.approx(5e-3)}  # × 0.5 after epoch 1


def test_sweep_writes_one_directory_per_member(digits, tmp_path):
    tcfg = TrainConfig(mode="implicit", epochs=2, batch_size=64, eval_white_noise=())
    sweep = Sweep(seeds=(0, 1), eps_add=(0.1, 0.0), eps_mult=(0.1, 0.0))
    run = tmp_path / "sweep"
    train_and_evaluate(NRNNConfig(**TINY, eps_add=0.1, eps_mult=0.1), tcfg, run, data=digits, progress=False,
                       log=None, sweep=sweep)
    dirs = sorted(p.name for p in (run / "tensorboard").iterdir())
    assert dirs == ["m0_seed0_add0.1_mult0.1", "m1_seed1_add0_mult0"]
    recs = records(run)
    for i, name in enumerate(dirs):
        assert_matches(scalars(run / "tensorboard" / name), recs, tcfg, member=i)
    assert recs[0]["train_loss"][0] != recs[0]["train_loss"][1]  # the members differ: the test has power


def test_resume_continues_without_duplicates(digits, tmp_path, monkeypatch):
    """Killed after epoch 2's record (and events) but before its checkpoint: the resumed session redoes
    epoch 2 in a new event file, and TensorBoard shows each epoch once, with the redone values."""
    import nrnn_jax.train as train_mod

    mcfg = NRNNConfig(**TINY, eps_add=0.1, eps_mult=0.1)
    tcfg = TrainConfig(mode="implicit", epochs=3, batch_size=64, eval_white_noise=())
    run = tmp_path / "run"
    real_save = train_mod.checkpoint.save_checkpoint
    calls = []

    def kill_at_second_epoch_end(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*args, **kw)

    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", kill_at_second_epoch_end)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(mcfg, tcfg, run, data=digits, progress=False, log=None)
    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", real_save)
    (first,) = (run / "tensorboard").glob("events.out.tfevents.*")
    assert sorted(scalars(first)["train/loss"]) == [1, 2]  # epoch 2 is on disk: the test has power
    train_and_evaluate(mcfg, tcfg, run, data=digits, progress=False, log=None, resume=True)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert_matches(scalars(run / "tensorboard"), recs, tcfg)


def test_off_writes_nothing_and_is_validated(digits, tmp_path):
    run = tmp_path / "off"
    train_and_evaluate(NRNNConfig(**TINY), TrainConfig(epochs=1, eval_white_noise=(), tensorboard=False), run,
                       data=digits, progress=False, log=None)
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()
    with pytest.raises(ValueError, match=r"TrainConfig.tensorboard='no' is invalid"):
        TrainConfig(tensorboard="no")
    with pytest.raises(ValueError, match=r"TrainConfig.tensorboard=1 is invalid"):
        TrainConfig(tensorboard=1)


def test_each_epoch_is_on_disk_when_written(tmp_path):
    """Nothing waits in a queue: a run killed right after an epoch (SIGKILL, no clean-up) keeps its events."""
    from nrnn_jax._tensorboard import EpochLog

    tcfg = TrainConfig(epochs=3)
    log = EpochLog.open(tmp_path, NRNNConfig(), tcfg)
    log.write({"epoch": 1, "step": 10, "train_loss": 0.5, "note": "text is skipped"}, tcfg.lr)
    assert scalars(tmp_path / "tensorboard") == {"train/loss": {1: 0.5}, "train/lr": {1: np.float32(tcfg.lr)}}
    log.write({"epoch": 2, "step": 20, "train_loss": 0.25}, tcfg.lr)
    assert scalars(tmp_path / "tensorboard")["train/loss"] == {1: 0.5, 2: 0.25}


def test_the_learning_rate_read_from_the_optimizer_state_is_the_one_applied():
    """train/lr is read from the optimizer state: after each step it is the rate that step applied (plain SGD:
    update = −lr × grad), and it follows the step-decay schedule."""
    import jax
    import jax.numpy as jnp

    from nrnn_jax import make_optimizer
    from nrnn_jax.state import learning_rate

    tcfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, lr_decay=0.5, lr_decay_epochs=(1, 3))
    steps_per_epoch = 3
    tx = make_optimizer(tcfg, steps_per_epoch)
    params = jnp.zeros(())
    state = tx.init(params)
    applied = []
    for step in range(5 * steps_per_epoch):
        with jax.numpy_dtype_promotion("standard"):  # as in the train step: optax mixes int32 counts with floats
            updates, state = tx.update(jnp.ones(()), state, params)
        assert float(learning_rate(state)) == float(-updates)
        applied.append(float(-updates))
    expected = [0.1, 0.05, 0.05, 0.025, 0.025]  # epochs 1-5: × 0.5 from epoch 2 and from epoch 4
    assert applied == pytest.approx([r for r in expected for _ in range(steps_per_epoch)], rel=1e-6)


def test_event_encoding_matches_the_protocol_buffers(tmp_path):
    """The hand-encoded events equal the `Event` protocol buffers serialised by protobuf itself (tensorboardX's
    compiled event.proto), the records equal tensorboardX's TFRecord framing, and the checksum is CRC-32C (its
    standard check value)."""
    from nrnn_jax._tensorboard import crc32c, event, tfrecord

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
    record_writer = pytest.importorskip("tensorboardX.record_writer")
    data = [b"", b"x", bytes(range(256)) * 3]
    w = record_writer.RecordWriter(str(tmp_path / "records"))
    for d in data:
        w.write(d)
    w.close()
    assert (tmp_path / "records").read_bytes() == b"".join(tfrecord(d) for d in data)
    pb = pytest.importorskip("tensorboardX.proto.event_pb2")
    summary_pb = pytest.importorskip("tensorboardX.proto.summary_pb2")
    value = summary_pb.Summary.Value
    cases = [
        (event(1.5, file_version="brain.Event:2"), pb.Event(wall_time=1.5, file_version="brain.Event:2")),
        (event(2.25, 3, session_start=True),
         pb.Event(wall_time=2.25, step=3, session_log=pb.SessionLog(status=pb.SessionLog.START))),
        (event(1e9 + 0.125, 300, scalars=[("train/loss", 0.3), ("val/acc", -2.0)]),
         pb.Event(wall_time=1e9 + 0.125, step=300, summary=summary_pb.Summary(
             value=[value(tag="train/loss", simple_value=0.3), value(tag="val/acc", simple_value=-2.0)]))),
    ]
    for ours, theirs in cases:
        assert ours == theirs.SerializeToString()
        assert pb.Event.FromString(ours) == theirs


def test_writing_and_resuming_do_not_import_torch(tmp_path):
    """A run writes and resumes its event files with a `torch` on the path whose import fails (an installed
    but broken PyTorch), so TensorBoard logging does not depend on PyTorch."""
    import subprocess
    import sys
    import textwrap

    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        from nrnn_jax import NRNNConfig, TrainConfig, load_dataset, train_and_evaluate
        mcfg = NRNNConfig(input_dim=8, num_classes=10, hidden=8, dt=0.5, backend="scan")
        data = load_dataset("digits")
        kw = dict(data=data, progress=False, log=None, devices=None)
        train_and_evaluate(mcfg, TrainConfig(epochs=1, batch_size=128, eval_white_noise=()), {str(run)!r}, **kw)
        train_and_evaluate(mcfg, TrainConfig(epochs=2, batch_size=128, eval_white_noise=()), {str(run)!r},
                           resume=True, **kw)
        import sys
        assert "torch" not in sys.modules
    """)
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    tb = scalars(run / "tensorboard")
    assert sorted(tb["train/loss"]) == [1, 2]
    assert_matches(tb, records(run), TrainConfig(epochs=2, batch_size=128, eval_white_noise=()))
