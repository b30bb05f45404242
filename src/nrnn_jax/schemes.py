"""Discretisations: one class per scheme, the way diffrax has one class per solver (docs/theory.md §2–§3).

A scheme turns the drift f = f(h, z_k) of the model's cell, the diffusion (`nrnn_jax.noise`) and the
standard normals ξ_k of a step into the next state, and supplies the pieces of the small-noise expansion
of that step (docs/theory.md §3): the deterministic map it is expanded around, the perturbation factor G_k
(C_k = G_k G_kᵀ) and the O(ε²) mean shift.

- `EulerMaruyama` (Itô, (2.4)): h + δ f + σ ΔW.
- `EulerHeun` (Stratonovich, (2.5)): h' = h + σ(h) ΔW; h + δ f + ½ (σ(h) + σ(h')) ΔW.
- `Milstein` (Itô, commutative noise, (2.7)–(2.8)): Euler–Maruyama + ½ Σ_{i,j} (L^i σ_j)(ΔW_i ΔW_j − δ_ij δ).
- `PublicCodeRule` (the public code's rule, (2.9)–(2.10)): h + (s ⊙ u) ⊙ f + ε_add ξ, u ~ U[1 − ε_mult, 1]^d,
  with a learnable per-unit step s; not the discretisation of an SDE.

A scheme is passed to the model as an object, `NoisyRNN(cfg, rngs=rngs, scheme=EulerHeun())`, which the
model records in its configuration (`NRNNConfig.solver`, `NRNNConfig.convention`);
`nrnn_jax._registry.scheme(cfg)` builds the scheme a configuration describes. Each method acts on ONE
example: a state `h` (d,), the step's input drive `z` and the drift `f = f(h, z)` of the model's cell at
`h`; `RecurrentParams` holds the step size s and the (possibly traced) noise levels.
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from .noise import Noise


class RecurrentParams(NamedTuple):
    """Parameters of the recurrent core a scheme reads beside the cell.

    - `A`, `W`: (hidden, hidden) matrices of the Lipschitz drift (docs/theory.md (1.4)), for
      `solvers.solve(cfg, RecurrentParams(A, W), ...)` without a cell; None when the model's cell gives the drift.
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


def noise_levels(cfg, p):
    """(ε_add, ε_mult): the parameters' values when set (e.g. traced in a sweep), else the configuration's."""
    return (cfg.eps_add if p.eps_add is None else p.eps_add, cfg.eps_mult if p.eps_mult is None else p.eps_mult)


class Choice:
    """A stateless choice of numerics (a scheme, a loop, a gradient): every instance of a class is the same
    choice, so it is equal to and hashed as any other (a static argument of `jax.jit`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class Scheme(Choice):
    """Base class of discretisations (the extension point for a new scheme). `step(cfg, p, noise, h, z, f,
    xi)`: one step driven by the standard normals `xi` of shape (noise_dim,) (None: noise off, the test-time
    step), with `cfg` the model's `NRNNConfig` (δ and the default noise levels), `p` its `RecurrentParams`
    and `noise` its diffusion (`nrnn_jax.noise`).

    - `is_sde`: a discretisation of dh = f dt + σ dB (certificates and exponents apply);
    - `expands_around_test_path`: whether the map F_k of the small-noise expansion is the test-time step;
    - `has_mean_shift`: whether the scheme's mean exceeds F_k at O(ε²) (`mean_shift`).
    """

    name: str = ""
    is_sde: bool = True
    expands_around_test_path: bool = True
    has_mean_shift: bool = False

    def noise_dim(self, cfg, noise: Noise, size: int) -> int:
        """The width of one step's standard normals for a noise on `size` coordinates of the state."""
        return noise.noise_dim(size)

    def step(self, cfg, p, noise: Noise, h, z, f, xi):
        raise NotImplementedError

    def mean_step_size(self, cfg, p):
        """c in F_k(h) = h + c f(h, x_k)."""
        return cfg.dt

    def perturbation_factor(self, cfg, p, noise: Noise, h, z, f) -> lx.AbstractLinearOperator:
        """G_k(h): √δ σ(h, z) for the SDE schemes."""
        sqrt_dt = jnp.sqrt(jnp.asarray(cfg.dt, h.dtype))
        op = noise.operator(noise_levels(cfg, p), h, z)
        if isinstance(op, lx.DiagonalLinearOperator):
            return lx.DiagonalLinearOperator(sqrt_dt * op.diagonal)
        return lx.MatrixLinearOperator(sqrt_dt * op.as_matrix())

    def perturbation_factor_mv(self, cfg, p, noise: Noise, h, z, f, eta):
        return jnp.sqrt(jnp.asarray(cfg.dt, h.dtype)) * noise.mv(noise_levels(cfg, p), h, z, eta)

    def mean_shift(self, cfg, p, noise: Noise, h, z, dt):
        """The O(ε²) mean the scheme adds beyond F_k over a time `dt` (zero for Itô schemes)."""
        return jnp.zeros_like(h)

    def diffrax_solver(self):
        raise NotImplementedError


class _SDEScheme(Scheme):
    def update(self, cfg, p, noise, h, z, f, dw):
        raise NotImplementedError

    def step(self, cfg, p, noise, h, z, f, xi):
        if xi is None or not cfg.is_noisy:
            return h + cfg.dt * f
        return self.update(cfg, p, noise, h, z, f, jnp.sqrt(jnp.asarray(cfg.dt, xi.dtype)) * xi)


class EulerMaruyama(_SDEScheme):
    """Itô Euler–Maruyama: h + δ f + σ(h) ΔW (docs/theory.md (2.4))."""

    name = "euler"

    def update(self, cfg, p, noise, h, z, f, dw):
        return h + cfg.dt * f + noise.mv(noise_levels(cfg, p), h, z, dw)

    def diffrax_solver(self):
        return diffrax.Euler()


class EulerHeun(_SDEScheme):
    """Stratonovich Euler–Heun (docs/theory.md (2.5)); its mean exceeds the Euler step by
    δ · ½ Σ_j (∂σ_j) σ_j (docs/theory.md (3.5))."""

    name = "euler_heun"
    has_mean_shift = True

    def update(self, cfg, p, noise, h, z, f, dw):
        levels = noise_levels(cfg, p)
        first = noise.mv(levels, h, z, dw)
        return h + cfg.dt * f + 0.5 * (first + noise.mv(levels, h + first, z, dw))

    def mean_shift(self, cfg, p, noise, h, z, dt):
        return 0.5 * dt * noise.column_derivative_sum(noise_levels(cfg, p), h, z)

    def diffrax_solver(self):
        return diffrax.EulerHeun()


class Milstein(_SDEScheme):
    """Itô Milstein for commutative noise (docs/theory.md (2.7)–(2.8)); the terms in closed form for the
    built-in diffusions, by autodiff for a user one (diffrax's `ItoMilstein` computes them by autodiff too)."""

    name = "milstein"

    def update(self, cfg, p, noise, h, z, f, dw):
        levels = noise_levels(cfg, p)
        return h + cfg.dt * f + noise.mv(levels, h, z, dw) + noise.milstein_correction(levels, h, z, dw, cfg.dt)

    def diffrax_solver(self):
        return diffrax.ItoMilstein()


class PublicCodeRule(Scheme):
    """The public code's update h + (s ⊙ u) ⊙ f + ε_add ξ_add, u = 1 − ε_mult + ε_mult Φ(ζ) ~ U[1 − ε_mult, 1]
    (docs/theory.md (2.9)–(2.10)); ξ = (ξ_add, ζ) of shape (2 d,). The expansion is around the mean step
    h + s (1 − ε_mult/2) ⊙ f (E u = 1 − ε_mult/2), which is not the test-time step h + s ⊙ f."""

    name = "reference"
    is_sde = False
    expands_around_test_path = False

    def noise_dim(self, cfg, noise, size):
        return 2 * size

    @staticmethod
    def multiplier(cfg, p, zeta):
        """u ~ U[1 − ε_mult, 1] from a standard normal ζ via the normal CDF (docs/theory.md (2.10))."""
        eps_mult = noise_levels(cfg, p)[1]
        return 1.0 - eps_mult + eps_mult * jax.scipy.stats.norm.cdf(zeta)

    def step(self, cfg, p, noise, h, z, f, xi):
        if xi is None:
            return h + p.step_size * f
        d = h.shape[0]
        return h + p.step_size * self.multiplier(cfg, p, xi[d:]) * f + noise_levels(cfg, p)[0] * xi[:d]

    def mean_step_size(self, cfg, p):
        return p.step_size * (1.0 - 0.5 * noise_levels(cfg, p)[1])

    def perturbation_factor(self, cfg, p, noise, h, z, f):
        """[diag(s ⊙ f) ε_mult/√12 | ε_add I] (u − E u has variance ε_mult²/12)."""
        eps_add, eps_mult = noise_levels(cfg, p)
        a = p.step_size * f * (eps_mult / jnp.sqrt(12.0))
        eye = eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
        return lx.MatrixLinearOperator(jnp.concatenate([jnp.diag(a), eye], axis=1))

    def perturbation_factor_mv(self, cfg, p, noise, h, z, f, eta):
        eps_add, eps_mult = noise_levels(cfg, p)
        d = h.shape[0]
        return p.step_size * f * (eps_mult / jnp.sqrt(12.0)) * eta[:d] + eps_add * eta[d:]

    def diffrax_solver(self):
        return diffrax.Euler()
