"""The discrete adjoint (`nrnn_jax.recurrence`) against JAX's own differentiation of the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nrnn_jax import NoisyRNN, NRNNConfig, explicit_regularizer
from nrnn_jax.recurrence import recurrence

SCHEMES = [
    dict(),
    dict(solver="euler_heun"),
    dict(solver="milstein"),
    dict(noise_kind="scalar", eps_add=0.0, solver="milstein"),
    dict(noise_kind="scalar"),
    dict(convention="reference"),
]


def _max_rel_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-300))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _model_grads(cfg):
    """Gradients of a loss of the logits AND the whole trajectory in the parameters, the inputs and the
    noise (so every cotangent of the adjoint is exercised)."""
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 7, cfg.input_dim), jnp.float64)
    xi = jax.random.normal(jax.random.PRNGKey(2), (4, 7, cfg.noise_dim), jnp.float64)

    def loss(params, x, xi):
        m = nnx.merge(graphdef, params)
        return jnp.sum(jnp.sin(m(x, noise=xi))) + jnp.sum(m.trajectory(x, noise=xi) ** 2) + jnp.sum(m(x) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, xi)


# diffeqsolve's forward saves T + 1 rows of states and products: the adjoint reuses the products' buffer
# for the cotangents and must zero the last row
CASES = ([("scan", kw) for kw in SCHEMES] + [("diffrax", kw) for kw in (SCHEMES[2], SCHEMES[5])]
         + [("diffrax", dict(diffrax_loop="diffeqsolve"))])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("backend,kw", CASES,
                         ids=[f"{b}-" + ("-".join(f"{k}={v}" for k, v in kw.items()) or "euler") for b, kw in CASES])
def test_adjoint_gradients_equal_autodiff(backend, kw):
    base = dict(input_dim=3, hidden=5, num_classes=3, dt=0.1, eps_add=0.2, eps_mult=0.3, dtype="float64",
                backend=backend) | kw
    v_auto, g_auto = _model_grads(NRNNConfig(**base, gradient="autodiff"))
    v_adj, g_adj = _model_grads(NRNNConfig(**base, gradient="adjoint"))
    np.testing.assert_allclose(v_adj, v_auto, rtol=1e-13)
    assert _max_rel_diff(g_auto, g_adj) < 1e-12


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kw", [dict(solver="euler_heun"), dict(noise_kind="scalar"), dict(convention="reference")])
def test_probe_regularizer_adjoint_equals_taylor_mode(kw):
    """The batched closed-form probe recursion equals the general Taylor-mode `probe_terms` (vmapped over
    examples) for the same probes: values, Q, R and gradients."""
    out = {}
    for gradient in ("autodiff", "adjoint"):
        cfg = NRNNConfig(input_dim=3, hidden=5, num_classes=3, dt=0.1, eps_add=0.2, eps_mult=0.3,
                         dtype="float64", backend="scan", gradient=gradient, **kw)
        graphdef, params = nnx.split(NoisyRNN(cfg, rngs=nnx.Rngs(0)))
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 3), jnp.float64)
        y = jnp.array([0, 1, 2, 1])

        def f(params, x):
            r = explicit_regularizer(nnx.merge(graphdef, params), x, y, method="probe", num_probes=3,
                                     key=jax.random.PRNGKey(5))
            return r.value, r

        out[gradient] = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
    (_, r_auto), g_auto = out["autodiff"]
    (_, r_adj), g_adj = out["adjoint"]
    for name in ("value", "Q", "R", "clean_loss", "per_example", "logits"):
        np.testing.assert_allclose(getattr(r_adj, name), getattr(r_auto, name), rtol=1e-12, atol=1e-15)
    assert _max_rel_diff(g_auto, g_adj) < 1e-12


def _rows_problem(seed: int, K: int, d: int, B: int = 3, p: int = 6, T: int = 9):
    """Random (M (p, d), θ (d,), s0 (B, K, d), xs (B, T, d)) in float64, and one more key."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    M = 0.3 * jax.random.normal(keys[0], (p, d), jnp.float64)
    theta = jax.random.normal(keys[1], (d,), jnp.float64)
    s0 = jax.random.normal(keys[2], (B, K, d), jnp.float64)
    xs = jax.random.normal(keys[3], (B, T, d), jnp.float64)
    return (M, theta, s0, xs), keys[4]


@pytest.mark.usefixtures("x64")
def test_recurrence_against_a_plain_scan_with_state_rows_and_params():
    """A generic cell with several state rows, shared parameters and `save="all"`: the adjoint's gradients
    in M, the parameters, the initial state and the inputs equal those of a plain differentiated scan, and
    its backward pass is differentiable again (Hessian-vector products by forward-over-reverse)."""
    d = 4
    (M, theta, s0, xs), v_key = _rows_problem(seed=0, K=2, d=d)

    def cell(s, prods, x, th):
        mix = jnp.tanh(prods[:, :d] + x[None]) * th[None] + jnp.sin(prods[:, d:d + 2]).sum(-1, keepdims=True)
        return s + 0.1 * mix[::-1] * s[:1]

    def plain(M, th, s0, xs):
        def body(s, x):
            s = jax.vmap(cell, (0, 0, 0, None))(s, s @ M.T, x, th)
            return s, s
        _, ss = jax.lax.scan(body, s0, jnp.swapaxes(xs, 0, 1))
        return jnp.concatenate([s0[None], ss])

    loss_plain = lambda *a: jnp.sum(jnp.cos(plain(*a)))
    loss_adj = lambda *a: jnp.sum(jnp.cos(recurrence(cell, a[0], a[1], a[2], a[3], save="all")))
    args = (M, theta, s0, xs)
    np.testing.assert_allclose(loss_adj(*args), loss_plain(*args), rtol=1e-14)
    g_plain = jax.grad(loss_plain, argnums=(0, 1, 2, 3))(*args)
    g_adj = jax.grad(loss_adj, argnums=(0, 1, 2, 3))(*args)
    assert _max_rel_diff(g_plain, g_adj) < 1e-12
    v = jax.random.normal(v_key, M.shape, jnp.float64)
    hvp = lambda loss: jax.jvp(jax.grad(lambda m: loss(m, *args[1:])), (M,), (v,))[1]
    np.testing.assert_allclose(hvp(loss_adj), hvp(loss_plain), rtol=1e-11)


@pytest.mark.usefixtures("x64")
def test_recurrence_keeping_some_product_columns():
    """`kept=(0, d)` for a cell affine with constant coefficients in the other product columns: the same
    gradients as a plain differentiated scan, in M, the parameters, the initial state and the inputs. For a
    cell nonlinear in the dropped columns the gradients differ (so the comparison can fail)."""
    d = 4
    (M, theta, s0, xs), _ = _rows_problem(seed=1, K=3, d=d)

    def make_cell(rest):
        def cell(s, prods, x, th):
            mix = jnp.tanh(prods[:, :d] + x[None]) * th[None]
            return s + 0.1 * mix[::-1] * s[:1] + 0.05 * rest(prods[:, d:]).sum(-1, keepdims=True)
        return cell

    def plain(cell, M, th, s0, xs):
        def body(s, x):
            return jax.vmap(cell, (0, 0, 0, None))(s, s @ M.T, x, th), None
        return jax.lax.scan(body, s0, jnp.swapaxes(xs, 0, 1))[0]

    args = (M, theta, s0, xs)
    for rest, same in ((lambda c: 0.7 * c, True), (jnp.sin, False)):
        cell = make_cell(rest)
        loss_plain = lambda *a: jnp.sum(jnp.cos(plain(cell, *a)))
        loss_kept = lambda *a: jnp.sum(jnp.cos(recurrence(cell, *a, kept=(0, d))))
        np.testing.assert_allclose(loss_kept(*args), loss_plain(*args), rtol=1e-14)
        g_plain = jax.grad(loss_plain, argnums=(0, 1, 2, 3))(*args)
        g_kept = jax.grad(loss_kept, argnums=(0, 1, 2, 3))(*args)
        assert (_max_rel_diff(g_plain, g_kept) < 1e-12) == same


def test_recurrence_rejects_a_bad_save():
    with pytest.raises(ValueError, match="save='every'"):
        recurrence(lambda s, p, x, th: s, jnp.eye(2), None, jnp.zeros((1, 1, 2)), jnp.zeros((1, 3, 2)), save="every")
