"""How the solve is differentiated: `DiscreteAdjoint` (the exact discrete adjoint of `nrnn_jax.recurrence`,
for a product cell) or `Autodiff` (JAX through the loop). The same gradients (tests check it; only the order
of floating-point sums differs); `NRNNConfig.gradient` names one (`nrnn_jax._registry.gradient`).

One interface: `gradient.solve(loop, cfg, p, scheme, sigma, drift, z, xi, h0, save, encoder)`.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import cells, recurrence
from ._drive import encode
from ._loops import Loop
from .schemes import Choice, RecurrentParams, Scheme, noise_levels


class Gradient(Choice):
    """How the solve is differentiated (base class)."""

    def uses_adjoint(self, drift: cells.Drift) -> bool:
        """Whether the drift runs through the discrete adjoint of `nrnn_jax.recurrence` (a product cell)."""
        return False

    def solve(self, loop: Loop, cfg, p: RecurrentParams, scheme: Scheme, sigma, drift: cells.Drift, z, xi, h0,
              save: str, encoder=None):
        """The batch's final states (B, s), or with `save="all"` (B, T + 1, s). `encoder` = (kernel, bias):
        `z` holds the raw inputs x (B, T, n) and the drive is x kernel + bias."""
        if encoder is not None:  # JAX differentiates the loop on the drives
            z = encode(z, *encoder)
        return loop.solve(cfg, p, scheme, sigma, drift, z, xi, h0, save)


class Autodiff(Gradient):
    """JAX differentiates the loop (forward and reverse mode; any cell)."""


class DiscreteAdjoint(Gradient):
    """The discrete adjoint of `nrnn_jax.recurrence` for a product cell f = g(h, M h, z), whichever loop
    computes the forward states: a reverse scan of the state cotangent, ∂L/∂M as one product after the loop
    (reverse mode only). Any other cell is differentiated by JAX through the loop."""

    def uses_adjoint(self, drift):
        return drift.has_products

    def solve(self, loop, cfg, p, scheme, sigma, drift, z, xi, h0, save, encoder=None):
        if not self.uses_adjoint(drift):
            return super().solve(loop, cfg, p, scheme, sigma, drift, z, xi, h0, save, encoder)
        encoded = encoder is not None
        params = matrix_free(cfg, p, z.dtype)
        # The SDE schemes step h + δ g + (noise not reading g): the backward pass reads only the product
        # columns g's derivatives read (the cell's kept_products); the reference rule's step reads all of g.
        kept = drift.kept_products if scheme.is_sde else None
        out = recurrence.recurrence(_cell(cfg, scheme, sigma, drift.from_products, encoded), drift.params,
                                    (params, *encoder) if encoded else params, h0[:, None, :], (z, xi),
                                    forward=loop.forward(cfg, scheme, sigma, drift, encoded), save=save, kept=kept)
        return out[:, 0] if save == "final" else jnp.swapaxes(out[:, :, 0], 0, 1)


def matrix_free(cfg, p: RecurrentParams, dtype) -> RecurrentParams:
    """`p` without the matrices and with the noise levels as arrays of `dtype`: the small parameters a
    recurrence cell receives beside the products M s."""
    eps_add, eps_mult = noise_levels(cfg, p)
    return p._replace(A=None, W=None, eps_add=jnp.asarray(eps_add, dtype), eps_mult=jnp.asarray(eps_mult, dtype))


def _cell(cfg, scheme: Scheme, sigma, from_products, encoded: bool):
    """One step of the scheme for `nrnn_jax.recurrence`, for a product cell with drift g(h, M h, z): the state
    is (1, hidden), the products M h, the inputs (z_k, ξ_k) with raw standard normals ξ_k (or None); the
    parameters are the `RecurrentParams` without matrices (step size, noise levels). `encoded`: the inputs
    are (x_k, ξ_k) and the parameters (`RecurrentParams`, kernel, bias), the drive z_k = x_k kernel + bias
    formed here."""

    def cell(s, prods, x_k, params):
        z_k, xi_k = x_k
        if encoded:
            params, kernel, bias = params
            z_k = encode(z_k, kernel, bias)
        h = s[0]
        return scheme.step(cfg, params, sigma, h, z_k, from_products(h, prods[0], z_k), xi_k)[None]

    return cell
