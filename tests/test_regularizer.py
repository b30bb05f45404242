"""The explicit regularizer (docs/theory.md §3): Monte Carlo, probe, continuous time, closed forms, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from nrnn_jax import NoisyRNN, NRNNConfig, antithetic_monte_carlo, explicit_regularizer
from nrnn_jax.cells import LipschitzDrift
from nrnn_jax.losses import cross_entropy
from nrnn_jax.regularizer import _trace_hessian_form
from oracles import half_trace_hessian, noise_loss

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
        # sign property only (R = tr(∇²ℓ P) with ∇²ℓ, P ⪰ 0); its exact value is checked per example in
        # test_Q_and_R_separately_match_final_state_derivatives
        assert float(reg.R) >= 0.0
    # At the smallest noise the O(ε²) relative bias is ~(0.05)² ≈ 3e-3, below the statistical error, so
    # MC / reg − 1 is a mean of n = 20000 i.i.d. samples: |z| < 4 fails with probability 6e-5 (fixed seed).
    assert abs(ratios[-1] - 1.0) < 4 * ses[-1], (ratios, ses)
    # The error shrinks with the noise: at the largest noise it is well beyond the statistical error (8
    # standard errors: a bias, not a fluctuation, so the next check has power), and r(ε) − r(ε_min)
    # (common random numbers: the statistical part largely cancels) falls monotonically, as O(ε²) does.
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
    # 3000 probes per example: the mean is normal to good accuracy; |z| < 4 fails w.p. 6e-5 (fixed seed)
    assert abs(z) < 4.0, (float(est.value), float(exact.value), float(est.std_err))
    # power: a bias of 20 % (e.g. a missing ½ on q, or Q's factor 2) would be ≥ 4 standard errors away
    assert float(est.std_err) < 0.05 * abs(float(exact.value))
    # ℓ(h̄) on the probe path (the adjoint recurrence cell) and the exact path: same float64 arithmetic
    # in another order, rounding only
    np.testing.assert_allclose(est.clean_loss, exact.clean_loss, rtol=1e-12)
    # (value = ½(Q + R) holds by construction and is not checked; Q and R are checked separately
    # against an oracle in test_Q_and_R_separately_match_final_state_derivatives)


@pytest.mark.parametrize("name", ["additive", "multiplicative", "euler_heun"])
def test_continuous_is_the_limit_of_exact(name):
    x, y = _data()
    base = _cfg(NOISES[name], 0.1)
    cont = explicit_regularizer(NoisyRNN(base, rngs=nnx.Rngs(0)), x, y, method="continuous")
    refinements = [1, 2, 4, 8, 16]
    values = []
    for r in refinements:
        fine = NoisyRNN(base.replace(dt=base.dt / r), rngs=nnx.Rngs(0))  # same parameters, finer grid
        exact = explicit_regularizer(fine, x.repeat(r, axis=1), y, method="exact")
        values.append(float(exact.value))
    values = np.array(values)
    errors = np.abs(values - float(cont.value))
    slope = np.polyfit(np.log(refinements), np.log(errors), 1)[0]
    # first order in δ over the whole range (measured −0.89 … −1.13)
    assert -1.2 < slope < -0.8, (errors, slope)
    # e(δ/8)/e(δ/16) = 2 (1 + O(δ/16)): measured deviations ≤ 3.5 %; ±10 % excludes orders 1/2 and 2
    assert 1.8 < errors[-2] / errors[-1] < 2.2, errors
    # Richardson: 2 v(δ/2) − v(δ) cancels the O(δ) term, so its distance to the continuous value must fall
    # ~4× per halving (second order; measured 4.0–4.2). This shows the continuous value IS the limit, which
    # a first-order error ratio alone cannot (it would also hold for a limit shifted by a constant bias
    # smaller than e(δ/16)). The ODE solve's own error (rtol 1e-6) is far below the last distance (~2e-4).
    rich = np.abs(2.0 * values[1:] - values[:-1] - float(cont.value))
    assert 3.2 < rich[-2] / rich[-1] < 4.8, rich


def test_trace_hessian_form_matches_the_closed_form():
    """q = δ tanh''(z) ⊙ diag(W P Wᵀ) for the Lipschitz step map (docs/theory.md (3.11))."""
    cfg = _cfg(NOISES["both"], 0.1, init_std=3.0)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    p = model.recurrent_params()
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    h, u = jax.random.normal(k[0], (D,), jnp.float64), jax.random.normal(k[1], (D,), jnp.float64)
    L = jax.random.normal(k[2], (D, D), jnp.float64)
    P = L @ L.T
    drift = lambda hh, uu: LipschitzDrift(cfg.alpha)(jnp.concatenate([p.A, p.W]), hh, uu)
    F = lambda hh: hh + model.scheme.mean_step_size(cfg, p) * drift(hh, u)
    pre = p.W @ h + u
    tanh2 = -2.0 * jnp.tanh(pre) * (1.0 - jnp.tanh(pre) ** 2)
    # autodiff vs. closed form of the same float64 expressions (d = 4): rounding only, 1e-12 ≈ 5000 ulps
    np.testing.assert_allclose(_trace_hessian_form(F, h, P), cfg.dt * tanh2 * jnp.diag(p.W @ P @ p.W.T), rtol=1e-12)
    J = jax.jacfwd(F)(h)
    J_closed = jnp.eye(D) + cfg.dt * (cfg.alpha * p.A + (1.0 - jnp.tanh(pre) ** 2)[:, None] * p.W)
    np.testing.assert_allclose(J, J_closed, rtol=1e-12)
    np.testing.assert_allclose(F(h), h + cfg.dt * drift(h, u), rtol=1e-14)


@pytest.mark.parametrize("method", ["exact", "probe", "continuous"])
def test_gradients_in_the_parameters(method):
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES["both"], 0.2), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    key = jax.random.PRNGKey(0)

    def value(M_A, M_W, kernel):
        p = jax.tree.map(lambda a: a, params)
        p["cell"]["M_A"].value, p["cell"]["M_W"].value, p["decoder"]["kernel"].value = M_A, M_W, kernel
        m = nnx.merge(graphdef, p)
        return explicit_regularizer(m, x, y, method=method, num_probes=4, key=key).value

    args = (params["cell"]["M_A"].value, params["cell"]["M_W"].value, params["decoder"]["kernel"].value)
    grads = jax.grad(value, argnums=(0, 1, 2))(*args)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in grads)
    if method != "continuous":
        # a smooth float64 function: check_grads' central differences (eps 1e-6) and its float64 tolerances
        check_grads(value, args, order=1, modes=["rev"], eps=1e-6)
    else:
        # The adaptive solve's step sequence depends on the parameters, so compare one directional derivative
        # with a central difference at a larger step h = 1e-3: truncation O(h²) (measured 6e-6 relative) plus
        # the solve's tolerance seen through 1/h (rtol 1e-6 · |value| / h ≈ 3e-4 of the derivative).
        keys = jax.random.split(jax.random.PRNGKey(9), 3)
        dirs = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, args)]
        h = 1e-3
        fd = (value(*[a + h * v for a, v in zip(args, dirs)]) - value(*[a - h * v for a, v in zip(args, dirs)])) / (2 * h)
        np.testing.assert_allclose(fd, sum(jnp.vdot(g, v) for g, v in zip(grads, dirs)), rtol=1e-3)


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
        # float32 rounding over T = 8 steps of a d = 4 recursion: a few hundred ulps at most (2e-5 ≈ 170
        # eps₃₂; measured 2.4e-7). For "continuous" both dtypes solve to rtol 1e-6, well inside this band.
        np.testing.assert_allclose(r32.value, r64.value, rtol=2e-5)
        np.testing.assert_allclose(r32.R, r64.R, rtol=2e-5)
        # Q = 2∇ℓᵀm is a signed sum of terms of R's size and here nearly cancels (|Q| ≈ 0.3 % of R), so its
        # rounding error is measured against R's scale (measured |ΔQ| ≈ 1e-9 ≈ 5e-8 · R)
        np.testing.assert_allclose(r32.Q, r64.Q, rtol=0, atol=2e-5 * float(r64.R))


def test_masked_examples_do_not_count():
    x, y = _data()
    model = NoisyRNN(_cfg(NOISES["both"], 0.1), rngs=nnx.Rngs(0))
    full = explicit_regularizer(model, x[:2], y[:2])
    masked = explicit_regularizer(model, x, y, mask=jnp.array([1.0, 1.0, 0.0, 0.0]))
    # the same per-example numbers averaged with other weights: rounding only
    for field in ("value", "Q", "R", "clean_loss"):
        np.testing.assert_allclose(getattr(masked, field), getattr(full, field), rtol=1e-12)
    np.testing.assert_allclose(masked.per_example[:2], full.per_example, rtol=1e-12)


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


# ------------------------------------------------------------------------------------------------------
# Deterministic oracles (docs/theory.md (3.16)–(3.17)): with the model's own forward pass
# L(ξ) = mean_b ℓ(model(x, noise=ξ)), the expansion terms are derivatives of L in the standard normals ξ at ξ = 0. For a scheme whose step is
# a polynomial in ε ξ with no ξ-free O(ε²) term (Euler–Maruyama, Euler–Heun), E ℓ's ε² term is the mean
# of the quadratic Taylor term ½ ξᵀ ∇²L ξ, i.e. exactly reg = ½ tr ∇²_ξ L(0), and L(0) = ℓ(h̄). Both sides
# are then float64 computations of the same number by different routes (a (P, m) recursion vs. a dense
# Hessian of the unrolled loop): they agree to rounding, so 1e-10 relative leaves ~10⁵ × machine epsilon.
# Sizes are tiny so that the full Hessian in all B·T·noise_dim variables is cheap.
# ------------------------------------------------------------------------------------------------------
OB, OT, ON, OD, OC = 2, 4, 2, 3, 3
ORACLE_NOISES = {"additive": dict(eps_add=0.3), "multiplicative": dict(eps_mult=0.5),
                 "both": dict(eps_add=0.3, eps_mult=0.5)}
RTOL_EXACT = 1e-10  # same quantity by two float64 routes: rounding only (~1e-15 per op, O(10²) ops deep)
RTOL_CLEAN = 1e-12  # ℓ(h̄) by the same arithmetic on two code paths: rounding only


def _ocfg(**kw) -> NRNNConfig:
    fields = dict(input_dim=ON, hidden=OD, num_classes=OC, dt=0.3, init_std=1.0, backend="scan",
                  gradient="autodiff", dtype="float64")
    fields.update(kw)
    return NRNNConfig(**fields)


def _odata():
    x = jax.random.normal(jax.random.PRNGKey(2), (OB, OT, ON), jnp.float64)
    return x, jnp.array([0, 2])


@pytest.mark.parametrize("noise", list(ORACLE_NOISES))
@pytest.mark.parametrize("kind", ["diagonal", "scalar"])
@pytest.mark.parametrize("solver", ["euler", "euler_heun"])
def test_regularizer_is_half_trace_of_noise_hessian(solver, kind, noise):
    """reg = ½ tr ∇²_ξ L(0) and clean loss = L(0), L the model's own noisy loss (convention "sde").

    Exact for Euler–Maruyama and for Euler–Heun (whose ξ² terms carry the Stratonovich mean shift: the
    shift in the (P, m) recursion must equal their Hessian contribution). gradient="autodiff" on the scan
    backend; the other backends / gradient settings are in the next test. Catches: a wrong C_k (e.g. a
    missing √δ, σ evaluated off the path, the scalar noise column), a wrong q_k or J_k, a missing or wrong
    Stratonovich shift, and any mismatch between the regularizer's step map and the model's forward pass.
    """
    x, y = _odata()
    model = NoisyRNN(_ocfg(solver=solver, noise_kind=kind, **ORACLE_NOISES[noise]), rngs=nnx.Rngs(0))
    reg = explicit_regularizer(model, x, y, method="exact")
    L, n = noise_loss(model, x, y)
    np.testing.assert_allclose(half_trace_hessian(L, n), reg.value, rtol=RTOL_EXACT)
    np.testing.assert_allclose(L(jnp.zeros(n)), reg.clean_loss, rtol=RTOL_CLEAN)
    assert float(reg.value) > 1e-4  # the comparison is not between two rounding-level numbers


# Hessian route per (backend, gradient): forward-over-reverse everywhere (what the flatness analyses use). The
# scan adjoint's custom VJP is itself forward-differentiable; on diffrax + adjoint the adjoint's forward states
# come from diffeqsolve's plain while loop (diffrax.ForwardMode: forward-differentiable, not reverse); on
# diffrax + autodiff the loop is a while_loop with a dynamic trip count (no reverse-over-reverse).
# Noise kinds alternate over the three settings to keep the time down (the diffrax cases cost ~5 s each).
BACKEND_HESSIAN = [("scan", "adjoint", "fwd", "scalar"), ("diffrax", "adjoint", "fwd", "diagonal"),
                   ("diffrax", "autodiff", "fwd", "scalar")]


@pytest.mark.parametrize("backend,gradient,mode,kind", BACKEND_HESSIAN)
def test_half_trace_oracle_on_every_backend(backend, gradient, mode, kind):
    """The oracle of the previous test (Euler–Heun, both noises: the most terms) through every backend and
    gradient setting of the forward pass. Catches: a backend whose noisy step differs from the regularizer's
    model (e.g. diffrax's EulerHeun vs. the scan's, the per-example vmap of scalar noise on diffrax), and a
    custom VJP whose derivatives are wrong at second order."""
    x, y = _odata()
    cfg = _ocfg(solver="euler_heun", noise_kind=kind, backend=backend, gradient=gradient, **ORACLE_NOISES["both"])
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    reg = explicit_regularizer(model, x, y, method="exact")
    L, n = noise_loss(model, x, y)
    np.testing.assert_allclose(half_trace_hessian(L, n, mode), reg.value, rtol=RTOL_EXACT)
    np.testing.assert_allclose(L(jnp.zeros(n)), reg.clean_loss, rtol=RTOL_CLEAN)


@pytest.mark.parametrize("kind", ["diagonal", "scalar"])
def test_milstein_matches_the_hessian_oracle_to_fourth_order(kind):
    """Milstein (Itô): the oracle is not exact, and what holds instead.

    At ξ = 0 the step carries the deterministic O(ε²) shift −½δ Σ_j L^jσ_j (the "− δ" of (ΔW² − δ)), so
    L(0) ≠ ℓ(h̄): e₂(ε) = L(0) − clean = O(ε²). Its ξ² terms cancel that shift in expectation, so
    e₄(ε) = L(0) + ½ tr ∇²L(0) − (clean + reg) = O(ε⁴). L(ξ; ε) = L(−ξ; −ε) (σΔW and ε_mult σ are odd·odd
    and even in ε), so both errors are even in ε: e(ε)/e(ε/2) = 2^p (1 + O(ε²)). At the scales used the
    measured ratios are within ~2 % of 16 and 4; the bands [14, 18] and [3.6, 4.4] (±12 %, ±10 %) keep a
    wide margin yet exclude the neighbouring orders (8 or 32; 2 or 8). Catches: an Itô regularizer with a
    spurious shift (as if Milstein were Stratonovich), or a Milstein correction whose mean is not zero.
    """
    x, y = _odata()
    noise = dict(eps_add=0.3, eps_mult=0.5) if kind == "diagonal" else dict(eps_mult=0.5)  # scalar: ε_add = 0
    e2, e4 = [], []
    for scale in (0.5, 0.25, 0.125):
        scaled = {k: v * scale for k, v in noise.items()}
        model = NoisyRNN(_ocfg(solver="milstein", noise_kind=kind, **scaled), rngs=nnx.Rngs(0))
        reg = explicit_regularizer(model, x, y, method="exact")
        L, n = noise_loss(model, x, y)
        L0 = float(L(jnp.zeros(n)))
        e2.append(L0 - float(reg.clean_loss))
        e4.append(L0 + float(half_trace_hessian(L, n)) - float(reg.clean_loss + reg.value))
    r2 = [e2[i] / e2[i + 1] for i in range(2)]
    r4 = [e4[i] / e4[i + 1] for i in range(2)]
    assert all(3.6 < r < 4.4 for r in r2), (e2, r2)
    assert all(14.0 < r < 18.0 for r in r4), (e4, r4)
    assert abs(e4[-1]) > 1e3 * np.finfo(np.float64).eps  # the smallest e₄ is well above rounding


def _reference_final_state(model, x, xi, eta):
    """An independent loop of the reference convention (docs/theory.md (2.9)), h + (s ⊙ u) ⊙ f + ε_add ξ,
    with the uniform factor written affinely in a standardised η: u = 1 − ε_mult/2 + (ε_mult/√12) η (mean and
    variance of U[1 − ε_mult, 1]). Only the model's parameters, encoder and decoder are used."""
    cfg = model.cfg
    p = model.recurrent_params()
    z = model.encode(x)
    em, ea = cfg.eps_mult, cfg.eps_add
    h = jnp.zeros((x.shape[0], cfg.hidden), jnp.float64)
    for k in range(x.shape[1]):
        u = 1.0 - em / 2 + em / np.sqrt(12.0) * eta[:, k]
        f = cfg.alpha * h @ p.A.T + jnp.tanh(h @ p.W.T + z[:, k])
        h = h + p.step_size[None] * u * f + ea * xi[:, k]
    return h


def _reference_model(backend="scan"):
    model = NoisyRNN(_ocfg(convention="reference", eps_add=0.2, eps_mult=0.6, backend=backend), rngs=nnx.Rngs(0))
    model.step_size[...] = jnp.array([0.2, 0.3, 0.45])  # unequal per-unit steps: a scalar/vector mix-up shows
    return model


def _reference_flat(model, x):
    """f(v) = final states of the independent loop at v = flat (ξ, η), and len(v)."""
    B, T, d = x.shape[0], x.shape[1], model.cfg.hidden

    def final(v):
        v = v.reshape(B, T, 2 * d)
        return _reference_final_state(model, x, v[..., :d], v[..., d:])

    return final, B * T * 2 * d


def test_reference_convention_oracle():
    """Reference convention: reg = ½ tr ∇² of an independent loop's loss in (ξ, η) at 0, and clean loss =
    its loss at 0 (the mean-step path s(1 − ε_mult/2)).

    The library's own forward pass is NOT a valid oracle here: it maps ζ through Φ, which is not affine,
    and u's law is uniform, not Gaussian; but the regularizer depends on the noise only through its first
    two moments, and the affine η-loop has exactly those, so the identity is exact in the η variables.
    Catches: a wrong variance ε_mult²/12 or mean 1 − ε_mult/2, additive noise scaled by √δ, s treated as a
    scalar, or an expansion around the test-time path (u ≡ 1).
    """
    x, y = _odata()
    model = _reference_model()
    reg = explicit_regularizer(model, x, y, method="exact")
    final, n = _reference_flat(model, x)
    L = lambda v: jnp.mean(cross_entropy(model.decode(final(v)), y))
    np.testing.assert_allclose(half_trace_hessian(L, n), reg.value, rtol=RTOL_EXACT)
    np.testing.assert_allclose(L(jnp.zeros(n)), reg.clean_loss, rtol=RTOL_CLEAN)


@pytest.mark.parametrize("backend", ["scan", "diffrax"])
def test_reference_oracle_loop_is_the_library_forward_pass(backend):
    """Ties the independent loop above to model(x, noise=(ξ, ζ)): with η chosen so that the affine u equals
    the library's 1 − ε_mult + ε_mult Φ(ζ), the logits agree; and with ξ = 0, η = √3 (u ≡ 1) the loop is
    the test-time pass model(x). Same arithmetic in another order: 1e-12 relative. Catches: the library's
    noise layout (ξ first, ζ second), its Φ map, or its step differing from the convention the oracle uses."""
    x, _ = _odata()
    model = _reference_model(backend)
    cfg, d = model.cfg, model.cfg.hidden
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    xi = jax.random.normal(k1, (OB, OT, d), jnp.float64)
    zeta = jax.random.normal(k2, (OB, OT, d), jnp.float64)
    u = 1.0 - cfg.eps_mult + cfg.eps_mult * jax.scipy.stats.norm.cdf(zeta)
    eta = (u - 1.0 + cfg.eps_mult / 2) * np.sqrt(12.0) / cfg.eps_mult
    ours = model.decode(_reference_final_state(model, x, xi, eta))
    theirs = model(x, noise=jnp.concatenate([xi, zeta], axis=-1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    test_time = model.decode(_reference_final_state(model, x, jnp.zeros_like(xi), jnp.full_like(eta, np.sqrt(3.0))))
    np.testing.assert_allclose(test_time, model(x), rtol=1e-12, atol=1e-14)


def _oracle_Q_R(final, n, decode, y):
    """Per-example Q = 2 ∇ℓᵀ m, m = ½ Σ_i ∂²h_M/∂v_i², and R = Σ_i (∂h_M/∂v_i)ᵀ ∇²ℓ (∂h_M/∂v_i), from the
    derivatives of the final states h_M(v) (B, d) in the flat standard normals v at 0."""
    v0 = jnp.zeros(n, jnp.float64)
    h, Jh, Hh = jax.jit(lambda v: (final(v), jax.jacfwd(final)(v), jax.jacfwd(jax.jacfwd(final))(v)))(v0)
    m = 0.5 * jnp.trace(Hh, axis1=-2, axis2=-1)  # (B, d); Jh (B, d, n)
    Q, R = [], []
    for i in range(h.shape[0]):
        loss = lambda hh: cross_entropy(decode(hh[None])[0], y[i])
        g, H = jax.grad(loss)(h[i]), jax.hessian(loss)(h[i])
        Q.append(2.0 * g @ m[i])
        R.append(jnp.einsum("an,ab,bn->", Jh[i], H, Jh[i]))
    return np.array(Q), np.array(R)


@pytest.mark.parametrize("case", ["euler_diagonal", "euler_heun_scalar", "reference"])
def test_Q_and_R_separately_match_final_state_derivatives(case):
    """Q and R each, per example, against the derivatives of the final state in the noise (replaces the
    tautology value = ½(Q + R)): R is the Gauss–Newton part of the ξ-Hessian, Q the gradient part.

    Both are exact identities (see the oracle tests), so 1e-10 relative, with an absolute floor of 1e-13
    (rounding of O(1) terms) for a Q that happens to be near 0. Also R ≥ 0 per example (∇²ℓ ⪰ 0).
    Catches: Q and R swapped or mis-scaled against each other (e.g. R = ½ tr instead of tr, Q missing its
    2), which the sum alone or value = ½(Q + R) cannot see, and a per-example mix-up in the batch.
    """
    x, y = _odata()
    if case == "reference":
        model = _reference_model()
        final, n = _reference_flat(model, x)
    else:
        solver, kind = ("euler", "diagonal") if case == "euler_diagonal" else ("euler_heun", "scalar")
        model = NoisyRNN(_ocfg(solver=solver, noise_kind=kind, **ORACLE_NOISES["both"]), rngs=nnx.Rngs(0))
        shape = (OB, OT, model.cfg.noise_dim)
        final, n = (lambda v: model.final_state(x, noise=v.reshape(shape))), int(np.prod(shape))
    Q, R = _oracle_Q_R(final, n, model.decode, y)
    assert np.all(R > 0.0), R
    # one-hot masks give each example's own Q and R (masked batch means over one example)
    singles = jax.jit(jax.vmap(lambda w: explicit_regularizer(model, x, y, method="exact", mask=w)))(jnp.eye(OB))
    np.testing.assert_allclose(singles.Q, Q, rtol=RTOL_EXACT, atol=1e-13)
    np.testing.assert_allclose(singles.R, R, rtol=RTOL_EXACT, atol=1e-13)
    batch = explicit_regularizer(model, x, y, method="exact")
    np.testing.assert_allclose(batch.per_example, 0.5 * (Q + R), rtol=RTOL_EXACT, atol=1e-13)
    np.testing.assert_allclose([batch.Q, batch.R], [Q.mean(), R.mean()], rtol=RTOL_EXACT, atol=1e-13)
