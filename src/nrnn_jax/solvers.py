"""Solving the input-driven recurrence: a diffrax backend and a `lax.scan` fast path (docs/theory.md §1–§2).

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

from . import cells, dynamics, recurrence, schemes
from . import noise as noise_lib
from .config import NRNNConfig
from ._types import ArrayLike
from .dynamics import RecurrentParams
from .validation import check_choice

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


def batch_drift(drift: cells.Drift, params, h: Float[Array, "B d"], z: Float[Array, "B d"]) -> Float[Array, "B d"]:
    """The cell's drift for a batch: a product cell's products M h as one matrix product, then g per example;
    any other cell vmapped."""
    if drift.has_products:
        return jax.vmap(drift.from_products)(h, h @ params.T, z)
    return jax.vmap(lambda h_i, z_i: drift.fn(params, h_i, z_i))(h, z)


def _drift_vf(drift: cells.Drift, batch: int, grid_dt: float, as_operator: bool):
    """The drift on the flat state y = vec(h) of shape (B·d,), reading the input of the step t is in."""

    def vf(t, y, args):
        params, z, p = args  # z time-major (T, B, d)
        h = y.reshape(batch, -1)
        f = batch_drift(drift, params, h, z[_grid_index(t, grid_dt, z.shape[0])])
        return lx.DiagonalLinearOperator(f.reshape(-1)) if as_operator else f.reshape(-1)

    return vf


def _diffusion_vf(cfg: NRNNConfig, sigma: noise_lib.Noise, batch: int, grid_dt: float):
    """σ(h, z) on the flat state as a lineax operator from the flat noise (B·noise_dim,) to (B·d,), reading
    the input of the step t is in: one example, or a batch of an elementwise diffusion (diagonal, each entry
    depending on its own coordinate and not on the input: it acts on vec(h) entry by entry)."""
    if not sigma.elementwise and batch != 1:  # e.g. [ε_add I | ε_mult h] is (d, d + 1) for ONE example
        raise ValueError("this diffusion couples the components of one example: solve one example at a time.")

    def vf(t, y, args):
        _, z, p = args
        levels = dynamics.noise_levels(cfg, p)
        if batch != 1:  # elementwise (the built-in diagonal noise): σ of the flat state, entry by entry
            return lx.DiagonalLinearOperator(sigma.diagonal(levels, y, None))
        return sigma.operator(levels, y, z[_grid_index(t, grid_dt, z.shape[0])][0])

    return vf


def solve_diffrax(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "T B d"], xi, h0: Float[Array, "B d"],
                  save: Save, drift: cells.Drift, forward_only: bool = False) -> Array:
    """The whole batch as ONE `diffrax.diffeqsolve` on the flat state vec(h) of shape (B·d,) (a batched
    while loop, no vmap). Time-major: z (T, B, d), xi (T, B, noise_dim) or None; `drift` the cell's pure
    form (`cells.pure`), its arrays passed to the solve as `args`; returns (B, d) or, with `save="all"`,
    (T + 1, B, d)."""
    T, B, d = z.shape
    scheme, sigma = schemes.of(cfg), noise_lib.of(cfg)
    if B > 1 and xi is not None and scheme.is_sde and not sigma.elementwise and cfg.is_noisy:
        # A diffusion coupling the components of one example (e.g. one multiplicative Brownian motion per
        # example): a dense σ over the flat batch would be (B d) x (B m), so the examples are solved one by one
        # (vmapped).
        one = lambda z_i, xi_i, h0_i: solve_diffrax(cfg, p, z_i[:, None], xi_i[:, None], h0_i[None], save, drift,
                                                    forward_only)
        out = jax.vmap(one, in_axes=(1, 1, 0), out_axes=0 if save == "final" else 1)(z, xi, h0)
        return out[:, 0] if save == "final" else out[:, :, 0]
    dtype = z.dtype
    flat = lambda a: a.reshape(a.shape[0], -1)
    if not scheme.is_sde:  # the public code's rule: a control term driven by the per-step clock s ⊙ u
        grid_dt = 1.0
        if xi is None:
            clock = jnp.broadcast_to(p.step_size, (T, B, d))
        else:
            clock = p.step_size[None, None, :] * scheme.multiplier(cfg, p, xi[..., d:])
        terms = diffrax.ControlTerm(_drift_vf(drift, B, grid_dt, True), GridIncrementPath(flat(clock), grid_dt))
        if xi is not None and cfg.has_additive_noise:
            eps_add = dynamics.noise_levels(cfg, p)[0]
            additive = diffrax.ControlTerm(lambda t, y, args: lx.DiagonalLinearOperator(jnp.full_like(y, eps_add)),
                                           GridBrownianPath(flat(xi[..., :d]), grid_dt))
            terms = diffrax.MultiTerm(terms, additive)
        solver = scheme.diffrax_solver()
    else:
        grid_dt = cfg.dt
        terms = diffrax.ODETerm(_drift_vf(drift, B, grid_dt, False))
        solver = diffrax.Euler()
        if xi is not None and cfg.is_noisy:
            dw = dynamics.increments(cfg, xi)
            terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(_diffusion_vf(cfg, sigma, B, grid_dt),
                                                                 GridBrownianPath(flat(dw), grid_dt)))
            solver = scheme.diffrax_solver()
    ts = grid_dt * jnp.arange(T + 1, dtype=dtype)
    saveat = diffrax.SaveAt(t1=True) if save == "final" else diffrax.SaveAt(t0=True, steps=True)
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=h0.reshape(-1),
        args=(drift.params, z, p),
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts),
        # forward_only: the states feed the discrete adjoint, nothing differentiates the solve, so a plain
        # while loop (diffrax.ForwardMode) rather than the checkpointed one reverse mode would need
        adjoint=diffrax.ForwardMode() if forward_only else diffrax.RecursiveCheckpointAdjoint(checkpoints=T),
        max_steps=T,
        throw=False,
    )
    return sol.ys[-1].reshape(B, d) if save == "final" else sol.ys.reshape(T + 1, B, d)


def solve_scan(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "T d"], xi, h0, save: Save, drift: cells.Drift):
    """The plain per-example `lax.scan` of `dynamics.step` with the cell's drift (JAX differentiates it: the
    generic path, `gradient="autodiff"` or a cell that is not a product cell)."""

    def body(h, inputs):
        z_k, xi_k = inputs
        h_next = dynamics.step(cfg, p, h, z_k, drift(h, z_k), xi_k)
        return h_next, (h_next if save == "all" else None)

    h_final, hs = jax.lax.scan(body, h0, (z, xi))
    if save == "final":
        return h_final
    return jnp.concatenate([h0[None], hs], axis=0)


def _cell(cfg: NRNNConfig, from_products):
    """One step of the configured scheme for `nrnn_jax.recurrence`, for a product cell with drift
    g(h, M h, z): the state is (1, hidden), the products M h, the inputs (z_k, ξ_k) with raw standard normals
    ξ_k (or None); the parameters are the `RecurrentParams` without matrices (step size, noise levels)."""

    def cell(s, prods, x_k, params):
        z_k, xi_k = x_k
        h = s[0]
        return dynamics.step(cfg, params, h, z_k, from_products(h, prods[0], z_k), xi_k)[None]

    return cell


def _diffrax_forward(cfg: NRNNConfig, drift: cells.Drift):
    """The forward states of the adjoint recurrence computed by `diffrax.diffeqsolve` (no autodiff through
    the solve: the recurrence's adjoint differentiates it)."""

    def forward(cell, M, params, state0, xs):
        z, xi = (None if a is None else jnp.swapaxes(a, 0, 1) for a in xs)  # time-major for the solve
        hs = solve_diffrax(cfg, params, z, xi, state0[:, 0], "all", drift._replace(params=M),
                           forward_only=True)[:, :, None, :]
        return hs[:-1], hs[-1], None  # (T, B, 1, d), (B, 1, d)

    return forward


def solve_batch(
    cfg: NRNNConfig,
    p: RecurrentParams,
    z: Float[ArrayLike, "B T d"],
    xi: Float[ArrayLike, "B T m"] | None = None,
    *,
    h0: Float[ArrayLike, "B d"] | None = None,
    save: Save = "final",
    cell=None,
) -> Array:
    """`solve` for a batch: z (B, T, hidden), xi (B, T, noise_dim) or None, h0 (B, hidden).

    Returns (B, hidden) or, with `save="all"`, (B, T + 1, hidden). `cell`: the drift, a `nrnn_jax.Cell` or
    its pure form `cells.Drift` (None: the Lipschitz drift of the matrices `p.A`, `p.W`).

    Fast path (a product cell under `cfg.gradient="adjoint"`): the backward pass is the discrete adjoint of
    `nrnn_jax.recurrence` whichever backend computed the forward states. Generic path (any other cell, or
    `"autodiff"`): JAX differentiates the backend's loop (`lax.scan`, or `diffeqsolve` with
    `RecursiveCheckpointAdjoint`).
    """
    if save not in ("final", "all"):
        check_choice("", "save", save, ("final", "all"))
    if h0 is None:
        h0 = jnp.zeros((z.shape[0], z.shape[-1]), z.dtype)
    drift = as_drift(cfg, p, cell)
    if (cfg.gradient == "autodiff" or not drift.has_products) and cfg.backend == "scan":
        one = lambda z_i, xi_i, h0_i: solve_scan(cfg, p, z_i, xi_i, h0_i, save, drift)
        return jax.vmap(one, in_axes=(0, None if xi is None else 0, 0))(z, xi, h0)
    if cfg.gradient == "autodiff" or not drift.has_products:  # diffrax's RecursiveCheckpointAdjoint
        out = solve_diffrax(cfg, p, jnp.swapaxes(z, 0, 1), None if xi is None else jnp.swapaxes(xi, 0, 1), h0, save,
                            drift)
        return out if save == "final" else jnp.swapaxes(out, 0, 1)
    forward = _diffrax_forward(cfg, drift) if cfg.backend == "diffrax" else recurrence.scan_forward
    out = recurrence.recurrence(_cell(cfg, drift.from_products), drift.params, dynamics.matrix_free(cfg, p, z.dtype),
                                h0[:, None, :], (z, xi), forward=forward, save=save)
    return out[:, 0] if save == "final" else jnp.swapaxes(out[:, :, 0], 0, 1)


def solve(
    cfg: NRNNConfig,
    p: RecurrentParams,
    z: Float[ArrayLike, "T d"],
    xi: Float[ArrayLike, "T m"] | None = None,
    *,
    h0: Float[ArrayLike, " d"] | None = None,
    save: Save = "final",
    cell=None,
) -> Array:
    """Run the recurrence for one example on the configured backend.

    **Arguments:**

    - `cfg`: the model configuration (convention, solver, backend, gradient, noise levels, δ).
    - `p`: the recurrent parameters.
    - `z`: the input drive U x_k + b for k = 0..T−1, shape (T, hidden).
    - `xi`: standard normals of shape (T, cfg.noise_dim), or None for the deterministic recursion.
    - `h0`: the initial state (default zeros).
    - `save`: `"final"` for h_T of shape (hidden,), `"all"` for (h_0, …, h_T) of shape (T + 1, hidden).
    - `cell`: the drift (a `nrnn_jax.Cell`); None: the Lipschitz drift of `p.A`, `p.W`.

    **Returns:** the final state or the whole trajectory. `solve_batch` runs a batch.
    """
    if h0 is None:
        h0 = jnp.zeros(z.shape[-1], z.dtype)
    return solve_batch(cfg, p, z[None], None if xi is None else xi[None], h0=h0[None], save=save, cell=cell)[0]


def as_drift(cfg: NRNNConfig, p: RecurrentParams, cell=None) -> cells.Drift:
    """The pure drift the solvers run: that of `cell` (a `Cell` or a `cells.Drift`), or with `cell=None` the
    Lipschitz drift of the matrices in `p`."""
    if isinstance(cell, cells.Drift):
        return cell
    return cells.pure(cells.MatrixLipschitz.of(cfg, p, "solve") if cell is None else cell)
