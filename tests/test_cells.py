"""Pluggable cells (docs/theory.md §8): every built-in cell and a user cell through the forward pass, both
backends, the explicit regularizer (against the ξ-Hessian oracle, Monte Carlo and the probe), training,
run directories and the analyses; the Lipschitz cell's generic path against its fast path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nrnn_jax as nj
from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, antithetic_monte_carlo, explicit_regularizer, load_run
from nrnn_jax.analysis import certificate, lyapunov_exponent, robustness_curve
from nrnn_jax.losses import cross_entropy
from oracles import assert_exact_regularizer_is_half_trace_of_noise_hessian

pytestmark = pytest.mark.usefixtures("x64")

B, T, N_IN, D, C = 3, 6, 2, 4, 3


class UserCell(nj.Cell):
    """A cell no library code knows: a gated sine drift with a bias inside the nonlinearity."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) * d ** -0.5)
        self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d,), dtype))

    def drift(self, h, z):
        return -h * jax.nn.sigmoid(z) + jnp.sin(self.W[...] @ h + z + self.b[...])


class AsGeneric(nj.Cell):
    """Wraps a product cell so that the library sees only `drift`: the generic path for the same numbers."""

    def __init__(self, inner):
        self.inner = inner

    def drift(self, h, z):
        return self.inner.drift(h, z)


CELLS = ["lipschitz", "antisymmetric", "gru", "tanh", "user"]


def _cfg(**kw) -> NRNNConfig:
    fields = dict(input_dim=N_IN, hidden=D, num_classes=C, dt=0.3, init_std=1.0, backend="scan", dtype="float64")
    fields.update(kw)
    return NRNNConfig(**fields)


def _model(name: str, **kw) -> NoisyRNN:
    if name == "user":
        rngs = nnx.Rngs(0)
        cfg = _cfg(**kw)
        return NoisyRNN(cfg, rngs=rngs, cell=UserCell(cfg, rngs=rngs))
    return NoisyRNN(_cfg(cell=name, **kw), rngs=nnx.Rngs(0))


def _data():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N_IN), jnp.float64)
    return x, jnp.arange(B) % C


def _em_loop(model, x, xi):
    """An independent Euler–Maruyama loop: the cell's drift per example, diagonal noise ε_add + ε_mult h."""
    cfg = model.cfg
    z = np.asarray(model.encode(x))
    h = np.zeros((x.shape[0], cfg.hidden))
    for k in range(x.shape[1]):
        f = np.stack([np.asarray(model.cell.drift(jnp.asarray(h[i]), jnp.asarray(z[i, k]))) for i in range(h.shape[0])])
        h = h + cfg.dt * f + np.sqrt(cfg.dt) * (cfg.eps_add + cfg.eps_mult * h) * np.asarray(xi[:, k])
    return np.asarray(model.decode(jnp.asarray(h)))


@pytest.mark.parametrize("name", CELLS)
def test_noisy_forward_is_an_euler_maruyama_loop_on_both_backends(name):
    x, _ = _data()
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, D), jnp.float64)
    outs = {}
    for backend in ("scan", "diffrax"):
        model = _model(name, eps_add=0.3, eps_mult=0.4, backend=backend)
        outs[backend] = np.asarray(model(x, noise=xi))
        np.testing.assert_allclose(outs[backend], _em_loop(model, x, xi), rtol=1e-12, atol=1e-12)
    assert model.cfg.cell == ("test_cells:UserCell" if name == "user" else name)  # a user cell: its import path
    traj = model.trajectory(x, noise=xi)
    assert traj.shape == (B, T + 1, D)
    np.testing.assert_allclose(model.decode(traj[:, -1]), outs["diffrax"], rtol=1e-12)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("solver", ["euler", "euler_heun"])
def test_exact_regularizer_is_half_trace_of_noise_hessian(name, solver):
    """½ tr ∇²_ξ L(0) of the model's own noisy loss equals the exact regularizer, for every cell."""
    x, y = _data()
    model = _model(name, eps_add=0.3, eps_mult=0.5, solver=solver, gradient="autodiff")
    assert_exact_regularizer_is_half_trace_of_noise_hessian(model, x, y, min_value=1e-4)


@pytest.mark.parametrize("name", CELLS)
def test_monte_carlo_agrees_at_small_noise_and_not_at_large(name):
    x, y = _data()
    n = 20000
    ratios, ses = [], []
    for scale in (2.0, 0.05):
        model = _model(name, eps_add=scale, eps_mult=scale)
        reg = explicit_regularizer(model, x, y, method="exact")
        s = np.asarray(antithetic_monte_carlo(model, x, y, n, jax.random.PRNGKey(1), reg.clean_loss))
        ratios.append(s.mean() / float(reg.value))
        ses.append(s.std(ddof=1) / np.sqrt(n) / float(reg.value))
    # small noise: the O(ε²) relative bias (~3e-3) is below the statistical error; |z| < 4 fails w.p. 6e-5
    assert abs(ratios[1] - 1.0) < 4 * ses[1], (ratios, ses)
    # large noise: the expansion's bias is far beyond the statistical error (the check above has power)
    assert abs(ratios[0] - ratios[1]) > 8 * ses[0], (ratios, ses)


@pytest.mark.parametrize("name", ["antisymmetric", "gru", "user"])
def test_probe_is_unbiased(name):
    x, y = _data()
    model = _model(name, eps_add=0.1, eps_mult=0.1)
    exact = explicit_regularizer(model, x, y, method="exact")
    est = explicit_regularizer(model, x, y, method="probe", num_probes=3000, key=jax.random.PRNGKey(7))
    z = (float(est.value) - float(exact.value)) / float(est.std_err)
    assert abs(z) < 4.0, (float(est.value), float(exact.value), float(est.std_err))
    assert float(est.std_err) < 0.05 * abs(float(exact.value))  # power: a 20 % bias would be caught
    np.testing.assert_allclose(est.clean_loss, exact.clean_loss, rtol=1e-12)


@pytest.mark.parametrize("name", ["antisymmetric", "tanh"])
def test_product_cells_probe_recursion_equals_the_generic_one(name):
    """The product-cell probe recursion (Taylor mode on g, discrete adjoint) against the generic Taylor-mode
    `probe_terms` of the same cell seen only through `drift`: same probes, same numbers, same gradients."""
    x, y = _data()
    fast = _model(name, eps_add=0.2, eps_mult=0.3, solver="euler_heun")
    slow = NoisyRNN(fast.cfg, rngs=nnx.Rngs(0), cell=AsGeneric(fast.cell))
    nnx.update(slow.encoder, nnx.state(fast.encoder))
    nnx.update(slow.decoder, nnx.state(fast.decoder))

    def value(model):
        return explicit_regularizer(model, x, y, method="probe", num_probes=4, key=jax.random.PRNGKey(3)).value

    np.testing.assert_allclose(value(fast), value(slow), rtol=1e-12)
    g_fast = nnx.grad(value)(fast)
    g_slow = nnx.grad(value)(slow)
    w = "M_W" if name == "antisymmetric" else "W"
    np.testing.assert_allclose(g_fast["cell"][w].value, g_slow["cell"]["inner"][w].value, rtol=1e-10, atol=1e-14)


def _lipschitz_pair(**kw):
    fast = _model("lipschitz", **kw)
    slow = NoisyRNN(fast.cfg, rngs=nnx.Rngs(0), cell=AsGeneric(fast.cell))
    nnx.update(slow.encoder, nnx.state(fast.encoder))
    nnx.update(slow.decoder, nnx.state(fast.decoder))
    return fast, slow


@pytest.mark.parametrize("backend", ["scan", "diffrax"])
def test_lipschitz_generic_path_equals_the_fast_path(backend):
    x, y = _data()
    fast, slow = _lipschitz_pair(eps_add=0.2, eps_mult=0.3, backend=backend)
    assert slow.cfg.cell == "test_cells:AsGeneric" and isinstance(fast.cell, nj.ProductCell)
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, D), jnp.float64)
    np.testing.assert_allclose(fast(x), slow(x), rtol=1e-13)
    np.testing.assert_allclose(fast.trajectory(x, noise=xi), slow.trajectory(x, noise=xi), rtol=1e-13, atol=1e-15)

    def loss(model):
        return jnp.mean(cross_entropy(model(x, noise=xi), y))

    g_fast, g_slow = nnx.grad(loss)(fast), nnx.grad(loss)(slow)
    for part in ("M_A", "M_W"):
        np.testing.assert_allclose(g_fast["cell"][part].value, g_slow["cell"]["inner"][part].value, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(g_fast["encoder"]["kernel"].value, g_slow["encoder"]["kernel"].value, rtol=1e-11)
    for method in ("exact", "probe"):
        kw = dict(method=method, num_probes=3, key=jax.random.PRNGKey(2))
        np.testing.assert_allclose(explicit_regularizer(fast, x, y, **kw).value,
                                   explicit_regularizer(slow, x, y, **kw).value, rtol=1e-12)


def test_a_user_cell_trains_saves_reloads_and_is_analysed(tmp_path):
    from nrnn_jax.data import load_dataset

    data = load_dataset("digits")
    mcfg = NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, hidden=8, dt=0.5, eps_add=0.2,
                      eps_mult=0.2)
    runs = {}
    for mode in ("deterministic", "implicit", "explicit"):
        tcfg = TrainConfig(dataset="digits", mode=mode, epochs=1, batch_size=128, reg_method="probe")
        runs[mode] = nj.train_and_evaluate(mcfg, tcfg, tmp_path / mode, data=data, progress=False, log=None,
                                           cell=UserCell)
        assert np.isfinite(runs[mode].summary["test_loss"])
    r = runs["implicit"]
    assert r.model.cfg.cell == "test_cells:UserCell" and isinstance(r.model.cell, UserCell)
    loaded = load_run(tmp_path / "implicit", cell=UserCell)
    x = data.x_test[:16]
    np.testing.assert_array_equal(loaded(x), r.model(x))
    acc = robustness_curve(loaded, data.x_test[:64], data.y_test[:64], "white", [0.0, 0.5], seed=0)
    assert acc.shape == (2,) and 0.0 <= float(acc.min()) <= 1.0
    with pytest.raises(ValueError, match="built-in cell 'lipschitz'"):
        nj.train_and_evaluate(mcfg, TrainConfig(dataset="digits", epochs=1), tmp_path / "lip", data=data,
                              progress=False, log=None)
        load_run(tmp_path / "lip", cell=UserCell)
    with pytest.raises(ValueError, match="cell='custom'"):
        nj.train_and_evaluate(mcfg.replace(cell="custom"), TrainConfig(dataset="digits", epochs=1), data=data,
                              progress=False, log=None)


def test_certificate_and_lyapunov_per_cell():
    gru = _model("gru", eps_mult=0.5)
    with pytest.raises(ValueError, match="has no certificate"):
        certificate(gru.cfg, gru.recurrent_params())
    lam, se = lyapunov_exponent(gru.cfg, gru.recurrent_params(), t_max=20.0, num_paths=4, cell=gru.cell)
    assert np.isfinite(lam) and se >= 0
    user = _model("user", eps_mult=0.5)  # its bias makes f(0, 0) ≠ 0
    with pytest.raises(ValueError, match="not an equilibrium"):
        lyapunov_exponent(user.cfg, user.recurrent_params(), cell=user.cell)
    # the Lipschitz cell: the exponent measured through the cell equals the one from its matrices
    lip = _model("lipschitz", eps_mult=0.5)
    p = lip.recurrent_params()
    a = lyapunov_exponent(lip.cfg, p, t_max=20.0, num_paths=4)
    b = lyapunov_exponent(lip.cfg, p, t_max=20.0, num_paths=4, cell=lip.cell)
    np.testing.assert_allclose(a, b, rtol=1e-10)


class NoDrift(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros(3))


class PlainObject:
    def drift(self, h, z):
        return h


class WrongShape(nj.Cell):
    def drift(self, h, z):
        return jnp.concatenate([h, z])


class WrongDtype(nj.Cell):
    def drift(self, h, z):
        return (h + z).astype(jnp.float32)


@pytest.mark.parametrize("cell,exc,match", [
    (NoDrift(), TypeError, "needs a method drift"),
    (WrongShape(), ValueError, r"must return dh/dt of shape \(4,\) and dtype float64.*float64\[8\]"),
    (WrongDtype(), ValueError, r"dtype float64.*float32\[4\]"),
    ("gru", TypeError, r"built-in cell is chosen by name with NRNNConfig\(cell='gru'\)"),
    (PlainObject(), TypeError, "must be a flax.nnx.Module"),
])
def test_bad_cells_are_named(cell, exc, match):
    with pytest.raises(exc, match=match):
        NoisyRNN(_cfg(), rngs=nnx.Rngs(0), cell=cell)


def test_bad_cell_names():
    with pytest.raises(ValueError, match="NRNNConfig.cell='transformer' is invalid"):
        NRNNConfig(cell="transformer")
    with pytest.raises(ValueError, match="pass it as NoisyRNN"):
        NoisyRNN(_cfg(cell="custom"), rngs=nnx.Rngs(0))


def test_flax_cell_adapter_is_the_flax_cells_euler_step():
    """FlaxCell(nnx.GRUCell): with δ = 1 and no noise one step of the model is the flax cell's own update."""
    cfg = _cfg(dt=1.0)
    rngs = nnx.Rngs(0)
    gru = nnx.GRUCell(D, D, rngs=rngs, dtype=jnp.float64, param_dtype=jnp.float64)
    model = NoisyRNN(cfg, rngs=rngs, cell=nj.FlaxCell(gru))
    x, _ = _data()
    z = model.encode(x)
    h = jnp.zeros((B, D))
    for k in range(T):
        h, _ = gru(h, z[:, k])
    np.testing.assert_allclose(model.final_state(x), h, rtol=1e-12)


def test_command_line_cells_are_recorded_and_resumed(tmp_path):
    import json

    from nrnn_jax.cli import train_main

    common = ["--dataset", "digits", "--hidden", "8", "--batch-size", "128", "--no-progress"]
    assert train_main(common + ["--cell", "antisymmetric", "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["cell"] == "antisymmetric"
    assert isinstance(load_run(tmp_path / "a").cell, nj.AntisymmetricCell)
    # a user cell by its import path (this test module is importable by its name); --resume imports it again
    # when trusted (tests/test_run_code.py: not without)
    user = common + ["--cell-factory", "test_cells:UserCell", "--mode", "implicit", "--eps-add", "0.1"]
    assert train_main(user + ["--epochs", "1", "--out", str(tmp_path / "u")]) == 0
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert saved["model"]["cell"] == "test_cells:UserCell" and saved["cell_factory"] == "test_cells:UserCell"
    assert train_main(["--resume", str(tmp_path / "u"), "--epochs", "2", "--no-progress", "--trust-code"]) == 0
    assert isinstance(load_run(tmp_path / "u", trust_code=True).cell, UserCell)
    assert train_main(common + ["--cell-factory", "nowhere:Cell", "--out", str(tmp_path / "x")]) == 2
