"""Brownian paths on the step grid t_k = k δ made of pre-sampled increments, for the diffrax loop
(docs/theory.md (2.3)).

Pre-sampled increments rather than `diffrax.UnsafeBrownianPath` (not differentiable) or
`diffrax.VirtualBrownianTree` (slow, and not equal to a given ξ): see diffrax issues #517 and #490.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import prng


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


def grid_index(t, dt: float, n: int):
    """Index k of the step [kδ, (k+1)δ) that starts at time t (rounded: t is a grid point)."""
    return jnp.clip(jnp.round(t / dt).astype(jnp.int32), 0, n - 1)


def at(a, k, time_axis: int):
    """Step k of `a` along its time axis (read in place: a dynamic slice, no transposed copy)."""
    return jax.lax.dynamic_index_in_dim(a, k, axis=time_axis, keepdims=False)


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
            k = grid_index(t0, self.dt, n + 1)
            first_k = (jnp.arange(n) < k).reshape((n,) + (1,) * (self.increments.ndim - axis - 1))
            return self._flat(jnp.sum(jnp.where(first_k, self._scaled(self.increments), 0), axis))
        return self._flat(self._scaled(at(self.increments, grid_index(t0, self.dt, n), axis)))


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


