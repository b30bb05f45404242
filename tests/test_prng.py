"""`nrnn_jax.prng.normal`: `jax.random.normal`'s numbers bit for bit (the fused threefry path), and the
fall-back everywhere else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nrnn_jax import prng


def _bits(a):
    return np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 9, 6), (2, 3, 5, 7), (128, 33, 2)])
def test_fused_normal_equals_jax_random_normal_bit_for_bit(shape):
    for seed in (0, 1, 2**31 + 5):
        key = jax.random.key(seed)
        assert prng.fused(key, shape, jnp.float32)
        for k in (key, jax.random.split(key)[1], jax.random.fold_in(key, 17)):
            np.testing.assert_array_equal(_bits(prng.normal(k, shape)), _bits(jax.random.normal(k, shape)))
            jitted = jax.jit(lambda k: prng.normal(k, shape))(k)  # and compiled (XLA fuses it)
            np.testing.assert_array_equal(_bits(jitted), _bits(jax.random.normal(k, shape)))


def test_fused_normal_under_vmap_and_from_key_data():
    """Batched keys (a sweep's members, vmapped) and keys rebuilt from their data, as the train step does."""
    keys = jax.random.split(jax.random.key(3), 4)
    got = jax.jit(jax.vmap(lambda k: prng.normal(k, (5, 6))))(keys)
    want = jax.vmap(lambda k: jax.random.normal(k, (5, 6)))(keys)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    data = jax.random.key_data(jax.random.key(11))
    k = jax.random.wrap_key_data(data, impl="threefry2x32")
    np.testing.assert_array_equal(_bits(prng.normal(k, (8, 3))), _bits(jax.random.normal(k, (8, 3))))


def test_other_keys_and_dtypes_fall_back_to_jax_random_normal():
    philox = jax.random.key(0, impl="philox4x32")
    assert not prng.fused(philox, (4, 5), jnp.float32)
    np.testing.assert_array_equal(prng.normal(philox, (4, 5)), jax.random.normal(philox, (4, 5)))
    raw = jax.random.PRNGKey(0)  # a raw uint32 key: not a typed key, left to jax.random
    assert not prng.fused(raw, (4, 5), jnp.float32)
    np.testing.assert_array_equal(prng.normal(raw, (4, 5)), jax.random.normal(raw, (4, 5)))
    key = jax.random.key(0)
    assert not prng.fused(key, (0, 3), jnp.float32)
    assert prng.normal(key, (0, 3)).shape == (0, 3)
    assert not prng.fused(jax.random.split(key, 2), (3,), jnp.float32)  # an array of keys


@pytest.mark.usefixtures("x64")
def test_float64_falls_back_to_jax_random_normal():
    key = jax.random.key(0)
    assert not prng.fused(key, (4, 5), jnp.float64)
    np.testing.assert_array_equal(prng.normal(key, (4, 5), jnp.float64), jax.random.normal(key, (4, 5), jnp.float64))


def test_threefry2x32_known_answer():
    """The Random123 known-answer vectors for threefry2x32 with 20 rounds (also JAX's own test)."""
    u = np.uint32
    got = prng.threefry2x32(u(0x13198A2E), u(0x03707344), jnp.array([u(0x243F6A88)]), jnp.array([u(0x85A308D3)]))
    np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got]), np.array([0xC4923A9C, 0x483DF7A0], u))
    got = prng.threefry2x32(u(0), u(0), jnp.array([u(0)]), jnp.array([u(0)]))
    np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got]), np.array([0x6B200159, 0x99BA4EFE], u))


@pytest.mark.usefixtures("x64")
def test_float32_draw_under_x64_is_still_fused_and_equal():
    key = jax.random.key(5)
    assert prng.fused(key, (6, 7), jnp.float32)
    got = prng.normal(key, (6, 7), jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(_bits(got), _bits(jax.random.normal(key, (6, 7), jnp.float32)))


def test_non_partitionable_threefry_falls_back():
    key = jax.random.key(5)
    with jax.threefry_partitionable(False):
        assert not prng.fused(key, (6, 7), jnp.float32)
        np.testing.assert_array_equal(prng.normal(key, (6, 7)), jax.random.normal(key, (6, 7)))


@pytest.mark.parametrize("impl", ["threefry2x32", "philox4x32"])
def test_rows_draw_the_block_of_the_whole_draw(impl):
    """A `Rows` key draws rows start … start + b − 1 of the whole (total, ...) draw, bit for bit, with the
    start traced (as a data-parallel step's device index makes it): on the fused path by offsetting the
    counters, for other key implementations by slicing the whole draw."""
    key = jax.random.key(11, impl=impl)
    whole = prng.normal(key, (12, 5, 3))
    block = jax.jit(lambda start: prng.normal(prng.Rows(key, start, 12), (4, 5, 3)))
    for start in (0, 4, 8):
        np.testing.assert_array_equal(_bits(block(start)), _bits(whole[start:start + 4]))
    assert prng.fused(key, (12, 5, 3), jnp.float32) == (impl == "threefry2x32")
    with pytest.raises(ValueError, match=r"shape=\(13, 5, 3\) is invalid for Rows\(total=12\)"):
        prng.normal(prng.Rows(key, 0, 12), (13, 5, 3))


def test_rows_of_rademacher_probes():
    from nrnn_jax.regularizer import draw_probes

    key = jax.random.key(2)
    whole = draw_probes(key, (6, 4, 2), "rademacher", jnp.float32)
    np.testing.assert_array_equal(draw_probes(prng.Rows(key, 3, 6), (3, 4, 2), "rademacher", jnp.float32), whole[3:])
    gauss = draw_probes(key, (6, 4, 2), "gaussian", jnp.float32)
    np.testing.assert_array_equal(draw_probes(prng.Rows(key, 2, 6), (2, 4, 2), "gaussian", jnp.float32), gauss[2:4])
