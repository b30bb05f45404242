"""Solving the input-driven recurrence: a diffrax backend and a `lax.scan` fast path (docs/theory.md §1–§2).

Both backends take the same pre-sampled standard normals ξ (T, noise_dim) and produce the same numbers:
the diffrax backend steps a diffrax solver (terms, solver, paths) on the exact grid t_k = k δ, by a `lax.scan`
of `solver.step` (default) or by `diffrax.diffeqsolve` (`NRNNConfig.diffrax_loop`), with a Brownian
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

from . import cells, dynamics, prng, recurrence, schemes
from . import noise as noise_lib
from .config import NRNNConfig
from ._types import ArrayLike
from .dynamics import RecurrentParams
from .validation import check_choice, fail

Save = Literal["final", "all"]


def brownian_increments(key: Array, shape: tuple[int, ...], dt: float, dtype=jnp.float32) -> Array:
    """Independent Brownian increments ΔW ~ N(0, δ I) of the given shape (time on the second-last axis).

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `shape`: e.g. (T, noise_dim) for one example or (B, T, noise_dim) for a batch.
    - `dt`: the step δ.
    - `dtype`: the floating dtype of the result.

    **Returns:** √δ times standard normals (`nrnn_jax.prng.normal`, the numbers of `jax.random.normal`).
    """
    return jnp.sqrt(jnp.asarray(dt, dtype)) * prng.normal(key, shape, dtype)


def _grid_index(t, dt: float, n: int):
    """Index k of the step [kδ, (k+1)δ) that starts at time t (rounded: t is a grid point)."""
    return jnp.clip(jnp.round(t / dt).astype(jnp.int32), 0, n - 1)


def _at(a, k, time_axis: int):
    """Step k of `a` along its time axis (read in place: a dynamic slice, no transposed copy)."""
    return jax.lax.dynamic_index_in_dim(a, k, axis=time_axis, keepdims=False)


def _encode(x, kernel, bias):
    """x kernel + bias along the last axis of x, whatever its leading axes: the encoder's affine map."""
    return x @ kernel + bias.reshape((1,) * (x.ndim - 1) + (-1,))


class Encoded(eqx.Module):
    """The input drive z = x kernel + bias kept as the raw inputs x (B, T, n) and the affine encoder, so that
    the drive of step k is formed inside the step: no (B, T, d) array of drives, and in the discrete adjoint
    no (T, B, d) array of their cotangents (∂L/∂kernel and ∂L/∂bias accumulate in the reverse loop instead).
    `solve_batch(..., encoder=)` builds it on its fast path."""

    x: Array  # (B, T, n)
    kernel: Array  # (n, d)
    bias: Array  # (d,)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.x.shape[:2] + (self.kernel.shape[1],)

    @property
    def dtype(self):
        return self.x.dtype

    def drive(self) -> Array:
        """z for all steps, (B, T, d)."""
        return _encode(self.x, self.kernel, self.bias)

    def at(self, k) -> Array:
        """z of step k, (B, d)."""
        return _encode(_at(self.x, k, 1), self.kernel, self.bias)


def _drive_at(z, k):
    """The drive of step k for the batch, (B, d): read in place from z (B, T, d), or formed from `Encoded`."""
    return z.at(k) if isinstance(z, Encoded) else _at(z, k, 1)


class _OnGrid:
    """Shared by the grid paths: increments on the grid t_k = k δ, k = 0..T, time-major (T, m) or
    batch-major (B, T, m)."""

    increments: Array
    dt: float
    batch_major: bool
    normals: bool

    @property
    def _time_axis(self) -> int:
        return 1 if self.batch_major else 0

    @property
    def t0(self):
        return 0.0

    @property
    def t1(self):
        return self.dt * self.increments.shape[self._time_axis]

    def _flat(self, a):
        return a.reshape(-1) if self.batch_major and self.flat else a

    def _scaled(self, a):
        """The increments of the stored values: ΔW = √δ ξ for standard normals (formed where they are read, as
        the scan backend's step does), the values themselves otherwise."""
        return jnp.sqrt(jnp.asarray(self.dt, a.dtype)) * a if self.normals else a

    def _evaluate(self, t0, t1):
        axis = self._time_axis
        n = self.increments.shape[axis]
        if t1 is None:  # W(t_k): the sum of the first k increments, k = 0..n
            k = _grid_index(t0, self.dt, n + 1)
            first_k = (jnp.arange(n) < k).reshape((n,) + (1,) * (self.increments.ndim - axis - 1))
            return self._flat(jnp.sum(jnp.where(first_k, self._scaled(self.increments), 0), axis))
        return self._flat(self._scaled(_at(self.increments, _grid_index(t0, self.dt, n), axis)))


class GridIncrementPath(_OnGrid, diffrax.AbstractPath):
    """A control path given by its increments on the fixed grid t_k = k δ, k = 0..T.

    `evaluate(t_k, t_{k+1})` returns `increments[k]`; `evaluate(t_k)` the cumulative sum up to t_k. Only
    whole grid steps may be requested, which is what a fixed-grid solve does. With `batch_major=True` the
    increments are (B, T, m), read in place, and a step's increments come as (B, m), or flattened to (B·m,)
    with `flat=True` (for a flat batch state).
    """

    increments: Float[Array, "T m"] | Float[Array, "B T m"]
    dt: float = eqx.field(static=True)
    batch_major: bool = eqx.field(static=True, default=False)
    normals: bool = eqx.field(static=True, default=False)
    flat: bool = eqx.field(static=True, default=True)

    def evaluate(self, t0, t1=None, left: bool = True):
        return self._evaluate(t0, t1)


class GridBrownianPath(_OnGrid, diffrax.AbstractBrownianPath):
    """A Brownian path made of pre-sampled increments ΔW_k on the grid (differentiable, exact); time-major
    (T, m), or batch-major (B, T, m) with `batch_major=True` (a step's increments then (B, m), or flattened
    to (B·m,) with `flat=True`). With `normals=True` the array holds standard normals ξ_k and the path returns
    ΔW_k = √δ ξ_k, formed at the step it is asked for (no scaled copy of the whole array)."""

    increments: Float[Array, "T m"] | Float[Array, "B T m"]
    dt: float = eqx.field(static=True)
    batch_major: bool = eqx.field(static=True, default=False)
    normals: bool = eqx.field(static=True, default=False)
    flat: bool = eqx.field(static=True, default=True)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        inc = self._evaluate(t0, t1)
        if use_levy and t1 is not None:
            return diffrax.BrownianIncrement(dt=t1 - t0, W=inc)
        return inc


class _WithProducts(eqx.Module):
    """The solve's `args` with the products P = M h of the state a step starts from (`_CarryProducts`)."""

    args: tuple
    products: Array


def _unpack(y, args):
    """The state h, the args (params, z, p), and the products M h when the solve carries them (None
    otherwise): y is h, or the carried (h, P) itself when diffrax checks the terms against the solve's y0."""
    args, prods = (args.args, args.products) if isinstance(args, _WithProducts) else (args, None)
    if isinstance(y, tuple):
        y, prods = y
    return y, args, prods


class _CarryProducts(diffrax.AbstractWrappedSolver):
    """Wraps a diffrax solver of the batch state h so that the solve carries the products P = M h beside it:
    the solve's state is (h, P), the wrapped solver steps h with P handed to the drift (which then does not
    multiply again), and the new products M h_{k+1} are formed once, after the step. Valid for solvers that
    evaluate the drift at the start of the step only (every solver this module uses: Euler, EulerHeun,
    ItoMilstein).

    The discrete adjoint of `nrnn_jax.recurrence` needs the states and products of every step; without the
    products it would form them again after the loop (6.6 GFLOP at the paper shape). Stepped on the grid by a
    `lax.scan` (`_step_on_grid`), the scan stacks them. Under `diffrax.diffeqsolve` (`steps` = T) the solver
    keeps both histories itself: its state holds (T + 1)-row arrays of h and P, step k writes row k + 1 in
    place, and `SaveAt(t1=True, solver_state=True)` returns them. `SaveAt(steps=True)` would store the same
    rows through a predicated write that reads each row back first (it must keep the row of a rejected
    step): two more reads, a reduction and two more writes per step, which at these sizes cost about as much
    as the step itself, each one a kernel launch on a GPU (H100: the step 1.49x scan's with them, 1.22x
    without)."""

    solver: diffrax.AbstractSolver
    batch: int = eqx.field(static=True)
    steps: int | None = eqx.field(static=True, default=None)

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return diffrax.LocalLinearInterpolation

    def products(self, h, M):
        """P = M h for every example of the batch state ((B, d), or flat (d,) for one example), as one matrix
        product; (B, p) or (p,)."""
        return (h.reshape(self.batch, -1) @ M.T).reshape(h.shape[:-1] + (-1,))

    def init(self, terms, t0, t1, y0, args):
        inner = self.solver.init(terms, t0, t1, y0[0], _WithProducts(args, y0[1]))
        if self.steps is None:
            return inner
        history = tuple(jnp.zeros((self.steps + 1,) + y.shape, y.dtype).at[0].set(y) for y in y0)
        return inner, jnp.zeros((), jnp.int32), history

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner = solver_state if self.steps is None else solver_state[0]
        h1, _, _, inner, result = self.solver.step(terms, t0, t1, y0[0], _WithProducts(args, y0[1]), inner,
                                                   made_jump)
        y1 = (h1, self.products(h1, args[0]))  # args = (M, z, p)
        if self.steps is None:
            return y1, None, dict(y0=y0, y1=y1), inner, result
        _, k, history = solver_state
        history = tuple(jax.lax.dynamic_update_index_in_dim(a, y, k + 1, 0) for a, y in zip(history, y1))
        return y1, None, dict(y0=y0, y1=y1), (inner, k + 1, history), result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0[0], _WithProducts(args, y0[1]))


def _step_on_grid(terms, solver, grid_dt: float, num_steps: int, y0, args, save_all: bool, emit=lambda y: y):
    """diffrax's manual stepping (`solver.init`, then `solver.step` from t_k to t_{k+1}, the documented way to
    use a diffrax solver without `diffeqsolve`) as a `lax.scan` over the grid t_k = k δ: the same steps as
    `diffeqsolve` with `StepTo` on that grid takes, without its loop's bookkeeping (time clipping, step-size
    control, counters, predicated saves), which on a GPU costs a kernel launch per item and step. Returns
    (`emit` of the state entering every step, stacked (T, ...), or None without `save_all`; the final state),
    as `lax.scan` stacks them: no copy to prepend y0."""
    dtype = jax.tree.leaves(y0)[0].dtype
    state = solver.init(terms, jnp.zeros((), dtype), jnp.asarray(grid_dt, dtype), y0, args)

    def body(carry, k):
        y, state = carry
        t0, t1 = grid_dt * k.astype(dtype), grid_dt * (k + 1).astype(dtype)  # as ts = δ · arange(T + 1)
        y1, _, _, state, _ = solver.step(terms, t0, t1, y, args, state, made_jump=False)
        return (y1, state), (emit(y) if save_all else None)

    (final, _), entering = jax.lax.scan(body, (y0, state), jnp.arange(num_steps))
    return entering, final


def batch_drift(drift: cells.Drift, params, h: Float[Array, "B s"], z: Float[Array, "B d"]) -> Float[Array, "B s"]:
    """The cell's drift for a batch: a product cell's products M h as one matrix product, then g per example;
    any other cell vmapped."""
    if drift.has_products:
        return jax.vmap(drift.from_products)(h, h @ params.T, z)
    return jax.vmap(lambda h_i, z_i: drift.fn(params, h_i, z_i))(h, z)


def _drift_vf(drift: cells.Drift, batch: int, grid_dt: float, as_operator: bool):
    """The drift on the batch state y (B, d) (or flat (d,) for one example), reading the input of the step
    t is in (z batch-major (B, T, d), read in place), and the products M h from the args when the solve
    carries them (`_CarryProducts`)."""

    def vf(t, y, args):
        carried = isinstance(y, tuple)  # diffrax checking the terms against the carried (h, P)
        y, (params, z, p), prods = _unpack(y, args)
        h = y.reshape(batch, -1)
        z_k = _drive_at(z, _grid_index(t, grid_dt, z.shape[1]))
        if prods is None:
            f = batch_drift(drift, params, h, z_k)
        else:
            f = jax.vmap(drift.from_products)(h, prods.reshape(batch, -1), z_k)
        f = f.reshape(y.shape)
        if as_operator:
            return lx.DiagonalLinearOperator(f)
        # on the carried state: P has no drift of its own (`_CarryProducts` sets it after each step)
        return (f, jnp.zeros_like(prods)) if carried else f

    return vf


def _diffusion_vf(cfg: NRNNConfig, sigma: noise_lib.Noise, batch: int, grid_dt: float):
    """σ(h, z) on the flat state as a lineax operator from the flat noise (B·noise_dim,) to (B·d,), reading
    the input of the step t is in: one example, or a batch of an elementwise diffusion (diagonal, each entry
    depending on its own coordinate and not on the input: it acts on vec(h) entry by entry)."""
    if not sigma.elementwise and batch != 1:  # e.g. [ε_add I | ε_mult h] is (d, d + 1) for ONE example
        raise ValueError("this diffusion couples the components of one example: solve one example at a time.")

    def vf(t, y, args):
        y, (_, z, p), _ = _unpack(y, args)
        levels = dynamics.noise_levels(cfg, p)
        if sigma.elementwise:  # the built-in diagonal noise: σ of the batch state, entry by entry
            return lx.DiagonalLinearOperator(sigma.diagonal(levels, y, None))
        return sigma.operator(levels, y, _at(z[0], _grid_index(t, grid_dt, z.shape[1]), 0))

    return vf


def solve_diffrax(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "B T d"] | Encoded, xi,
                  h0: Float[Array, "B s"],
                  save: Save, drift: cells.Drift, for_adjoint: bool = False):
    """The whole batch as ONE diffrax solve on the batch state (B, d) (a batched loop, no vmap; a diffusion
    that couples the components of one example is solved example by example on vec(h)): diffrax terms and
    solver, stepped on the grid by `cfg.diffrax_loop`, "steps" (a `lax.scan` of `solver.step`,
    `_step_on_grid`) or "diffeqsolve" (`diffrax.diffeqsolve` with `StepTo` on the grid). Both take the same
    steps. Batch-major inputs, read in place: z (B, T, d), xi (B, T, noise_dim) or None;
    `drift` the cell's pure form (`cells.pure`), its arrays passed to the solve as `args`; h0 (B, s) the flat
    states (s = d unless the cell's state is a pytree, `drift.layout`). Returns (B, s)
    or, with `save="all"`, time-major (T + 1, B, s).

    `for_adjoint=True` (a product cell whose gradient is the discrete adjoint): nothing differentiates the
    solve (under diffeqsolve it runs as a plain while loop, `diffrax.ForwardMode`); it carries the products
    P = M h with the state (`_CarryProducts`) and returns (states, final state, products) in the per-example
    layout of `nrnn_jax.recurrence`: the state entering every step and its products, (T, B, 1, d) and
    (T, B, 1, p) when stepped (T + 1 rows under diffeqsolve, which saves the final state too), and the final
    state (B, 1, d)."""
    B, T, d = z.shape
    n = h0.shape[-1]  # the flat state's size
    scheme, sigma = schemes.of(cfg), noise_lib.of(cfg, drift.layout)
    # A diffusion coupling the components of one example (e.g. one multiplicative Brownian motion per example):
    # the state is vec(h) of one example and σ a matrix. Over the batch it would be (B d) x (B m), so the
    # examples are solved one by one (vmapped).
    coupled = xi is not None and scheme.is_sde and not sigma.elementwise and cfg.is_noisy
    if coupled and isinstance(z, Encoded):  # solved on vec(h) with σ reading z: the drives up front
        z = z.drive()
    if B > 1 and coupled:
        one = lambda z_i, xi_i, h0_i: solve_diffrax(cfg, p, z_i[None], xi_i[None], h0_i[None], save, drift,
                                                    for_adjoint)
        if for_adjoint:
            hs, final, prods = jax.vmap(one, out_axes=(1, 0, 1))(z, xi, h0)
            return hs[:, :, 0], final[:, 0], prods[:, :, 0]
        out = jax.vmap(one, out_axes=0 if save == "final" else 1)(z, xi, h0)
        return out[:, 0] if save == "final" else out[:, :, 0]
    if not scheme.is_sde:  # the public code's rule: a control term driven by the per-step clock s ⊙ u
        grid_dt = 1.0
        if xi is None:
            clock = jnp.broadcast_to(p.step_size, (B, T, d))
        else:
            clock = p.step_size[None, None, :] * scheme.multiplier(cfg, p, xi[..., d:])
        terms = diffrax.ControlTerm(_drift_vf(drift, B, grid_dt, True),
                                    GridIncrementPath(clock, grid_dt, True, flat=False))
        if xi is not None and cfg.has_additive_noise:
            eps_add = dynamics.noise_levels(cfg, p)[0]
            sigma_add = lambda t, y, args: lx.DiagonalLinearOperator(jnp.full_like(_unpack(y, args)[0], eps_add))
            additive = diffrax.ControlTerm(sigma_add, GridBrownianPath(xi[..., :d], grid_dt, True, flat=False))
            terms = diffrax.MultiTerm(terms, additive)
        solver = scheme.diffrax_solver()
    else:
        grid_dt = cfg.dt
        terms = diffrax.ODETerm(_drift_vf(drift, B, grid_dt, False))
        solver = diffrax.Euler()
        if xi is not None and cfg.is_noisy:
            # ΔW_k = √δ ξ_k (dynamics.increments) formed at each step
            dw = GridBrownianPath(xi, grid_dt, True, True, flat=coupled)
            terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(_diffusion_vf(cfg, sigma, B, grid_dt), dw))
            solver = scheme.diffrax_solver()
    y0 = h0.reshape(-1) if coupled else h0  # (B, d): the update vectorises along d (flat: 2-3x slower on CPU)
    args = (drift.params, z, p)
    stepped = cfg.diffrax_loop == "steps"
    if for_adjoint:
        # under diffeqsolve the histories of h and P are kept in the solver's state (`_CarryProducts`)
        solver = _CarryProducts(solver, B, None if stepped else T)
        y0 = (y0, solver.products(y0, drift.params))
        save = "all"
    if stepped:
        # for the adjoint, each step's (h, P) is stacked in the recurrence's per-example layout (B, 1, ·) as
        # it is emitted: reshaped after the loop, XLA:CPU copied the whole (T, B, p) products to relayout them
        per_example = lambda y: jax.tree.map(lambda a: a.reshape(B, 1, -1), y)
        entering, final = _step_on_grid(terms, solver, grid_dt, T, y0, args, save == "all",
                                        per_example if for_adjoint else (lambda y: y))
        if for_adjoint:
            return entering[0], final[0].reshape(B, 1, n), entering[1]
        if save == "final":
            return final.reshape(B, n)
        return jnp.concatenate([entering, final[None]]).reshape(T + 1, B, n)
    if for_adjoint:
        saveat = diffrax.SaveAt(t1=True, solver_state=True)
    else:
        saveat = diffrax.SaveAt(t1=True) if save == "final" else diffrax.SaveAt(t0=True, steps=True)
    ts = grid_dt * jnp.arange(T + 1, dtype=z.dtype)
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts),
        # for_adjoint: the states feed the discrete adjoint, nothing differentiates the solve, so a plain
        # while loop (diffrax.ForwardMode) rather than the checkpointed one reverse mode would need
        adjoint=diffrax.ForwardMode() if for_adjoint else diffrax.RecursiveCheckpointAdjoint(checkpoints=T),
        max_steps=T,
        throw=False,
    )
    if for_adjoint:
        hs, prods = sol.solver_state[2]
        return hs.reshape(T + 1, B, 1, n), hs[-1].reshape(B, 1, n), prods.reshape(T + 1, B, 1, -1)
    return sol.ys[-1].reshape(B, n) if save == "final" else sol.ys.reshape(T + 1, B, n)


def solve_scan(cfg: NRNNConfig, p: RecurrentParams, z: Float[Array, "T d"], xi, h0, save: Save, drift: cells.Drift):
    """The plain per-example `lax.scan` of `dynamics.step` with the cell's drift (JAX differentiates it: the
    generic path, `gradient="autodiff"` or a cell that is not a product cell), on the flat state h0 (s,)."""
    sigma = noise_lib.of(cfg, drift.layout)

    def body(h, inputs):
        z_k, xi_k = inputs
        h_next = dynamics.step(cfg, p, h, z_k, drift(h, z_k), xi_k, sigma)
        return h_next, (h_next if save == "all" else None)

    h_final, hs = jax.lax.scan(body, h0, (z, xi))
    if save == "final":
        return h_final
    return jnp.concatenate([h0[None], hs], axis=0)


def _cell(cfg: NRNNConfig, from_products, encoded: bool):
    """One step of the configured scheme for `nrnn_jax.recurrence`, for a product cell with drift
    g(h, M h, z): the state is (1, hidden), the products M h, the inputs (z_k, ξ_k) with raw standard normals
    ξ_k (or None); the parameters are the `RecurrentParams` without matrices (step size, noise levels).
    `encoded`: the inputs are (x_k, ξ_k) and the parameters (`RecurrentParams`, kernel, bias), the drive
    z_k = x_k kernel + bias formed here."""

    def cell(s, prods, x_k, params):
        z_k, xi_k = x_k
        if encoded:
            params, kernel, bias = params
            z_k = _encode(z_k, kernel, bias)
        h = s[0]
        return dynamics.step(cfg, params, h, z_k, from_products(h, prods[0], z_k), xi_k)[None]

    return cell


def _diffrax_forward(cfg: NRNNConfig, drift: cells.Drift, encoded: bool):
    """The forward states and products of the adjoint recurrence computed by the diffrax solve (no
    autodiff through the solve: the recurrence's adjoint differentiates it)."""

    def forward(cell, M, params, state0, xs):
        z, xi = xs
        if encoded:
            params, kernel, bias = params
            z = Encoded(z, kernel, bias)
        # (T or T + 1, B, 1, d), (B, 1, d), (T or T + 1, B, 1, p)
        return solve_diffrax(cfg, params, z, xi, state0[:, 0], "all", drift._replace(params=M), for_adjoint=True)

    return forward


def solve_batch(
    cfg: NRNNConfig,
    p: RecurrentParams,
    z: Float[ArrayLike, "B T _"],  # (B, T, d); with `encoder`, the raw inputs (B, T, n)
    xi: Float[ArrayLike, "B T m"] | None = None,
    *,
    h0: Float[ArrayLike, "B s"] | None = None,
    save: Save = "final",
    cell=None,
    encoder: tuple[ArrayLike, ArrayLike] | None = None,
) -> Array:
    """`solve` for a batch: z (B, T, hidden), xi (B, T, noise_dim) or None, h0 (B, hidden).

    Returns (B, hidden) or, with `save="all"`, (B, T + 1, hidden). For a cell whose state is a pytree
    (`cells.StateLayout`), the states are the flat states (B, s) and the noise width is `NoisyRNN.noise_dim`. `cell`: the drift, a `nrnn_jax.Cell` or
    its pure form `cells.Drift` (None: the Lipschitz drift of the matrices `p.A`, `p.W`). `encoder=(kernel
    (n, hidden), bias (hidden,))`: `z` holds the raw inputs x (B, T, n) instead, and the drive is
    x kernel + bias (what `NoisyRNN` passes); the fast path forms each step's drive inside the step.

    Fast path (a product cell under `cfg.gradient="adjoint"`): the backward pass is the discrete adjoint of
    `nrnn_jax.recurrence` whichever backend computed the forward states. Generic path (any other cell, or
    `"autodiff"`): JAX differentiates the backend's loop (the scan backend's `lax.scan`; the diffrax backend's
    `lax.scan` of its solver's step, or `diffeqsolve` with `RecursiveCheckpointAdjoint`, by `cfg.diffrax_loop`).
    """
    if save not in ("final", "all"):
        check_choice("", "save", save, ("final", "all"))
    z = jnp.asarray(z)
    xi = None if xi is None else jnp.asarray(xi)
    drift = as_drift(cfg, p, cell)
    fast = cfg.gradient != "autodiff" and drift.has_products
    if encoder is not None:
        encoder = tuple(jnp.asarray(a) for a in encoder)
        kernel, bias = encoder
        if kernel.ndim != 2 or kernel.shape[0] != z.shape[-1] or bias.shape != kernel.shape[1:]:
            fail("", "encoder", f"(kernel {kernel.shape}, bias {bias.shape})",
                 f"expected a kernel (n, hidden) with n = {z.shape[-1]}, the last axis of the raw inputs, and a "
                 "bias (hidden,)")
        if not fast:  # JAX differentiates the backend's loop on the drives
            z, encoder = _encode(z, kernel, bias), None
    d = z.shape[-1] if encoder is None else encoder[0].shape[-1]
    if drift.layout is not None:
        d = drift.layout.size
    h0 = jnp.zeros((z.shape[0], d), z.dtype) if h0 is None else jnp.asarray(h0)
    if not fast and cfg.backend == "scan":
        one = lambda z_i, xi_i, h0_i: solve_scan(cfg, p, z_i, xi_i, h0_i, save, drift)
        return jax.vmap(one, in_axes=(0, None if xi is None else 0, 0))(z, xi, h0)
    if not fast:  # JAX differentiates the diffrax loop
        out = solve_diffrax(cfg, p, z, xi, h0, save, drift)
        return out if save == "final" else jnp.swapaxes(out, 0, 1)
    encoded = encoder is not None
    forward = _diffrax_forward(cfg, drift, encoded) if cfg.backend == "diffrax" else recurrence.scan_forward
    params = dynamics.matrix_free(cfg, p, z.dtype)
    out = recurrence.recurrence(_cell(cfg, drift.from_products, encoded), drift.params,
                                (params, *encoder) if encoded else params, h0[:, None, :], (z, xi),
                                forward=forward, save=save)
    return out[:, 0] if save == "final" else jnp.swapaxes(out[:, :, 0], 0, 1)


def solve(
    cfg: NRNNConfig,
    p: RecurrentParams,
    z: Float[ArrayLike, "T d"],
    xi: Float[ArrayLike, "T m"] | None = None,
    *,
    h0: Float[ArrayLike, " s"] | None = None,
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
    return solve_batch(cfg, p, z[None], None if xi is None else xi[None], h0=None if h0 is None else h0[None],
                       save=save, cell=cell)[0]


def as_drift(cfg: NRNNConfig, p: RecurrentParams, cell=None) -> cells.Drift:
    """The pure drift the solvers run: that of `cell` (a `Cell` or a `cells.Drift`), or with `cell=None` the
    Lipschitz drift of the matrices in `p`."""
    if isinstance(cell, cells.Drift):
        return cell
    if cell is None:
        return cells.pure(cells.MatrixLipschitz.of(cfg, p, "solve"))
    return cells.pure(cell, layout=cells.state_layout(cell, cfg))
