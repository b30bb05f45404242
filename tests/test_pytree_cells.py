"""Cells whose state is a pytree (flax's LSTM (c, h), a user cell's tuple) and flax cells through `FlaxCell`
without a wrapper: the noisy forward pass against an Euler–Maruyama loop written here on the flattened state,
the explicit regularizer against ½ tr ∇²_ξ L(0), Monte Carlo and the probe, noise on the whole state or on
named parts, training, run directories, SIGKILL and resume, and the errors that name what is wrong."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nrnn_jax as nj
from kill_resume import uninterrupted_and_resumed
from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, antithetic_monte_carlo, explicit_regularizer, load_run
from nrnn_jax.analysis import lyapunov_exponent
from nrnn_jax.losses import cross_entropy
from oracles import assert_exact_regularizer_is_half_trace_of_noise_hessian

pytestmark = pytest.mark.usefixtures("x64")

B, T, N_IN, D, C = 3, 5, 2, 3, 3
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


class TupleCell(nj.Cell):
    """A user cell with state (a, b), a of shape (2,) and b of shape (hidden,); the decoder reads b:
    da/dt = tanh(P b) − a, db/dt = −b + tanh(W b + V z + a[0] − a[1])."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.P = nnx.Param(jax.random.normal(rngs.params(), (2, d), dtype))
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) * d ** -0.5)
        self.V = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype))

    def state_shape(self, hidden, dtype):
        return (jax.ShapeDtypeStruct((2,), dtype), jax.ShapeDtypeStruct((hidden,), dtype))

    def output(self, state):
        return state[1]

    def drift(self, state, z):
        a, b = state
        return (jnp.tanh(self.P[...] @ b) - a, -b + jnp.tanh(self.W[...] @ b + self.V[...] @ z + a[0] - a[1]))


def lstm_factory(cfg: NRNNConfig, *, rngs: nnx.Rngs):
    """flax's plain `nnx.LSTMCell` as a user cell (what a user writes: no wrapper beyond FlaxCell)."""
    dtype = jnp.dtype(cfg.dtype)
    return nj.FlaxCell(nnx.LSTMCell(cfg.hidden, cfg.hidden, rngs=rngs, dtype=dtype, param_dtype=dtype))


FLAX = {"lstm": nnx.LSTMCell, "optimized_lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell}
CELLS = ["lstm", "optimized_lstm", "gru", "tuple"]


def _cfg(**kw) -> NRNNConfig:
    fields = dict(input_dim=N_IN, hidden=D, num_classes=C, dt=0.3, backend="scan", dtype="float64")
    fields.update(kw)
    return NRNNConfig(**fields)


def _model(name: str, **kw) -> NoisyRNN:
    rngs = nnx.Rngs(0)
    cfg = _cfg(**kw)
    cell = TupleCell(cfg, rngs=rngs) if name == "tuple" else nj.FlaxCell(FLAX[name](D, D, rngs=rngs, **F64))
    return NoisyRNN(cfg, rngs=rngs, cell=cell)


def _data():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N_IN), jnp.float64)
    return x, jnp.arange(B) % C


def _em_loop(model, x, xi, noised):
    """Euler–Maruyama written here: the cell's own update (a flax cell's carry, batched; the tuple cell's
    drift per example), the state flattened by hand as [leaves laid end to end], diagonal noise
    ε_add + ε_mult s on the coordinates `noised` (xi's columns in that order), decoded from the output part."""
    cfg, cell = model.cfg, model.cell
    z = model.encode(x)
    if isinstance(cell, nj.FlaxCell):
        carry = cell.cell.initialize_carry((B, D), rngs=nnx.Rngs(0))
        carry = carry if isinstance(carry, tuple) else (carry,)
        flat = np.concatenate([np.asarray(c) for c in carry], axis=1)
        sizes = [D] * len(carry)
    else:
        flat, sizes = np.zeros((B, 2 + D)), [2, D]
    for k in range(T):
        parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
        if isinstance(cell, nj.FlaxCell):
            carry = tuple(jnp.asarray(p) for p in parts)
            new, _ = cell.cell(carry if len(carry) > 1 else carry[0], z[:, k])
            new = np.concatenate([np.asarray(c) for c in jax.tree.leaves(new)], axis=1)
            f = new - flat
        else:
            f = np.stack([np.concatenate([np.asarray(a) for a in cell.drift(
                (jnp.asarray(parts[0][i]), jnp.asarray(parts[1][i])), z[i, k])]) for i in range(B)])
        noise = np.zeros_like(flat)
        noise[:, noised] = (cfg.eps_add + cfg.eps_mult * flat[:, noised]) * np.asarray(xi[:, k])
        flat = flat + cfg.dt * f + np.sqrt(cfg.dt) * noise
    out = flat[:, -D:]  # the output part: h of (c, h), the array of a GRU, b of (a, b) — last in every case
    return np.asarray(model.decoder(jnp.asarray(out))), flat


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("noise_on", [(), ("output",)])
def test_noisy_forward_is_an_euler_maruyama_loop_on_the_flat_state(name, noise_on):
    x, _ = _data()
    model = _model(name, eps_add=0.3, eps_mult=0.4, noise_on=noise_on)
    n = {"lstm": 2 * D, "optimized_lstm": 2 * D, "gru": D, "tuple": 2 + D}[name]
    noised = list(range(n)) if not noise_on else list(range(n - D, n))
    assert model.state_size == n and model.noise_dim == len(noised)
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, model.noise_dim), jnp.float64)
    want, flat = _em_loop(model, x, xi, noised)
    for backend in ("scan", "diffrax"):
        m = NoisyRNN(model.cfg.replace(backend=backend), rngs=nnx.Rngs(0), cell=model.cell)
        nnx.update(m.encoder, nnx.state(model.encoder))
        nnx.update(m.decoder, nnx.state(model.decoder))
        np.testing.assert_allclose(m(x, noise=xi), want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m.final_state(x, noise=xi), flat, rtol=1e-12, atol=1e-14)
    traj = model.trajectory(x, noise=xi)
    assert traj.shape == (B, T + 1, n)
    parts = model.state_tree(traj[:, -1])
    np.testing.assert_allclose(jnp.concatenate([a.reshape(B, -1) for a in jax.tree.leaves(parts)], axis=1), traj[:, -1])
    assert len(jax.tree.leaves(parts)) == (1 if name == "gru" else 2)


@pytest.mark.parametrize("name", ["lstm", "optimized_lstm", "gru"])
def test_step_one_without_noise_is_the_discrete_flax_cell(name):
    """At δ = 1 and no noise the model is the flax cell itself, its output decoded."""
    model = _model(name, dt=1.0)
    x, _ = _data()
    z = model.encode(x)
    cell = model.cell.cell
    carry = cell.initialize_carry((B, D), rngs=nnx.Rngs(0))
    for k in range(T):
        carry, y = cell(carry, z[:, k])
    np.testing.assert_allclose(model(x), model.decoder(y), rtol=1e-12)


def test_built_in_lstm_is_the_lstm_and_reads_h():
    model = NoisyRNN(_cfg(cell="lstm", dt=1.0), rngs=nnx.Rngs(0))
    assert isinstance(model.cell, nj.LSTMCell) and model.cfg.cell == "lstm"
    assert model.noise_dim == 2 * D and model.state_layout.names == ("0", "1") and model.state_layout.output == 1
    assert NoisyRNN(_cfg(cell="lstm", noise_on=("output",)), rngs=nnx.Rngs(0)).noise_dim == D
    assert NoisyRNN(_cfg(cell="lstm", noise_on=("0",)), rngs=nnx.Rngs(0)).state_layout.noise == (0, 1, 2)
    x, _ = _data()
    c, h = model.state_tree(model.final_state(x))
    np.testing.assert_allclose(model(x), model.decoder(h), rtol=1e-13)
    assert not np.allclose(c, h)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("solver,noise_on", [("euler", ()), ("euler_heun", ()), ("euler_heun", ("output",))])
def test_exact_regularizer_is_half_trace_of_noise_hessian(name, solver, noise_on):
    """½ tr ∇²_ξ L(0) of the model's own noisy loss, by autodiff over the whole noise array, equals the exact
    regularizer (and the continuous one at a small step agrees with it to O(δ))."""
    x, y = _data()
    model = _model(name, eps_add=0.3, eps_mult=0.5, solver=solver, gradient="autodiff", noise_on=noise_on)
    assert_exact_regularizer_is_half_trace_of_noise_hessian(model, x, y, min_value=1e-5)


def test_noise_on_the_parts_adds_up_to_the_whole_state():
    """Noise on h alone leaves out the c coordinates: the whole-state regularizer is the sum of the parts'
    (the additive part is linear in the per-coordinate covariances, so with ε_mult = 0 it adds exactly)."""
    x, y = _data()
    vals = {on: float(explicit_regularizer(_model("lstm", eps_add=0.3, noise_on=on), x, y).value)
            for on in [(), ("output",), ("0",)]}
    np.testing.assert_allclose(vals[()], vals[("output",)] + vals[("0",)], rtol=1e-12)
    assert abs(vals[("output",)]) > 1e-4 and abs(vals[("0",)]) > 1e-4  # each part carries its own share


@pytest.mark.parametrize("name", CELLS)
def test_monte_carlo_agrees_at_small_noise(name):
    x, y = _data()
    n = 20000
    model = _model(name, eps_add=0.05, eps_mult=0.05)
    reg = explicit_regularizer(model, x, y, method="exact")
    s = np.asarray(antithetic_monte_carlo(model, x, y, n, jax.random.PRNGKey(1), reg.clean_loss))
    ratio, se = s.mean() / float(reg.value), s.std(ddof=1) / np.sqrt(n) / float(reg.value)
    assert abs(ratio - 1.0) < 4 * se and se < 0.05, (ratio, se)


@pytest.mark.parametrize("name,noise_on", [("lstm", ()), ("optimized_lstm", ("output",)), ("gru", ()),
                                           ("tuple", ("1",))])
def test_probe_is_unbiased(name, noise_on):
    x, y = _data()
    model = _model(name, eps_add=0.1, eps_mult=0.1, noise_on=noise_on)
    exact = explicit_regularizer(model, x, y, method="exact")
    est = explicit_regularizer(model, x, y, method="probe", num_probes=3000, key=jax.random.PRNGKey(7))
    z = (float(est.value) - float(exact.value)) / float(est.std_err)
    assert abs(z) < 4.0, (float(est.value), float(exact.value), float(est.std_err))
    assert float(est.std_err) < 0.05 * abs(float(exact.value))  # power: a 20 % bias would be caught
    np.testing.assert_allclose(est.clean_loss, exact.clean_loss, rtol=1e-12)


def test_continuous_regularizer_and_lyapunov_on_the_lstm():
    x, y = _data()
    model = _model("lstm", eps_add=0.2, eps_mult=0.2, dt=0.01)
    exact = explicit_regularizer(model, x, y, method="exact")
    cont = explicit_regularizer(model, x, y, method="continuous")
    np.testing.assert_allclose(cont.value, exact.value, rtol=0.05)
    lstm = _model("lstm", eps_mult=0.5, noise_on=("output",))
    lam, se = lyapunov_exponent(lstm.cfg, lstm.recurrent_params(), t_max=10.0, num_paths=4, cell=lstm.cell)
    assert np.isfinite(lam) and se >= 0


def test_gradients_flow_into_the_flax_cell():
    x, y = _data()
    model = _model("lstm", eps_add=0.1)
    xi = jax.random.normal(jax.random.PRNGKey(1), (B, T, model.noise_dim), jnp.float64)
    g = nnx.grad(lambda m: jnp.mean(cross_entropy(m(x, noise=xi), y)) + explicit_regularizer(m, x, y).value)(model)
    leaves = jax.tree.leaves(g["cell"])
    assert leaves and all(np.isfinite(a).all() for a in leaves) and any(np.abs(a).max() > 0 for a in leaves)


# -- run directories ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [lstm_factory, TupleCell])
def test_a_pytree_cell_trains_saves_and_reloads(tmp_path, factory):
    from nrnn_jax.data import load_dataset

    data = load_dataset("digits")
    mcfg = NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, hidden=8, dt=0.5, eps_add=0.1,
                      noise_on=("output",))
    for mode in ("implicit", "explicit"):
        tcfg = TrainConfig(dataset="digits", mode=mode, epochs=1, batch_size=128, reg_method="exact",
                           eval_white_noise=())
        r = nj.train_and_evaluate(mcfg, tcfg, tmp_path / mode, data=data, progress=False, log=None, cell=factory)
        assert np.isfinite(r.summary["test_loss"])
        loaded = load_run(tmp_path / mode, cell=factory)
        assert loaded.cfg.noise_on == ("output",) and loaded.noise_dim == 8
        np.testing.assert_array_equal(loaded(data.x_test[:16]), r.model(data.x_test[:16]))


ARGS = ["--dataset", "digits", "--epochs", "2", "--hidden", "8", "--dt", "0.5", "--backend", "scan", "--cell",
        "lstm", "--noise-on", "output", "--mode", "implicit", "--eps-add", "0.1", "--batch-size", "32",
        "--checkpoint-every", "3", "--eval-white-noise", "", "--no-progress", "--seed", "3"]


def test_the_lstm_from_the_command_line_resumes_after_a_kill(tmp_path):
    full, killed = uninterrupted_and_resumed(ARGS, tmp_path, kill_step=45)  # killed in the second epoch (39 steps an epoch)
    a, b = load_run(full), load_run(killed)
    assert isinstance(b.cell, nj.LSTMCell) and b.cfg.noise_on == ("output",)
    for u, v in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(u, v)


# -- errors that teach -------------------------------------------------------------------------------------
class WrongCarry(TupleCell):
    def drift(self, state, z):
        return state[1]


class OutputNotAPart(TupleCell):
    def output(self, state):
        return state[1] * 2.0


class WideOutput(TupleCell):
    def output(self, state):
        return state[0]


class EmitsAProjection(nnx.Module):
    """A flax-style cell whose output y is not part of its carry."""

    def __init__(self, rngs):
        self.inner = nnx.GRUCell(D, D, rngs=rngs, **F64)
        self.in_features = D

    def initialize_carry(self, input_shape, rngs=None):
        return self.inner.initialize_carry(input_shape, rngs=rngs)

    def __call__(self, carry, x):
        new, y = self.inner(carry, x)
        return new, 2.0 * y


@pytest.mark.parametrize("make,match", [
    (lambda cfg, r: WrongCarry(cfg, rngs=r),
     r"WrongCarry.drift\(h, z\) must return dh/dt of shape the structure and shapes of its declared state "
     r"\(0: float64\[2\], 1: float64\[3\]\).*got float64\[3\]"),
    (lambda cfg, r: OutputNotAPart(cfg, rngs=r), r"decoder cannot read OutputNotAPart's output.*one part of the "
                                                 r"state \(0: float64\[2\], 1: float64\[3\]\)"),
    (lambda cfg, r: WideOutput(cfg, rngs=r), r"output part 0: float64\[2\], which must have shape \(3,\)"),
    (lambda cfg, r: nj.FlaxCell(EmitsAProjection(r)), r"decoder cannot read FlaxCell\(EmitsAProjection\)'s output"),
    (lambda cfg, r: nj.FlaxCell(nnx.LSTMCell(D, D, rngs=r)), r"FlaxCell\(LSTMCell\)'s state \(0: float32\[3\], "
                                                             r"1: float32\[3\]\) must have NRNNConfig.dtype=float64"),
    (lambda cfg, r: nj.FlaxCell(nnx.LSTMCell(D + 1, D, rngs=r, **F64)), r"FlaxCell\(LSTMCell\).drift\(h, z\) "
                                                                        r"failed for h the declared state"),
])
def test_bad_pytree_cells_are_named(make, match):
    cfg = _cfg()
    with pytest.raises(ValueError, match=match):
        NoisyRNN(cfg, rngs=nnx.Rngs(0), cell=make(cfg, nnx.Rngs(0)))


def test_bad_noise_parts_are_named():
    with pytest.raises(ValueError, match=r"noise_on=\('h',\) is invalid for LSTMCell\(OptimizedLSTMCell\): 'h' names no part of its "
                                         r"state \(0: float64\[3\], 1: float64\[3\]\); allowed: 'output', '0', '1'"):
        NoisyRNN(_cfg(cell="lstm", noise_on=("h",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NRNNConfig.noise_on='output' is invalid"):
        _cfg(noise_on="output")
    with pytest.raises(ValueError, match="NRNNConfig.noise_on=.*reference convention"):
        _cfg(noise_on=("output",), convention="reference")
    with pytest.raises(ValueError, match="convention='reference' is invalid with LSTMCell"):
        NoisyRNN(_cfg(cell="lstm", convention="reference"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"noise has shape \(3, 5, 3\); expected .* = \(3, 5, 6\)"):
        NoisyRNN(_cfg(cell="lstm", eps_add=0.1), rngs=nnx.Rngs(0))(_data()[0], noise=jnp.zeros((B, T, D)))
