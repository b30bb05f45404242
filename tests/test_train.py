"""Training: beats chance on the embedded data in seconds, run directories, load_run, resume, CLI."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from nrnn_jax import NRNNConfig, TrainConfig, evaluate, load_dataset, load_run, train_and_evaluate
from nrnn_jax.cli import train_main

TINY = dict(input_dim=8, num_classes=10, hidden=32, dt=0.5, backend="scan")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def chance_bound(y, tail: float) -> float:
    """The smallest accuracy a that an input-independent predictor reaches with probability ≤ `tail` on labels y:
    its number of correct answers is Binomial(n, q) with q ≤ the largest class frequency, so a is the
    (1 − tail) binomial quantile at that q, divided by n."""
    n = len(y)
    q = np.bincount(y).max() / n
    pmf = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]
    upper = np.append(np.cumsum(pmf[::-1])[::-1], 0.0)  # upper[k] = P(X ≥ k), k = 0..n+1
    return int(np.argmax(upper <= tail)) / n


def test_chance_bound():
    """chance_bound against values worked out by hand: 359 images with 42 of the largest class."""
    y = np.repeat(np.arange(10), [28, 38, 33, 40, 33, 39, 32, 42, 41, 33])
    assert 0.15 < chance_bound(y, 1e-4) < 0.20  # mean 11.7 %, sd 1.7 %: 3.7 sd above the mean is 18 %
    assert chance_bound(np.zeros(10, int), 1e-4) > 1.0  # one class: no accuracy beats a constant predictor


@pytest.mark.parametrize("mode", ["deterministic", "implicit"])
def test_training_beats_chance(digits, mode, tmp_path):
    mcfg = NRNNConfig(**TINY, eps_add=0.1 if mode == "implicit" else 0.0, eps_mult=0.1 if mode == "implicit" else 0.0)
    tcfg = TrainConfig(mode=mode, epochs=6, batch_size=32, lr=1e-2, eval_white_noise=())
    r = train_and_evaluate(mcfg, tcfg, tmp_path / "run", data=digits, progress=False, log=None)
    # a predictor that ignores its input is right with probability ≤ the largest class frequency (42/359 = 11.7 %);
    # it exceeds 18.7 % (67/359, computed here) with probability ≤ 10⁻⁴ (binomial tail)
    assert r.summary["test_acc"] > chance_bound(digits.y_test, 1e-4)
    # regression floor: seeds 0-3 measured 0.79/0.88/0.86/0.85 (deterministic), 0.86/0.90/0.86/0.87 (implicit);
    # 0.75 = the lower mode mean 0.845 − 3 × the pooled seed-to-seed std 0.031
    assert r.summary["test_acc"] > 0.75
    # training lowers the loss, and ends below ln 10 = 2.30, the cross-entropy of a uniform prediction
    assert r.history[-1]["train_loss"] < min(r.history[0]["train_loss"], np.log(10))
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"]["hidden"] == 32
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["test_acc"] == r.summary["test_acc"]
    loaded = load_run(run)
    assert evaluate(loaded, digits.x_test, digits.y_test)["acc"] == r.summary["test_acc"]


def test_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    import nrnn_jax.train as train_mod

    mcfg = NRNNConfig(**TINY, eps_add=0.1, eps_mult=0.1)
    tcfg = TrainConfig(mode="implicit", epochs=3, batch_size=64, lr=1e-2, checkpoint_every=5, eval_white_noise=())
    full = train_and_evaluate(mcfg, tcfg, tmp_path / "a", data=digits, progress=False, log=None)

    real_save = train_mod.checkpoint.save_checkpoint
    calls = []

    def interrupt_mid_epoch(*args, **kw):
        real_save(*args, **kw)
        calls.append(args[1])
        if len(calls) == 5:  # saves at steps 5, 10, 15, 19 (end of epoch 1), 20: stop in epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", interrupt_mid_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(mcfg, tcfg, tmp_path / "b", data=digits, progress=False, log=None)
    assert calls[-1] == 20
    monkeypatch.setattr(train_mod.checkpoint, "save_checkpoint", real_save)
    resumed = train_and_evaluate(mcfg, tcfg, tmp_path / "b", data=digits, progress=False, log=None, resume=True)
    for a, b in zip(jax.tree.leaves(nnx.state(full.model)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_array_equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert strip(full.history) == strip(resumed.history)
    with pytest.raises(ValueError, match="already holds a run"):
        train_and_evaluate(mcfg, tcfg, tmp_path / "b", data=digits, progress=False, log=None)
    with pytest.raises(ValueError, match="different train configuration"):
        train_and_evaluate(mcfg, tcfg.replace(lr=0.5), tmp_path / "b", data=digits, progress=False, log=None,
                           resume=True)


def test_mismatched_config_and_mode_errors(digits):
    with pytest.raises(ValueError, match="does not match the data set 'digits'"):
        train_and_evaluate(NRNNConfig(input_dim=3), TrainConfig(epochs=1), data=digits, log=None)
    with pytest.raises(ValueError, match="mode='implicit' needs noise"):
        train_and_evaluate(NRNNConfig(**TINY), TrainConfig(mode="implicit", epochs=1), data=digits, log=None)


def test_divergence_guard(digits, tmp_path, capsys):
    from nrnn_jax import TrainingDiverged

    mcfg = NRNNConfig(**TINY)
    tcfg = TrainConfig(epochs=3, lr=1e30, batch_size=32, checkpoint_every=1, eval_white_noise=())
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step \d+"):
        train_and_evaluate(mcfg, tcfg, tmp_path / "div", data=digits, progress=False, log=None)
    # the command line reports it as an error line and exit status 1 (a bad setting is 2), not a traceback
    from nrnn_jax.cli import train_main

    argv = ["--dataset", "digits", "--hidden", "16", "--epochs", "1", "--lr", "1e30", "--batch-size", "32",
            "--eval-white-noise", "", "--no-progress", "--out", str(tmp_path / "cli")]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("nrnn-train: error: ") and "NaN/Inf at step" in err and "Traceback" not in err


def test_cli_trains_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = train_main(["--dataset", "digits", "--epochs", "2", "--hidden", "16", "--dt", "0.5", "--backend", "scan",
                     "--out", str(out), "--no-progress", "--eval-white-noise", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| deterministic |" in text and "test_acc_white_0.5" in text
    assert load_run(out).cfg.hidden == 16
    assert train_main(["--resume", str(out), "--no-progress"]) == 0  # already finished: nothing to do
    assert train_main(["--dataset", "digits", "--hidden", "0", "--out", str(tmp_path / "x")]) == 2
    assert "NRNNConfig.hidden=0" in capsys.readouterr().err


@pytest.mark.parametrize("convention", ["sde", "reference"])
def test_explicit_clean_loss_is_the_test_time_forward_pass(convention):
    """Explicit training's clean loss is that of the forward pass `evaluate` uses. Under the reference
    convention the expansion is taken around the mean-step path s(1 − ε_mult/2), whose loss differs from the
    test-time one (step s) at O(ε_mult): training on it would optimise another map than the one evaluated."""
    import jax.numpy as jnp

    from nrnn_jax import NoisyRNN, explicit_regularizer
    from nrnn_jax.losses import cross_entropy
    from nrnn_jax.step import loss_fn

    mcfg = NRNNConfig(input_dim=2, hidden=4, num_classes=3, dt=0.3, init_std=3.0, convention=convention,
                      eps_add=0.1, eps_mult=0.5, backend="scan")
    model = NoisyRNN(mcfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 2))
    y = jnp.arange(8) % 3
    mask = jnp.ones(8)
    graphdef, params = nnx.split(model)
    _, metrics = loss_fn(graphdef, params, x, y, mask, jax.random.PRNGKey(1), TrainConfig(mode="explicit"))
    test_time = float(jnp.mean(cross_entropy(model(x), y)))
    # the same float32 operations in another order: agreement to a few float32 ulps of a loss of about 1
    assert float(metrics["loss"]) == pytest.approx(test_time, rel=1e-5)
    mean_path = float(explicit_regularizer(model, x, y, method="exact").clean_loss)
    if convention == "reference":  # the test has power: the mean-step path's loss is measurably different
        assert abs(mean_path - test_time) > 1e-3
    else:  # under the SDE convention the expansion is around the test-time path itself
        assert mean_path == pytest.approx(test_time, rel=1e-5)


def test_divergence_rollback_policy(digits, tmp_path):
    """on_divergence="rollback": a NaN/Inf in epoch 1 rolls back to the epoch's start with the learning rate ×
    factor, clipping at rollback_grad_clip and fresh optimizer moments, which from the initial state is exactly
    a fresh run with those settings; the rollback is recorded; without it the default still raises."""
    from nrnn_jax import TrainingDiverged

    mcfg = NRNNConfig(**TINY)
    base = dict(epochs=2, batch_size=32, eval_white_noise=())
    tcfg = TrainConfig(lr=1e30, on_divergence="rollback", rollback_lr_factor=1e-31, rollback_grad_clip=1.0, **base)
    r = train_and_evaluate(mcfg, tcfg, tmp_path / "rb", data=digits, progress=False, log=None)
    events = [json.loads(l) for l in (tmp_path / "rb" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["epoch"] == 1 and rollbacks[0]["step"] == 0
    assert r.summary["rollbacks"] == rollbacks
    assert [e["epoch"] for e in events if "event" not in e] == [1, 2]
    fresh = train_and_evaluate(mcfg, TrainConfig(lr=1e30 * 1e-31, grad_clip=1.0, **base), data=digits,
                               progress=False, log=None)
    for a, b in zip(jax.tree.leaves(nnx.state(r.model)), jax.tree.leaves(nnx.state(fresh.model))):
        np.testing.assert_array_equal(a, b)  # the same computation from the same state: bit for bit
    assert load_run(tmp_path / "rb") is not None  # the checkpoint restores into the rolled-back optimizer
    # a run stopped by a divergence continues under "rollback", as the error suggests: to the same numbers
    with pytest.raises(TrainingDiverged, match="on_divergence='rollback'"):
        train_and_evaluate(mcfg, tcfg.replace(on_divergence="raise"), tmp_path / "stopped", data=digits,
                           progress=False, log=None)
    resumed = train_and_evaluate(mcfg, tcfg.replace(max_rollbacks=1), tmp_path / "stopped", data=digits,
                                 progress=False, log=None, resume=True)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(r.model))):
        np.testing.assert_array_equal(a, b)
    saved = json.loads((tmp_path / "stopped" / "config.json").read_text())["train"]
    assert (saved["on_divergence"], saved["max_rollbacks"]) == ("rollback", 1)
    # the rollback's factor sets the optimizer after a rollback: not changed on resume
    with pytest.raises(ValueError, match=r"fields differing: \['rollback_lr_factor'\]"):
        train_and_evaluate(mcfg, tcfg.replace(rollback_lr_factor=0.25), tmp_path / "stopped", data=digits,
                           progress=False, log=None, resume=True)
    # a bounded number of rollbacks: a factor that cannot help ends in the clear error
    hopeless = tcfg.replace(rollback_lr_factor=0.9, max_rollbacks=2)
    with pytest.raises(TrainingDiverged, match="after 2 rollback"):
        train_and_evaluate(mcfg, hopeless, tmp_path / "h", data=digits, progress=False, log=None)
    with pytest.raises(ValueError, match="TrainConfig.on_divergence='retry'"):
        TrainConfig(on_divergence="retry")


def test_a_checkpoint_of_the_scheduled_optimizer_layout_resumes(digits, tmp_path):
    """A checkpoint whose optimizer state applies the schedule inside the update rule (`optax.scale_by_schedule`,
    no recorded learning rate) restores, and the run resumes to the numbers of an uninterrupted one."""
    import shutil

    import optax

    from nrnn_jax import checkpoint
    from nrnn_jax.state import init_model_state, make_optimizer, metric_names, zero_sums

    mcfg = NRNNConfig(**TINY)
    tcfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, grad_clip=1.0, lr_decay=0.5, lr_decay_epochs=(1,),
                       eval_white_noise=())
    full = train_and_evaluate(mcfg, tcfg, tmp_path / "full", data=digits, progress=False, log=None)
    run = tmp_path / "old"
    train_and_evaluate(mcfg, tcfg.replace(epochs=1), run, data=digits, progress=False, log=None)

    # the checkpoint after epoch 1, rewritten with the optimizer state of the update rule written by hand
    steps_per_epoch = digits.x_train.shape[0] // 64
    ckpts = run / "checkpoints"
    _, target = init_model_state(mcfg, make_optimizer(tcfg, steps_per_epoch), tcfg.seed)
    restored, step = checkpoint.restore_checkpoint(ckpts, {"state": target, "sums": zero_sums(metric_names(tcfg))})
    state = restored["state"]
    clip_state, (adam_state, _) = state.opt_state.inner_state
    old = (clip_state, (adam_state, optax.ScaleByScheduleState(count=state.opt_state.count)))
    by_hand = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adam(optax.piecewise_constant_schedule(1e-2, {steps_per_epoch: 0.5})))
    assert jax.tree.structure(by_hand.init(state.params)) == jax.tree.structure(old)
    shutil.rmtree(ckpts)
    checkpoint.save_checkpoint(ckpts, step, {"state": state._replace(opt_state=old), "sums": restored["sums"]})

    assert load_run(run) is not None
    resumed = train_and_evaluate(mcfg, tcfg, run, data=digits, progress=False, log=None, resume=True)
    for a, b in zip(jax.tree.leaves(nnx.state(full.model)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_array_equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert strip(full.history) == strip(resumed.history)
