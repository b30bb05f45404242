"""The explicit regularizer (math.md §2): Monte Carlo, probe, continuous time, closed forms, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from nrnn_jax import NoisyRNN, NRNNConfig, antithetic_monte_carlo, explicit_regularizer
from nrnn_jax.dynamics import drift, mean_step_map
from nrnn_jax.losses import cross_entropy
from nrnn_jax.regularizer import _trace_hessian_form

pytestmark = pytest.mark.usefixtures("x64")

B, T, N_IN, D, C = 4, 8, 2, 4, 3
NOISES = {
    "additive": dict(eps_add=1.0),
    "multiplicative": dict(eps_mult=1.0),
    "both": dict(eps_add=1.0, eps_mult=1.0),
    "scalar": dict(eps_add=1.0, eps_mult=1.0, noise_kind="scalar"),
    "euler_heun": dict(eps_add=1.0, eps_mult=1.0, solver="euler_heun"),
    "milstein": dict(eps_add=1.0, eps_mult=1.0, solver="milstein"),
    "reference": dict(eps_add=0.2, eps_mult=0.6, convention="reference"),
}


def _cfg(noise: dict, scale: float, **kw) -> NRNNConfig:
    fields = dict(input_dim=N_IN, hidden=D, num_classes=C, dt=0.3, init_std=1.0, backend="scan", dtype="float64")
    fields.update(noise)
    for k in ("eps_add", "eps_mult"):
        if k in fields:
            fields[k] = fields[k] * scale
    fields.update(kw)
    return NRNNConfig(**fields)


def _data():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N_IN), jnp.float64)
    return x, jnp.arange(B) % C


@pytest.mark.parametrize("name", list(NOISES))
def test_monte_carlo_agrees_and_error_shrinks(name):
    x, y = _data()
    scales = [1.6, 0.8, 0.4, 0.05]
    n = 20000
    ratios, ses = [], []
    for scale in scales:
        model = NoisyRNN(_cfg(NOISES[name], scale), rngs=nnx.Rngs(0))
        reg = explicit_regularizer(model, x, y, method="exact")
        s = np.asarray(antithetic_monte_carlo(model, x, y, n, jax.random.PRNGKey(1), reg.clean_loss))  # common random numbers
        ratios.append(s.mean() / float(reg.value))
        ses.append(s.std(ddof=1) / np.sqrt(n) / float(reg.value))
        assert np.all(np.asarray(reg.R) >= 0.0)
    # At the smallest noise, MC / reg is 1 within 4 standard errors.
    assert abs(ratios[-1] - 1.0) < 4 * ses[-1], (ratios, ses)
    # The error shrinks with the noise: at the largest noise it is well beyond the statistical error, and
    # r(ε) − r(ε_min) (common random numbers: the statistical part largely cancels) falls monotonically.
    gaps = [abs(r - ratios[-1]) for r in ratios[:-1]]
    assert gaps[0] > 8 * ses[0], (ratios, ses)
    assert gaps[0] > gaps[1] > gaps[2], (ratios, gaps)


@pytest.mark.parametrize("name", ["additive", "both", "euler_heun", "reference"])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_probe_is_unbiased(name, probe):
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES[name], 0.1), rngs=nnx.Rngs(0))
    exact = explicit_regularizer(model, x, y, method="exact")
    est = explicit_regularizer(model, x, y, method="probe", num_probes=3000, key=jax.random.PRNGKey(7), probe=probe)
    z = (float(est.value) - float(exact.value)) / float(est.std_err)
    assert abs(z) < 4.0, (float(est.value), float(exact.value), float(est.std_err))
    assert float(est.std_err) < 0.05 * abs(float(exact.value))  # the test has power
    np.testing.assert_allclose(est.clean_loss, exact.clean_loss, rtol=1e-12)
    np.testing.assert_allclose(est.value, 0.5 * (est.Q + est.R), rtol=1e-12)


@pytest.mark.parametrize("name", ["additive", "multiplicative", "euler_heun"])
def test_continuous_is_the_limit_of_exact(name):
    x, y = _data()
    base = _cfg(NOISES[name], 0.1)
    cont = explicit_regularizer(NoisyRNN(base, rngs=nnx.Rngs(0)), x, y, method="continuous")
    refinements = [1, 2, 4, 8, 16]
    errors = []
    for r in refinements:
        fine = NoisyRNN(base.replace(dt=base.dt / r), rngs=nnx.Rngs(0))  # same parameters, finer grid
        exact = explicit_regularizer(fine, x.repeat(r, axis=1), y, method="exact")
        errors.append(abs(float(exact.value) - float(cont.value)))
    slope = np.polyfit(np.log(refinements), np.log(errors), 1)[0]
    assert -1.2 < slope < -0.8, (errors, slope)  # first order in δ
    assert errors[-1] < 0.02 * abs(float(cont.value))


def test_trace_hessian_form_matches_the_closed_form():
    """q = δ tanh''(z) ⊙ diag(W P Wᵀ) for the Lipschitz step map (math.md §2)."""
    cfg = _cfg(NOISES["both"], 0.1, init_std=3.0)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    p = model.recurrent_params()
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    h, u = jax.random.normal(k[0], (D,), jnp.float64), jax.random.normal(k[1], (D,), jnp.float64)
    L = jax.random.normal(k[2], (D, D), jnp.float64)
    P = L @ L.T
    F = lambda hh: mean_step_map(cfg, p, hh, u)
    pre = p.W @ h + u
    tanh2 = -2.0 * jnp.tanh(pre) * (1.0 - jnp.tanh(pre) ** 2)
    np.testing.assert_allclose(_trace_hessian_form(F, h, P), cfg.dt * tanh2 * jnp.diag(p.W @ P @ p.W.T), rtol=1e-12)
    J = jax.jacfwd(F)(h)
    J_closed = jnp.eye(D) + cfg.dt * (cfg.alpha * p.A + (1.0 - jnp.tanh(pre) ** 2)[:, None] * p.W)
    np.testing.assert_allclose(J, J_closed, rtol=1e-12)
    np.testing.assert_allclose(F(h), h + cfg.dt * drift(cfg, p, h, u), rtol=1e-14)


@pytest.mark.parametrize("method", ["exact", "probe", "continuous"])
def test_gradients_in_the_parameters(method):
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES["both"], 0.2), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    key = jax.random.PRNGKey(0)

    def value(M_A, M_W, kernel):
        p = jax.tree.map(lambda a: a, params)
        p["M_A"].value, p["M_W"].value, p["decoder"]["kernel"].value = M_A, M_W, kernel
        m = nnx.merge(graphdef, p)
        return explicit_regularizer(m, x, y, method=method, num_probes=4, key=key).value

    args = (params["M_A"].value, params["M_W"].value, params["decoder"]["kernel"].value)
    grads = jax.grad(value, argnums=(0, 1, 2))(*args)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in grads)
    if method != "continuous":  # the adaptive ODE solve is checked for finiteness only
        check_grads(value, args, order=1, modes=["rev"], eps=1e-6)


def test_float32_agrees_with_float64():
    x, y = _data()
    cfg64 = _cfg(NOISES["both"], 0.1)
    m64 = NoisyRNN(cfg64, rngs=nnx.Rngs(0))
    m32 = NoisyRNN(cfg64.replace(dtype="float32"), rngs=nnx.Rngs(0))
    _, p64 = nnx.split(m64)
    nnx.update(m32, jax.tree.map(lambda a: a.astype(jnp.float32), p64))
    for method in ("exact", "continuous"):  # (probe draws differ between dtypes by construction)
        r64 = explicit_regularizer(m64, x, y, method=method)
        r32 = explicit_regularizer(m32, x.astype(jnp.float32), y, method=method)
        assert r32.value.dtype == jnp.float32
        np.testing.assert_allclose(r32.value, r64.value, rtol=2e-4)
        np.testing.assert_allclose(r32.Q, r64.Q, rtol=2e-3, atol=1e-7)


def test_masked_examples_do_not_count():
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES["both"], 0.1), rngs=nnx.Rngs(0))
    full = explicit_regularizer(model, x[:2], y[:2])
    masked = explicit_regularizer(model, x, y, mask=jnp.array([1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(masked.value, full.value, rtol=1e-12)


@pytest.mark.parametrize("kw,match", [
    (dict(method="mc"), "method='mc' is invalid"),
    (dict(method="probe"), "needs a PRNG key"),
    (dict(method="probe", key=jax.random.PRNGKey(0), num_probes=0), "num_probes=0 is invalid"),
    (dict(method="probe", key=jax.random.PRNGKey(0), probe="sobol"), "probe='sobol' is invalid"),
])
def test_bad_arguments(kw, match):
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES["both"], 0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        explicit_regularizer(model, x, y, **kw)


def test_bad_inputs_and_conventions():
    x, y = _data()
    ref = NoisyRNN(_cfg(NOISES["reference"], 0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="convention='sde' only"):
        explicit_regularizer(ref, x, y, method="continuous")
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        explicit_regularizer(ref, x, y + 5)
    with pytest.raises(ValueError, match="x has shape"):
        explicit_regularizer(ref, x[..., :1], y)
