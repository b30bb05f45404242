"""Stability certificates and Lyapunov exponents of the unforced dynamics (docs/theory.md §5).

With x ≡ 0 and b = 0, h = 0 is an equilibrium of dh = f(h) dt + σ(h) dB, f(h) = α A h + tanh(W h), and
hᵀ f(h) ≤ c₁ |h|² with c₁ = λ_max(sym(α A)) + L_a ‖W‖₂ (L_a = 1 for tanh; λ_max(sym(αA)) is α λ_max(sym A)
for α ≥ 0 but α λ_min(sym A) for α < 0). With multiplicative noise only, |σ(h)|²_F ≤ c₂ |h|² and
|hᵀ σ(h)|² ≥ c₃ |h|⁴, and (Mao, Thm 4.3.3) almost surely limsup (1/t) log |h_t| ≤ −(c₃ − c₁ − c₂/2).
Scalar noise ε h dβ: c₂ = c₃ = ε²; diagonal noise ε diag(h) dB: c₂ = ε², c₃ = ε²/d. Additive noise removes
the equilibrium, so no certificate applies.

The theorem is about the Itô SDE, so c₁ must bound the Itô drift of the equation the scheme actually
discretises. Euler–Maruyama and Milstein are Itô schemes: the drift is f. Euler–Heun is a Stratonovich
scheme: dh = f dt + σ ∘ dB has Itô drift f + ½ Σ_j (∂σ_j) σ_j, which for multiplicative noise (scalar or
diagonal) is f + ½ ε_mult² h, so c₁ grows by ε_mult²/2 (`Certificate.ito_correction`); for scalar noise
the bound is then c₁ of f itself: Stratonovich noise of this form does not stabilise.

That bound is the continuous-time one (δ → 0). The model is the scheme at its step δ = `cfg.dt`, whose
exponent can differ from it by far more than O(δ) (Euler at δ|λ| > 2 grows where the SDE decays), so
`Certificate.discrete_bound` bounds the exponent of the simulated chain itself (docs/theory.md (5.11)) and
`certified_stable` is read from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtr

from .. import _registry, cells
from ..config import NRNNConfig
from ..schemes import RecurrentParams


@dataclasses.dataclass(frozen=True)
class Certificate:
    """(c₁, c₂, c₃, bound) of docs/theory.md (5.2)–(5.7), and the bound at the step size (5.11).

    - `c1`: bound on hᵀ(Itô drift)/|h|² of the simulated scheme, `ito_correction` included.
    - `bound`: upper bound on the top Lyapunov exponent of the SDE (continuous time, the δ → 0 limit of
      the scheme), c₁ + c₂/2 − c₃ (None: not applicable; see `note`).
    - `ito_correction`: what the scheme adds to c₁ of the drift f: ε_mult²/2 for the Stratonovich
      Euler–Heun scheme, 0 for the Itô schemes (Euler–Maruyama, Milstein).
    - `discrete_bound`: almost-sure upper bound on the top Lyapunov exponent of the scheme as simulated,
      at its step δ = `dt` (docs/theory.md (5.11)); −inf when the step maps every state to 0; None where
      `bound` is None.
    - `dt`: the step size δ of `discrete_bound`.

    `certified_stable` is `discrete_bound < 0`: the model as simulated at its step size is stable. The
    continuous `bound` carries over to the scheme only as δ → 0 (`discrete_bound` → `bound` for scalar
    noise and no noise; for diagonal noise → `bound` + ε_mult²/d), so `bound < 0` alone certifies nothing
    about the model.
    """

    c1: float
    c2: float
    c3: float
    bound: float | None
    note: str = ""
    ito_correction: float = 0.0
    discrete_bound: float | None = None
    dt: float | None = None

    @property
    def certified_stable(self) -> bool:
        return self.discrete_bound is not None and self.discrete_bound < 0


def _check_sde(cfg: NRNNConfig, where: str) -> None:
    if cfg.convention != "sde":
        raise ValueError(f"{where}: NRNNConfig.convention={cfg.convention!r} is invalid here: the reference "
                         "convention is not an SDE discretisation, so h = 0 has no Lyapunov exponent of "
                         "dh = f dt + σ dB to measure; use convention='sde'.")


def certificate(cfg: NRNNConfig, p: RecurrentParams, lipschitz: float = 1.0) -> Certificate:
    """(c₁, c₂, c₃, bound) of docs/theory.md (5.2), (5.4)–(5.7) for the configured noise and scheme
    (`cfg.solver`), and the bound (5.11) on the exponent of that scheme at its step size `cfg.dt`.

    **Arguments:**

    - `cfg`: the model configuration (noise kind and levels, solver, `dt`, `alpha`).
    - `p`: the recurrent parameters with the matrices A and W (`model.recurrent_params()`).
    - `lipschitz`: the Lipschitz constant L of the activation (1 for tanh).

    **Returns:** a `Certificate`. c₁ = λ_max(sym(αA)) + L ‖W‖₂, plus ε_mult²/2 under `solver="euler_heun"`
    (the Itô drift of the Stratonovich SDE it discretises); `bound` = c₁ + c₂/2 − c₃ holds for the SDE;
    `discrete_bound` holds for the simulated scheme at δ = `cfg.dt` and decides `certified_stable`.
    `bound` and `discrete_bound` are None (with a `note`) where no certificate applies: additive noise (no
    equilibrium), and the reference convention (not an SDE discretisation; c₂, c₃ are then NaN and c₁ is
    that of the drift f). `lyapunov_exponent` raises for the reference convention instead, since it has
    nothing to measure.
    """
    if cfg.noise_kind == "custom":
        raise ValueError("certificate: NRNNConfig.noise_kind='custom' has no certificate: the constants c2, c3 "
                         "(docs/theory.md (5.4)-(5.7)) are derived for the built-in multiplicative noises only")
    if p.A is None or p.W is None:
        raise ValueError(f"certificate: NRNNConfig.cell={cfg.cell!r} has no certificate: its assumptions (the drift "
                         "α A h + tanh(W h) with h = 0 an equilibrium, docs/theory.md §5) hold for the Lipschitz cell "
                         "only; measure the cell's exponent with lyapunov_exponent(cfg, p, cell=model.cell)")
    sym = 0.5 * (cfg.alpha * p.A + cfg.alpha * p.A.T)
    c1_drift = float(jnp.linalg.eigvalsh(sym)[-1] + lipschitz * jnp.linalg.norm(p.W, 2))
    if cfg.convention != "sde":
        return Certificate(c1_drift, float("nan"), float("nan"), None,
                           "the reference convention is not an SDE discretisation: no certificate; "
                           "use convention='sde'")
    eps = float(cfg.eps_mult)
    if cfg.solver == "euler_heun":
        correction = 0.5 * eps**2
        note = (f"Stratonovich scheme (euler_heun): c1 includes the Itô correction ½ε_mult² = {correction:g} "
                "of the drift f + ½ Σ_j (∂σ_j) σ_j")
    else:
        correction, note = 0.0, f"Itô scheme ({cfg.solver}): c1 is that of the drift f"
    c1 = c1_drift + correction
    c2 = eps**2
    c3 = eps**2 if cfg.noise_kind == "scalar" else eps**2 / p.A.shape[0]
    if cfg.eps_add > 0:
        return Certificate(c1, c2, c3, None, "additive noise: h = 0 is not an equilibrium; " + note, correction)
    discrete = _discrete_bound(cfg, np.asarray(p.A, np.float64), np.asarray(p.W, np.float64), lipschitz)
    return Certificate(c1, c2, c3, c1 + c2 / 2 - c3, note, correction, discrete, float(cfg.dt))


# The one-step factor of the unforced scheme with multiplicative noise (docs/theory.md (5.11)): every SDE
# scheme maps h to c(ξ) ⊙ h + δ f(h) with c(ξ) = 1 + μ + ε√δ ξ + κ ε²δ ξ² per noise coordinate ξ
# (the scalar noise's one ξ for all units, the diagonal noise's own ξ_i per unit): (κ, μ/(ε²δ)) per solver.
_FACTOR = {"euler": (0.0, 0.0), "euler_heun": (0.5, 0.0), "milstein": (0.5, -0.5)}
# ξ beyond ±_XI_MAX (Gaussian mass 1.2e-15) is left out of the expectation (5.11)
_XI_MAX = 8.0
# the piecewise-linear envelope of φ raises the scalar-noise bound (5.11) by at most this much (1/time)
_ENVELOPE_SLACK = 1e-5
_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(16)


class _StepNorm:
    """φ(c) = ‖c I + B‖₂ = √λ_max(c² I + c (B + Bᵀ) + BᵀB), one symmetric eigenvalue problem per c."""

    def __init__(self, B: np.ndarray):
        self.eye, self.sym, self.gram = np.eye(B.shape[0]), B + B.T, B.T @ B

    def __call__(self, cs: np.ndarray) -> np.ndarray:
        cs = np.asarray(cs, np.float64)[:, None, None]
        top = np.linalg.eigvalsh(cs**2 * self.eye + cs * self.sym + self.gram)[:, -1]
        return np.sqrt(np.maximum(top, 0.0))


def _upper_envelope(phi: _StepNorm, kinks: np.ndarray, lo: float, hi: float, mass, slack: float, floor: float):
    """Nodes c_0 < … < c_n spanning [lo, hi] and φ(c_j), whose piecewise-linear interpolant is ≥ φ on
    [lo, hi] (φ is convex in c, so each chord lies above it). An interval [a, b] is halved until
    2 e / (min φ + floor) · mass(a, b) ≤ slack (b − a)/(hi − lo), with e the chord's excess at the midpoint
    (for a convex φ the excess anywhere in the interval is at most 2 e) and `mass(a, b)` the probability
    of c(ξ) ∈ [a, b]: then E log(envelope + floor) − E log(φ + floor) ≤ slack. `kinks` (where φ may have
    a corner) are nodes from the start."""
    nodes = np.unique(np.concatenate([np.linspace(lo, hi, 17), kinks[(kinks > lo) & (kinks < hi)]]))
    values = phi(nodes)
    width = 1e-12 * (1.0 + abs(lo) + abs(hi))
    while nodes.size < 4097:
        open_ = np.flatnonzero(np.diff(nodes) > width)
        if open_.size == 0:
            break
        a, b = nodes[open_], nodes[open_ + 1]
        mids = 0.5 * (a + b)
        mid_values = phi(mids)
        excess = 0.5 * (values[open_] + values[open_ + 1]) - mid_values
        least = np.minimum(np.minimum(values[open_], values[open_ + 1]), mid_values) + floor
        with np.errstate(divide="ignore", invalid="ignore"):
            split = 2 * excess * mass(a, b) > slack * least * (b - a) / (hi - lo)
        split &= excess > 0
        if not split.any():
            break
        nodes, values = np.concatenate([nodes, mids[split]]), np.concatenate([values, mid_values[split]])
        order = np.argsort(nodes)
        nodes, values = nodes[order], values[order]
    return nodes, values


def _discrete_bound(cfg: NRNNConfig, A: np.ndarray, W: np.ndarray, lipschitz: float) -> float:
    """docs/theory.md (5.11): an almost-sure upper bound on the top Lyapunov exponent of the unforced
    scheme `cfg.solver` at δ = cfg.dt with multiplicative noise ε = cfg.eps_mult (no additive noise).

    The step is h ↦ c(ξ) ⊙ h + δαA h + δ tanh(W h), with |δ tanh(W h)| ≤ δ L ‖W‖₂ |h| (`_FACTOR`).
    Scalar noise: |h_{k+1}| ≤ (φ(c(ξ_k)) + δL‖W‖₂) |h_k| with φ(c) = ‖cI + δαA‖₂, a factor independent of
    h_k, so by the law of large numbers the exponent is at most E log(φ(c(ξ)) + δL‖W‖₂) / δ; computed with
    a piecewise-linear upper envelope of φ (convex in c), by Gauss–Legendre quadrature against the normal
    density on the pieces where the envelope is linear in c. Diagonal noise: c(ξ) = c̄ + η with E η = 0,
    Var η = ε²δ + 2κ²ε⁴δ² per unit, independent across units, so E|h_{k+1}|² ≤ ((φ(c̄) + δL‖W‖₂)² +
    Var η)|h_k|², and by Jensen the exponent is at most the log of that factor over 2δ. No noise:
    log(φ(1) + δL‖W‖₂)/δ."""
    if not (np.isfinite(A).all() and np.isfinite(W).all()):
        return float("nan")
    dt, eps = float(cfg.dt), float(cfg.eps_mult)
    B = dt * cfg.alpha * A
    phi = _StepNorm(B)
    lip_w = dt * lipschitz * float(np.linalg.norm(W, 2))
    kappa, mu = _FACTOR[cfg.solver]
    s, q, c0 = eps * math.sqrt(dt), kappa * eps**2 * dt, 1.0 + mu * eps**2 * dt
    with np.errstate(divide="ignore"):
        if eps == 0.0:
            return float(np.log(phi(np.array([1.0]))[0] + lip_w) / dt)
        if cfg.noise_kind == "diagonal":
            g = phi(np.array([c0 + q]))[0] + lip_w
            return float(np.log(g**2 + s**2 + 2 * q**2) / (2 * dt))
    # scalar noise: E log(φ(c(ξ)) + δL‖W‖₂), ξ ~ N(0, 1), over |ξ| ≤ _XI_MAX
    c = lambda xi: c0 + s * xi + q * xi**2
    ends = np.array([c(-_XI_MAX), c(_XI_MAX)] + ([c(-s / (2 * q))] if q > 0 else []))
    # corners of φ where B is normal: where c + Re λ_i(B) changes sign
    kinks = -np.linalg.eigvals(B).real

    def below(t):  # P(c(ξ) ≤ t)
        if q == 0:
            return ndtr((t - c0) / s)
        disc = s**2 + 4 * q * (t - c0)
        root = np.sqrt(np.maximum(disc, 0.0))
        return np.where(disc > 0, ndtr((-s + root) / (2 * q)) - ndtr((-s - root) / (2 * q)), 0.0)

    nodes, values = _upper_envelope(phi, kinks, float(ends.min()), float(ends.max()),
                                    lambda a, b: below(b) - below(a), _ENVELOPE_SLACK * dt, lip_w)
    # the ξ at which c(ξ) passes a node: the envelope is linear in c between them
    if q > 0:
        disc = s**2 + 4 * q * (nodes - c0)
        big = -0.5 * (s + np.sqrt(disc[disc >= 0]))  # the stable roots of q ξ² + s ξ + c0 − c_j = 0
        cuts = np.concatenate([big / q, (c0 - nodes[disc >= 0]) / big])
    else:
        cuts = (nodes - c0) / s
    cuts = np.unique(np.clip(np.concatenate([cuts, [-_XI_MAX, _XI_MAX]]), -_XI_MAX, _XI_MAX))
    envelope = lambda xi: (np.interp(c(xi), nodes, values) + np.maximum(nodes[0] - c(xi), 0.0)
                           + np.maximum(c(xi) - nodes[-1], 0.0) + lip_w)  # beyond the nodes: slope 1
    # where the envelope vanishes (δαA = −c I, W = 0) the log is singular: pieces graded towards that point
    zero = np.flatnonzero(envelope(cuts) <= 1e-12 * (1.0 + values.max()))
    grading = 2.0 ** -np.arange(1, 40)
    extra = [cuts[i] + grading * (cuts[i + sign] - cuts[i]) for i in zero for sign in (-1, 1)
             if 0 <= i + sign < cuts.size]
    cuts = np.unique(np.concatenate([cuts, *extra]))
    x_gl, w_gl = _GAUSS_LEGENDRE
    half, centre = 0.5 * np.diff(cuts), 0.5 * (cuts[:-1] + cuts[1:])
    xi = centre[:, None] + half[:, None] * x_gl[None]
    weights = half[:, None] * w_gl[None] * np.exp(-0.5 * xi**2) / math.sqrt(2 * math.pi)
    with np.errstate(divide="ignore"):
        return float(np.sum(weights * np.log(envelope(xi))) / dt)


@functools.partial(jax.jit, static_argnames=("num_paths", "steps", "d", "m", "dtype"))
def _paths_randomness(key, num_paths: int, steps: int, d: int, m: int, dtype):
    """Per path: a random initial direction (d,) and the standard normals ξ (steps, m). Compiled once per
    shape (random-number generation dominates the compile time of a short simulation)."""

    def one(k):
        k0, k1 = jax.random.split(k)
        return jax.random.normal(k0, (d,), dtype), jax.random.normal(k1, (steps, m), dtype)

    return jax.vmap(one)(jax.random.split(key, num_paths))


@functools.partial(jax.jit, static_argnames=("cfg", "fn", "radius", "layout"))
def _path_exponents(cfg: NRNNConfig, p: RecurrentParams, fn, params, h0, xi, radius: float, layout=None):
    """(1/t) Σ_k log(|h_{k+1}| / |h_k|) for each path (h0[i], xi[i]) of the unforced scheme with the drift
    fn(params, h, 0), h (the flat state of the cell's `layout`) renormalised to `radius` after every step.
    Compiled once per configuration, drift, layout and shape."""
    z = jnp.zeros(cfg.hidden if layout is not None else h0.shape[-1], h0.dtype)
    scheme, sigma = _registry.scheme(cfg), _registry.diffusion(cfg, layout)

    def path(h0, xi):
        h0 = radius * h0 / jnp.linalg.norm(h0)

        def body(h, xi_k):
            h1 = scheme.step(cfg, p, sigma, h, z, fn(params, h, z), xi_k)
            n = jnp.linalg.norm(h1)
            return radius * h1 / n, jnp.log(n / radius)

        _, logs = jax.lax.scan(body, h0, xi)
        return jnp.sum(logs) / (xi.shape[0] * cfg.dt)

    return jax.vmap(path)(h0, xi)


def lyapunov_exponent(cfg: NRNNConfig, p: RecurrentParams, *, t_max: float = 200.0, num_paths: int = 16,
                      radius: float = 1e-6, seed: int = 0, cell=None) -> tuple[float, float]:
    """Top Lyapunov exponent of the equilibrium h = 0 of the unforced scheme `cfg.solver`, measured as
    (1/t) Σ log(|h_{k+1}| / |h_k|) with h renormalised to `radius` after each step (so that the model's
    own nonlinear step acts in its linear regime). Additive noise is left out (it removes the equilibrium).
    `cell`: the drift (a model's `model.cell`; None: the Lipschitz drift of `p.A`, `p.W`); h = 0 must be an
    equilibrium of the unforced cell, f(0, 0) = 0, else `ValueError`. A cell whose state is a pytree (an
    LSTM's (c, h)) is measured on its whole flat state, with the noise on the parts `cfg.noise_on`.
    Returns (mean over paths, standard error). Raises `ValueError` for the reference convention."""
    _check_sde(cfg, "lyapunov_exponent")
    layout = None
    if cell is None:
        drift = cells.pure(cells.lipschitz_drift(cfg, p, "lyapunov_exponent"), products=False)
        d, dtype = p.A.shape[0], jnp.dtype(p.A.dtype)
    else:
        layout = cells.state_layout(cell, cfg)
        d, dtype = cfg.hidden if layout is None else layout.size, jnp.dtype(cfg.dtype)
        drift = cells.pure(cell, products=False, layout=layout)
    f0 = float(jnp.max(jnp.abs(drift(jnp.zeros(d, dtype), jnp.zeros(cfg.hidden if layout else d, dtype)))))
    if not f0 <= 1e-6:
        raise ValueError(f"lyapunov_exponent: h = 0 is not an equilibrium of the unforced cell "
                         f"(max |f(0, 0)| = {f0:.3g}; NRNNConfig.cell={cfg.cell!r}), so it has no exponent to "
                         "measure; cells with f(0, 0) = 0 (e.g. no bias inside the drift) qualify")
    steps = int(round(t_max / cfg.dt))
    noiseless = cfg.replace(eps_add=0.0)  # the equilibrium's own noise: additive noise is excluded
    h0, xi = _paths_randomness(jax.random.PRNGKey(seed), num_paths, steps, d,
                               _registry.noise_width(noiseless, layout), dtype)
    exps = np.asarray(_path_exponents(noiseless, p, drift.fn, drift.params, h0, xi, radius, layout))
    return float(exps.mean()), float(exps.std(ddof=1) / np.sqrt(num_paths))


def stabilization_demo(a: float = 0.5, eps_values=(0.0, 0.5, 1.0, 1.5, 2.0), hidden: int = 4, dt: float = 0.01,
                       t_max: float = 100.0, seed: int = 0, solver: str = "euler",
                       num_paths: int = 16) -> list[dict]:
    """Stochastic stabilisation: the drift f(h) = a h (c₁ = a > 0, unstable) under scalar multiplicative
    noise ε h dβ, simulated with `solver`. Certificate bound against the measured exponent, for each ε:
    a − ε²/2 for the Itô schemes ("euler", "milstein"); a for the Stratonovich "euler_heun" (no
    stabilisation). `discrete_bound` is the bound at the step `dt` (docs/theory.md (5.11)), here the exact
    exponent (5.10) of the simulated chain."""
    rows = []
    for eps in eps_values:
        cfg = NRNNConfig(hidden=hidden, dt=dt, alpha=1.0, eps_mult=float(eps), noise_kind="scalar", solver=solver,
                         dtype="float64" if jax.config.jax_enable_x64 else "float32")
        dtype = jnp.dtype(cfg.dtype)
        p = RecurrentParams(A=a * jnp.eye(hidden, dtype=dtype), W=jnp.zeros((hidden, hidden), dtype))
        cert = certificate(cfg, p)
        lam, se = lyapunov_exponent(cfg, p, t_max=t_max, num_paths=num_paths, seed=seed)
        rows.append({"eps": float(eps), "solver": solver, "c1": cert.c1, "c2": cert.c2, "c3": cert.c3,
                     "bound": cert.bound, "discrete_bound": cert.discrete_bound,
                     "ito_correction": cert.ito_correction, "exponent": lam,
                     "exponent_se": se})
    return rows
