"""Standard normals from a threefry2x32 key: `jax.random.normal`'s numbers, bit for bit, drawn faster on CPU.

Drawing the injected noise is a large part of a train step on CPU (12.8 M normals per step at the pixel-MNIST
shape). On CPU, JAX lowers the threefry2x32 hash as a rolled five-iteration loop (to keep compile times
short), each iteration a separate pass over the whole count array. `normal` writes the same hash unrolled
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011: 20 rounds, a key injection every 4)
in plain `jax.numpy`, so that XLA fuses the hash, the bits-to-uniform map and the inverse error function into
one elementwise pass. It follows `jax.random.normal` step for step (partitionable threefry bits over the
linear index, 23 mantissa bits to a uniform on (−1, 1), √2 erf⁻¹), so the numbers are identical; the tests
compare them bit for bit. Keys of another implementation, other dtypes, or JAX's non-partitionable threefry
mode fall back to `jax.random.normal` itself.

`Rows(key, start, total)` draws a block of rows of a larger draw: `normal(Rows(key, start, total), (b, ...))`
is rows start … start + b − 1 of `normal(key, (total, ...))`, bit for bit. A data-parallel train step draws
each device's share of the batch's noise this way (`nrnn_jax.step`): the same numbers as on one device,
each drawn once. On the fused path it only offsets the counters; otherwise (`full_rows`) it draws the whole
array and slices it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from typing import Any, Callable, NamedTuple

from jax import lax
from jaxtyping import Array, Float

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """The threefry2x32 hash of the counter pairs (x1, x2) under the key (k1, k2), all uint32, unrolled:
    five groups of four rounds, the key schedule (k1, k2, k1 ^ k2 ^ 0x1BD11BDA) injected after each group."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def fused(key, shape: tuple[int, ...], dtype) -> bool:
    """Whether `normal` computes the numbers itself (else it calls `jax.random.normal`)."""
    return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
            and str(jax.random.key_impl(key)) == "threefry2x32"
            and jax.config.jax_threefry_partitionable
            and jnp.dtype(dtype) == jnp.float32
            and 0 < math.prod(shape) < 2**32)


class Rows(NamedTuple):
    """A key that draws rows `start`, `start + 1`, … of a draw whose leading axis has `total` rows: a draw
    of shape (b, ...) from it is that block of the (total, ...) draw from `key`. `start` may be traced."""

    key: Any
    start: Any
    total: int


def full_rows(key, shape: tuple[int, ...], draw: Callable[[Any, tuple[int, ...]], Array]) -> Array:
    """`draw(key, shape)`, where `key` may be a `Rows`: then the whole (total, ...) draw is made and the
    block sliced out of it (for draws `normal` does not compute itself)."""
    if not isinstance(key, Rows):
        return draw(key, shape)
    full = draw(key.key, (key.total,) + tuple(shape[1:]))
    return lax.dynamic_slice_in_dim(full, jnp.asarray(key.start, np.int32), int(shape[0]), 0)


def normal(key, shape: tuple[int, ...], dtype=jnp.float32) -> Float[Array, "..."]:
    """`jax.random.normal(key, shape, dtype)`: the same numbers, in one fused pass for a float32 draw from a
    typed threefry2x32 key (`jax.random.key`, or `wrap_key_data(..., impl="threefry2x32")`). With a `Rows`
    key: the block of rows of the larger draw it names."""
    shape = tuple(int(s) for s in shape)
    rows = key if isinstance(key, Rows) else None
    if rows is not None:
        if not shape or not 0 < shape[0] <= rows.total:
            raise ValueError(f"prng.normal: shape={shape} is invalid for Rows(total={rows.total}): expected a leading "
                             f"axis of 1 to {rows.total} rows.")
        key = rows.key
    full = shape if rows is None else (rows.total,) + shape[1:]
    if not fused(key, full, dtype):
        return full_rows(rows or key, shape, lambda k, s: jax.random.normal(k, s, dtype))
    k = jax.random.key_data(key)
    # jax.random's partitionable bits: the hash of the 64-bit linear index (high word, low word); the two
    # output words XOR-ed into one 32-bit word. Below 2**32 elements the high word is 0. A block of rows
    # is a contiguous range of linear indices: its counters are offset by start × (elements per row).
    count = lax.iota(np.uint32, math.prod(shape)).reshape(shape)
    if rows is not None:
        count = count + jnp.asarray(rows.start, np.uint32) * np.uint32(math.prod(shape[1:]))
    b1, b2 = threefry2x32(k[..., 0], k[..., 1], jnp.zeros(shape, np.uint32), count)
    bits = b1 ^ b2
    # jax.random.uniform on [nextafter(−1, 0), 1): 23 mantissa bits under the exponent of 1.0, minus 1
    one = np.array(1.0, np.float32)
    floats = lax.bitcast_convert_type((bits >> np.uint32(9)) | one.view(np.uint32), jnp.float32) - one
    lo = jnp.asarray(np.nextafter(np.float32(-1.0), np.float32(0.0)), jnp.float32)
    hi = jnp.asarray(one)
    u = lax.max(lo, floats * (hi - lo) + lo)
    return lax.mul(np.array(np.sqrt(2), np.float32), lax.erf_inv(u))
