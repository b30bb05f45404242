"""The noise and the discretisation of the recurrence as pure functions (docs/theory.md §1–§3).

Everything here acts on ONE example: a hidden state `h` of shape (hidden,) and the drift `f = f(h, z_k)`
of the model's cell at that state (`nrnn_jax.cells`), so any cell gets every noise scheme and every
discretisation. Batching is `jax.vmap`'s job. The solver backends in `nrnn_jax.solvers` and the explicit
regularizer in `nrnn_jax.regularizer` call these functions, so each scheme is defined exactly once.

Names used throughout (each for one thing only):

- `xi` (ξ): standard normals, what the caller supplies, shape (noise_dim,) per step;
- `dw` (ΔW = √δ ξ): the Brownian increments of a step of the SDE convention;
- `diffusion` (σ(h)) and `diffusion_mv` (σ(h) ΔW): the diffusion and its action on an increment;
- `perturbation_factor` (G_k): the factor of a step's perturbation G_k η_k in the small-noise expansion,
  whose covariance is C_k = G_k G_kᵀ.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._types import ArrayLike
from .cells import lipschitz_from_products, lipschitz_matrix  # noqa: F401  (lipschitz_matrix: re-exported)
from .config import NRNNConfig


class RecurrentParams(NamedTuple):
    """Parameters of the recurrent core after the Lipschitz parametrisation.

    - `A`, `W`: (hidden, hidden) matrices of docs/theory.md (1.4).
    - `step_size`: (hidden,) the learnable per-unit step `s` of the reference convention (None under "sde").
    - `eps_add`, `eps_mult`: the noise levels as values (arrays in a vmapped sweep over noise levels);
      None takes the configuration's. The configuration alone decides which noise terms exist, so it stays
      static and hashable while the levels may be traced.
    """

    A: Float[Array, "hidden hidden"] | None
    W: Float[Array, "hidden hidden"] | None
    step_size: Float[Array, " hidden"] | None = None
    eps_add: Float[Array, ""] | float | None = None
    eps_mult: Float[Array, ""] | float | None = None


def noise_levels(cfg: NRNNConfig, p: RecurrentParams):
    """(ε_add, ε_mult): the parameters' values when set, else the configuration's."""
    return (cfg.eps_add if p.eps_add is None else p.eps_add, cfg.eps_mult if p.eps_mult is None else p.eps_mult)


def matrix_free(cfg: NRNNConfig, p: RecurrentParams, dtype) -> RecurrentParams:
    """`p` without the matrices and with the noise levels as arrays of `dtype`: the small parameters a
    recurrence cell receives beside the products M s."""
    eps_add, eps_mult = noise_levels(cfg, p)
    return p._replace(A=None, W=None, eps_add=jnp.asarray(eps_add, dtype), eps_mult=jnp.asarray(eps_mult, dtype))


def products_matrix(p: RecurrentParams) -> Float[Array, "p d"]:
    """M = [A; W], so that M h = (A h, W h) in one matrix product (the Lipschitz drift from given matrices)."""
    return jnp.concatenate([p.A, p.W], axis=0)


def drift(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, "*batch d"], z: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """The Lipschitz drift α A h + tanh(W h + z) from the matrices of `p` (docs/theory.md (1.3)); h and z may
    carry the same leading batch axes. A model's cell gives its own drift (`nrnn_jax.cells`)."""
    return lipschitz_from_products(cfg.alpha, h, h @ products_matrix(p).T, z)


def diffusion(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"]) -> lx.AbstractLinearOperator:
    """σ(h) as a linear operator from noise space (cfg.noise_dim,) to state space (docs/theory.md (2.1)–(2.2)).

    Diagonal: σ(h) = ε_add I + ε_mult diag(h). Scalar: [ε_add I | ε_mult h], the last column driven by
    the one multiplicative Brownian motion.
    """
    eps_add, eps_mult = noise_levels(cfg, p)
    if cfg.noise_kind == "diagonal":
        return lx.DiagonalLinearOperator(eps_add + eps_mult * h)
    eye = eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
    return lx.MatrixLinearOperator(jnp.concatenate([eye, eps_mult * h[:, None]], axis=1))


def diffusion_mv(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], dw: Float[Array, " m"]) -> Float[Array, " d"]:
    """σ(h) ΔW without materialising σ."""
    eps_add, eps_mult = noise_levels(cfg, p)
    if cfg.noise_kind == "diagonal":
        return (eps_add + eps_mult * h) * dw
    d = h.shape[0]
    return eps_add * dw[:d] + eps_mult * h * dw[d]


def increments(cfg: NRNNConfig, xi: Float[Array, "... m"]) -> Float[Array, "... m"]:
    """The Brownian increments ΔW = √δ ξ of the SDE convention (docs/theory.md (2.3))."""
    return jnp.sqrt(jnp.asarray(cfg.dt, xi.dtype)) * xi


def reference_multiplier(cfg: NRNNConfig, p: RecurrentParams, zeta: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """u ~ U[1 − ε_mult, 1] from a standard normal ζ via the normal CDF (docs/theory.md (2.10))."""
    eps_mult = noise_levels(cfg, p)[1]
    return 1.0 - eps_mult + eps_mult * jax.scipy.stats.norm.cdf(zeta)


def _sde_update(cfg: NRNNConfig, p: RecurrentParams, h, f, dw):
    """One step of the chosen SDE scheme given the drift f(h, x_k) and the increment ΔW (docs/theory.md §2).

    - euler (Itô Euler–Maruyama, (2.4)):  h + δ f + σ(h) ΔW
    - euler_heun (Stratonovich, (2.5)):  h' = h + σ(h) ΔW;  h + δ f + ½ (σ(h) + σ(h')) ΔW
    - milstein (Itô, commutative noise, (2.7)–(2.8)):  Euler–Maruyama + ½ Σ_j (L^j σ_j)(ΔW_j² − δ), in closed
      form for the two noise kinds (diffrax's `ItoMilstein` computes it by autodiff instead).
    """
    dt = cfg.dt
    h_det = h + dt * f
    noise = diffusion_mv(cfg, p, h, dw)
    if cfg.solver == "euler":
        return h_det + noise
    if cfg.solver == "euler_heun":
        return h_det + 0.5 * (noise + diffusion_mv(cfg, p, h + noise, dw))
    eps_add, eps_mult = noise_levels(cfg, p)
    if cfg.noise_kind == "diagonal":
        correction = 0.5 * eps_mult * (eps_add + eps_mult * h) * (dw * dw - dt)
    else:  # scalar multiplicative noise, eps_add == 0 (validated by the config)
        correction = 0.5 * eps_mult**2 * h * (dw[-1] ** 2 - dt)
    return h_det + noise + correction


def step(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], f: Float[Array, " d"],
         xi: Float[Array, " m"] | None) -> Float[Array, " d"]:
    """One recurrence step of the configured convention and scheme, driven by the standard normals `xi`
    of shape (cfg.noise_dim,) (None: noise off, the test-time step).

    - "sde": the scheme of `cfg.solver` with ΔW = √δ ξ (docs/theory.md (2.3)–(2.8));
    - "reference": the public code's rule h + (s ⊙ u) ⊙ f + ε_add ξ_add with u = 1 − ε_mult + ε_mult Φ(ζ),
      `xi` = (ξ_add, ζ) of shape (2 hidden,); with noise off, h + s ⊙ f (docs/theory.md (2.9)–(2.10)).

    `f`: the drift f(h, x_k) of the model's cell at h (every scheme evaluates it once, at h).
    """
    if cfg.convention == "reference":
        if xi is None:
            return h + p.step_size * f
        d = h.shape[0]
        eps_add = noise_levels(cfg, p)[0]
        return h + p.step_size * reference_multiplier(cfg, p, xi[d:]) * f + eps_add * xi[:d]
    if xi is None or not cfg.is_noisy:
        return h + cfg.dt * f
    return _sde_update(cfg, p, h, f, increments(cfg, xi))


# ------------------------------------------------------------------------------------------------------
# The pieces of the small-noise expansion (docs/theory.md §3): the deterministic step map F_k, the
# perturbation factor G_k with per-step covariance C_k = G_k G_kᵀ, and the O(ε²) mean shift of a
# Stratonovich scheme.
# ------------------------------------------------------------------------------------------------------
def mean_step_size(cfg: NRNNConfig, p: RecurrentParams):
    """c in F_k(h) = h + c f(h, x_k): δ ("sde"), or s (1 − ε_mult/2) per unit ("reference")."""
    if cfg.convention == "reference":
        return p.step_size * (1.0 - 0.5 * noise_levels(cfg, p)[1])
    return cfg.dt


def mean_step_map(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], f: Float[Array, " d"]) -> Float[Array, " d"]:
    """F_k(h): the deterministic map the expansion is taken around (docs/theory.md (3.1)–(3.2)).

    "sde": the Euler step h + δ f(h, x_k). "reference": the mean step h + s (1 − ε_mult/2) ⊙ f(h, x_k),
    since E u = 1 − ε_mult/2; note that this is not the test-time step (u ≡ 1). `f`: the drift f(h, x_k) at h.
    """
    return h + mean_step_size(cfg, p) * f


def expands_around_test_path(cfg: NRNNConfig) -> bool:
    """Whether the deterministic path of the expansion is the test-time forward pass: yes under the SDE
    convention (F_k is the Euler step), no under the reference convention (mean step s(1 − ε_mult/2) against
    the test-time step s)."""
    return cfg.convention == "sde"


def perturbation_factor(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"],
                        f: Float[Array, " d"]) -> lx.AbstractLinearOperator:
    """G_k(h) with perturbation G_k η_k, Cov η_k = I, so that C_k = G_k G_kᵀ (docs/theory.md (3.2)).

    "sde": √δ σ(h). "reference": [diag(s ⊙ f(h, x_k)) ε_mult/√12 | ε_add I] (u − E u has variance
    ε_mult²/12), giving C_k = diag(s ⊙ f)² ε_mult²/12 + ε_add² I, with f the drift f(h, x_k) at h.
    """
    eps_add, eps_mult = noise_levels(cfg, p)
    if cfg.convention == "reference":
        a = p.step_size * f * (eps_mult / jnp.sqrt(12.0))
        eye = eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
        return lx.MatrixLinearOperator(jnp.concatenate([jnp.diag(a), eye], axis=1))
    sqrt_dt = jnp.sqrt(jnp.asarray(cfg.dt, h.dtype))
    if cfg.noise_kind == "diagonal":
        return lx.DiagonalLinearOperator(sqrt_dt * (eps_add + eps_mult * h))
    return lx.MatrixLinearOperator(sqrt_dt * diffusion(cfg, p, h).as_matrix())


def perturbation_factor_mv(cfg: NRNNConfig, p: RecurrentParams, h, f, eta):
    """G_k η for one η of shape (noise_dim,) without forming G_k (elementwise; the same G_k as
    `perturbation_factor`). `f` is the drift f(h, x_k), used by the reference convention only."""
    d = h.shape[0]
    if cfg.convention == "reference":
        eps_add, eps_mult = noise_levels(cfg, p)
        return p.step_size * f * (eps_mult / jnp.sqrt(12.0)) * eta[:d] + eps_add * eta[d:]
    return jnp.sqrt(jnp.asarray(cfg.dt, h.dtype)) * diffusion_mv(cfg, p, h, eta)


def has_mean_shift(cfg: NRNNConfig) -> bool:
    """Whether the scheme's mean differs from the deterministic step at O(ε²): the Stratonovich
    Euler–Heun scheme of the SDE convention (docs/theory.md (3.5))."""
    return cfg.convention == "sde" and cfg.solver == "euler_heun"


def stratonovich_shift(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], dt) -> Float[Array, " d"]:
    """dt · ½ Σ_j (∂σ_j/∂h) σ_j: the mean drift a Stratonovich scheme (Euler–Heun) adds, by autodiff
    (docs/theory.md (3.5)). Zero for the Itô schemes (Euler–Maruyama, Milstein), whose extra terms have
    mean zero."""
    basis = jnp.eye(cfg.noise_dim, dtype=h.dtype)
    column = lambda hh, e: diffusion(cfg, p, hh).mv(e)
    terms = jax.vmap(lambda e: jax.jvp(lambda hh: column(hh, e), (h,), (column(h, e),))[1])(basis)
    return 0.5 * dt * jnp.sum(terms, axis=0)
