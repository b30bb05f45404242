"""Solving the input-driven recurrence: a diffrax backend and a `lax.scan` fast path (math.md §1).

Both backends take the same pre-sampled standard normals ξ (T, noise_dim) and produce the same numbers:
the diffrax backend drives `diffrax.diffeqsolve` with fixed steps on the exact grid t_k = k δ, a Brownian
path made of the increments ΔW_k = √δ ξ_k, and a drift that reads the input of the step it is in (the
input is piecewise constant: x(t) = x_k on [kδ, (k+1)δ)). Every supported solver evaluates the drift at
the start of the step only, so the input a step sees is exact.

Pre-sampled increments rather than `diffrax.UnsafeBrownianPath` (not differentiable) or
`diffrax.VirtualBrownianTree` (slow, and not equal to a given ξ): see diffrax issues #517 and #490.
"""

from __future__ import annotations

from typing import Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from . import dynamics
from .config import NRNNConfig
from .dynamics import RecurrentParams

Save = Literal["final", "all"]


def brownian_increments(key: Array, shape: tuple[int, ...], dt: float, dtype=jnp.float32) -> Array:
    """Independent Brownian increments ΔW ~ N(0, δ I) of the given shape (time on the second-last axis)."""
    return jnp.sqrt(jnp.asarray(dt, dtype)) * jax.random.normal(key, shape, dtype)


def _grid_index(t, dt: float, n: int):
    """Index k of the step [kδ, (k+1)δ) that starts at time t (rounded: t is a grid point)."""
    return jnp.clip(jnp.round(t / dt).astype(jnp.int32), 0, n - 1)


class _OnGrid:
    """Shared by the grid paths: increments (T, m) on the grid t_k = k δ, k = 0..T."""

    increments: Float[Array, "T m"]
    dt: float

    @property
    def t0(self):
        return 0.0

    @property
    def t1(self):
        return self.dt * self.increments.shape[0]

    def _evaluate(self, t0, t1):
        n = self.increments.shape[0]
        if t1 is None:
            values = jnp.concatenate([jnp.zeros_like(self.increments[:1]), jnp.cumsum(self.increments, 0)])
            return values[jnp.clip(jnp.round(t0 / self.dt).astype(jnp.int32), 0, n)]
        return self.increments[_grid_index(t0, self.dt, n)]


class GridIncrementPath(_OnGrid, diffrax.AbstractPath):
    """A control path given by its increments on the fixed grid t_k = k δ, k = 0..T.

    `evaluate(t_k, t_{k+1})` returns `increments[k]`; `evaluate(t_k)` the cumulative sum up to t_k. Only
    whole grid steps may be requested, which is what a fixed-grid solve does.
    """

    increments: Float[Array, "T m"]
    dt: float = eqx.field(static=True)

    def evaluate(self, t0, t1=None, left: bool = True):
        return self._evaluate(t0, t1)


class GridBrownianPath(_OnGrid, diffrax.AbstractBrownianPath):
    """A Brownian path made of pre-sampled increments ΔW_k on the grid (differentiable, exact)."""

    increments: Float[Array, "T m"]
    dt: float = eqx.field(static=True)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        inc = self._evaluate(t0, t1)
        if use_levy and t1 is not None:
            return diffrax.BrownianIncrement(dt=t1 - t0, W=inc)
        return inc


def _sde_drift_vf(cfg: NRNNConfig):
    def vf(t, h, args):
        p, z = args
        return dynamics.drift(cfg, p, h, z[_grid_index(t, cfg.dt, z.shape[0])])

    return vf


def _reference_drift_vf(cfg: NRNNConfig):
    def vf(t, h, args):
        p, z = args
        return lx.DiagonalLinearOperator(dynamics.drift(cfg, p, h, z[_grid_index(t, 1.0, z.shape[0])]))

    return vf


_SDE_SOLVERS = {"euler": diffrax.Euler, "euler_heun": diffrax.EulerHeun, "milstein": diffrax.ItoMilstein}


def solve_diffrax(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "T d"], xi, h0, save: Save):
    T = z.shape[0]
    dtype = z.dtype
    if cfg.convention == "reference":
        grid_dt = 1.0
        d = h0.shape[0]
        if xi is None:
            clock = jnp.broadcast_to(p.step, (T, d))
        else:
            clock = p.step[None, :] * dynamics.reference_multiplier(cfg, xi[:, d:])
        terms = diffrax.ControlTerm(_reference_drift_vf(cfg), GridIncrementPath(clock, grid_dt))
        if xi is not None and cfg.eps_add > 0:
            additive = diffrax.ControlTerm(
                lambda t, h, args: lx.DiagonalLinearOperator(jnp.full_like(h, cfg.eps_add)),
                GridBrownianPath(xi[:, :d], grid_dt),
            )
            terms = diffrax.MultiTerm(terms, additive)
        solver = diffrax.Euler()
    else:
        grid_dt = cfg.dt
        terms = diffrax.ODETerm(_sde_drift_vf(cfg))
        solver = diffrax.Euler()
        if xi is not None and cfg.is_noisy:
            dw = jnp.sqrt(jnp.asarray(cfg.dt, dtype)) * xi
            noise_term = diffrax.ControlTerm(lambda t, h, args: dynamics.diffusion(cfg, h),
                                             GridBrownianPath(dw, grid_dt))
            terms = diffrax.MultiTerm(terms, noise_term)
            solver = _SDE_SOLVERS[cfg.solver]()
    ts = grid_dt * jnp.arange(T + 1, dtype=dtype)
    saveat = diffrax.SaveAt(t1=True) if save == "final" else diffrax.SaveAt(t0=True, steps=True)
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=h0,
        args=(p, z),
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts),
        adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=T),
        max_steps=T,
    )
    return sol.ys[-1] if save == "final" else sol.ys


def solve_scan(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "T d"], xi, h0, save: Save):
    if xi is None:
        noise = None
    elif cfg.convention == "sde":
        noise = jnp.sqrt(jnp.asarray(cfg.dt, z.dtype)) * xi
    else:
        noise = xi

    def body(h, inputs):
        z_k, n_k = inputs
        h_next = dynamics.step(cfg, p, h, z_k, n_k)
        return h_next, (h_next if save == "all" else None)

    h_final, hs = jax.lax.scan(body, h0, (z, noise))
    if save == "final":
        return h_final
    return jnp.concatenate([h0[None], hs], axis=0)


def solve(
    cfg: NRNNConfig,
    p: RecurrentParams,
    z: Float[Array, "T d"],
    xi: Float[Array, "T m"] | None = None,
    *,
    h0: Float[Array, " d"] | None = None,
    save: Save = "final",
) -> Array:
    """Run the recurrence for one example on the configured backend.

    **Arguments:**

    - `cfg`: the model configuration (convention, solver, backend, noise levels, δ).
    - `p`: the recurrent parameters.
    - `z`: the input drive U x_k + b for k = 0..T−1, shape (T, hidden).
    - `xi`: standard normals of shape (T, cfg.noise_dim), or None for the deterministic recursion.
    - `h0`: the initial state (default zeros).
    - `save`: `"final"` for h_T of shape (hidden,), `"all"` for (h_0, …, h_T) of shape (T + 1, hidden).

    **Returns:** the final state or the whole trajectory.
    """
    if h0 is None:
        h0 = jnp.zeros(z.shape[-1], z.dtype)
    backend = solve_diffrax if cfg.backend == "diffrax" else solve_scan
    return backend(cfg, p, z, xi, h0, save)
