"""Sweeps (several models in one vmapped step) and data-parallel training over several devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nrnn_jax import NRNNConfig, Sweep, TrainConfig, load_dataset, load_run, train_and_evaluate
from nrnn_jax.cli import train_main

TINY = dict(input_dim=8, num_classes=10, hidden=16, dt=0.5, backend="scan", eps_add=0.1, eps_mult=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_sweep_members_equal_single_runs(digits, tmp_path):
    """Each member of a sweep trains exactly as the single run with its seed and noise levels (the same data
    order); members differing in the seed or the noise differ."""
    mcfg = NRNNConfig(**TINY)
    tcfg = TrainConfig(mode="implicit", epochs=1, batch_size=64, eval_white_noise=(0.5,))
    sweep = Sweep(seeds=(0, 0, 1), eps_add=(0.1, 0.3, 0.1), eps_mult=(0.1, 0.0, 0.1))
    r = train_and_evaluate(mcfg, tcfg, tmp_path / "sweep", data=digits, progress=False, log=None, sweep=sweep)
    assert len(r.models) == 3 and len(r.summary["members"]) == 3
    for i in (0, 1):
        single = train_and_evaluate(sweep.member_config(mcfg, i), tcfg, data=digits, progress=False, log=None)
        np.testing.assert_allclose([h["train_loss"][i] for h in r.history], [h["train_loss"] for h in single.history],
                                   rtol=1e-5)
        member = r.summary["members"][i]
        assert (member["eps_add"], member["eps_mult"]) == (sweep.eps_add[i], sweep.eps_mult[i])
        assert abs(member["test_acc"] - single.summary["test_acc"]) <= 1 / len(digits.y_test)
        np.testing.assert_allclose(r.models[i].M_W[...], single.model.M_W[...], rtol=1e-4, atol=1e-6)
    assert not np.allclose(r.models[0].M_W[...], r.models[2].M_W[...])  # another seed
    # the run directory holds the sweep; load_run picks a member with its own noise levels
    loaded = load_run(tmp_path / "sweep", member=1)
    np.testing.assert_array_equal(loaded.M_W[...], r.models[1].M_W[...])
    assert (loaded.cfg.eps_add, loaded.cfg.eps_mult) == (0.3, 0.0)
    with pytest.raises(ValueError, match="member=None is invalid"):
        load_run(tmp_path / "sweep")
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["sweep"]["seeds"] == [0, 0, 1]


def test_sweep_resume_and_cli(digits, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--dataset", "digits", "--mode", "implicit", "--epochs", "1", "--batch-size", "128", "--hidden", "8",
            "--dt", "0.5", "--eps-add", "0.1", "--eps-mult", "0.1", "--backend", "scan", "--no-progress",
            "--eval-white-noise", "", "--sweep-seeds", "0,1", "--out", str(out)]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("| implicit |") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [m["seed"] for m in summary["members"]] == [0, 1]
    assert train_main(["--resume", str(out), "--no-progress"]) == 0  # already finished: nothing to redo


def test_sweep_validation():
    with pytest.raises(ValueError, match="Sweep.seeds"):
        Sweep(seeds=(0, 1), eps_add=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="Sweep.eps_mult"):
        Sweep(eps_mult=(-0.1,))
    with pytest.raises(ValueError, match="Sweep.seeds"):
        Sweep(seeds=())
    grid = Sweep.grid(seeds=(0, 1), noise_levels=[(0.1, 0.2), (0.0, 0.3)])
    assert grid.size == 4 and grid.member_seeds() == [0, 1, 0, 1]
    assert grid.noise_levels(NRNNConfig()).tolist() == [[0.1, 0.2], [0.1, 0.2], [0.0, 0.3], [0.0, 0.3]]


def test_sweep_member_without_noise_is_refused_in_implicit_mode(digits):
    with pytest.raises(ValueError, match="sweep member 1"):
        train_and_evaluate(NRNNConfig(**TINY), TrainConfig(mode="implicit", epochs=1), data=digits, log=None,
                           sweep=Sweep(eps_add=(0.1, 0.0), eps_mult=(0.1, 0.0)))


DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import nrnn_jax as nj
    assert jax.device_count() == 4, jax.devices()
    data = nj.load_dataset("digits")
    mcfg = nj.NRNNConfig(input_dim=8, num_classes=10, hidden=16, dt=0.5, eps_add=0.1, eps_mult=0.1, backend="scan")
    tcfg = nj.TrainConfig(mode="implicit", epochs=2, batch_size=64, eval_white_noise=())
    runs = {str(n): nj.train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None, devices=n)
            for n in (None, 4)}
    out = {k: [h["train_loss"] for h in r.history] for k, r in runs.items()}
    out["W_diff"] = float(np.max(np.abs(np.asarray(runs["None"].model.M_W[...]) - np.asarray(runs["4"].model.M_W[...]))))
    # the compiled step really is partitioned: 4 partitions, gradients summed by an all-reduce
    from flax import nnx
    graphdef, params = nnx.split(nj.NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
    tx = nj.make_optimizer(tcfg, 10)
    batch, replicated = nj.data_parallel_sharding(4)
    state = jax.device_put(nj.init_train_state(params, tx, 0), replicated)
    x = jax.device_put(np.zeros((64, 8, 8), np.float32), batch)
    y = jax.device_put(np.zeros(64, np.int32), batch)
    m = jax.device_put(np.ones(64, np.float32), batch)
    hlo = nj.make_train_step(graphdef, tx, tcfg).lower(state, x, y, m).compile().as_text()
    out["all_reduce"] = "all-reduce" in hlo
    for bad in (dict(devices=5), dict(devices=3)):
        try:
            nj.train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None, **bad)
        except ValueError as e:
            out[str(bad)] = str(e)
    print(json.dumps(out))
""")


def test_data_parallel_equals_one_device():
    """On 4 (virtual) CPU devices, data-parallel training gives the loss trajectory of one device."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["4"], out["None"], rtol=1e-5)
    assert out["W_diff"] < 1e-4
    assert out["all_reduce"]
    assert "devices=5 is invalid" in out["{'devices': 5}"]
    assert "batch_size=64 is invalid for devices=3" in out["{'devices': 3}"]


def test_prng_choice(digits):
    """Philox draws other noise than threefry (so another trajectory), with the same key layout."""
    mcfg = NRNNConfig(**TINY)
    runs = [train_and_evaluate(mcfg, TrainConfig(mode="implicit", epochs=1, batch_size=128, eval_white_noise=(),
                                                 prng=prng), data=digits, progress=False, log=None)
            for prng in ("threefry2x32", "philox4x32")]
    assert runs[0].history[0]["train_loss"] != runs[1].history[0]["train_loss"]
    assert abs(runs[0].history[0]["train_loss"] - runs[1].history[0]["train_loss"]) < 0.5
    with pytest.raises(ValueError, match="TrainConfig.prng='mt19937'"):
        TrainConfig(prng="mt19937")


def test_explicit_sweep_over_noise_levels_equals_single_runs(digits):
    """The traced noise levels reach the explicit regularizer: each member's penalty is the single run's."""
    mcfg = NRNNConfig(**{**TINY, "hidden": 8})
    tcfg = TrainConfig(mode="explicit", reg_method="probe", epochs=1, batch_size=128, eval_white_noise=())
    sweep = Sweep(eps_add=(0.1, 0.3), eps_mult=(0.1, 0.0))
    r = train_and_evaluate(mcfg, tcfg, data=digits, progress=False, log=None, sweep=sweep)
    single = train_and_evaluate(sweep.member_config(mcfg, 1), tcfg, data=digits, progress=False, log=None)
    np.testing.assert_allclose(r.history[0]["train_reg"][1], single.history[0]["train_reg"], rtol=1e-5)
    assert r.history[0]["train_reg"][0] < r.history[0]["train_reg"][1]  # less noise, smaller penalty
