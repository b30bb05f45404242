"""The loops that step the recurrence through time: `ScanLoop` (a `lax.scan` of the scheme's own step, one
example at a time) and `DiffraxLoop` (a diffrax solver stepped on the grid, the batch as one state). Both
take the same pre-sampled standard normals ξ (T, noise_dim) per example and give the same numbers
(docs/theory.md §1–§2); `NRNNConfig.backend` names one (`nrnn_jax._registry.loop`).

One interface: `loop.solve(...)` runs the loop for JAX to differentiate (`nrnn_jax._gradients.Autodiff`);
`loop.forward(...)` gives the forward states and products the discrete adjoint of `nrnn_jax.recurrence`
runs backwards (`nrnn_jax._gradients.DiscreteAdjoint`).

The diffrax loop: diffrax terms and solver on the exact grid t_k = k δ, stepped by a `lax.scan` of
`solver.step` (diffrax's manual stepping), with a Brownian path made of the increments ΔW_k = √δ ξ_k
(`nrnn_jax._brownian`) and a drift that reads the input of the step it is in (the input is piecewise
constant: x(t) = x_k on [kδ, (k+1)δ)). Every supported solver evaluates the drift at the start of the step
only, so the input a step sees is exact.
"""

from __future__ import annotations

from typing import Literal

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from . import cells, recurrence
from ._brownian import GridBrownianPath, GridIncrementPath, at, grid_index
from ._carry import CarryProducts, unpack
from ._drive import Encoded, drive_at
from .config import NRNNConfig
from .noise import Noise
from .schemes import Choice, RecurrentParams, Scheme, noise_levels

Save = Literal["final", "all"]


class Loop(Choice):
    """How the recurrence is stepped through time (base class)."""

    def solve(self, cfg: NRNNConfig, p: RecurrentParams, scheme: Scheme, sigma: Noise, drift: cells.Drift,
              z: Float[Array, "B T d"], xi, h0: Float[Array, "B s"], save: Save) -> Array:
        """The batch's final states (B, s), or with `save="all"` (B, T + 1, s), differentiable by JAX."""
        raise NotImplementedError

    def forward(self, cfg: NRNNConfig, scheme: Scheme, sigma: Noise, drift: cells.Drift,
                encoded: bool) -> recurrence.Forward:
        """The forward pass of `recurrence.recurrence` (states entering each step, final state, products)."""
        raise NotImplementedError


class ScanLoop(Loop):
    """The plain per-example `lax.scan` of the scheme's step with the cell's drift, on the flat state, vmapped
    over the batch; for the discrete adjoint, `recurrence.scan_forward`."""

    def solve(self, cfg, p, scheme, sigma, drift, z, xi, h0, save):
        one = lambda z_i, xi_i, h0_i: _scan_one(cfg, p, scheme, sigma, drift, z_i, xi_i, h0_i, save)
        return jax.vmap(one, in_axes=(0, None if xi is None else 0, 0))(z, xi, h0)

    def forward(self, cfg, scheme, sigma, drift, encoded):
        return recurrence.scan_forward


def _scan_one(cfg, p, scheme: Scheme, sigma: Noise, drift, z: Float[Array, "T d"], xi, h0, save: Save):
    def body(h, inputs):
        z_k, xi_k = inputs
        h_next = scheme.step(cfg, p, sigma, h, z_k, drift(h, z_k), xi_k)
        return h_next, (h_next if save == "all" else None)

    h_final, hs = jax.lax.scan(body, h0, (z, xi))
    if save == "final":
        return h_final
    return jnp.concatenate([h0[None], hs], axis=0)


class DiffraxLoop(Loop):
    """The whole batch as ONE diffrax solve on the batch state (B, d) (a batched loop, no vmap; a diffusion
    that couples the components of one example is solved example by example on vec(h)), stepped on the grid
    by a `lax.scan` of `solver.step`. For the discrete adjoint, the solve carries the products P = M h with
    the state (`nrnn_jax._carry.CarryProducts`) and nothing differentiates it."""

    def solve(self, cfg, p, scheme, sigma, drift, z, xi, h0, save):
        out = _solve_diffrax(cfg, p, scheme, sigma, z, xi, h0, save, drift, carry=False)
        return out if save == "final" else jnp.swapaxes(out, 0, 1)

    def forward(self, cfg, scheme, sigma, drift, encoded):
        def forward(cell, M, params, state0, xs):
            z, xi = xs
            if encoded:
                params, kernel, bias = params
                z = Encoded(z, kernel, bias)
            # (T, B, 1, d), (B, 1, d), (T, B, 1, p)
            return _solve_diffrax(cfg, params, scheme, sigma, z, xi, state0[:, 0], "all", drift._replace(params=M),
                                  carry=True)

        return forward


def _step_on_grid(terms, solver, grid_dt: float, num_steps: int, y0, args, save_all: bool, emit=lambda y: y):
    """diffrax's manual stepping (`solver.init`, then `solver.step` from t_k to t_{k+1}, the documented way to
    use a diffrax solver without `diffeqsolve`) as a `lax.scan` over the grid t_k = k δ: the steps
    `diffeqsolve` with `StepTo` on that grid takes, without its loop's bookkeeping (time clipping, step-size
    control, counters, predicated saves). Returns (`emit` of the state entering every step, stacked (T, ...),
    or None without `save_all`; the final state), as `lax.scan` stacks them: no copy to prepend y0."""
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
    carries them (`CarryProducts`)."""

    def vf(t, y, args):
        carried = isinstance(y, tuple)  # diffrax checking the terms against the carried (h, P)
        y, (params, z, p), prods = unpack(y, args)
        h = y.reshape(batch, -1)
        z_k = drive_at(z, grid_index(t, grid_dt, z.shape[1]))
        if prods is None:
            f = batch_drift(drift, params, h, z_k)
        else:
            f = jax.vmap(drift.from_products)(h, prods.reshape(batch, -1), z_k)
        f = f.reshape(y.shape)
        if as_operator:
            return lx.DiagonalLinearOperator(f)
        # on the carried state: P has no drift of its own (`CarryProducts` sets it after each step)
        return (f, jnp.zeros_like(prods)) if carried else f

    return vf


def _diffusion_vf(cfg: NRNNConfig, sigma: Noise, batch: int, grid_dt: float):
    """σ(h, z) on the flat state as a lineax operator from the flat noise (B·noise_dim,) to (B·d,), reading
    the input of the step t is in: one example, or a batch of an elementwise diffusion (diagonal, each entry
    depending on its own coordinate and not on the input: it acts on vec(h) entry by entry)."""
    if not sigma.elementwise and batch != 1:  # e.g. [ε_add I | ε_mult h] is (d, d + 1) for ONE example
        raise ValueError("this diffusion couples the components of one example: solve one example at a time.")

    def vf(t, y, args):
        y, (_, z, p), _ = unpack(y, args)
        levels = noise_levels(cfg, p)
        if sigma.elementwise:  # the built-in diagonal noise: σ of the batch state, entry by entry
            return lx.DiagonalLinearOperator(sigma.diagonal(levels, y, None))
        return sigma.operator(levels, y, at(z[0], grid_index(t, grid_dt, z.shape[1]), 0))

    return vf


def _terms(cfg: NRNNConfig, p, scheme: Scheme, sigma: Noise, drift, xi, B: int, T: int, d: int, coupled: bool):
    """The diffrax terms, solver and grid step of the configured scheme (docs/theory.md §2)."""
    if not scheme.is_sde:  # the public code's rule: a control term driven by the per-step clock s ⊙ u
        grid_dt = 1.0
        if xi is None:
            clock = jnp.broadcast_to(p.step_size, (B, T, d))
        else:
            clock = p.step_size[None, None, :] * scheme.multiplier(cfg, p, xi[..., d:])
        terms = diffrax.ControlTerm(_drift_vf(drift, B, grid_dt, True),
                                    GridIncrementPath(clock, grid_dt, True, flat=False))
        if xi is not None and cfg.has_additive_noise:
            eps_add = noise_levels(cfg, p)[0]
            sigma_add = lambda t, y, args: lx.DiagonalLinearOperator(jnp.full_like(unpack(y, args)[0], eps_add))
            additive = diffrax.ControlTerm(sigma_add, GridBrownianPath(xi[..., :d], grid_dt, True, flat=False))
            terms = diffrax.MultiTerm(terms, additive)
        return terms, scheme.diffrax_solver(), grid_dt
    grid_dt = cfg.dt
    terms = diffrax.ODETerm(_drift_vf(drift, B, grid_dt, False))
    solver = diffrax.Euler()
    if xi is not None and cfg.is_noisy:
        # ΔW_k = √δ ξ_k formed at each step
        dw = GridBrownianPath(xi, grid_dt, True, True, flat=coupled)
        terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(_diffusion_vf(cfg, sigma, B, grid_dt), dw))
        solver = scheme.diffrax_solver()
    return terms, solver, grid_dt


def _solve_diffrax(cfg: NRNNConfig, p: RecurrentParams, scheme: Scheme, sigma: Noise,
                   z: Float[Array, "B T d"] | Encoded, xi, h0: Float[Array, "B s"], save: Save, drift: cells.Drift,
                   carry: bool):
    """The diffrax loop on batch-major inputs, read in place: z (B, T, d) (or `Encoded`), xi (B, T, noise_dim)
    or None; `drift` the cell's pure form, its arrays passed to the solve as `args`; h0 (B, s) the flat
    states. Returns (B, s) or, with `save="all"`, time-major (T + 1, B, s). With `carry=True` (the discrete
    adjoint's forward pass): (the state entering every step (T, B, 1, d), the final state (B, 1, d), the
    products (T, B, 1, p)) in the per-example layout of `nrnn_jax.recurrence`."""
    B, T, d = z.shape
    n = h0.shape[-1]  # the flat state's size
    # A diffusion coupling the components of one example (e.g. one multiplicative Brownian motion per example):
    # the state is vec(h) of one example and σ a matrix. Over the batch it would be (B d) x (B m), so the
    # examples are solved one by one (vmapped).
    coupled = xi is not None and scheme.is_sde and not sigma.elementwise and cfg.is_noisy
    if coupled and isinstance(z, Encoded):  # solved on vec(h) with σ reading z: the drives up front
        z = z.drive()
    if B > 1 and coupled:
        one = lambda z_i, xi_i, h0_i: _solve_diffrax(cfg, p, scheme, sigma, z_i[None], xi_i[None], h0_i[None], save,
                                                     drift, carry)
        if carry:
            hs, final, prods = jax.vmap(one, out_axes=(1, 0, 1))(z, xi, h0)
            return hs[:, :, 0], final[:, 0], prods[:, :, 0]
        out = jax.vmap(one, out_axes=0 if save == "final" else 1)(z, xi, h0)
        return out[:, 0] if save == "final" else out[:, :, 0]
    terms, solver, grid_dt = _terms(cfg, p, scheme, sigma, drift, xi, B, T, d, coupled)
    y0 = h0.reshape(-1) if coupled else h0  # (B, d): the update vectorises along d
    args = (drift.params, z, p)
    if carry:
        solver = CarryProducts(solver, B)
        y0 = (y0, solver.products(y0, drift.params))
        # each step's (h, P) is stacked in the recurrence's per-example layout (B, 1, ·) as it is emitted
        per_example = lambda y: jax.tree.map(lambda a: a.reshape(B, 1, -1), y)
        entering, final = _step_on_grid(terms, solver, grid_dt, T, y0, args, True, per_example)
        return entering[0], final[0].reshape(B, 1, n), entering[1]
    entering, final = _step_on_grid(terms, solver, grid_dt, T, y0, args, save == "all")
    if save == "final":
        return final.reshape(B, n)
    return jnp.concatenate([entering, final[None]]).reshape(T + 1, B, n)
