"""Noise schemes as objects (docs/theory.md §8): user diffusions σ(h, z), diagonal and with m Brownian motions,
through every discretisation, both backends and the explicit regularizer; a user diffusion that restates a
built-in one must give the built-in's numbers (closed-form Milstein and Stratonovich terms against autodiff)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nrnn_jax as nj
from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, explicit_regularizer, load_run
from nrnn_jax import _registry, noise, schemes
from oracles import noise_hessian_oracle

pytestmark = pytest.mark.usefixtures("x64")

B, T, N_IN, D, C = 3, 5, 2, 4, 3
EPS_ADD, EPS_MULT = 0.3, 0.4


def diagonal_sigma(h, z):
    """A state- and input-dependent diagonal diffusion."""
    return 0.2 + 0.3 * jnp.tanh(h) * jax.nn.sigmoid(z)


def matrix_sigma(h, z):
    """Two Brownian motions: an additive one along z's direction and a multiplicative one."""
    return jnp.stack([0.3 * jnp.tanh(z), 0.5 * h], axis=1)


def restated_diagonal(h, z):
    """DiagonalNoise(ε_add, ε_mult) written by a user."""
    return EPS_ADD + EPS_MULT * h


def restated_scalar(h, z):
    """ScalarNoise(0, ε_mult) written by a user: one multiplicative Brownian motion."""
    return EPS_MULT * h[:, None]


def _cfg(**kw) -> NRNNConfig:
    fields = dict(input_dim=N_IN, hidden=D, num_classes=C, dt=0.3, init_std=1.0, backend="scan", dtype="float64")
    fields.update(kw)
    return NRNNConfig(**fields)


def _data():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N_IN), jnp.float64)
    return x, jnp.arange(B) % C


def _xi(model):
    return jax.random.normal(jax.random.PRNGKey(1), (B, T, model.cfg.noise_dim), jnp.float64)


def _loop(model, x, xi, sigma):
    """An independent Euler–Maruyama loop with the user's σ (diagonal or matrix)."""
    cfg = model.cfg
    z = model.encode(x)
    h = jnp.zeros((B, D))
    for k in range(T):
        rows = []
        for i in range(B):
            s = sigma(h[i], z[i, k])
            noise_i = s * xi[i, k] if s.ndim == 1 else s @ xi[i, k]
            rows.append(h[i] + cfg.dt * model.cell.drift(h[i], z[i, k]) + np.sqrt(cfg.dt) * noise_i)
        h = jnp.stack(rows)
    return model.decode(h)


@pytest.mark.parametrize("sigma,m", [(diagonal_sigma, D), (matrix_sigma, 2)])
def test_user_diffusion_forward_is_an_euler_maruyama_loop_on_both_backends(sigma, m):
    x, _ = _data()
    for backend in ("scan", "diffrax"):
        model = NoisyRNN(_cfg(backend=backend), rngs=nnx.Rngs(0), diffusion=sigma)
        assert model.cfg.noise_kind == "custom" and model.cfg.noise_dim == m and model.cfg.is_noisy
        xi = _xi(model)
        np.testing.assert_allclose(model(x, noise=xi), _loop(model, x, xi, sigma), rtol=1e-12, atol=1e-14)


# (σ, scheme, cell): both kinds of user σ under both schemes, on a fast-path and a generic-path cell
ORACLE_CASES = [(diagonal_sigma, "euler_heun", "gru"), (matrix_sigma, "euler_heun", "lipschitz"),
                (matrix_sigma, "euler", "gru"), (diagonal_sigma, "euler", "lipschitz")]


@pytest.mark.parametrize("sigma,solver,cell", ORACLE_CASES)
def test_user_diffusion_regularizer_is_half_trace_of_noise_hessian(sigma, solver, cell):
    """For Euler–Heun the Stratonovich shift of the user's σ comes from autodiff: the oracle checks it. The
    probe is unbiased for it (|z| < 4 fails w.p. 6e-5, fixed seed)."""
    x, y = _data()
    model = NoisyRNN(_cfg(cell=cell, solver=solver, gradient="autodiff"), rngs=nnx.Rngs(0), diffusion=sigma)
    reg = explicit_regularizer(model, x, y, method="exact")
    half_trace, clean = noise_hessian_oracle(model, x, y)
    np.testing.assert_allclose(half_trace, reg.value, rtol=1e-10)
    np.testing.assert_allclose(clean, reg.clean_loss, rtol=1e-12)
    assert float(reg.value) > 1e-4
    est = explicit_regularizer(model, x, y, method="probe", num_probes=1000, key=jax.random.PRNGKey(5))
    assert abs(float(est.value) - float(reg.value)) < 4 * float(est.std_err), (est, reg)


def test_user_diffusion_continuous_regularizer_is_the_limit_of_exact():
    """The moment ODE with the user's σ(h, z) (read at the step's input; Stratonovich shift by autodiff)
    is the δ → 0 limit of the exact discrete terms on the same piecewise-constant input: first order in δ."""
    x, y = _data()
    base = _cfg(solver="euler_heun")
    cont = float(explicit_regularizer(NoisyRNN(base, rngs=nnx.Rngs(0), diffusion=diagonal_sigma), x, y,
                                      method="continuous").value)
    values = []
    for r in (1, 2, 4):
        fine = NoisyRNN(base.replace(dt=base.dt / r), rngs=nnx.Rngs(0), diffusion=diagonal_sigma)
        values.append(float(explicit_regularizer(fine, x.repeat(r, axis=1), y, method="exact").value))
    values = np.array(values)
    errors = np.abs(values - cont)
    assert errors[0] > errors[1] > errors[2], errors  # converging (measured ratios 3.3, 3.0: O(δ) + O(δ²))
    # Richardson 2 v(δ/2) − v(δ) cancels the O(δ) term: its distance to the continuous value falls ~4× per
    # halving (measured 3.9), which holds only if the continuous value IS the limit
    rich = np.abs(2.0 * values[1:] - values[:-1] - cont)
    assert 3.2 < rich[0] / rich[1] < 4.8, rich


@pytest.mark.parametrize("solver", ["euler", "euler_heun", "milstein"])
@pytest.mark.parametrize("backend", ["scan", "diffrax"])
def test_a_restated_built_in_diffusion_gives_the_built_in_numbers(solver, backend):
    """The closed forms of the built-in diffusions (Milstein terms, Stratonovich shift) against the generic
    autodiff forms of the same σ written by a user: two independent computations."""
    x, y = _data()
    built_in = NoisyRNN(_cfg(solver=solver, backend=backend, eps_add=EPS_ADD, eps_mult=EPS_MULT), rngs=nnx.Rngs(0))
    user = NoisyRNN(_cfg(solver=solver, backend=backend), rngs=nnx.Rngs(0), diffusion=restated_diagonal)
    xi = _xi(built_in)
    np.testing.assert_allclose(user(x, noise=xi), built_in(x, noise=xi), rtol=1e-12)
    if backend == "scan":
        np.testing.assert_allclose(explicit_regularizer(user, x, y).value, explicit_regularizer(built_in, x, y).value,
                                   rtol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "euler_heun", "milstein"])
def test_a_restated_scalar_noise_gives_the_built_in_numbers(solver):
    x, y = _data()
    built_in = NoisyRNN(_cfg(solver=solver, noise_kind="scalar", eps_mult=EPS_MULT), rngs=nnx.Rngs(0))
    user = NoisyRNN(_cfg(solver=solver), rngs=nnx.Rngs(0), diffusion=restated_scalar)
    xi = _xi(built_in)  # (d additive normals, then the one multiplicative): the user's σ has only the last
    np.testing.assert_allclose(user(x, noise=xi[..., D:]), built_in(x, noise=xi.at[..., :D].set(0.0)), rtol=1e-12)
    np.testing.assert_allclose(explicit_regularizer(user, x, y).value, explicit_regularizer(built_in, x, y).value,
                               rtol=1e-12)


def test_milstein_with_a_user_diffusion_is_fourth_order_against_the_oracle():
    """Milstein's extra terms have mean zero but a ξ-Hessian: L(0) + ½ tr H − (clean + reg) is O(ε⁴)."""
    x, y = _data()
    errs = []
    for scale in (0.4, 0.2):
        sigma = lambda h, z, s=scale: s * (1.0 + jnp.tanh(h))
        model = NoisyRNN(_cfg(solver="milstein", gradient="autodiff"), rngs=nnx.Rngs(0), diffusion=sigma)
        reg = explicit_regularizer(model, x, y)
        half_trace, clean = noise_hessian_oracle(model, x, y)
        errs.append(abs(float(clean + half_trace - reg.clean_loss - reg.value)))
    assert 10.0 < errs[0] / errs[1] < 24.0, errs  # 16 for a pure ε⁴ term


def test_schemes_and_noises_are_objects():
    assert isinstance(_registry.scheme(_cfg(solver="euler_heun")), schemes.EulerHeun)
    assert isinstance(_registry.scheme(_cfg(convention="reference")), schemes.PublicCodeRule)
    assert isinstance(_registry.diffusion(_cfg(noise_kind="scalar")), noise.ScalarNoise)
    assert isinstance(_registry.diffusion(_cfg(noise_kind="custom", diffusion=matrix_sigma)), noise.CustomNoise)


def test_training_and_reloading_with_a_user_diffusion(tmp_path):
    from nrnn_jax.data import load_dataset

    data = load_dataset("digits")
    mcfg = NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, hidden=8, dt=0.5, noise_kind="custom",
                      diffusion=diagonal_sigma)
    results = {}
    for mode in ("implicit", "explicit"):
        results[mode] = nj.train_and_evaluate(mcfg, TrainConfig(dataset="digits", mode=mode, epochs=1, batch_size=128),
                                              tmp_path / mode, data=data, progress=False, log=None)
        assert np.isfinite(results[mode].summary["test_loss"])
    loaded = load_run(tmp_path / "implicit", diffusion=diagonal_sigma)
    assert loaded.cfg.diffusion is diagonal_sigma
    np.testing.assert_array_equal(loaded(data.x_test[:8]), results["implicit"].model(data.x_test[:8]))
    with pytest.raises(ValueError, match="trained without a user diffusion"):
        nj.train_and_evaluate(mcfg.replace(noise_kind="diagonal", diffusion=None, eps_add=0.1),
                              TrainConfig(dataset="digits", epochs=1), tmp_path / "plain", data=data, progress=False,
                              log=None)
        load_run(tmp_path / "plain", diffusion=diagonal_sigma)


def test_a_local_user_diffusion_that_cannot_be_imported_is_named():
    local = lambda h, z: 0.1 + 0.0 * h
    d = _cfg(noise_kind="custom", diffusion=local).to_dict()
    assert d["diffusion"].endswith("<lambda>")
    with pytest.raises(ValueError, match="NRNNConfig.diffusion=.*cannot be imported.*diffusion=sigma"):
        NRNNConfig.from_dict(d)
    # a module-level one round-trips through its import path (this test module is importable by its name)
    d = _cfg(noise_kind="custom", diffusion=diagonal_sigma).to_dict()
    assert d["diffusion"].endswith(":diagonal_sigma")
    assert NRNNConfig.from_dict(d).diffusion is diagonal_sigma


@pytest.mark.parametrize("kw,match", [
    (dict(diffusion=lambda h, z: jnp.ones((4, 4, 2))), r"diagonal of shape \(4,\) or a matrix of shape \(4, m\).*\(4, 4, 2\)"),
    (dict(diffusion=lambda h, z: jnp.ones(3)), r"got \(3,\)"),
    (dict(diffusion=lambda h, z: h @ jnp.ones((5, 5))), "failed for h, z of shape"),
    (dict(noise_kind="custom"), "noise_kind='custom' is invalid.*needs diffusion=sigma"),
    (dict(diffusion=diagonal_sigma, noise_kind="custom", eps_add=0.1), "eps_add=0.1 is invalid.*do not apply"),
    (dict(diffusion=diagonal_sigma, noise_kind="custom", convention="reference"), "reference convention has its own noise"),
])
def test_bad_user_diffusions_are_named(kw, match):
    fields = dict(noise_kind="custom")
    fields.update(kw)
    with pytest.raises(ValueError, match=match):
        _cfg(**fields)
