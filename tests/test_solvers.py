"""Strong convergence orders, scan against diffrax, gradients, and the reference convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.stats import norm
from jax.test_util import check_grads

from nrnn_jax import NoisyRNN, NRNNConfig, RecurrentParams, solve


# --------------------------------------------------------------------------------------------------
# Strong order of convergence, on both backends.
# --------------------------------------------------------------------------------------------------
def _strong_errors(cfg, params, h0, exact_fn, n_paths=400, T=1.0, levels=(8, 16, 32, 64), ref_steps=None):
    """Mean |X_N − X_exact(T)| at each level, all levels driven by the same Brownian path."""
    n_fine = ref_steps or levels[-1]
    key = jax.random.PRNGKey(42)
    xi_fine = jax.random.normal(key, (n_paths, n_fine, cfg.noise_dim), jnp.float64)
    dw_fine = xi_fine * jnp.sqrt(T / n_fine)
    exact = exact_fn(dw_fine)
    errors = []
    for n in levels:
        dt = T / n
        dw = dw_fine.reshape(n_paths, n, n_fine // n, -1).sum(axis=2)
        c = cfg.replace(dt=dt)
        z = jnp.zeros((n, h0.shape[0]), jnp.float64)
        h = jax.vmap(lambda xi: solve(c, params, z, xi, h0=h0))(dw / jnp.sqrt(dt))
        errors.append(float(jnp.mean(jnp.linalg.norm(h - exact, axis=-1))))
    slope = np.polyfit(np.log([T / n for n in levels]), np.log(errors), 1)[0]
    return errors, slope


def _linear_params(mu, d):
    return RecurrentParams(A=mu * jnp.eye(d, dtype=jnp.float64), W=jnp.zeros((d, d), jnp.float64))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("backend", ["scan", "diffrax"])
@pytest.mark.parametrize("solver,order", [("euler", 0.5), ("milstein", 1.0)])
def test_strong_order_gbm(backend, solver, order):
    """Geometric Brownian motion dX = μ X dt + ε X dW: X_T = X_0 exp((μ − ε²/2) T + ε W_T)."""
    mu, eps, d = -0.5, 0.8, 2
    cfg = NRNNConfig(hidden=d, eps_mult=eps, solver=solver, backend=backend, dtype="float64")
    h0 = jnp.ones(d, jnp.float64)
    exact = lambda dw: h0[None] * jnp.exp((mu - eps**2 / 2) * 1.0 + eps * dw.sum(axis=1))
    errors, slope = _strong_errors(cfg, _linear_params(mu, d), h0, exact, levels=(16, 32, 64, 128, 256),
                                   ref_steps=256)
    assert abs(slope - order) < 0.15, (errors, slope)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("backend", ["scan", "diffrax"])
def test_strong_order_additive_noise(backend):
    """Additive noise (a nonlinear drift with tanh): Euler–Maruyama has strong order 1.

    The reference is Euler–Maruyama on a grid 64 times finer than the finest level."""
    d = 2
    cfg = NRNNConfig(hidden=d, eps_add=0.7, backend=backend, dtype="float64")
    params = RecurrentParams(A=jnp.array([[-1.0, 2.0], [-2.0, -1.0]]), W=jnp.array([[1.5, -0.5], [0.5, 1.0]]))
    h0 = jnp.array([0.5, -0.3])
    n_ref = 4096

    def reference(dw):
        c = cfg.replace(dt=1.0 / n_ref, backend="scan")
        z = jnp.zeros((n_ref, d))
        return jax.vmap(lambda xi: solve(c, params, z, xi, h0=h0))(dw / jnp.sqrt(1.0 / n_ref))

    errors, slope = _strong_errors(cfg, params, h0, reference, n_paths=200, levels=(8, 16, 32, 64),
                                   ref_steps=n_ref)
    assert abs(slope - 1.0) < 0.15, (errors, slope)


# --------------------------------------------------------------------------------------------------
# scan and diffrax: the same numbers and the same gradients.
# --------------------------------------------------------------------------------------------------
VARIANTS = [
    dict(),
    dict(solver="euler_heun"),
    dict(solver="milstein"),
    dict(noise_kind="scalar"),
    dict(noise_kind="scalar", eps_add=0.0, solver="milstein"),
    dict(convention="reference"),
]


def _model(cfg, backend):
    return NoisyRNN(cfg.replace(backend=backend), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()) or "default")
def test_scan_equals_diffrax_values_and_gradients(kw):
    kw = {"eps_add": 0.2, "eps_mult": 0.3, **kw}
    cfg = NRNNConfig(input_dim=3, hidden=6, num_classes=4, init_std=2.0, **kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 3), jnp.float32)
    xi = jax.random.normal(jax.random.PRNGKey(1), (4, 12, cfg.noise_dim), jnp.float32)
    y = jnp.array([0, 1, 2, 3])

    def loss(params, graphdef):
        logits = nnx.merge(graphdef, params)(x, noise=xi)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    out = {}
    for backend in ("scan", "diffrax"):
        graphdef, params = nnx.split(_model(cfg, backend))
        logits = nnx.merge(graphdef, params)(x, noise=xi)
        out[backend] = (logits, jax.grad(loss)(params, graphdef))
    np.testing.assert_allclose(out["diffrax"][0], out["scan"][0], rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(out["diffrax"][1]), jax.tree.leaves(out["scan"][1])):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["scan", "diffrax"])
@pytest.mark.parametrize("solver", ["euler", "euler_heun"])
def test_deterministic_equals_zero_noise(backend, solver):
    cfg = NRNNConfig(input_dim=2, hidden=5, eps_add=0.3, eps_mult=0.3, solver=solver, backend=backend)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 2), jnp.float32)
    zero = jnp.zeros((3, 9, cfg.noise_dim), jnp.float32)
    np.testing.assert_allclose(model(x), model(x, noise=zero), rtol=1e-6, atol=1e-7)
    # and noise does change the result
    assert not np.allclose(model(x), model(x, key=jax.random.PRNGKey(3)))


def test_trajectory_shape_and_consistency():
    cfg = NRNNConfig(input_dim=2, hidden=5, eps_add=0.3, backend="diffrax")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 2), jnp.float32)
    xi = jax.random.normal(jax.random.PRNGKey(1), (3, 9, 5), jnp.float32)
    traj = model.trajectory(x, noise=xi)
    assert traj.shape == (3, 10, 5)
    np.testing.assert_array_equal(traj[:, 0], 0.0)
    np.testing.assert_allclose(traj[:, -1], model.final_state(x, noise=xi), rtol=1e-6)
    np.testing.assert_allclose(model.decode(traj[:, -1]), model(x, noise=xi), rtol=1e-5)


def test_key_draws_standard_normals():
    cfg = NRNNConfig(input_dim=2, hidden=5, eps_add=0.3, backend="scan")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 9, 2), jnp.float32)
    key = jax.random.PRNGKey(7)
    xi = jax.random.normal(key, (3, 9, 5), jnp.float32)
    np.testing.assert_array_equal(model(x, key=key), model(x, noise=xi))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("backend,gradient", [("scan", "autodiff"), ("scan", "adjoint"), ("diffrax", "autodiff")])
@pytest.mark.parametrize("kw", [dict(), dict(solver="milstein"), dict(convention="reference")])
def test_check_grads_through_solve(backend, gradient, kw):
    cfg = NRNNConfig(hidden=3, eps_add=0.2, eps_mult=0.3, backend=backend, gradient=gradient, dtype="float64", **kw)
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float64)
    xi = jax.random.normal(jax.random.PRNGKey(1), (5, cfg.noise_dim), jnp.float64)
    A = jax.random.normal(jax.random.PRNGKey(2), (3, 3), jnp.float64)
    W = jax.random.normal(jax.random.PRNGKey(3), (3, 3), jnp.float64)
    step = jnp.full((3,), 0.1) if cfg.convention == "reference" else None

    def f(A, W, z):
        return solve(cfg, RecurrentParams(A, W, step), z, xi)

    # The adjoint is reverse mode only; its backward pass is itself differentiable (second order). The
    # diffrax backend's adjoint equals its autodiff gradient (tests/test_adjoint.py).
    if gradient == "adjoint":
        check_grads(f, (A, W, z), order=2, modes=["rev"], eps=1e-6)
    else:
        check_grads(f, (A, W, z), order=1, modes=["fwd", "rev"] if backend == "scan" else ["rev"], eps=1e-6)


@pytest.mark.usefixtures("x64")
def test_reference_convention_matches_the_public_update_rule():
    """A direct NumPy transcription (row vectors, as in the public PyTorch code) of
    h ← h + d ⊙ u ⊙ (α h A + tanh(h W + E x)) + add · ξ, u = mult · U(0,1) + (1 − mult)."""
    d, n, T, B = 4, 3, 7, 2
    cfg = NRNNConfig(input_dim=n, hidden=d, num_classes=3, convention="reference", eps_add=0.05,
                     eps_mult=0.2, dt=0.03, alpha=0.7, beta=0.6, gamma_a=0.01, gamma_w=0.02,
                     init_std=3.0, backend="scan", dtype="float64")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(1))
    model.step_size[...] = jnp.linspace(0.02, 0.05, d)  # a learned, non-uniform step
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (B, T, n), jnp.float64))
    xi = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, T, 2 * d), jnp.float64))

    # PyTorch parameters: B_torch = M_Aᵀ, C_torch = M_Wᵀ (row vectors transpose the parametrisation).
    Bt, Ct = np.asarray(model.cell.M_A[...]).T, np.asarray(model.cell.M_W[...]).T
    eye = np.eye(d)
    A = cfg.beta * (Bt - Bt.T) + (1 - cfg.beta) * (Bt + Bt.T) - cfg.gamma_a * eye
    W = cfg.beta * (Ct - Ct.T) + (1 - cfg.beta) * (Ct + Ct.T) - cfg.gamma_w * eye
    E_w, E_b = np.asarray(model.encoder.kernel[...]), np.asarray(model.encoder.bias[...])
    D_w, D_b = np.asarray(model.decoder.kernel[...]), np.asarray(model.decoder.bias[...])
    s = np.asarray(model.step_size[...])

    def torch_like(train):
        h = np.zeros((B, d))
        for i in range(T):
            z = x[:, i, :] @ E_w + E_b
            add, mult = 0.0, 1.0
            if train:
                add = cfg.eps_add * xi[:, i, :d]
                uniform = np.asarray(norm.cdf(xi[:, i, d:]))
                mult = cfg.eps_mult * uniform + (1 - cfg.eps_mult)
            h = h + s * mult * (cfg.alpha * h @ A + np.tanh(h @ W + z)) + add
        return h @ D_w + D_b

    np.testing.assert_allclose(model(x, noise=xi), torch_like(True), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model(x), torch_like(False), rtol=1e-12, atol=1e-12)
    on_diffrax = NoisyRNN(cfg.replace(backend="diffrax"), rngs=nnx.Rngs(1))
    on_diffrax.step_size[...] = model.step_size[...]
    np.testing.assert_allclose(on_diffrax(x, noise=xi), torch_like(True), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kw", [dict(), dict(solver="euler_heun"), dict(solver="milstein"), dict(noise_kind="scalar"),
                                dict(convention="reference")], ids=lambda kw: "-".join(kw.values()) or "euler")
def test_diffrax_forward_carries_the_products_of_every_step(kw):
    """The diffrax forward of the discrete adjoint (`DiffraxLoop.forward`) carries P = M h with the state: the
    saved products are M h_k of the saved states, and the states are those of the plain solve and of the
    scan; `diffrax_loop="diffeqsolve"` (read for old configurations) runs the same loop."""
    from nrnn_jax import _registry, solvers
    from nrnn_jax._loops import DiffraxLoop

    products_matrix = lambda p: jnp.concatenate([p.A, p.W], axis=0)

    cfg = NRNNConfig(input_dim=2, hidden=5, eps_add=0.2, eps_mult=0.3, init_std=2.0, dtype="float64", **kw)
    params = NoisyRNN(cfg, rngs=nnx.Rngs(0)).recurrent_params()
    B, T = 3, 9
    z = jax.random.normal(jax.random.PRNGKey(0), (B, T, 5), jnp.float64)
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.noise_dim), jnp.float64)
    h0 = jax.random.normal(jax.random.PRNGKey(2), (B, 5), jnp.float64)
    drift = solvers.as_drift(cfg, params)
    scheme, sigma = _registry.scheme(cfg), _registry.diffusion(cfg)
    loop = DiffraxLoop()
    hs, final, prods = loop.forward(cfg, scheme, sigma, drift, False)(None, drift.params, params, h0[:, None], (z, xi))
    # the states entering the steps, in the recurrence's per-example layout (B, 1, ·)
    assert hs.shape == (T, B, 1, 5) and final.shape == (B, 1, 5) and prods.shape == (T, B, 1, 10)
    hs, final, prods = hs[:, :, 0], final[:, 0], prods[:, :, 0]
    hs = jnp.concatenate([hs, final[None]])
    prods = jnp.concatenate([prods, final[None] @ products_matrix(params).T])
    np.testing.assert_allclose(prods, hs @ products_matrix(params).T, rtol=1e-13, atol=1e-13)
    plain = jnp.swapaxes(loop.solve(cfg, params, scheme, sigma, drift, z, xi, h0, "all"), 0, 1)
    np.testing.assert_allclose(hs, plain, rtol=1e-13, atol=1e-13)
    scan = solvers.solve_batch(cfg.replace(backend="scan"), params, z, xi, h0=h0, save="all")
    np.testing.assert_allclose(jnp.swapaxes(hs, 0, 1), scan, rtol=1e-12, atol=1e-12)

    # diffrax_loop="diffeqsolve", as older configurations name it, is the same loop
    assert _registry.loop(cfg.replace(diffrax_loop="diffeqsolve")) == _registry.loop(cfg)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("backend", ["scan", "diffrax"])
@pytest.mark.parametrize("kw", [dict(), dict(noise_kind="scalar"), dict(gradient="autodiff")],
                         ids=["diagonal", "scalar", "autodiff"])
def test_encoder_drive_formed_in_the_step_equals_the_encoded_inputs(backend, kw):
    """`solve_batch(..., encoder=(kernel, bias))` with the raw inputs x gives the solve of z = x kernel + bias:
    values and gradients (in kernel, bias, the matrices, x and ξ), whether the drive is formed inside each step
    (the adjoint's fast path) or up front (autodiff; a diffusion coupling one example's components)."""
    from nrnn_jax import solvers

    cfg = NRNNConfig(input_dim=3, hidden=5, eps_add=0.2, eps_mult=0.3, init_std=2.0, dtype="float64",
                     backend=backend, **kw)
    params = NoisyRNN(cfg, rngs=nnx.Rngs(0)).recurrent_params()
    B, T = 3, 6
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, 3), jnp.float64)
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.noise_dim), jnp.float64)
    kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 5), jnp.float64)
    bias = jax.random.normal(jax.random.PRNGKey(3), (5,), jnp.float64)

    def loss(encoded, kernel, bias, params, x, xi):
        if encoded:
            out = solvers.solve_batch(cfg, params, x, xi, save="all", encoder=(kernel, bias))
        else:
            out = solvers.solve_batch(cfg, params, x @ kernel + bias[None, None, :], xi, save="all")
        return jnp.sum(jnp.sin(out[:, -1])) + jnp.sum(out ** 2), out

    (v1, out1), g1 = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)(True, kernel, bias, params, x, xi)
    (v0, out0), g0 = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)(False, kernel, bias, params, x, xi)
    assert out1.shape == (B, T + 1, 5)
    np.testing.assert_allclose(out1, out0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_encoder_of_the_wrong_shape_is_refused():
    from nrnn_jax import solvers

    cfg = NRNNConfig(input_dim=3, hidden=5)
    params = NoisyRNN(cfg, rngs=nnx.Rngs(0)).recurrent_params()
    x = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"encoder='\(kernel \(2, 5\), bias \(5,\)\)' is invalid: expected a kernel "
                                         r"\(n, hidden\) with n = 3"):
        solvers.solve_batch(cfg, params, x, encoder=(jnp.zeros((2, 5)), jnp.zeros(5)))
    with pytest.raises(ValueError, match="encoder="):
        solvers.solve_batch(cfg, params, x, encoder=(jnp.zeros((3, 5)), jnp.zeros(4)))
