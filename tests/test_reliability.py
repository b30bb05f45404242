"""Nothing lost: SIGKILL and exact resume, determinism, and a clear error at every public entry point."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kill_resume import uninterrupted_and_resumed
from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, evaluate, load_dataset, load_run, train_and_evaluate

ARGS = ["--dataset", "digits", "--epochs", "4", "--hidden", "24", "--dt", "0.5", "--backend", "scan",
        "--mode", "implicit", "--eps-add", "0.1", "--eps-mult", "0.1", "--batch-size", "32", "--lr", "0.01",
        "--checkpoint-every", "3", "--eval-white-noise", "", "--no-progress", "--seed", "3"]


def _params(run_dir):
    return jax.tree.leaves(nnx.state(load_run(run_dir)))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    # killed once a checkpoint from the middle of training exists (steps 3, 6, 9, ...; 39 steps an epoch)
    full, killed = uninterrupted_and_resumed(ARGS, tmp_path, kill_step=45)
    for a, b in zip(_params(full), _params(killed)):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if k != "time_s"}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(full) == strip(killed)
    s_full, s_killed = (json.loads((r / "summary.json").read_text()) for r in (full, killed))
    assert s_full["test_acc"] == s_killed["test_acc"] and s_full["test_loss"] == s_killed["test_loss"]
    try:  # TensorBoard shows the killed-and-resumed run as the uninterrupted one: every epoch, once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    accs = [EventAccumulator(str(r / "tensorboard")) for r in (full, killed)]
    for acc in accs:
        acc.Reload()
    for tag in ("train/loss", "val/acc"):
        a, b = ([(e.step, e.value) for e in acc.Scalars(tag)] for acc in accs)
        assert a == b and [s for s, _ in a] == [1, 2, 3, 4], (tag, a, b)


def test_same_seed_same_numbers():
    data = load_dataset("digits")
    mcfg = NRNNConfig(input_dim=8, num_classes=10, hidden=16, dt=0.5, eps_add=0.1, eps_mult=0.1, backend="diffrax")
    tcfg = TrainConfig(mode="implicit", epochs=2, batch_size=64, eval_white_noise=(0.5,))
    a = train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None)
    b = train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None)
    for x, y in zip(jax.tree.leaves(nnx.state(a.model)), jax.tree.leaves(nnx.state(b.model))):
        np.testing.assert_array_equal(x, y)
    assert a.summary["test_acc_white_0.5"] == b.summary["test_acc_white_0.5"]
    c = train_and_evaluate(mcfg, tcfg.replace(seed=1), data=data, progress=False, log=None)
    assert not np.array_equal(jax.tree.leaves(nnx.state(a.model))[0], jax.tree.leaves(nnx.state(c.model))[0])


@pytest.fixture(scope="module")
def model():
    return NoisyRNN(NRNNConfig(input_dim=2, hidden=4, num_classes=3, eps_add=0.1), rngs=nnx.Rngs(0))


X = np.zeros((2, 5, 2), np.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m(np.zeros((2, 5))), ValueError, r"x has shape \(2, 5\); expected \(batch, T, input_dim\)"),
    (lambda m: m(np.zeros((2, 5, 3))), ValueError, r"expected \(batch, T, input_dim\) = \(B ≥ 1, T ≥ 1, 2\)"),
    (lambda m: m(np.zeros((0, 5, 2))), ValueError, "x has shape"),
    (lambda m: m(np.full((2, 5, 2), np.nan)), ValueError, "x contains 20 NaN or Inf"),
    (lambda m: m(np.zeros((2, 5, 2), bool)), TypeError, "x has dtype bool"),
    (lambda m: m(X, noise=np.zeros((2, 5, 3))), ValueError, r"noise has shape \(2, 5, 3\); expected .* \(2, 5, 4\)"),
    (lambda m: m(X, noise=np.zeros((2, 5, 4)), key=jax.random.PRNGKey(0)), ValueError, "either noise=xi or key=key"),
    (lambda m: evaluate(m, X, np.array([0, 3])), ValueError, r"labels in \[0, 3\]; expected labels in \[0, 3\)"),
    (lambda m: evaluate(m, X, np.array([0.0, 1.0])), TypeError, "y has dtype float64"),
    (lambda m: evaluate(m, X, np.array([0, 1, 2])), ValueError, r"y has shape \(3,\); expected \(2,\)"),
])
def test_entry_point_errors(model, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model)


def test_other_entry_points(tmp_path):
    with pytest.raises(TypeError, match="expects an NRNNConfig"):
        NoisyRNN({"hidden": 3}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype='float64' needs 64-bit JAX"):
        NoisyRNN(NRNNConfig(dtype="float64"), rngs=nnx.Rngs(0))
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"hiden": 3}, "train": {}}))
    with pytest.raises(ValueError, match=r"NRNNConfig has no field\(s\) \['hiden'\]"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="resume=True needs a run_dir"):
        train_and_evaluate(NRNNConfig(input_dim=8, num_classes=10), TrainConfig(epochs=1),
                           data=load_dataset("digits"), resume=True, log=None)
    with pytest.raises(ValueError, match="it holds no run"):
        train_and_evaluate(NRNNConfig(input_dim=8, num_classes=10), TrainConfig(epochs=1), tmp_path / "none",
                           data=load_dataset("digits"), resume=True, log=None)
