"""Interchange with the public PyTorch code (erichson/NoisyRNN): `from_public`, `to_public`, `public_args`,
the torch.save reader and `nrnn-from-public`.

The reference here is the public model's forward pass written out in NumPy from its published equations, in
its own row-vector form: A = β(B − Bᵀ) + (1 − β)(B + Bᵀ) − γ_A I (W from C likewise),
h ← h + d ⊙ u ⊙ (α h A + tanh(h W + x Eᵀ + e)) + add_noise · ξ for solver "noisy" (u ≡ 1, ξ ≡ 0 in test
mode; u = mult_noise · U[0, 1] + 1 − mult_noise in train mode), h ← h + eps (α h A + tanh(h W + x Eᵀ + e))
for solver "base", logits h Dᵀ + b_D. Nothing of the public code is used or copied."""

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import ndtr

from nrnn_jax import (NoisyRNN, NRNNConfig, TrainConfig, evaluate, from_public, load_dataset, load_run, public_args,
                      to_public, with_noise)
from nrnn_jax.analysis import output_margins
from nrnn_jax.cli import from_public_main, robustness_main, train_main
from nrnn_jax.interchange import read_public_file, write_model_run

N_IN, N, CLASSES = 3, 6, 4
ARGS = dict(eps=0.07, beta=0.6, gamma_A=0.02, gamma_W=0.03, alpha=0.8)


def public_state(seed=0, n_in=N_IN, n=N, classes=CLASSES):
    """A state dict in the public layout: (out, in) weights, free matrices B, C far from symmetric, and a
    per-unit step d that is not eps (so that a wrong step shows)."""
    rng = np.random.default_rng(seed)
    return {"E.weight": rng.normal(size=(n, n_in)), "E.bias": rng.normal(size=n) * 0.3,
            "D.weight": rng.normal(size=(classes, n)), "D.bias": rng.normal(size=classes) * 0.3,
            "B": rng.normal(size=(n, n)) * 0.6, "C": rng.normal(size=(n, n)) * 0.6,
            "d": rng.uniform(0.05, 0.3, size=n)}


def public_forward(sd, x, *, solver, eps, beta, gamma_A, gamma_W, alpha, add_noise=0.0, mult_noise=0.0,
                   xi=None, zeta=None):
    """The public forward pass, row vectors; `xi`, `zeta` (B, T, n) given: train mode with additive noise
    add_noise · xi and u = mult_noise · Φ(zeta) + 1 − mult_noise (Φ(zeta) uniform on [0, 1])."""
    B, C = sd["B"], sd["C"]
    eye = np.eye(B.shape[0])
    A = beta * (B - B.T) + (1 - beta) * (B + B.T) - gamma_A * eye
    W = beta * (C - C.T) + (1 - beta) * (C + C.T) - gamma_W * eye
    h = np.zeros((x.shape[0], B.shape[0]))
    for i in range(x.shape[1]):
        z = x[:, i, :] @ sd["E.weight"].T + sd["E.bias"]
        update = alpha * (h @ A) + np.tanh(h @ W + z)
        if solver == "base":
            h = h + eps * update
        elif xi is None:
            h = h + sd["d"] * update
        else:
            u = mult_noise * ndtr(zeta[:, i]) + (1 - mult_noise)
            h = h + sd["d"] * u * update + add_noise * xi[:, i]
    return h @ sd["D.weight"].T + sd["D.bias"]


def inputs(seed=1, batch=5, T=30, n_in=N_IN):
    return np.random.default_rng(seed).normal(size=(batch, T, n_in))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", ["noisy", "base"])
def test_from_public_gives_the_public_logits(solver):
    sd, x = public_state(), inputs()
    model = from_public(sd, solver=solver, **ARGS, dtype="float64")
    want = public_forward(sd, x, solver=solver, **ARGS)
    got = np.asarray(model(x))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert model.cfg.convention == ("reference" if solver == "noisy" else "sde")
    # The layout matters at this size: the matrices taken without transposing give other logits.
    untransposed = public_forward({**sd, "B": sd["B"].T, "C": sd["C"].T}, x, solver=solver, **ARGS)
    assert np.max(np.abs(got - untransposed)) > 1e-2
    # The diffrax and scan backends agree.
    scan = with_noise(model, 0.0, 0.0)
    scan.cfg = model.cfg.replace(backend="scan")
    np.testing.assert_allclose(np.asarray(scan(x)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_from_public_noise_is_the_public_train_mode_noise():
    sd, x = public_state(2), inputs(3)
    noise = dict(add_noise=0.05, mult_noise=0.3)
    model = from_public(sd, solver="noisy", **ARGS, **noise, dtype="float64")
    xi = np.random.default_rng(4).normal(size=(x.shape[0], x.shape[1], 2 * N))  # (ξ_add, ζ) per step
    want = public_forward(sd, x, solver="noisy", **ARGS, **noise, xi=xi[..., :N], zeta=xi[..., N:])
    np.testing.assert_allclose(np.asarray(model(x, noise=xi)), want, rtol=1e-12, atol=1e-12)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", ["noisy", "base"])
def test_round_trip(solver):
    sd = public_state(5)
    noise = dict(add_noise=0.04, mult_noise=0.2) if solver == "noisy" else {}
    model = from_public(sd, solver=solver, **ARGS, init_std=0.3, **noise, dtype="float64")
    back = to_public(model)
    assert set(back) == set(sd)
    for k in sd:
        if k != "d" or solver == "noisy":  # "base" holds eps for d (the public base ignores d)
            np.testing.assert_array_equal(back[k], sd[k])
    if solver == "base":
        np.testing.assert_array_equal(back["d"], np.full(N, ARGS["eps"]))
    args = public_args(model)
    assert args == {"input_dim": N_IN, "output_classes": CLASSES, "n_units": N, "solver": solver, **ARGS,
                    "init_std": 0.3, "add_noise": noise.get("add_noise", 0.0), "mult_noise": noise.get("mult_noise", 0.0)}
    again = from_public(back, **args, dtype="float64")
    assert again.cfg == model.cfg
    for a, b in zip(_params(again), _params(model), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.usefixtures("x64")
def test_round_trip_of_a_native_model():
    """A model built here, with a learned non-uniform step, goes out and comes back unchanged; its public
    state dict gives its logits through the public forward pass."""
    cfg = NRNNConfig(input_dim=N_IN, hidden=N, num_classes=CLASSES, convention="reference", eps_add=0.02,
                     eps_mult=0.1, dt=0.05, alpha=0.9, beta=0.7, gamma_a=0.01, gamma_w=0.02, init_std=4.0,
                     dtype="float64")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(3))
    model.step_size[...] = jnp.linspace(0.03, 0.2, N)
    sd, args = to_public(model), public_args(model)
    x = inputs(6)
    pub = {k: args[k] for k in ("eps", "beta", "gamma_A", "gamma_W", "alpha")}
    np.testing.assert_allclose(public_forward(sd, x, solver="noisy", **pub), np.asarray(model(x)), rtol=1e-12,
                               atol=1e-12)
    again = from_public(sd, **args, dtype="float64")
    assert again.cfg == cfg
    for a, b in zip(_params(again), _params(model), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.usefixtures("x64")
def test_public_args_of_sde_models():
    base = dict(input_dim=N_IN, hidden=N, num_classes=CLASSES, dt=0.05, dtype="float64")
    quiet = NoisyRNN(NRNNConfig(**base, solver="milstein"), rngs=nnx.Rngs(0))
    args = public_args(quiet)
    assert args["solver"] == "base" and args["eps"] == 0.05
    x = inputs(7)
    np.testing.assert_allclose(np.asarray(from_public(to_public(quiet), **args, dtype="float64")(x)),
                               np.asarray(quiet(x)), rtol=1e-12, atol=1e-12)
    noisy = NoisyRNN(NRNNConfig(**base, eps_add=0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model\.cfg\.eps_add=0\.1 is invalid: the public code has no SDE noise"):
        public_args(noisy)
    gru = NoisyRNN(NRNNConfig(**base, cell="gru"), rngs=nnx.Rngs(0))
    for fn in (to_public, public_args):
        with pytest.raises(ValueError, match=r"model\.cfg\.cell='gru' is invalid: the public code has the Lipschitz"):
            fn(gru)


def _fails(sd, match, **kw):
    with pytest.raises(ValueError, match=match):
        from_public(sd, **{"solver": "noisy", **ARGS, **kw})


def test_bad_state_dicts_and_arguments_are_named():
    sd = public_state()
    _fails({k: v for k, v in sd.items() if k != "C"}, r"missing key\(s\) \['C'\], unexpected key\(s\) \[\]")
    _fails({**sd, "I": np.eye(N)}, r"missing key\(s\) \[\], unexpected key\(s\) \['I'\]")
    _fails({**sd, "B": np.zeros((N, N + 1))},
           r"state_dict\['B'\] has shape \(6, 7\); expected \(n_units, n_units\) = \(6, 6\) \(n_units = 6 from E\.weight\)")
    _fails({**sd, "d": np.zeros((N, 1))}, r"state_dict\['d'\] has shape \(6, 1\); expected \(n_units,\)\.")
    _fails({**sd, "D.bias": np.zeros(CLASSES + 1)},
           r"state_dict\['D\.bias'\] has shape \(5,\); expected \(output_classes,\) = \(4,\) \(output_classes = 4 from D\.weight\)")
    _fails(sd, r"state_dict\['E\.weight'\] has shape \(6, 3\); expected \(n_units, input_dim\) = \(6, 2\) "
               r"\(n_units = 6 from E\.weight, input_dim = 2 as given\)", input_dim=2)
    _fails({**sd, "C": np.full((N, N), np.nan)}, r"state_dict\['C'\] holds 36 NaN or Inf value\(s\)")
    _fails({**sd, "B": np.zeros((N, N), np.int64)}, r"state_dict\['B'\] has dtype int64; expected a floating-point")
    _fails(sd, r"from_public\.solver='euler' is invalid: expected one of 'noisy', 'base'", solver="euler")
    _fails(sd, r"from_public\.mult_noise=1\.5 is invalid", mult_noise=1.5)
    _fails(sd, r"from_public\.beta=2 is invalid", beta=2)
    _fails(sd, r"from_public\.eps=0\.0 is invalid", eps=0.0)
    _fails(sd, r"from_public\.dtype='float16' is invalid", dtype="float16")
    with pytest.raises(ValueError, match=r"state_dict='list' is invalid: expected a mapping"):
        from_public([], solver="noisy", **ARGS)


class TensorLike:
    """What a torch tensor offers the reader: detach().cpu().numpy()."""

    def __init__(self, a):
        self.a = np.asarray(a, np.float32)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def test_tensors_are_read_as_arrays_in_float32_by_default():
    sd = public_state()
    model = from_public({k: TensorLike(v) for k, v in sd.items()}, solver="noisy", **ARGS)
    assert model.cfg.dtype == "float32" and model.cell.M_A[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(model.cell.M_A[...]), sd["B"].T.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(model.step_size[...]), sd["d"].astype(np.float32))


def test_model_as_run_directory(tmp_path, capsys):
    """A converted model written as a run directory: load_run, nrnn-robustness, the analyses and a resumed
    training read it."""
    data = load_dataset("digits")
    sd = public_state(8, n_in=data.input_dim, n=8, classes=data.num_classes)
    model = from_public(sd, solver="noisy", **ARGS, add_noise=0.02)
    run = tmp_path / "run"
    tcfg = TrainConfig(dataset="digits", mode="implicit", epochs=0)
    summary = write_model_run(model, run, tcfg, extra_summary={"note": "x"})
    test = evaluate(model, data.x_test, data.y_test)
    assert summary["test_acc"] == test["acc"] and summary["note"] == "x" and summary["epochs"] == 0
    assert json.loads((run / "summary.json").read_text())["test_acc"] == test["acc"]
    loaded = load_run(run)
    assert loaded.cfg == model.cfg
    np.testing.assert_array_equal(np.asarray(loaded(data.x_test[:20])), np.asarray(model(data.x_test[:20])))
    np.testing.assert_array_equal(output_margins(loaded, data.x_test, data.y_test),
                                  output_margins(model, data.x_test, data.y_test))
    assert robustness_main([str(run), "--strengths", "0"]) == 0
    assert f"{test['acc']:.4f}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a run"):
        write_model_run(model, run, tcfg)
    with pytest.raises(ValueError, match=r"NRNNConfig\.input_dim=8 is invalid: the data set 'mnist1d' has input_dim=1"):
        write_model_run(model, tmp_path / "other", tcfg.replace(dataset="mnist1d"))
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match=r"TrainConfig\.mode='implicit' is invalid: the model has no noise"):
        write_model_run(with_noise(model, 0.0, 0.0), tmp_path / "quiet", tcfg)
    assert train_main(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 0


def test_cli_without_torch_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert from_public_main([str(path), "--out", str(tmp_path / "run"), "--dataset", "digits"]) == 2
    assert "pip install torch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------
# torch.save files (skipped without PyTorch).
# ------------------------------------------------------------------------------------------------------
RAN = []


def _ran():
    """Stands for code that a file asks the reader to run."""
    RAN.append(True)


@pytest.fixture
def public_files(tmp_path, monkeypatch):
    """A whole-module file and a state-dict file in the public driver's layout. The module's class is named
    NoisyRNN in a module `models` (as the public driver pickles it), holds its sizes, the constructor's
    attributes and the parameters; `models` is gone from sys.modules before anything is read."""
    torch = pytest.importorskip("torch")
    data = load_dataset("digits")
    sd = public_state(9, n_in=data.input_dim, n=8, classes=data.num_classes)
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    models = types.ModuleType("models")

    def init(self):
        torch.nn.Module.__init__(self)
        self.eps, self.solver, self.beta, self.alpha = ARGS["eps"], "noisy", ARGS["beta"], ARGS["alpha"]
        self.gamma_A, self.gamma_W, self.add_noise, self.mult_noise = ARGS["gamma_A"], ARGS["gamma_W"], 0.02, 0.1
        self.tanh = torch.nn.Tanh()
        self.E, self.D = torch.nn.Linear(data.input_dim, 8), torch.nn.Linear(8, data.num_classes)
        self.C, self.B = (torch.nn.Parameter(torch.from_numpy(sd[k])) for k in ("C", "B"))
        self.I = torch.eye(8)
        self.d = torch.nn.Parameter(torch.from_numpy(sd["d"]))
        with torch.no_grad():
            for k in ("E", "D"):
                getattr(self, k).weight.copy_(torch.from_numpy(sd[f"{k}.weight"]))
                getattr(self, k).bias.copy_(torch.from_numpy(sd[f"{k}.bias"]))

    cls = type("NoisyRNN", (torch.nn.Module,), {"__init__": init, "__module__": "models"})
    models.NoisyRNN = cls
    monkeypatch.setitem(sys.modules, "models", models)
    module = cls()
    torch.save(module, tmp_path / "model.pkl")
    torch.save(module.state_dict(), tmp_path / "state.pt")
    monkeypatch.delitem(sys.modules, "models")
    return tmp_path, sd, data


def test_read_public_file(public_files):
    tmp_path, sd, _ = public_files
    arrays, args = read_public_file(tmp_path / "model.pkl")
    assert set(arrays) == set(sd) and args == {**ARGS, "solver": "noisy", "add_noise": 0.02, "mult_noise": 0.1}
    for k in sd:
        np.testing.assert_array_equal(arrays[k], sd[k])
    arrays, args = read_public_file(tmp_path / "state.pt")
    assert args is None and all(np.array_equal(arrays[k], sd[k]) for k in sd)


def test_reader_runs_no_code_from_the_file(tmp_path):
    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return (_ran, ())

    torch.save({"B": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refers to test_interchange\._ran, which the reader does not load"):
        read_public_file(tmp_path / "evil.pt")
    assert RAN == []


def test_cli_converts_public_files(public_files, capsys):
    tmp_path, sd, data = public_files
    x = data.x_test[:50].astype(np.float64)
    want = public_forward({k: v.astype(np.float64) for k, v in sd.items()}, x, solver="noisy", **ARGS)
    with jax.enable_x64(True):  # JAX_ENABLE_X64=1 from the command line
        assert from_public_main([str(tmp_path / "model.pkl"), "--out", str(tmp_path / "run"), "--dataset", "digits",
                                 "--dtype", "float64"]) == 0
        model = load_run(tmp_path / "run")
        # the file's float32 weights, computed in float64 on both sides
        np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-12, atol=1e-12)
    assert model.cfg.eps_add == 0.02 and model.cfg.eps_mult == 0.1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mode"] == "implicit" and summary["imported_from"]["format"] == "module"
    # A state dict needs the arguments; a flag that contradicts a module file is refused.
    common = ["--dataset", "digits", "--out"]
    assert from_public_main([str(tmp_path / "state.pt"), *common, str(tmp_path / "r2")]) == 2
    assert "does not record the public constructor's argument(s) ['solver', 'eps', 'beta', 'gamma_A', 'gamma_W']" \
        in capsys.readouterr().err
    assert from_public_main([str(tmp_path / "model.pkl"), *common, str(tmp_path / "r3"), "--beta", "0.9"]) == 2
    assert "beta=0.9 is invalid" in capsys.readouterr().err
    flags = ["--solver", "base", "--eps", "0.07", "--beta", "0.6", "--gamma_A", "0.02", "--gamma-W", "0.03",
             "--alpha", "0.8"]
    assert from_public_main([str(tmp_path / "state.pt"), *common, str(tmp_path / "r4"), *flags]) == 0
    assert load_run(tmp_path / "r4").cfg.convention == "sde"
