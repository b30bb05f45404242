"""Solving the input-driven recurrence for a batch or one example (docs/theory.md §1–§2): the public entry
points `solve_batch` and `solve`.

They resolve the configuration's scheme, diffusion, loop and gradient (`nrnn_jax._registry`) and hand the
work to the gradient object (`nrnn_jax._gradients`), which runs the loop (`nrnn_jax._loops`): scan or diffrax,
differentiated by the discrete adjoint of `nrnn_jax.recurrence` (product cells) or by JAX. All of these give
the same numbers. The Brownian paths of the diffrax loop are `GridBrownianPath` and `GridIncrementPath`
(`nrnn_jax._brownian`, re-exported here with `brownian_increments`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _registry, cells
from ._brownian import GridBrownianPath, GridIncrementPath, brownian_increments
from ._loops import Save
from .config import NRNNConfig
from .schemes import RecurrentParams
from .validation import ArrayLike, check_choice, fail

__all__ = ["GridBrownianPath", "GridIncrementPath", "as_drift", "brownian_increments", "solve", "solve_batch"]


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
    (`cells.StateLayout`), the states are the flat states (B, s) and the noise width is `NoisyRNN.noise_dim`.
    `cell`: the drift, a `nrnn_jax.Cell` or its pure form `cells.Drift` (None: the Lipschitz drift of the
    matrices `p.A`, `p.W`). `encoder=(kernel (n, hidden), bias (hidden,))`: `z` holds the raw inputs x
    (B, T, n) instead, and the drive is x kernel + bias (what `NoisyRNN` passes); the discrete adjoint forms
    each step's drive inside the step.

    A product cell under `cfg.gradient="adjoint"` is differentiated by the discrete adjoint of
    `nrnn_jax.recurrence` whichever loop computed the forward states; any other cell, or `"autodiff"`, by JAX
    through the loop of `cfg.backend`.
    """
    if save not in ("final", "all"):
        check_choice("", "save", save, ("final", "all"))
    z = jnp.asarray(z)
    xi = None if xi is None else jnp.asarray(xi)
    drift = as_drift(cfg, p, cell)
    if encoder is not None:
        encoder = tuple(jnp.asarray(a) for a in encoder)
        kernel, bias = encoder
        if kernel.ndim != 2 or kernel.shape[0] != z.shape[-1] or bias.shape != kernel.shape[1:]:
            fail("", "encoder", f"(kernel {kernel.shape}, bias {bias.shape})",
                 f"expected a kernel (n, hidden) with n = {z.shape[-1]}, the last axis of the raw inputs, and a "
                 "bias (hidden,)")
    d = z.shape[-1] if encoder is None else encoder[0].shape[-1]
    if drift.layout is not None:
        d = drift.layout.size
    h0 = jnp.zeros((z.shape[0], d), z.dtype) if h0 is None else jnp.asarray(h0)
    scheme, sigma = _registry.scheme(cfg), _registry.diffusion(cfg, drift.layout)
    return _registry.gradient(cfg).solve(_registry.loop(cfg), cfg, p, scheme, sigma, drift, z, xi, h0, save, encoder)


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
        return cells.lipschitz_drift(cfg, p, "solve")
    return cells.pure(cell, layout=cells.state_layout(cell, cfg))
