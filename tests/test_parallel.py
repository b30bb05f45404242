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
        np.testing.assert_allclose(r.models[i].cell.M_W[...], single.model.cell.M_W[...], rtol=1e-4, atol=1e-6)
    assert not np.allclose(r.models[0].cell.M_W[...], r.models[2].cell.M_W[...])  # another seed
    # the run directory holds the sweep; load_run picks a member with its own noise levels
    loaded = load_run(tmp_path / "sweep", member=1)
    np.testing.assert_array_equal(loaded.cell.M_W[...], r.models[1].cell.M_W[...])
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


def test_noise_free_sweep_member_is_the_deterministic_baseline(digits):
    """An implicit-mode sweep may hold a noise-free member: it trains exactly as a deterministic single run
    (its noise terms are exactly zero); a sweep with no noise at all is refused."""
    tcfg = TrainConfig(mode="implicit", epochs=1, batch_size=128, eval_white_noise=())
    r = train_and_evaluate(NRNNConfig(**TINY), tcfg, data=digits, progress=False, log=None,
                           sweep=Sweep(eps_add=(0.1, 0.0), eps_mult=(0.1, 0.0)))
    det = train_and_evaluate(NRNNConfig(**{**TINY, "eps_add": 0.0, "eps_mult": 0.0}),
                             tcfg.replace(mode="deterministic"), data=digits, progress=False, log=None)
    # vmapped float32 sums may be reordered: a few ulps of a loss of about 2
    np.testing.assert_allclose(r.history[0]["train_loss"][1], det.history[0]["train_loss"], rtol=1e-5)
    assert r.summary["members"][1]["test_acc"] == det.summary["test_acc"]
    with pytest.raises(ValueError, match="in at least one sweep member"):
        train_and_evaluate(NRNNConfig(**TINY), tcfg, data=digits, log=None,
                           sweep=Sweep(eps_add=(0.0, 0.0), eps_mult=(0.0, 0.0)))


DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import nrnn_jax as nj
    from flax import nnx
    from nrnn_jax.train import _default_devices as default_devices
    assert jax.device_count() == 4, jax.devices()
    data = nj.load_dataset("digits")
    mcfg = nj.NRNNConfig(input_dim=8, num_classes=10, hidden=16, dt=0.5, eps_add=0.1, eps_mult=0.1, backend="scan")
    tcfg = nj.TrainConfig(mode="implicit", epochs=2, batch_size=64, eval_white_noise=())
    runs = {str(n): nj.train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None, devices=n)
            for n in (None, 4)}
    out = {k: [h["train_loss"] for h in r.history] for k, r in runs.items()}
    out["param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                            zip(jax.tree.leaves(nnx.state(runs["None"].model)), jax.tree.leaves(nnx.state(runs["4"].model))))
    # interrupted after one epoch (checkpoints restored onto one device), then resumed on 4: the same run
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        nj.train_and_evaluate(mcfg, tcfg.replace(epochs=1, checkpoint_every=3), d, data=data, progress=False,
                              log=None, devices=4)
        resumed = nj.train_and_evaluate(mcfg, tcfg.replace(checkpoint_every=3), d, data=data, progress=False,
                                        log=None, devices=4, resume=True)
    out["resumed"] = [h["train_loss"] for h in resumed.history]
    # one step of each mode on a padded batch whose last device holds only padding (mask 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    mask = np.r_[np.ones(11), np.zeros(5)].astype(np.float32)
    for mode, method in (("implicit", "probe"), ("explicit", "probe"), ("explicit", "exact"), ("deterministic", "probe")):
        cfg = nj.TrainConfig(mode=mode, reg_method=method, num_probes=2, lr=1e-2)
        tx = nj.make_optimizer(cfg, 10)
        res = {}
        for n in (1, 4):
            graphdef, params = nnx.split(nj.NoisyRNN(mcfg.replace(backend="diffrax"), rngs=nnx.Rngs(0)))
            state = nj.init_train_state(params, tx, 0)
            step = nj.make_train_step(graphdef, tx, cfg, devices=n)
            metrics = []
            for _ in range(3):
                state, m = step(state, x, y, mask)
                metrics.append({k: float(v) for k, v in m.items()})
            res[n] = (metrics, [np.asarray(a) for a in jax.tree.leaves(state.params)])
        out[f"step {mode} {method}"] = {"metrics": [res[1][0], res[4][0]], "param_diff": max(
            float(np.max(np.abs(a - b))) for a, b in zip(res[1][1], res[4][1]))}
    # the compiled data-parallel step: no collective in either program (the shares are copied between
    # devices), and the state stays replicated over the mesh
    graphdef, params = nnx.split(nj.NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
    tx = nj.make_optimizer(tcfg, 10)
    batch, replicated = nj.data_parallel_sharding(4)
    state = jax.device_put(nj.init_train_state(params, tx, 0), replicated)
    args = [jax.device_put(a, batch) for a in (np.zeros((64, 8, 8), np.float32), np.zeros(64, np.int32),
                                                 np.ones(64, np.float32))]
    step = nj.make_train_step(graphdef, tx, tcfg, devices=4)
    hlo = step.shares.lower(state, *args).compile().as_text()
    key, stacked = step.shares(state, *args)
    d0 = jax.devices()[0]
    on0 = lambda t: jax.tree.map(lambda a: [s.data for s in a.addressable_shards if s.device == d0][0], t)
    hlo += step.update.lower(on0(state), on0(key), [on0(stacked)] * 4).compile().as_text()
    out["collectives"] = sum(hlo.count(f" {op}(") for op in ("all-reduce", "all-gather", "reduce-scatter",
                                                              "collective-permute", "all-to-all"))
    new_state, _ = step(state, *args)
    out["replicated"] = all(a.sharding.is_fully_replicated and len(a.addressable_shards) == 4
                            for a in jax.tree.leaves(new_state))
    out["auto"] = [default_devices(mcfg, 64, 8), default_devices(mcfg.replace(hidden=128), 128, 784),
                   default_devices(mcfg.replace(hidden=128), 126, 784), default_devices(mcfg.replace(hidden=128), 127, 784),
                   default_devices(mcfg.replace(hidden=128), 128, 784, "philox4x32")]
    # philox4x32 with devices="auto" trains on one device (the data-parallel step cannot draw with it)
    r = nj.train_and_evaluate(mcfg, tcfg.replace(epochs=1, prng="philox4x32"), data=data, progress=False, log=None)
    out["philox_auto"] = r.history[-1]["train_loss"]
    for bad in (dict(devices=5), dict(devices=3), dict(devices="two")):
        try:
            nj.train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None, **bad)
        except ValueError as e:
            out[str(bad)] = str(e)
    print(json.dumps(out))
""")


def test_data_parallel_equals_one_device():
    """On 4 (virtual) CPU devices, data-parallel training gives one device's numbers: the loss trajectory of
    `train_and_evaluate`, and each mode's step metrics and parameters, with a device holding only padding.
    The noise and probes of each example are those of one device (`prng.Rows`), so only the order of the
    float32 sums differs."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the runs differ only in the order of the float32 gradient sum (4 partial sums, then an all-reduce): a few
    # ulp per step. Measured: identical losses, largest parameter difference 6e-8 (2 ulp of |W| ≈ 0.09) after
    # 38 Adam steps; the bounds allow ~10 ulp on the losses and ~16x the measured parameter difference.
    np.testing.assert_allclose(out["4"], out["None"], rtol=1e-6)
    assert out["resumed"] == out["4"]
    assert out["param_diff"] < 1e-6
    for mode in ("implicit probe", "explicit probe", "explicit exact", "deterministic probe"):
        one, four = out[f"step {mode}"]["metrics"]
        for m1, m4 in zip(one, four):
            assert m1.keys() == m4.keys()
            for k in m1:  # the same noise and probes: equal up to float32 reassociation
                np.testing.assert_allclose(m4[k], m1[k], rtol=2e-6, atol=1e-7, err_msg=f"{mode}: {k}")
        assert out[f"step {mode}"]["param_diff"] < 1e-5, mode  # lr 1e-2, 3 Adam steps
    assert out["collectives"] == 0 and out["replicated"]
    assert out["auto"] == [1, 4, 3, 1, 1]
    assert np.isfinite(out["philox_auto"])
    assert "devices=5 is invalid" in out["{'devices': 5}"]
    assert "batch_size=64 is invalid for devices=3" in out["{'devices': 3}"]
    assert "devices='two' is invalid" in out["{'devices': 'two'}"]


def test_prng_choice(digits):
    """Philox draws other noise than threefry (so another trajectory), with the same key layout."""
    key_data = jax.random.key_data(jax.random.PRNGKey(0))
    n = 2**16
    draws = {}
    for prng in ("threefry2x32", "philox4x32"):
        key = jax.random.wrap_key_data(key_data, impl=prng)  # the same uint32[2] key data serves both
        assert jax.random.key_data(jax.random.split(key)[0]).shape == key_data.shape
        draws[prng] = np.asarray(jax.random.normal(key, (n,)), np.float64)  # as NoisyRNN draws its noise
        # N(0, 1) draws: mean within 5 standard errors (1/√n = 0.004) of 0, variance within 5 s.e. (√(2/n)) of 1
        assert abs(draws[prng].mean()) < 5 / np.sqrt(n)
        assert abs(draws[prng].var() - 1) < 5 * np.sqrt(2 / n)
    # other noise, not a transform of the same: the two streams are uncorrelated within 5 s.e. (1/√n)
    assert abs(np.corrcoef(draws["threefry2x32"], draws["philox4x32"])[0, 1]) < 5 / np.sqrt(n)

    mcfg = NRNNConfig(**TINY)
    loss = lambda prng, seed: train_and_evaluate(
        mcfg, TrainConfig(mode="implicit", epochs=1, batch_size=128, eval_white_noise=(), prng=prng, seed=seed),
        data=digits, progress=False, log=None).history[0]["train_loss"]
    threefry = [loss("threefry2x32", seed) for seed in (0, 1, 2)]
    philox = loss("philox4x32", 0)
    assert philox != threefry[0]  # another noise, so another trajectory
    # ... of the same training: the generator changes only the noise, the seed also the initialisation, so the
    # generator moves the loss by less than one seed-to-seed std. Measured (seeds 0-3): generator changes
    # 0.001-0.014, seed std 0.06 over seeds 0-2 (0.10 over 0-3).
    assert abs(philox - threefry[0]) < np.std(threefry, ddof=1)
    with pytest.raises(ValueError, match="TrainConfig.prng='mt19937'"):
        TrainConfig(prng="mt19937")


def test_explicit_sweep_over_noise_levels_equals_single_runs(digits):
    """The traced noise levels reach the explicit regularizer: each member's penalty is the single run's."""
    mcfg = NRNNConfig(**{**TINY, "hidden": 8})
    tcfg = TrainConfig(mode="explicit", reg_method="probe", epochs=1, batch_size=128, eval_white_noise=())
    sweep = Sweep(eps_add=(0.1, 0.3), eps_mult=(0.1, 0.3))
    r = train_and_evaluate(mcfg, tcfg, data=digits, progress=False, log=None, sweep=sweep)
    for i in (0, 1):
        single = train_and_evaluate(sweep.member_config(mcfg, i), tcfg, data=digits, progress=False, log=None)
        # vmap may reorder float32 reductions: ~100 ulp (1e-5) allowed; measured: equal
        np.testing.assert_allclose(r.history[0]["train_reg"][i], single.history[0]["train_reg"], rtol=1e-5)
        np.testing.assert_allclose(r.history[0]["train_loss"][i], single.history[0]["train_loss"], rtol=1e-5)
    # with ε_add = ε_mult = ε the penalty is ε² × a function of the parameters, so 3x the noise gives 9x the
    # penalty at equal parameters; over the epoch the members' parameters drift apart (the 9x stronger penalty
    # lowers its own value): measured ratio 8.50. Band: 9 ± 3x that drift.
    ratio = r.history[0]["train_reg"][1] / r.history[0]["train_reg"][0]
    assert 7.5 < ratio < 10.5


def test_devices_flag_is_validated(capsys):
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            train_main(["--dataset", "digits", "--devices", bad])
        assert f"--devices={bad!r} is invalid: expected 'auto' or a positive integer" in capsys.readouterr().err


RUN_AHEAD = textwrap.dedent("""
    import jax
    import numpy as np
    from flax import nnx
    import nrnn_jax as nj
    mcfg = nj.NRNNConfig(input_dim=1, num_classes=10, hidden=32, dt=0.03, eps_add=0.02, eps_mult=0.02)
    tcfg = nj.TrainConfig(mode="implicit", lr=1e-3)
    tx = nj.make_optimizer(tcfg, 10)
    graphdef, params = nnx.split(nj.NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
    batch, replicated = nj.data_parallel_sharding(2)
    state = jax.device_put(nj.init_train_state(params, tx, 0), replicated)
    rng = np.random.default_rng(0)
    x, y, m = (jax.device_put(a, batch) for a in (rng.standard_normal((16, 100, 1)).astype(np.float32),
                                                   rng.integers(0, 10, 16).astype(np.int32), np.ones(16, np.float32)))
    step = nj.make_train_step(graphdef, tx, tcfg, devices=2)
    for _ in range(300):
        state, metrics = step(state, x, y, m)
    jax.block_until_ready(state)
    print("finished", int(state.step))
""")


def test_data_parallel_step_survives_the_host_running_ahead():
    """300 data-parallel steps on 2 CPU devices dispatched without waiting (the host runs far ahead of the
    devices, as a training loop does). With an in-process all-reduce in the step, XLA:CPU's client ran out
    of threads and the process aborted after its 40 s rendezvous timeout (docs/xla_cpu_all_reduce.md: 2 of 2
    such processes on a busy 2-core machine); the step has no collective now."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", RUN_AHEAD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "finished 300"


def test_data_parallel_step_refuses_a_generator_it_cannot_draw_with():
    """philox4x32 cannot be lowered inside shard_map: the data-parallel step refuses it up front, naming the
    field, the value and what works (devices='auto' picks one device for it: test_data_parallel_equals_one_device)."""
    from flax import nnx

    from nrnn_jax import NoisyRNN, make_optimizer, make_train_step

    tcfg = TrainConfig(mode="implicit", prng="philox4x32")
    graphdef, _ = nnx.split(NoisyRNN(NRNNConfig(**TINY), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"TrainConfig.prng='philox4x32' is invalid: the data-parallel step "
                                         r"\(devices=2\).*expected one of \('threefry2x32',\), or devices=1"):
        make_train_step(graphdef, make_optimizer(tcfg, 10), tcfg, devices=2)
