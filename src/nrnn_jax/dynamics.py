"""The noisy Lipschitz recurrence as pure functions of a parameter pytree (math.md §1).

Everything here acts on ONE example: a hidden state `h` of shape (hidden,) and the pre-computed input
drive `z = U x + b` of shape (hidden,). Batching is `jax.vmap`'s job. The solver backends in
`nrnn_jax.solvers` and the explicit regularizer in `nrnn_jax.regularizer` call these functions, so the
model is defined exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from .config import NRNNConfig


class RecurrentParams(NamedTuple):
    """Parameters of the recurrent core after the Lipschitz parametrisation.

    - `A`, `W`: (hidden, hidden) matrices of math.md §1.
    - `step`: (hidden,) the learnable per-unit step `s` of the reference convention (None under "sde").
    """

    A: Float[Array, "hidden hidden"]
    W: Float[Array, "hidden hidden"]
    step: Float[Array, " hidden"] | None = None


def lipschitz_matrix(m: Float[Array, "d d"], beta: float, gamma: float) -> Float[Array, "d d"]:
    """β (M − Mᵀ) + (1 − β)(M + Mᵀ) − γ I   (math.md §1)."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return beta * (m - m.T) + (1.0 - beta) * (m + m.T) - gamma * eye


def drift(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " d"]) -> Float[Array, " d"]:
    """f(h, x) = α A h + tanh(W h + U x + b), with z = U x + b   (math.md §1)."""
    return drift_from_products(cfg, p.A @ h, p.W @ h, z)


def drift_from_products(cfg: NRNNConfig, ah, wh, z):
    """The drift given the matrix products a = A h and w = W h: α a + tanh(w + z). The parameters A, W
    enter the recurrence only through these products, which is what `nrnn_jax.recurrence` exploits."""
    return cfg.alpha * ah + jnp.tanh(wh + z)


def products_matrix(p: RecurrentParams) -> Float[Array, "2d d"]:
    """M = [A; W], so that M h = (A h, W h) in one matrix product."""
    return jnp.concatenate([p.A, p.W], axis=0)


def diffusion(cfg: NRNNConfig, h: Float[Array, " d"]) -> lx.AbstractLinearOperator:
    """σ(h) as a linear operator from noise space (cfg.noise_dim,) to state space (math.md §1).

    Diagonal: σ(h) = ε_add I + ε_mult diag(h). Scalar: [ε_add I | ε_mult h], the last column driven by
    the one multiplicative Brownian motion.
    """
    if cfg.noise_kind == "diagonal":
        return lx.DiagonalLinearOperator(cfg.eps_add + cfg.eps_mult * h)
    eye = cfg.eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
    return lx.MatrixLinearOperator(jnp.concatenate([eye, cfg.eps_mult * h[:, None]], axis=1))


def diffusion_mv(cfg: NRNNConfig, h: Float[Array, " d"], dw: Float[Array, " m"]) -> Float[Array, " d"]:
    """σ(h) dW without materialising σ (the scan fast path)."""
    if cfg.noise_kind == "diagonal":
        return (cfg.eps_add + cfg.eps_mult * h) * dw
    d = h.shape[0]
    return cfg.eps_add * dw[:d] + cfg.eps_mult * h * dw[d]


def reference_multiplier(cfg: NRNNConfig, zeta: Float[Array, " d"]) -> Float[Array, " d"]:
    """u ~ U[1 − ε_mult, 1] from a standard normal ζ via the normal CDF (reference convention)."""
    return 1.0 - cfg.eps_mult + cfg.eps_mult * jax.scipy.stats.norm.cdf(zeta)


def sde_step(
    cfg: NRNNConfig,
    p: RecurrentParams,
    h: Float[Array, " d"],
    z: Float[Array, " d"],
    dw: Float[Array, " m"] | None,
) -> Float[Array, " d"]:
    """One step of the chosen scheme, with Brownian increment `dw` (None: the deterministic Euler step).

    - euler (Itô Euler–Maruyama, math.md §1):  h + δ f + σ(h) ΔW
    - euler_heun (Stratonovich):  h' = h + σ(h) ΔW;  h + δ f + ½ (σ(h) + σ(h')) ΔW
    - milstein (Itô, commutative noise):  Euler–Maruyama + ½ Σ_j (L^j σ_j)(ΔW_j² − δ), written in
      closed form for the two noise kinds (diffrax's `ItoMilstein` computes it by autodiff instead).
    """
    return sde_step_given_drift(cfg, h, drift(cfg, p, h, z), dw)


def sde_step_given_drift(cfg: NRNNConfig, h, f, dw):
    """`sde_step` with the drift f(h, x_k) already evaluated (every scheme evaluates it once, at h)."""
    dt = cfg.dt
    h_det = h + dt * f
    if dw is None or not cfg.is_noisy:
        return h_det
    noise = diffusion_mv(cfg, h, dw)
    if cfg.solver == "euler":
        return h_det + noise
    if cfg.solver == "euler_heun":
        return h_det + 0.5 * (noise + diffusion_mv(cfg, h + noise, dw))
    # milstein
    if cfg.noise_kind == "diagonal":
        correction = 0.5 * cfg.eps_mult * (cfg.eps_add + cfg.eps_mult * h) * (dw * dw - dt)
    else:  # scalar multiplicative noise, eps_add == 0 (validated by the config)
        correction = 0.5 * cfg.eps_mult**2 * h * (dw[-1] ** 2 - dt)
    return h_det + noise + correction


def reference_step(
    cfg: NRNNConfig,
    p: RecurrentParams,
    h: Float[Array, " d"],
    z: Float[Array, " d"],
    xi: Float[Array, " m"] | None,
) -> Float[Array, " d"]:
    """The public code's update h + (s ⊙ u) ⊙ f(h, x) + ε_add ξ (math.md §1, reference convention).

    `xi` of shape (2 hidden,) holds ξ then ζ (u = 1 − ε_mult + ε_mult Φ(ζ)); None means test time
    (u ≡ 1, ξ ≡ 0).
    """
    return reference_step_given_drift(cfg, h, drift(cfg, p, h, z), xi, p.step)


def reference_step_given_drift(cfg: NRNNConfig, h, f, xi, step_size):
    """`reference_step` with the drift f(h, x_k) already evaluated and the per-unit step s."""
    if xi is None:
        return h + step_size * f
    d = h.shape[0]
    return h + step_size * reference_multiplier(cfg, xi[d:]) * f + cfg.eps_add * xi[:d]


def step_noise(cfg: NRNNConfig, xi):
    """What a step consumes from the standard normals ξ: the Brownian increment ΔW = √δ ξ (convention
    "sde") or ξ itself (convention "reference"); None stays None."""
    if xi is None or cfg.convention == "reference":
        return xi
    return jnp.sqrt(jnp.asarray(cfg.dt, xi.dtype)) * xi


def step(cfg: NRNNConfig, p: RecurrentParams, h, z, noise):
    """One recurrence step under the configured convention. `noise` is the scaled Brownian increment
    ΔW = √δ ξ (convention "sde") or the raw standard normals ξ (convention "reference"), or None."""
    return step_given_drift(cfg, h, drift(cfg, p, h, z), noise, p.step)


def step_given_drift(cfg: NRNNConfig, h, f, noise, step_size=None):
    """`step` with the drift already evaluated; `step_size` is s (reference convention only)."""
    if cfg.convention == "reference":
        return reference_step_given_drift(cfg, h, f, noise, step_size)
    return sde_step_given_drift(cfg, h, f, noise)


# ------------------------------------------------------------------------------------------------------
# The pieces of the small-noise expansion (math.md §2): the deterministic step map F_k, a noise factor G_k
# with per-step covariance C_k = G_k G_kᵀ, and the O(ε²) mean shift of a Stratonovich scheme.
# ------------------------------------------------------------------------------------------------------
def mean_step_map(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " d"]) -> Float[Array, " d"]:
    """F_k(h): the deterministic map the expansion is taken around.

    "sde": the Euler step h + δ f(h, x_k). "reference": the mean step h + s (1 − ε_mult/2) ⊙ f(h, x_k),
    since E u = 1 − ε_mult/2 (math.md §2); note that this is not the test-time step (u ≡ 1).
    """
    return mean_step_given_drift(cfg, h, drift(cfg, p, h, z), p.step)


def mean_step_given_drift(cfg: NRNNConfig, h, f, step_size=None):
    """`mean_step_map` with the drift f(h, x_k) already evaluated; `step_size` is s (reference only)."""
    return h + mean_step_size(cfg, step_size) * f


def mean_step_size(cfg: NRNNConfig, step_size=None):
    """c in F_k(h) = h + c f(h, x_k): δ ("sde"), or s (1 − ε_mult/2) per unit ("reference")."""
    if cfg.convention == "reference":
        return step_size * (1.0 - 0.5 * cfg.eps_mult)
    return cfg.dt


def noise_factor(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " d"]) -> lx.AbstractLinearOperator:
    """G_k(h) with perturbation G_k η_k, Cov η_k = I, so that C_k = G_k G_kᵀ (math.md §2).

    "sde": √δ σ(h). "reference": [diag(s ⊙ f(h, x_k)) ε_mult/√12 | ε_add I] (u − E u has variance
    ε_mult²/12), giving C_k = diag(s ⊙ f)² ε_mult²/12 + ε_add² I.
    """
    if cfg.convention == "reference":
        a = p.step * drift(cfg, p, h, z) * (cfg.eps_mult / jnp.sqrt(12.0))
        eye = cfg.eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
        return lx.MatrixLinearOperator(jnp.concatenate([jnp.diag(a), eye], axis=1))
    sqrt_dt = jnp.sqrt(jnp.asarray(cfg.dt, h.dtype))
    if cfg.noise_kind == "diagonal":
        return lx.DiagonalLinearOperator(sqrt_dt * (cfg.eps_add + cfg.eps_mult * h))
    return lx.MatrixLinearOperator(sqrt_dt * diffusion(cfg, h).as_matrix())


def noise_factor_mv(cfg: NRNNConfig, h, f, eta, step_size=None):
    """G_k η for one η of shape (noise_dim,) without forming G_k (elementwise; the same G_k as
    `noise_factor`, whose covariance is C_k). `f` is the drift f(h, x_k), used by the reference
    convention only."""
    d = h.shape[0]
    if cfg.convention == "reference":
        return step_size * f * (cfg.eps_mult / jnp.sqrt(12.0)) * eta[:d] + cfg.eps_add * eta[d:]
    return jnp.sqrt(jnp.asarray(cfg.dt, h.dtype)) * diffusion_mv(cfg, h, eta)


def stratonovich_shift(cfg: NRNNConfig, h: Float[Array, " d"], dt: float | Array) -> Float[Array, " d"]:
    """dt · ½ Σ_j (∂σ_j/∂h) σ_j: the mean drift a Stratonovich scheme (Euler–Heun) adds, by autodiff.

    Zero for the Itô schemes (Euler–Maruyama, Milstein), whose extra terms have mean zero.
    """
    m = cfg.noise_dim
    basis = jnp.eye(m, dtype=h.dtype)
    column = lambda hh, e: diffusion(cfg, hh).mv(e)
    terms = jax.vmap(lambda e: jax.jvp(lambda hh: column(hh, e), (h,), (column(h, e),))[1])(basis)
    return 0.5 * dt * jnp.sum(terms, axis=0)
