"""Stability certificates and Lyapunov exponents of the unforced dynamics (math.md §4).

With x ≡ 0 and b = 0, h = 0 is an equilibrium of dh = f(h) dt + σ(h) dB, f(h) = α A h + tanh(W h), and
hᵀ f(h) ≤ c₁ |h|² with c₁ = α λ_max(sym A) + L_a ‖W‖₂ (L_a = 1 for tanh). With multiplicative noise only,
|σ(h)|²_F ≤ c₂ |h|² and |hᵀ σ(h)|² ≥ c₃ |h|⁴, and (Mao, Thm 4.3.3) almost surely
limsup (1/t) log |h_t| ≤ −(c₃ − c₁ − c₂/2). Scalar noise ε h dβ: c₂ = c₃ = ε²; diagonal noise
ε diag(h) dB: c₂ = ε², c₃ = ε²/d. Additive noise removes the equilibrium, so no certificate applies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import dynamics
from ..config import NRNNConfig
from ..dynamics import RecurrentParams


@dataclasses.dataclass(frozen=True)
class Certificate:
    c1: float
    c2: float
    c3: float
    bound: float | None  # upper bound on the top Lyapunov exponent (None: not applicable)
    note: str = ""

    @property
    def certified_stable(self) -> bool:
        return self.bound is not None and self.bound < 0


def certificate(cfg: NRNNConfig, p: RecurrentParams, lipschitz: float = 1.0) -> Certificate:
    """(c₁, c₂, c₃, bound) of math.md §4 for the configured noise."""
    sym = 0.5 * (p.A + p.A.T)
    c1 = float(cfg.alpha * jnp.linalg.eigvalsh(sym)[-1] + lipschitz * jnp.linalg.norm(p.W, 2))
    if cfg.convention != "sde":
        return Certificate(c1, float("nan"), float("nan"), None, "the reference convention is not an SDE")
    eps = cfg.eps_mult
    c2 = eps**2
    c3 = eps**2 if cfg.noise_kind == "scalar" else eps**2 / p.A.shape[0]
    if cfg.eps_add > 0:
        return Certificate(c1, c2, c3, None, "additive noise: h = 0 is not an equilibrium")
    return Certificate(c1, c2, c3, c1 + c2 / 2 - c3)


def lyapunov_exponent(cfg: NRNNConfig, p: RecurrentParams, *, t_max: float = 200.0, num_paths: int = 16,
                      radius: float = 1e-6, seed: int = 0) -> tuple[float, float]:
    """Top Lyapunov exponent of the equilibrium h = 0 of the unforced scheme, measured as
    (1/t) Σ log(|h_{k+1}| / |h_k|) with h renormalised to `radius` after each step (so that the model's
    own nonlinear step acts in its linear regime). Returns (mean over paths, standard error)."""
    steps = int(round(t_max / cfg.dt))
    d = p.A.shape[0]
    z = jnp.zeros(d, p.A.dtype)
    noiseless = cfg.replace(eps_add=0.0)  # the equilibrium's own noise: additive noise is excluded
    keys = jax.random.split(jax.random.PRNGKey(seed), num_paths)

    def path(key):
        k0, k1 = jax.random.split(key)
        h0 = jax.random.normal(k0, (d,), p.A.dtype)
        h0 = radius * h0 / jnp.linalg.norm(h0)
        xi = jax.random.normal(k1, (steps, cfg.noise_dim), p.A.dtype)

        def body(h, xi_k):
            h1 = dynamics.step(noiseless, p, h, z, xi_k)
            n = jnp.linalg.norm(h1)
            return radius * h1 / n, jnp.log(n / radius)

        _, logs = jax.lax.scan(body, h0, xi)
        return jnp.sum(logs) / (steps * cfg.dt)

    exps = np.asarray(jax.jit(jax.vmap(path))(keys))
    return float(exps.mean()), float(exps.std(ddof=1) / np.sqrt(num_paths))


def stabilization_demo(a: float = 0.5, eps_values=(0.0, 0.5, 1.0, 1.5, 2.0), hidden: int = 4, dt: float = 0.01,
                       t_max: float = 100.0, seed: int = 0) -> list[dict]:
    """Stochastic stabilisation: the drift f(h) = a h (c₁ = a > 0, unstable) under scalar multiplicative
    noise ε h dβ. Certificate bound a − ε²/2 against the measured exponent, for each ε."""
    rows = []
    for eps in eps_values:
        cfg = NRNNConfig(hidden=hidden, dt=dt, alpha=1.0, eps_mult=float(eps), noise_kind="scalar",
                         dtype="float64" if jax.config.jax_enable_x64 else "float32")
        dtype = jnp.dtype(cfg.dtype)
        p = RecurrentParams(A=a * jnp.eye(hidden, dtype=dtype), W=jnp.zeros((hidden, hidden), dtype))
        cert = certificate(cfg, p)
        lam, se = lyapunov_exponent(cfg, p, t_max=t_max, seed=seed)
        rows.append({"eps": float(eps), "c1": cert.c1, "c2": cert.c2, "c3": cert.c3, "bound": cert.bound,
                     "exponent": lam, "exponent_se": se})
    return rows
