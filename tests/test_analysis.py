"""Analysis tools checked against independent computations (math.md §3–§5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from nrnn_jax import NoisyRNN, NRNNConfig, RecurrentParams, evaluate
from nrnn_jax.analysis import (
    certificate,
    deepfool,
    fgsm,
    hessian_lanczos,
    hessian_trace,
    lyapunov_exponent,
    output_margins,
    pgd,
    robustness_curve,
    stabilization_demo,
)
from nrnn_jax.losses import cross_entropy


@pytest.fixture(scope="module")
def setup():
    cfg = NRNNConfig(input_dim=2, hidden=3, num_classes=3, dt=0.5, init_std=3.0, backend="scan")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64, 6, 2)), np.float32)
    y = np.array(jnp.argmax(model(x), -1))  # labels the model gets right, so attacks have work to do
    y[::4] = (y[::4] + 1) % 3
    return model, x, y


def _loss(model, x, y):
    return float(jnp.mean(cross_entropy(model(jnp.asarray(x)), jnp.asarray(y))))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_and_pgd_stay_in_budget_and_raise_the_loss(setup, norm):
    model, x, y = setup
    eps = 0.3
    for adv in (fgsm(model, x, y, eps, norm), pgd(model, x, y, eps, norm, steps=10)):
        delta = np.asarray(adv) - x
        if norm == "linf":
            assert np.abs(delta).max() <= eps + 1e-6
        else:
            assert np.sqrt((delta**2).sum(axis=(1, 2))).max() <= eps + 1e-5
        assert _loss(model, adv, y) > _loss(model, x, y)
    assert _loss(model, pgd(model, x, y, eps, norm, steps=20), y) >= _loss(model, fgsm(model, x, y, eps, norm), y) - 1e-6


def test_deepfool_flips_labels_near_the_boundary(setup):
    model, x, _ = setup
    r, found = deepfool(model, jnp.asarray(x), max_iter=50)
    r, found = np.asarray(r), np.asarray(found)
    pred = np.argmax(np.asarray(model(x)), -1)
    assert found.mean() > 0.9
    flipped = np.argmax(np.asarray(model(x + r)), -1) != pred
    assert flipped[found].all()
    half = np.argmax(np.asarray(model(x + 0.5 * r)), -1) != pred  # half-way: mostly not yet across
    assert half[found].mean() < 0.2


def test_lanczos_and_hutchinson_match_the_full_hessian(setup):
    model, x, y = setup
    graphdef, params = nnx.split(model)
    flat, unravel = ravel_pytree(params)
    loss = lambda th: jnp.mean(cross_entropy(nnx.merge(graphdef, unravel(th))(jnp.asarray(x)), jnp.asarray(y)))
    eig = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
    ritz = hessian_lanczos(model, x, y, num_steps=flat.shape[0])
    np.testing.assert_allclose(ritz[-1], eig[-1], rtol=1e-3)
    np.testing.assert_allclose(ritz[0], eig[0], rtol=1e-2, atol=1e-4)
    assert hessian_lanczos(model, x, y, num_steps=15)[-1] == pytest.approx(eig[-1], rel=1e-2)
    mean, se = hessian_trace(model, x, y, num_samples=200)
    assert abs(mean - eig.sum()) < 4 * se


def test_output_margins_sign_is_correctness(setup):
    model, x, y = setup
    m = output_margins(model, x, y, batch_size=16)
    correct = np.argmax(np.asarray(model(x)), -1) == y
    np.testing.assert_array_equal(m > 0, correct)


def test_robustness_curve(setup):
    model, x, y = setup
    curve = robustness_curve(model, x, y, "white", [0.0, 0.5, 5.0], batch_size=16)
    assert curve[0] == evaluate(model, x, y, 16)["acc"]
    assert curve[2] < curve[0]
    adv = robustness_curve(model, x, y, "pgd_linf", [0.0, 0.5], batch_size=16)
    assert adv[1] < adv[0]
    with pytest.raises(ValueError, match="kind='gauss' is invalid"):
        robustness_curve(model, x, y, "gauss", [0.1])


@pytest.mark.usefixtures("x64")
def test_stochastic_stabilisation_matches_theory():
    """dh = a h dt + ε h dβ: the top Lyapunov exponent is exactly a − ε²/2, equal to the certificate."""
    rows = stabilization_demo(a=0.5, eps_values=(0.0, 1.0, 2.0), dt=0.005, t_max=200.0)
    for r in rows:
        theory = 0.5 - r["eps"] ** 2 / 2
        assert r["bound"] == pytest.approx(theory, abs=1e-9)
        # Euler–Maruyama bias is O(dt · ε⁴); statistical error from 16 paths
        assert abs(r["exponent"] - theory) < 4 * r["exponent_se"] + 0.02 * (1 + r["eps"] ** 4), r
    assert rows[0]["exponent"] > 0 and rows[-1]["exponent"] < 0  # unstable made stable by noise


@pytest.mark.usefixtures("x64")
def test_certificate_bounds_the_measured_exponent_diagonal_noise():
    d = 4
    key = jax.random.PRNGKey(1)
    M = jax.random.normal(key, (d, d), jnp.float64)
    p = RecurrentParams(A=0.3 * (M - M.T) - 0.2 * jnp.eye(d), W=0.1 * jax.random.normal(jax.random.PRNGKey(2), (d, d), jnp.float64))
    cfg = NRNNConfig(hidden=d, dt=0.01, eps_mult=1.0, dtype="float64")
    cert = certificate(cfg, p)
    c1 = float(jnp.linalg.eigvalsh(0.5 * (p.A + p.A.T))[-1] + jnp.linalg.norm(p.W, 2))
    assert cert.c1 == pytest.approx(c1) and cert.c2 == 1.0 and cert.c3 == 0.25
    lam, se = lyapunov_exponent(cfg, p, t_max=100.0)
    assert lam <= cert.bound + 4 * se
    assert certificate(cfg.replace(eps_add=0.1), p).bound is None
