"""The input drive z_k = x_k U + b of the recurrence, formed step by step inside the loops (docs/theory.md §1)."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array

from ._brownian import at as at_step


def encode(x, kernel, bias):
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
        return encode(self.x, self.kernel, self.bias)

    def at(self, k) -> Array:
        """z of step k, (B, d)."""
        return encode(at_step(self.x, k, 1), self.kernel, self.bias)


def drive_at(z, k):
    """The drive of step k for the batch, (B, d): read in place from z (B, T, d), or formed from `Encoded`."""
    return z.at(k) if isinstance(z, Encoded) else at_step(z, k, 1)


