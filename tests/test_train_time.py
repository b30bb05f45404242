"""`summary["train_time_s"]` adds the training time of every session (process) that worked on a run: a killed
session's counts up to its last checkpoint, from RUN/train_time.json."""

import json
import time

import pytest

from nrnn_jax import NRNNConfig, TrainConfig, load_dataset, train_and_evaluate

TINY = dict(input_dim=8, num_classes=10, hidden=8, dt=0.5, backend="scan")


class _Clock:
    """The training loop's `time` module with perf_counter moved ahead by `offset` seconds."""

    offset = 0.0

    def perf_counter(self):
        return time.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_killed_session_counts(tmp_path, monkeypatch):
    import nrnn_jax.train as train_mod

    data = load_dataset("digits")
    mcfg, tcfg = NRNNConfig(**TINY), TrainConfig(epochs=3, batch_size=128, eval_white_noise=())
    steps = data.x_train.shape[0] // 128  # 9 per epoch
    clock = _Clock()
    monkeypatch.setattr(train_mod, "time", clock)

    def hundred_seconds_in_epoch_one(epoch, model):
        if epoch == 1:
            clock.offset += 100.0  # the first session's clock says epoch 1 took 100 s more
        return {}

    real_save, calls = train_mod.checkpoint.save_checkpoint, []

    def killed_before_the_second_checkpoint(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*args, **kw)

    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", killed_before_the_second_checkpoint)
    run = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(mcfg, tcfg, run, data=data, progress=False, log=None, devices=None,
                           on_epoch_end=hundred_seconds_in_epoch_one)
    wall_1 = time.perf_counter() - t0
    assert calls == [steps, 2 * steps] and not (run / "summary.json").exists()
    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", real_save)
    t0 = time.perf_counter()
    r = train_and_evaluate(mcfg, tcfg, run, data=data, progress=False, log=None, devices=None, resume=True)
    wall_2 = time.perf_counter() - t0
    assert 100.0 < r.summary["train_time_s"] < 100.0 + wall_1 + wall_2  # the killed session's 100 s count

    sessions = json.loads((run / "train_time.json").read_text())["sessions"]
    assert [(s["first_step"], s["last_step"]) for s in sessions] == [(0, steps), (steps, 3 * steps)]
    # the first session up to its checkpoint after epoch 1 (the 100 s inside), the second all of its own
    assert 100.0 < sessions[0]["train_time_s"] < 100.0 + wall_1
    assert 0.0 < sessions[1]["train_time_s"] < wall_2
    assert r.summary["train_time_s"] == sessions[0]["train_time_s"] + sessions[1]["train_time_s"]
    assert json.loads((run / "summary.json").read_text())["train_time_s"] == r.summary["train_time_s"]

    # a resume with nothing left to train keeps the time; a fresh run over the directory starts from zero
    again = train_and_evaluate(mcfg, tcfg, run, data=data, progress=False, log=None, devices=None, resume=True)
    assert again.summary["train_time_s"] == r.summary["train_time_s"]
    fresh = train_and_evaluate(mcfg, tcfg.replace(epochs=1), run, data=data, progress=False, log=None, devices=None,
                               overwrite=True)
    assert len(json.loads((run / "train_time.json").read_text())["sessions"]) == 1
    assert fresh.summary["train_time_s"] < 100.0


def test_a_run_from_before_train_time_json_keeps_its_recorded_time(tmp_path):
    """A run whose directory has no train_time.json (written before it existed): its summary's time is the
    earlier sessions' total, and an unreadable train_time.json falls back to it with a warning naming it."""
    from nrnn_jax import runs

    run = tmp_path / "run"
    run.mkdir()
    assert runs.read_sessions(run) == []
    (run / "summary.json").write_text(json.dumps({"train_time_s": 12.5}))
    assert runs.read_sessions(run) == [{"train_time_s": 12.5, "recorded_in": "summary.json"}]
    (run / "train_time.json").write_text('{"sessions": [{"train_time_s": 3')
    with pytest.warns(UserWarning, match=r"train_time\.json cannot be read .*taken from summary\.json"):
        assert runs.read_sessions(run) == [{"train_time_s": 12.5, "recorded_in": "summary.json"}]
