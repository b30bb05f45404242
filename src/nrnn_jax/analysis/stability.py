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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import cells, dynamics, noise
from ..config import NRNNConfig
from ..dynamics import RecurrentParams


@dataclasses.dataclass(frozen=True)
class Certificate:
    """(c₁, c₂, c₃, bound) of docs/theory.md (5.2)–(5.7).

    - `c1`: bound on hᵀ(Itô drift)/|h|² of the simulated scheme, `ito_correction` included.
    - `bound`: upper bound on the top Lyapunov exponent, c₁ + c₂/2 − c₃ (None: not applicable; see `note`).
    - `ito_correction`: what the scheme adds to c₁ of the drift f: ε_mult²/2 for the Stratonovich
      Euler–Heun scheme, 0 for the Itô schemes (Euler–Maruyama, Milstein).
    """

    c1: float
    c2: float
    c3: float
    bound: float | None
    note: str = ""
    ito_correction: float = 0.0

    @property
    def certified_stable(self) -> bool:
        return self.bound is not None and self.bound < 0


def _check_sde(cfg: NRNNConfig, where: str) -> None:
    if cfg.convention != "sde":
        raise ValueError(f"{where}: NRNNConfig.convention={cfg.convention!r} is invalid here: the reference "
                         "convention is not an SDE discretisation, so h = 0 has no Lyapunov exponent of "
                         "dh = f dt + σ dB to measure; use convention='sde'.")


def certificate(cfg: NRNNConfig, p: RecurrentParams, lipschitz: float = 1.0) -> Certificate:
    """(c₁, c₂, c₃, bound) of docs/theory.md (5.2), (5.4)–(5.7) for the configured noise and scheme
    (`cfg.solver`).

    c₁ = λ_max(sym(αA)) + L ‖W‖₂, plus ε_mult²/2 under `solver="euler_heun"` (the Itô drift of the
    Stratonovich SDE it discretises). Returns `bound=None` (with a `note`) where no certificate applies:
    additive noise (no equilibrium), and the reference convention (not an SDE discretisation; c₂, c₃ are
    then NaN and c₁ is that of the drift f). `lyapunov_exponent` raises for the reference convention instead,
    since it has nothing to measure.
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
    return Certificate(c1, c2, c3, c1 + c2 / 2 - c3, note, correction)


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
    sigma = noise.of(cfg, layout)

    def path(h0, xi):
        h0 = radius * h0 / jnp.linalg.norm(h0)

        def body(h, xi_k):
            h1 = dynamics.step(cfg, p, h, z, fn(params, h, z), xi_k, sigma)
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
        cell = cells.MatrixLipschitz.of(cfg, p, "lyapunov_exponent")
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
                               noise.width(noiseless, layout), dtype)
    exps = np.asarray(_path_exponents(noiseless, p, drift.fn, drift.params, h0, xi, radius, layout))
    return float(exps.mean()), float(exps.std(ddof=1) / np.sqrt(num_paths))


def stabilization_demo(a: float = 0.5, eps_values=(0.0, 0.5, 1.0, 1.5, 2.0), hidden: int = 4, dt: float = 0.01,
                       t_max: float = 100.0, seed: int = 0, solver: str = "euler",
                       num_paths: int = 16) -> list[dict]:
    """Stochastic stabilisation: the drift f(h) = a h (c₁ = a > 0, unstable) under scalar multiplicative
    noise ε h dβ, simulated with `solver`. Certificate bound against the measured exponent, for each ε:
    a − ε²/2 for the Itô schemes ("euler", "milstein"); a for the Stratonovich "euler_heun" (no
    stabilisation)."""
    rows = []
    for eps in eps_values:
        cfg = NRNNConfig(hidden=hidden, dt=dt, alpha=1.0, eps_mult=float(eps), noise_kind="scalar", solver=solver,
                         dtype="float64" if jax.config.jax_enable_x64 else "float32")
        dtype = jnp.dtype(cfg.dtype)
        p = RecurrentParams(A=a * jnp.eye(hidden, dtype=dtype), W=jnp.zeros((hidden, hidden), dtype))
        cert = certificate(cfg, p)
        lam, se = lyapunov_exponent(cfg, p, t_max=t_max, num_paths=num_paths, seed=seed)
        rows.append({"eps": float(eps), "solver": solver, "c1": cert.c1, "c2": cert.c2, "c3": cert.c3,
                     "bound": cert.bound, "ito_correction": cert.ito_correction, "exponent": lam,
                     "exponent_se": se})
    return rows
