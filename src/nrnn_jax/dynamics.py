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

import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from . import noise, schemes
from .schemes import noise_levels  # the one definition, shared with the schemes
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


def diffusion(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " n"] | None = None,
              sigma: noise.Noise | None = None) -> lx.AbstractLinearOperator:
    """σ(h, z) as a linear operator from noise space (cfg.noise_dim,) to state space (docs/theory.md (2.1)–(2.2)):
    the configuration's diffusion (`nrnn_jax.noise`). Diagonal: ε_add I + ε_mult diag(h). Scalar:
    [ε_add I | ε_mult h], the last column driven by the one multiplicative Brownian motion. Custom: the user's
    σ(h, z) (z needed). `sigma`: the diffusion on a cell's flat state (`noise.of(cfg, layout)`; None: the
    configuration's on a state (hidden,)), here and in the functions below."""
    return _sigma(cfg, sigma).operator(noise_levels(cfg, p), h, z)


def diffusion_mv(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], dw: Float[Array, " m"],
                 z: Float[Array, " n"] | None = None, sigma: noise.Noise | None = None) -> Float[Array, " d"]:
    """σ(h, z) ΔW without materialising σ."""
    return _sigma(cfg, sigma).mv(noise_levels(cfg, p), h, z, dw)


def _sigma(cfg: NRNNConfig, sigma: noise.Noise | None) -> noise.Noise:
    return noise.of(cfg) if sigma is None else sigma


def increments(cfg: NRNNConfig, xi: Float[Array, "... m"]) -> Float[Array, "... m"]:
    """The Brownian increments ΔW = √δ ξ of the SDE convention (docs/theory.md (2.3))."""
    return jnp.sqrt(jnp.asarray(cfg.dt, xi.dtype)) * xi


def step(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " n"], f: Float[Array, " d"],
         xi: Float[Array, " m"] | None, sigma: noise.Noise | None = None) -> Float[Array, " d"]:
    """One recurrence step of the configured scheme (`nrnn_jax.schemes.of(cfg)`) with the configured diffusion,
    driven by the standard normals `xi` of shape (cfg.noise_dim,) (None: noise off, the test-time step).

    - "sde": the scheme of `cfg.solver` with ΔW = √δ ξ (docs/theory.md (2.3)–(2.8));
    - "reference": the public code's rule h + (s ⊙ u) ⊙ f + ε_add ξ_add with u = 1 − ε_mult + ε_mult Φ(ζ),
      `xi` = (ξ_add, ζ) of shape (2 hidden,); with noise off, h + s ⊙ f (docs/theory.md (2.9)–(2.10)).

    `z`: the step's input drive; `f`: the drift f(h, z) of the model's cell at h (every scheme evaluates it
    once, at h). `sigma`: as in `diffusion`.
    """
    return schemes.of(cfg).step(cfg, p, _sigma(cfg, sigma), h, z, f, xi)


# ------------------------------------------------------------------------------------------------------
# The pieces of the small-noise expansion (docs/theory.md §3): the deterministic step map F_k, the
# perturbation factor G_k with per-step covariance C_k = G_k G_kᵀ, and the O(ε²) mean shift of a
# Stratonovich scheme.
# ------------------------------------------------------------------------------------------------------
def mean_step_size(cfg: NRNNConfig, p: RecurrentParams):
    """c in F_k(h) = h + c f(h, x_k): δ ("sde"), or s (1 − ε_mult/2) per unit ("reference")."""
    return schemes.of(cfg).mean_step_size(cfg, p)


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
    return schemes.of(cfg).expands_around_test_path


def perturbation_factor(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " n"],
                        f: Float[Array, " d"], sigma: noise.Noise | None = None) -> lx.AbstractLinearOperator:
    """G_k(h) with perturbation G_k η_k, Cov η_k = I, so that C_k = G_k G_kᵀ (docs/theory.md (3.2)).

    "sde": √δ σ(h, z). "reference": [diag(s ⊙ f) ε_mult/√12 | ε_add I] (u − E u has variance ε_mult²/12),
    giving C_k = diag(s ⊙ f)² ε_mult²/12 + ε_add² I, with f the drift f(h, x_k) at h.
    """
    return schemes.of(cfg).perturbation_factor(cfg, p, _sigma(cfg, sigma), h, z, f)


def perturbation_factor_mv(cfg: NRNNConfig, p: RecurrentParams, h, z, f, eta, sigma: noise.Noise | None = None):
    """G_k η for one η of shape (noise_dim,) without forming G_k (the same G_k as `perturbation_factor`)."""
    return schemes.of(cfg).perturbation_factor_mv(cfg, p, _sigma(cfg, sigma), h, z, f, eta)


def has_mean_shift(cfg: NRNNConfig) -> bool:
    """Whether the scheme's mean differs from the deterministic step at O(ε²): the Stratonovich
    Euler–Heun scheme of the SDE convention (docs/theory.md (3.5))."""
    return schemes.of(cfg).has_mean_shift


def stratonovich_shift(cfg: NRNNConfig, p: RecurrentParams, h: Float[Array, " d"], z: Float[Array, " n"],
                       dt, sigma: noise.Noise | None = None) -> Float[Array, " d"]:
    """dt · ½ Σ_j (∂σ_j/∂h) σ_j: the mean drift a Stratonovich scheme (Euler–Heun) adds (docs/theory.md (3.5));
    in closed form for the built-in diffusions, by autodiff for a user one. Zero for the Itô schemes
    (Euler–Maruyama, Milstein), whose extra terms have mean zero."""
    return schemes.SCHEMES["euler_heun"].mean_shift(cfg, p, _sigma(cfg, sigma), h, z, dt)
