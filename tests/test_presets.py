"""Named presets of the public pixel-MNIST runs (docs/theory.md Table 7.1, (7.1)): each builds valid
configurations, each noisy one adds the public code's per-step additive noise (measured on the library's own
step), bad names are clear errors, and the presets reach `run_compare` and the command lines."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nrnn_jax import NoisyRNN, cli, compare
from nrnn_jax.compare import CompareConfig, compare_settings
from nrnn_jax.config import NRNNConfig, TrainConfig
from nrnn_jax import _registry
from nrnn_jax.presets import PRESETS, PUBLIC_ADDITIVE_STD, get_preset

TABLE = {  # docs/theory.md Table 7.1 and (7.1): dt, lr (ordered, permuted), beta, gamma, alpha, eps_add, eps_mult, convention
    "lipschitz": (0.03, (3e-3, 3.5e-3), 0.75, 1e-3, 1.0, 0.0, 0.0, "sde"),
    "antisymmetric": (0.01, (2e-3, 2e-3), 1.0, 1e-4, 0.0, 0.0, 0.0, "sde"),
    "nrnn-small": (0.01, (1e-3, 1e-3), 0.75, 1e-3, 1.0, 0.02, 0.02, "reference"),
    "nrnn-high": (0.01, (1e-3, 1e-3), 0.75, 1e-3, 1.0, 0.05, 0.02, "reference"),
    "nrnn-small-sde": (0.01, (1e-3, 1e-3), 0.75, 1e-3, 1.0, 0.02 / math.sqrt(0.01), 0.02 / math.sqrt(0.01), "sde"),
    "nrnn-high-sde": (0.01, (1e-3, 1e-3), 0.75, 1e-3, 1.0, 0.05 / math.sqrt(0.01), 0.02 / math.sqrt(0.01), "sde"),
}
DATASETS = ("mnist_pixel", "mnist_permuted")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_build_valid_configs_of_the_public_runs(name):
    assert set(PRESETS) == set(TABLE)
    dt, lrs, beta, gamma, alpha, eps_add, eps_mult, convention = TABLE[name]
    for dataset, lr in zip(DATASETS, lrs):
        mcfg, tcfg = get_preset(name, dataset)
        assert isinstance(mcfg, NRNNConfig) and isinstance(tcfg, TrainConfig)
        # both validate again from their dictionaries (as a run directory stores them)
        assert NRNNConfig.from_dict(mcfg.to_dict()) == mcfg and TrainConfig.from_dict(tcfg.to_dict()) == tcfg
        assert (mcfg.dt, mcfg.beta, mcfg.gamma_a, mcfg.gamma_w, mcfg.alpha, mcfg.convention) == (
            dt, beta, gamma, gamma, alpha, convention)
        np.testing.assert_allclose([mcfg.eps_add, mcfg.eps_mult], [eps_add, eps_mult], rtol=1e-12)
        assert (mcfg.hidden, mcfg.init_std, mcfg.input_dim, mcfg.num_classes) == (128, 0.1, 1, 10)
        assert (tcfg.dataset, tcfg.optimizer, tcfg.lr, tcfg.batch_size, tcfg.epochs, tcfg.lr_decay,
                tcfg.lr_decay_epochs, tcfg.seed) == (dataset, "adam", lr, 128, 100, 0.1, (90,), 1)
        assert tcfg.mode == ("implicit" if eps_add > 0 else "deterministic")
        options = dict(tcfg.data_options)
        if dataset == "mnist_permuted":  # the public permutation and the public code's raw 0-255 pixels
            assert options == {"permutation": "public", "pixel_scale": "raw"}
        else:
            assert options == {"pixel_scale": "unit"}
        assert PRESETS[name].description


@pytest.mark.parametrize("name", [n for n in sorted(TABLE) if TABLE[n][5] > 0])
def test_per_step_additive_noise_is_the_public_codes(name):
    """∂h_{k+1}/∂ξ_add of the library's step at h = 0, z = 0 (where the drift vanishes) is the per-step
    additive standard deviation times I; it must be the public code's 0.02 or 0.05 under both readings."""
    mcfg, _ = get_preset(name, "mnist_pixel")
    d = mcfg.hidden
    p = NoisyRNN(mcfg, rngs=nnx.Rngs(0)).recurrent_params()
    h = z = jnp.zeros(d, jnp.float32)
    rest = jnp.zeros(mcfg.noise_dim - d, jnp.float32)
    model = NoisyRNN(mcfg, rngs=nnx.Rngs(0))
    scheme, sigma, f = _registry.scheme(mcfg), _registry.diffusion(mcfg), model.cell.drift(h, z)
    jac = jax.jacfwd(lambda a: scheme.step(mcfg, p, sigma, h, z, f, jnp.concatenate([a, rest])))(jnp.zeros(d, jnp.float32))
    public = PUBLIC_ADDITIVE_STD[name]
    assert public in (0.02, 0.05)
    np.testing.assert_allclose(np.diag(jac), public, rtol=1e-6)
    np.testing.assert_array_equal(jac - np.diag(np.diag(jac)), 0.0)
    assert PRESETS[name].per_step_additive_std == pytest.approx(public, rel=1e-12)


def test_get_preset_errors_name_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"preset='nrnn' is invalid: expected one of 'lipschitz', 'antisymmetric', "
                                         r"'nrnn-small', 'nrnn-high', 'nrnn-small-sde', 'nrnn-high-sde'"):
        get_preset("nrnn", "mnist_pixel")
    with pytest.raises(ValueError, match=r"dataset='ecg5000' is invalid: expected one of 'mnist_pixel', 'mnist_permuted'"):
        get_preset("nrnn-small", "ecg5000")


def test_compare_config_preset_settings():
    st = compare_settings(CompareConfig(dataset="mnist_permuted", preset="nrnn-high", epochs=2, lambdas=(0.5,)))
    mcfg, tcfg = get_preset("nrnn-high", "mnist_permuted")
    assert st.preset == "nrnn-high"
    assert {k: st.model[k] for k in ("dt", "eps_add", "eps_mult", "convention", "hidden", "beta")} == {
        "dt": 0.01, "eps_add": 0.05, "eps_mult": 0.02, "convention": "reference", "hidden": 128, "beta": 0.75}
    assert st.train["epochs"] == 2 and st.train["lr"] == tcfg.lr and st.train["lr_decay_epochs"] == (90,)
    assert "seed" not in st.train and "mode" not in st.train and st.lambdas == (0.5,)
    # raw 0-255 inputs: the additive perturbation strengths and the selection strengths scale with the pixel range
    assert st.data_options == {"permutation": "public", "pixel_scale": "raw"} and st.input_scale == 255.0
    assert st.curves["white"] == [255.0 * s for s in compare.DEFAULTS["mnist_permuted"]["curves"]["white"]]
    # the data set's defaults ARE the nrnn-small protocol
    for dataset in DATASETS:
        default = compare_settings(CompareConfig(dataset=dataset))
        assert default.preset == "nrnn-small" and default.model["convention"] == "reference"
        assert (default.model["eps_add"], default.model["eps_mult"], default.model["dt"]) == (0.02, 0.02, 0.01)
    with pytest.raises(ValueError, match=r"CompareConfig.preset='lipschitz' is invalid: .*noisy preset: 'nrnn-small'"):
        compare_settings(CompareConfig(dataset="mnist_pixel", preset="lipschitz"))
    with pytest.raises(ValueError, match=r"dataset='digits' is invalid: expected one of 'mnist_pixel', 'mnist_permuted'"):
        compare_settings(CompareConfig(dataset="digits", preset="nrnn-small"))


class _Reached(Exception):
    pass


def test_preset_reaches_run_compare_and_the_command_lines(monkeypatch, tmp_path, capsys):
    # run_compare loads the preset's data set with its loader options
    seen = {}

    def fake_load(name, data_dir=None, **options):
        seen.update(name=name, data_dir=data_dir, options=options)
        raise _Reached

    monkeypatch.setattr(compare, "load_dataset", fake_load)
    with pytest.raises(_Reached):
        compare.run_compare(CompareConfig(dataset="mnist_permuted", data_dir="dd", preset="nrnn-small-sde"), tmp_path)
    assert seen == {"name": "mnist_permuted", "data_dir": "dd",
                    "options": {"permutation": "public", "pixel_scale": "raw"}}

    # nrnn-compare --preset NAME builds CompareConfig(preset=NAME); its help lists the names
    got = []

    def fake_run(cc, out, resume):
        got.append((cc, resume))
        (out / "results.md").write_text("table")
        return {"time_s": 0.0}

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert cli.compare_main(["--dataset", "mnist_pixel", "--preset", "nrnn-high", "--out", str(tmp_path),
                             "--epochs", "1"]) == 0
    cc, resume = got[0]
    assert cc.preset == "nrnn-high" and cc.dataset == "mnist_pixel" and cc.epochs == 1
    assert cc.modes == ("deterministic", "implicit", "explicit") and not resume
    # --modes and --resume reach CompareConfig.modes and run_compare(resume=...)
    assert cli.compare_main(["--dataset", "mnist_pixel", "--preset", "nrnn-high", "--out", str(tmp_path),
                             "--modes", "implicit", "--resume"]) == 0
    assert got[1][0].modes == ("implicit",) and got[1][1] is True
    with pytest.raises(SystemExit):
        cli.compare_main(["--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in PRESETS)

    # nrnn-train --preset NAME: the preset's configurations, other flags overriding
    configs = []

    class FakeData:
        input_dim, num_classes = 1, 10

    def fake_train(mcfg, tcfg, run_dir, **kw):
        configs.append((mcfg, tcfg))
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "load_dataset", lambda name, data_dir=None, **options: seen.update(options=options) or FakeData())
    monkeypatch.setattr(cli, "train_and_evaluate", fake_train)
    assert cli.train_main(["--preset", "nrnn-small", "--dataset", "mnist_permuted", "--epochs", "3",
                           "--out", str(tmp_path / "run")]) == 2
    mcfg, tcfg = configs[0]
    want_m, want_t = get_preset("nrnn-small", "mnist_permuted")
    assert mcfg == want_m and tcfg == want_t.replace(epochs=3)
    assert seen["options"] == {"permutation": "public", "pixel_scale": "raw"}
    assert cli.train_main(["--preset", "nrnn-small", "--dataset", "digits", "--out", str(tmp_path / "r2")]) == 2
    assert "dataset='digits' is invalid" in capsys.readouterr().err
