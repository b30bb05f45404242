"""Analysis tools checked against independent computations (docs/theory.md §4–§6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from numpy.polynomial import Polynomial
from numpy.polynomial.hermite_e import hermegauss

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


def test_hessian_products_summed_over_chunks_match_the_full_hessian(setup):
    """Chunks of 5 of the 64 examples (the last one padded): the Hessian-vector products summed over chunks
    give the full Hessian's extreme eigenvalues, and the same Ritz values and Hutchinson samples as one chunk
    of all examples up to float32 summation order. A chunk weighted by its own mean, or its padding counted,
    would scale the Hessian by about 13 or change it."""
    model, x, y = setup
    graphdef, params = nnx.split(model)
    flat, unravel = ravel_pytree(params)
    loss = lambda th: jnp.mean(cross_entropy(nnx.merge(graphdef, unravel(th))(jnp.asarray(x)), jnp.asarray(y)))
    eig = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
    ritz = hessian_lanczos(model, x, y, num_steps=flat.shape[0], batch_size=5)
    np.testing.assert_allclose(ritz[-1], eig[-1], rtol=1e-3)
    np.testing.assert_allclose(ritz[0], eig[0], rtol=1e-2, atol=1e-4)
    whole = hessian_lanczos(model, x, y, num_steps=6, batch_size=64)
    np.testing.assert_allclose(hessian_lanczos(model, x, y, num_steps=6, batch_size=5), whole, rtol=1e-4)
    mean, se = hessian_trace(model, x, y, num_samples=5, batch_size=64)
    np.testing.assert_allclose(hessian_trace(model, x, y, num_samples=5, batch_size=5), (mean, se), rtol=1e-4)
    with pytest.raises(ValueError, match="batch_size.*expected an integer >= 1"):
        hessian_trace(model, x, y, num_samples=2, batch_size=0)


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


# ------------------------------------------------------------------------------------------------------
# Stability (docs/theory.md §5). Oracles: a sampled supremum of hᵀf(h)/|h|² for c₁, and the exact top Lyapunov
# exponent of the discrete scheme for scalar noise, E log|m(ξ)| / δ with m the scheme's one-step factor,
# by Gauss–Hermite quadrature. Neither recomputes the implementation's formulas.
# ------------------------------------------------------------------------------------------------------
def _rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


_J = np.array([[0.0, 1.0], [-1.0, 0.0]])  # skew: leaves hᵀAh unchanged
_Q = _rotation(0.4)


def _sampled_sup(alpha, A, W, h):
    """max over the rows h of hᵀ(αAh + tanh(Wh)) / |h|², in numpy float64."""
    f = alpha * h @ A.T + np.tanh(h @ W.T)
    return float(np.max(np.sum(h * f, axis=1) / np.sum(h * h, axis=1)))


def _circle(radii, n=20001):
    """h = r (cos θ, sin θ) on a grid θ ∈ [0, π] (hᵀf(h)/|h|² is even in h)."""
    theta = np.linspace(0.0, np.pi, n)
    u = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return np.concatenate([r * u for r in radii])


# (alpha, A, W, c₁ worked out by hand). sym(αA) and W share their top eigenvector Q e₁, and W is symmetric
# PSD, so the supremum is approached by small h along Q e₁ (where tanh(Wh) ≈ Wh): the bound is tight.
_TIGHT = {
    "alpha_positive": (0.7, _Q @ np.diag([1.0, -2.0]) @ _Q.T + 0.8 * _J, _Q @ np.diag([0.6, 0.1]) @ _Q.T, 0.7 + 0.6),
    "alpha_zero": (0.0, _Q @ np.diag([1.0, -2.0]) @ _Q.T + 0.8 * _J, _Q @ np.diag([0.6, 0.1]) @ _Q.T, 0.6),
    "alpha_negative": (-1.0, _Q @ np.diag([-2.0, 1.0]) @ _Q.T + 0.8 * _J, _Q @ np.diag([0.6, 0.1]) @ _Q.T, 2.0 + 0.6),
    "alpha_negative_W0": (-1.0, np.diag([-2.0, 1.0]), np.zeros((2, 2)), 2.0),  # docs/theory.md (5.2), α < 0: c₁ = 2
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", list(_TIGHT))
def test_c1_equals_the_sampled_supremum_when_tight(case):
    alpha, A, W, c1_by_hand = _TIGHT[case]
    cert = certificate(NRNNConfig(hidden=2, alpha=alpha, dtype="float64"), RecurrentParams(A=jnp.asarray(A), W=jnp.asarray(W)))
    sup = _sampled_sup(alpha, A, W, _circle([1e-4, 0.1, 1.0, 10.0]))
    # upper: c₁ bounds hᵀf/|h|² exactly; 1e-9 covers float64 rounding of eigvalsh/norm and of the quotient
    assert sup <= cert.c1 + 1e-9, (sup, cert.c1)
    # lower: grid step π/20000 loses ≤ (λ_max − λ_min)(π/40000)² < 1e-7, tanh at |h| = 1e-4 loses ≤ ‖W‖³|h|²/3 < 1e-9
    assert sup >= cert.c1 - 1e-6, (sup, cert.c1)
    assert cert.c1 == pytest.approx(c1_by_hand, abs=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("alpha", [0.8, 0.0, -0.8])
def test_c1_bounds_the_sampled_supremum_generic(alpha):
    """Random non-symmetric A, W in d = 4: c₁ is an upper bound (not tight, W is not symmetric)."""
    rng = np.random.default_rng(3)
    d = 4
    A, W = rng.normal(size=(d, d)), 0.5 * rng.normal(size=(d, d))
    cert = certificate(NRNNConfig(hidden=d, alpha=alpha, dtype="float64"), RecurrentParams(A=jnp.asarray(A), W=jnp.asarray(W)))
    n = 50_000
    u = rng.normal(size=(n, d))
    h = u / np.linalg.norm(u, axis=1, keepdims=True) * np.exp(rng.uniform(np.log(1e-3), np.log(10.0), (n, 1)))
    sup = _sampled_sup(alpha, A, W, h)
    assert sup <= cert.c1 + 1e-9, (sup, cert.c1)  # 1e-9: float64 rounding only; the bound is exact
    # and it is not vacuous: the supremum of the linear part alone, sampled, is within ‖W‖₂ of c₁
    sup_lin = _sampled_sup(alpha, A, np.zeros_like(W), h)
    # 0.05: the best of 5·10⁴ random directions on S³ is within angle ~0.03 of the top eigenvector (loss ≤ spread·θ²)
    assert sup_lin >= cert.c1 - np.linalg.svd(W, compute_uv=False)[0] - 0.05


_SCHEMES = ("euler", "euler_heun", "milstein")


def _factor(scheme, c, eps, dt):
    """The one-step factor m(ξ) of dh = c h dt + ε h dβ: h_{k+1} = m(ξ_k) h_k, as a polynomial in ξ."""
    sq = eps * math.sqrt(dt)
    if scheme == "euler":  # 1 + cδ + ε√δ ξ
        return Polynomial([1 + c * dt, sq])
    if scheme == "milstein":  # + ½ε²δ(ξ² − 1)
        return Polynomial([1 + c * dt - 0.5 * eps**2 * dt, sq, 0.5 * eps**2 * dt])
    return Polynomial([1 + c * dt, sq, 0.5 * eps**2 * dt])  # euler_heun: + ½ε²δ ξ²


def _normal_mass_where_nonpositive(poly):
    """P(poly(ξ) ≤ 0), ξ ~ N(0, 1): sum the Gaussian mass of the intervals between real roots where it is ≤ 0."""
    cdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    edges = [-math.inf, *sorted(r.real for r in poly.roots() if abs(r.imag) < 1e-12), math.inf]
    inside = lambda lo, hi: (lo + hi) / 2 if math.isfinite(lo + hi) else (hi - 1 if math.isfinite(hi) else lo + 1 if math.isfinite(lo) else 0.0)
    return sum(cdf(hi) - cdf(lo) for lo, hi in zip(edges[:-1], edges[1:]) if poly(inside(lo, hi)) <= 0)


def _exact_exponent(scheme, c, eps, dt, rotation=0.0, nodes=240):
    """Top Lyapunov exponent of the discrete scheme, E log √(m(ξ)² + (δ·rotation)²) / δ, by Gauss–Hermite
    quadrature (rotation: the Euler step of a skew drift rotation·J in d = 2, |(mI + δ·rotation·J) h| =
    √(m² + δ²rotation²)|h|)."""
    x, w = hermegauss(nodes)
    m = _factor(scheme, c, eps, dt)(x)
    return float(np.sum(w * 0.5 * np.log(m**2 + (dt * rotation) ** 2)) / math.sqrt(2 * math.pi) / dt)


def _first_order_coefficient(scheme, c, eps):
    """k₁ in E log|m| / δ = (continuous exponent) + k₁ δ + O(δ²), from the Taylor series of log(1 + x),
    x = cδ + ε√δ ξ + g ε²δ (ξ² − κ): k₁ = −E q²/2 + ε² E[ξ² q] − 3ε⁴/4, q = c + g ε² (ξ² − κ)."""
    e2 = eps**2
    return {"euler": -c**2 / 2 + c * e2 - 3 * e2**2 / 4,
            "milstein": -c**2 / 2 + c * e2,
            "euler_heun": -c**2 / 2 + c * e2 / 2 + 3 * e2**2 / 8}[scheme]


_DT, _T, _PATHS = 0.01, 100.0, 64  # one set of sizes for all simulations (the random numbers compile once)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_scalar_linear_exponent_matches_quadrature_oracle(scheme):
    """f = a h (A = aI, W = 0), noise ε h dβ: the certificate is attained, a − ε²/2 (Itô) or a (Stratonovich)."""
    a, eps = 0.5, 1.5
    cfg = NRNNConfig(hidden=2, dt=_DT, eps_mult=eps, noise_kind="scalar", solver=scheme, dtype="float64")
    p = RecurrentParams(A=a * jnp.eye(2, dtype=jnp.float64), W=jnp.zeros((2, 2), jnp.float64))
    lam, se = lyapunov_exponent(cfg, p, t_max=_T, num_paths=_PATHS)
    bound = certificate(cfg, p).bound
    # the singularity of log|m| at m = 0 is harmless: m ≤ 0 has Gaussian mass < 1e-9 (none for euler_heun/milstein)
    assert _normal_mass_where_nonpositive(_factor(scheme, a, eps, _DT)) < 1e-9
    exact = _exact_exponent(scheme, a, eps, _DT)
    assert abs(exact - _exact_exponent(scheme, a, eps, _DT, nodes=160)) < 1e-8  # converged in the nodes
    # Monte Carlo: 64 independent paths, the estimate's standard error; 4 SE (two-sided, p ≈ 6e-5)
    assert abs(lam - exact) < 4 * se, (lam, se, exact)
    # the discrete exponent is the bound plus the derived first-order bias k₁δ; the O(δ²) remainder is a small
    # fraction of it at δ = 0.01 (k₂/k₁ ~ ε² so remainder/k₁δ ~ ε²δ ≈ 0.02; 0.25 leaves room)
    k1 = _first_order_coefficient(scheme, a, eps)
    assert abs(exact - bound - k1 * _DT) <= 0.25 * abs(k1) * _DT, (exact, bound, k1)
    # the bound at the step size (docs/theory.md (5.11)) is the discrete exponent itself here: A = aI, W = 0
    assert certificate(cfg, p).discrete_bound == pytest.approx(exact, abs=1e-6)


@pytest.mark.usefixtures("x64")
def test_stochastic_stabilisation_matches_theory():
    """dh = a h dt + ε h dβ: the Itô top Lyapunov exponent a − ε²/2 equals the certificate; Euler–Maruyama's
    bias is measured against the exact exponent of the discrete scheme (quadrature), not assumed."""
    a = 0.5
    rows = stabilization_demo(a=a, eps_values=(0.0, 1.0, 1.5), hidden=2, dt=_DT, t_max=_T, num_paths=_PATHS)
    for r in rows:
        assert r["bound"] == pytest.approx(a - r["eps"] ** 2 / 2, abs=1e-12)
        assert _normal_mass_where_nonpositive(_factor("euler", a, r["eps"], _DT)) < 1e-9
        exact = _exact_exponent("euler", a, r["eps"], _DT)
        # 4 SE: Monte Carlo over 64 paths; 1e-9: float64 rounding of 10⁴ logs (ε = 0 is deterministic, SE = 0)
        assert abs(r["exponent"] - exact) < 4 * r["exponent_se"] + 1e-9, (r, exact)
        assert r["discrete_bound"] == pytest.approx(exact, abs=1e-6)  # (5.11) is (5.10) here
    assert rows[0]["exponent"] > 0 and rows[-1]["exponent"] < 0  # unstable made stable by noise
    # Stratonovich noise of the same size does not stabilise, and the certificate says so
    (strat,) = stabilization_demo(a=a, eps_values=(1.5,), hidden=2, dt=_DT, t_max=_T, solver="euler_heun", num_paths=_PATHS)
    assert strat["bound"] == pytest.approx(a, abs=1e-12) and strat["ito_correction"] == pytest.approx(1.5**2 / 2)
    assert strat["exponent"] > 0


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("noise_kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_certificate_bounds_the_measured_exponent(scheme, noise_kind):
    """d = 2, f(h) = A h + tanh(W h) with A = a₀I + sJ (J skew), W = wI: c₁ = a₀ + w, attained in the linear
    regime the exponent is measured in, so for scalar noise the bound is tight."""
    a0, s, w, eps = 0.3, 1.0, 0.2, 1.5
    p = RecurrentParams(A=jnp.asarray(a0 * np.eye(2) + s * _J), W=jnp.asarray(w * np.eye(2)))
    cfg = NRNNConfig(hidden=2, dt=_DT, eps_mult=eps, noise_kind=noise_kind, solver=scheme, dtype="float64")
    cert = certificate(cfg, p)
    strat = scheme == "euler_heun"
    lam, se = lyapunov_exponent(cfg, p, t_max=_T, num_paths=_PATHS)
    # discretisation allowance: the exact discrete exponent of the linearised scalar-noise scheme minus its δ → 0
    # limit (Itô–Taylor O(δ) bias of the factor m plus Euler's rotation growth √(1 + δ²s²/m²)); for diagonal noise
    # the same per-step remainder, and the bound has the further slack ε²(E Σh_i⁴/|h|⁴ − 1/d) ≥ 0
    c = a0 + w
    exact = _exact_exponent(scheme, c, eps, _DT, rotation=s)
    allowance = max(0.0, exact - (c if strat else c - eps**2 / 2))
    assert lam <= cert.bound + 3 * se + allowance, (lam, se, cert.bound, allowance)  # 3 SE: one-sided, p ≈ 1e-3
    # the bound at the step size needs no discretisation allowance (docs/theory.md (5.11))
    assert lam <= cert.discrete_bound + 3 * se, (lam, se, cert.discrete_bound)
    assert cert.dt == _DT
    # the certificate records the scheme's Itô correction of c₁
    assert cert.ito_correction == (0.5 * eps**2 if strat else 0.0)
    assert ("Stratonovich" in cert.note) == strat
    assert cert.c1 == pytest.approx(a0 + w + cert.ito_correction, abs=1e-12)
    if noise_kind == "scalar":  # tight: the measured exponent is the discrete scheme's, the bound's O(δ) neighbour
        assert abs(lam - exact) < 4 * se, (lam, se, exact)  # tanh(wh) = wh(1 + O((w|h|)²)), 1e-14 at radius 1e-6
    if not (scheme == "milstein" and noise_kind == "scalar"):  # (that pair rejects additive noise)
        assert certificate(cfg.replace(eps_add=0.1), p).bound is None  # additive noise: no equilibrium


@pytest.mark.usefixtures("x64")
def test_certificate_holds_for_the_model_at_its_step_size():
    """`certified_stable` speaks of the scheme as simulated at its δ (docs/theory.md (5.11)), not of the SDE."""
    # dh = −30 h dt: the ODE decays at rate 30, but Euler at δ = 0.1 multiplies h by 1 − 3 = −2 every step
    cfg = NRNNConfig(hidden=4, dt=0.1, alpha=1.0, dtype="float64")
    p = RecurrentParams(A=-30.0 * jnp.eye(4, dtype=jnp.float64), W=jnp.zeros((4, 4), jnp.float64))
    cert = certificate(cfg, p)
    assert cert.bound == pytest.approx(-30.0, abs=1e-12)
    lam, _ = lyapunov_exponent(cfg, p, t_max=10.0, num_paths=2)
    assert lam == pytest.approx(math.log(2.0) / 0.1, rel=1e-9)  # deterministic: |h| doubles every step
    assert cert.discrete_bound == pytest.approx(math.log(2.0) / 0.1, rel=1e-12) and not cert.certified_stable
    # at δ = 0.05 the step multiplies h by 1 − 1.5 = −0.5: certified, with the exact exponent log(0.5)/0.05
    cert = certificate(cfg.replace(dt=0.05), p)
    assert cert.certified_stable and cert.discrete_bound == pytest.approx(math.log(0.5) / 0.05, rel=1e-12)

    # Euler–Heun, scalar noise ε h ∘ dβ, f = 0.5 h, δ = 0.1, ε = 2: the continuous bound a = 0.5 is below the
    # simulated exponent; the bound at δ is the exact discrete exponent (5.10) (quadrature; m(ξ) > 0, no root)
    a, eps, dt = 0.5, 2.0, 0.1
    cfg = NRNNConfig(hidden=4, dt=dt, alpha=1.0, eps_mult=eps, noise_kind="scalar", solver="euler_heun",
                     dtype="float64")
    p = RecurrentParams(A=a * jnp.eye(4, dtype=jnp.float64), W=jnp.zeros((4, 4), jnp.float64))
    cert = certificate(cfg, p)
    assert _normal_mass_where_nonpositive(_factor("euler_heun", a, eps, dt)) == 0.0
    exact = _exact_exponent("euler_heun", a, eps, dt)
    assert abs(exact - _exact_exponent("euler_heun", a, eps, dt, nodes=160)) < 1e-8  # converged in the nodes
    assert cert.discrete_bound == pytest.approx(exact, abs=1e-6)
    lam, se = lyapunov_exponent(cfg, p, t_max=_T, num_paths=_PATHS)
    assert abs(lam - exact) < 4 * se, (lam, se, exact)  # 4 SE: two-sided, p ≈ 6e-5
    assert cert.bound == pytest.approx(a, abs=1e-12) and cert.bound < lam - 4 * se


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("scheme, a, eps, dt", [("euler", 0.5, 2.0, 0.1), ("euler", -3.0, 1.0, 0.2),
                                                ("euler_heun", -8.0, 1.0, 0.1), ("milstein", 0.5, 2.0, 0.3)])
def test_discrete_bound_is_the_exact_exponent_of_the_linear_scheme(scheme, a, eps, dt):
    """A = aI, W = 0, scalar noise: (5.11) is E log|m(ξ)|/δ (5.10), here with Gaussian mass where m(ξ) < 0, so
    log|m| is singular at m's real roots; oracle: scipy's adaptive quadrature split at those roots."""
    from scipy import integrate

    cfg = NRNNConfig(hidden=3, dt=dt, eps_mult=eps, noise_kind="scalar", solver=scheme, dtype="float64")
    p = RecurrentParams(A=a * jnp.eye(3, dtype=jnp.float64), W=jnp.zeros((3, 3), jnp.float64))
    m = _factor(scheme, a, eps, dt)
    f = lambda t: math.log(abs(m(t))) * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    edges = [-12.0, *sorted(r.real for r in m.roots() if abs(r.imag) < 1e-12 and abs(r.real) < 12), 12.0]
    exact = sum(integrate.quad(f, lo, hi, limit=500, epsabs=1e-13)[0] for lo, hi in zip(edges[:-1], edges[1:])) / dt
    assert _normal_mass_where_nonpositive(m) > 1e-4 or scheme == "milstein"  # the singular case is exercised
    assert certificate(cfg, p).discrete_bound == pytest.approx(exact, abs=1e-7)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("noise_kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_discrete_bound_tends_to_the_continuous_bound(scheme, noise_kind):
    """As δ → 0 the bound at the step size (5.11) tends to the continuous one (5.6)–(5.7) at first order in δ
    (diagonal noise: plus ε²/d, the slack of its mean-square bound), for non-normal A and W and α ≠ 1."""
    rng = np.random.default_rng(5)
    d, eps = 4, 1.2
    p = RecurrentParams(A=jnp.asarray(rng.normal(size=(d, d))), W=jnp.asarray(0.5 * rng.normal(size=(d, d))))
    cfg = NRNNConfig(hidden=d, alpha=0.7, eps_mult=eps, noise_kind=noise_kind, solver=scheme, dtype="float64")
    gaps = []
    for dt in (1e-2, 1e-3):
        cert = certificate(cfg.replace(dt=dt), p)
        gaps.append(cert.discrete_bound - cert.bound - (eps**2 / d if noise_kind == "diagonal" else 0.0))
    # first order: the gap shrinks tenfold with δ (0.08–0.12 leaves room for the O(δ²) term and the
    # quadrature's 1e-5), and is already small at δ = 1e-2
    assert 0.08 < gaps[1] / gaps[0] < 0.12 and abs(gaps[0]) < 0.1, gaps


@pytest.mark.usefixtures("x64")
def test_reference_convention_has_no_lyapunov_exponent():
    cfg = NRNNConfig(hidden=2, convention="reference", eps_mult=0.5, dtype="float64")
    p = RecurrentParams(A=-jnp.eye(2), W=jnp.zeros((2, 2)), step_size=jnp.full(2, 0.1))
    with pytest.raises(ValueError, match=r"convention='reference' is invalid.*not an SDE.*use convention='sde'"):
        lyapunov_exponent(cfg, p, t_max=1.0, num_paths=2)
    cert = certificate(cfg, p)
    assert cert.bound is None and not cert.certified_stable and "use convention='sde'" in cert.note
    assert cert.discrete_bound is None


def test_hessian_analyses_run_on_the_default_backend():
    """Hessian-vector products (forward-over-reverse) through the default diffrax backend with the discrete
    adjoint: its forward states come from a forward-differentiable loop (failed before: the checkpointed
    loop had no jvp). The trace agrees with the scan backend's (same model, same probes)."""
    from nrnn_jax.analysis import hessian_trace

    cfg = NRNNConfig(input_dim=2, hidden=8, num_classes=3, eps_add=0.1)
    assert (cfg.backend, cfg.gradient) == ("diffrax", "adjoint")
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 2))
    y = jnp.arange(4) % 3
    tr_diffrax = hessian_trace(NoisyRNN(cfg, rngs=nnx.Rngs(0)), x, y, num_samples=3, seed=0)[0]
    tr_scan = hessian_trace(NoisyRNN(cfg.replace(backend="scan"), rngs=nnx.Rngs(0)), x, y, num_samples=3, seed=0)[0]
    np.testing.assert_allclose(tr_diffrax, tr_scan, rtol=1e-4)
