"""Brownian increments: the statistics, with tolerances derived from the sample size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nrnn_jax import GridBrownianPath, GridIncrementPath, brownian_increments


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dt", [0.01, 0.3])
def test_increment_mean_and_variance(dt):
    n_paths, n_steps = 4000, 50
    dw = np.asarray(brownian_increments(jax.random.PRNGKey(0), (n_paths, n_steps), dt, jnp.float64))
    n = dw.shape[0]
    mean = dw.mean(axis=0)
    var = dw.var(axis=0, ddof=1)
    # per-step: mean ~ N(0, dt/n); sample variance ~ dt (1 + N(0, 2/(n-1))); 5 standard errors, over 50 steps
    assert np.all(np.abs(mean) < 5 * np.sqrt(dt / n))
    assert np.all(np.abs(var - dt) < 5 * dt * np.sqrt(2 / (n - 1)))
    # pooled over all steps: a much tighter check
    assert abs(dw.mean()) < 4 * np.sqrt(dt / dw.size)
    assert abs(dw.var() - dt) < 4 * dt * np.sqrt(2 / dw.size)
    # independent steps: lag-1 correlation ~ N(0, 1/N)
    corr = np.mean(dw[:, 1:] * dw[:, :-1]) / dt
    assert abs(corr) < 4 / np.sqrt(dw[:, 1:].size)


def test_grid_path_returns_the_given_increments():
    inc = jnp.arange(12.0).reshape(6, 2)
    dt = 0.1
    path = GridBrownianPath(inc, dt)
    for k in range(6):
        t0, t1 = k * dt, (k + 1) * dt
        np.testing.assert_array_equal(path.evaluate(t0, t1), inc[k])
    np.testing.assert_allclose(path.evaluate(3 * dt), inc[:3].sum(0))
    assert path.t1 == pytest.approx(0.6)
    np.testing.assert_array_equal(GridIncrementPath(inc, 1.0).evaluate(5.0, 6.0), inc[5])


def test_batch_major_grid_path_reads_the_step_in_place():
    """A batch-major path (B, T, m) returns step k of every example, flattened to (B·m,): the same numbers as
    the time-major path of the transposed array; with `normals=True` it scales standard normals by √δ."""
    xi = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 2))
    dt = 0.25
    time_major = GridBrownianPath(jnp.swapaxes(xi, 0, 1).reshape(5, 6), dt)
    batch_major = GridBrownianPath(xi, dt, batch_major=True)
    scaled = GridBrownianPath(xi / jnp.sqrt(dt), dt, batch_major=True, normals=True)
    assert batch_major.t1 == pytest.approx(5 * dt)
    for k in range(5):
        t0, t1 = k * dt, (k + 1) * dt
        np.testing.assert_array_equal(batch_major.evaluate(t0, t1), xi[:, k].reshape(-1))
        np.testing.assert_array_equal(batch_major.evaluate(t0, t1), time_major.evaluate(t0, t1))
        np.testing.assert_allclose(scaled.evaluate(t0, t1), xi[:, k].reshape(-1), rtol=1e-6)
    for k in range(6):  # W(t_k), the cumulative sum, for k = 0 (zero) .. T
        np.testing.assert_allclose(batch_major.evaluate(k * dt), xi[:, :k].sum(1).reshape(-1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(scaled.evaluate(k * dt), xi[:, :k].sum(1).reshape(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(time_major.evaluate(k * dt), batch_major.evaluate(k * dt), rtol=1e-6, atol=1e-7)
