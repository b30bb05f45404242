"""Interchange with the public PyTorch code (erichson/NoisyRNN, `models.py`): its models in, ours out
(docs/theory.md §2, "The public code's layout", (2.13)).

The public `NoisyRNN` has the same equations as this library but multiplies row vectors: its drift is
α h A + tanh(h W + E(x)) with A, W built from its free matrices `B`, `C` by (1.4). In the column convention
of this library that is α Aᵀ h + tanh(Wᵀ h + z), and since (1.4) of Mᵀ is the transpose of (1.4) of M, the
public model is ours with M_A = Bᵀ, M_W = Cᵀ. Its linear layers store (out, in) weights; flax stores (in, out)
kernels, also transposed. Its state dict, the arrays this module reads and writes:

    E.weight (n_units, input_dim)        encoder kernel ᵀ
    E.bias   (n_units,)                  encoder bias
    D.weight (output_classes, n_units)   decoder kernel ᵀ
    D.bias   (output_classes,)           decoder bias
    B        (n_units, n_units)          M_A ᵀ
    C        (n_units, n_units)          M_W ᵀ
    d        (n_units,)                  the per-unit step s of the reference convention (solver "noisy")

- `from_public(state_dict, **public_args)`: the equivalent `NoisyRNN`.
- `to_public(model)`, `public_args(model)`: the state dict and the public constructor's arguments back.
- `read_public_file(path)`: a `torch.save` file (a whole public module or a state dict) as NumPy arrays and
  the constructor arguments the module records, without running code from the file (needs torch).
- `write_model_run(model, run_dir, tcfg)`: any model as a run directory (`load_run`, `nrnn-robustness`
  and the analyses read it).
- `convert_public_file(path, run_dir, dataset=...)`: the two together, what `nrnn-from-public` runs.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import cells
from .config import BUILT_IN_CELLS, NRNNConfig, TrainConfig
from .model import NoisyRNN
from .validation import check_choice, check_int, check_real, fail

PUBLIC_SOLVERS = ("noisy", "base")
# Each array of the public state dict and its shape in the public constructor's size names.
PUBLIC_SHAPES: dict[str, tuple[str, ...]] = {
    "E.weight": ("n_units", "input_dim"),
    "E.bias": ("n_units",),
    "D.weight": ("output_classes", "n_units"),
    "D.bias": ("output_classes",),
    "B": ("n_units", "n_units"),
    "C": ("n_units", "n_units"),
    "d": ("n_units",),
}
# Where each size is read from when the caller does not give it.
_SIZE_SOURCES = {"n_units": ("E.weight", 0), "input_dim": ("E.weight", 1), "output_classes": ("D.weight", 0)}
# The public constructor's arguments that are not sizes, in its order.
PUBLIC_ARGS = ("eps", "beta", "gamma_A", "gamma_W", "init_std", "alpha", "solver", "add_noise", "mult_noise")


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (`.detach().cpu().numpy()`) or anything NumPy reads (`__array__`, lists) as an array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def check_public_state(state_dict: Mapping, sizes: Mapping[str, int | None] | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of a public state dict, checked, and the sizes (n_units, input_dim, output_classes).

    A size given in `sizes` is checked against the arrays; one not given (or None) is read from them. Raises
    ValueError naming the key, the shape found and the shape expected, for a missing or extra key, a wrong
    shape, a non-float or a non-finite array."""
    if not isinstance(state_dict, Mapping):
        fail("", "state_dict", type(state_dict).__name__, "expected a mapping of names to arrays (the public "
             f"NoisyRNN's state_dict(), keys {list(PUBLIC_SHAPES)})")
    missing = [k for k in PUBLIC_SHAPES if k not in state_dict]
    extra = sorted(str(k) for k in state_dict if k not in PUBLIC_SHAPES)
    if missing or extra:
        raise ValueError(f"state_dict is not the public NoisyRNN's: missing key(s) {missing}, unexpected key(s) "
                         f"{extra}; it holds exactly {list(PUBLIC_SHAPES)}.")
    arrays = {k: _to_numpy(state_dict[k]) for k in PUBLIC_SHAPES}
    for key, names in PUBLIC_SHAPES.items():
        if arrays[key].ndim != len(names):
            raise ValueError(f"state_dict[{key!r}] has shape {arrays[key].shape}; expected "
                             f"({', '.join(names)}{',' if len(names) == 1 else ''}).")
    bound: dict[str, int] = {}
    origin: dict[str, str] = {}
    for name, (key, axis) in _SIZE_SOURCES.items():
        given = None if sizes is None else sizes.get(name)
        if given is None:
            bound[name], origin[name] = int(arrays[key].shape[axis]), f"from {key}"
        else:
            bound[name], origin[name] = check_int("from_public", name, given, 1), "as given"
    for key, names in PUBLIC_SHAPES.items():
        want = tuple(bound[n] for n in names)
        if arrays[key].shape != want:
            how = ", ".join(f"{n} = {bound[n]} {origin[n]}" for n in dict.fromkeys(names))
            raise ValueError(f"state_dict[{key!r}] has shape {arrays[key].shape}; expected "
                             f"({', '.join(names)}{',' if len(names) == 1 else ''}) = {want} ({how}).")
        if not np.issubdtype(arrays[key].dtype, np.floating):
            raise ValueError(f"state_dict[{key!r}] has dtype {arrays[key].dtype}; expected a floating-point array.")
        bad = int(np.size(arrays[key]) - np.isfinite(arrays[key]).sum())
        if bad:
            raise ValueError(f"state_dict[{key!r}] holds {bad} NaN or Inf value(s); expected finite values.")
    return arrays, bound


def _public_config(sizes: Mapping[str, int], *, solver, eps, beta, gamma_A,
                   gamma_W, alpha, init_std, add_noise, mult_noise, dtype) -> NRNNConfig:
    """The configuration of the public model (arguments checked under their public names)."""
    own = "from_public"
    check_choice(own, "solver", solver, PUBLIC_SOLVERS)
    eps = check_real(own, "eps", eps, 0.0, lo_open=True)
    beta = check_real(own, "beta", beta, 0.0, 1.0)
    gamma_A, gamma_W = check_real(own, "gamma_A", gamma_A, 0.0), check_real(own, "gamma_W", gamma_W, 0.0)
    alpha, init_std = check_real(own, "alpha", alpha), check_real(own, "init_std", init_std, 0.0)
    add_noise = check_real(own, "add_noise", add_noise, 0.0)
    if solver == "noisy":  # u = mult_noise * U[0, 1] + 1 - mult_noise; under "base" the noise is ignored
        mult_noise = check_real(own, "mult_noise", mult_noise, 0.0, 1.0)
    else:
        mult_noise = check_real(own, "mult_noise", mult_noise, 0.0)
    check_choice(own, "dtype", dtype, ("float32", "float64"))
    common = dict(input_dim=sizes["input_dim"], hidden=sizes["n_units"], num_classes=sizes["output_classes"],
                  alpha=alpha, beta=beta, gamma_a=gamma_A, gamma_w=gamma_W, init_std=init_std, dtype=dtype,
                  dt=eps, cell="lipschitz")
    if solver == "noisy":
        return NRNNConfig(**common, convention="reference", eps_add=add_noise, eps_mult=mult_noise)
    # "base": h + eps f with a fixed scalar step; the public code computes no noise into it
    return NRNNConfig(**common, convention="sde", solver="euler", eps_add=0.0, eps_mult=0.0)


def from_public(state_dict: Mapping, *, solver: str, eps: float, beta: float, gamma_A: float, gamma_W: float,
                alpha: float = 1.0, init_std: float = 0.1, add_noise: float = 0.0, mult_noise: float = 0.0,
                input_dim: int | None = None, output_classes: int | None = None, n_units: int | None = None,
                dtype: str = "float32") -> NoisyRNN:
    """The `NoisyRNN` equivalent to a model of the public PyTorch code (erichson/NoisyRNN): its test-time
    logits are the public forward pass's (`model(x)` = `public(x, mode='test')`), and its noise is the public
    `mode='train'` noise (docs/theory.md (2.9)–(2.10)).

    **Arguments:**

    - `state_dict`: the public model's `state_dict()`: `E.weight`, `E.bias`, `D.weight`, `D.bias`, `B`, `C`,
      `d` (module docstring), as torch tensors, NumPy arrays or anything with `__array__`. Taken as
      M_A = Bᵀ, M_W = Cᵀ (the public code multiplies row vectors), kernels = weightsᵀ, step s = `d`.
    - `solver`, `eps`, `beta`, `gamma_A`, `gamma_W`, `alpha`, `init_std`, `add_noise`, `mult_noise`: the
      public constructor's arguments, under its names. They are not in the state dict; those that change
      the forward pass and whose defaults differ between the public constructor and its driver have none
      here. `solver="noisy"` gives convention "reference" (ε_add = `add_noise`, ε_mult = `mult_noise`
      ∈ [0, 1], the learnable step s = `d`, `dt` = `eps` its initial value); `solver="base"` gives the
      deterministic convention "sde" with the fixed step δ = `eps` (the public "base" ignores `d` and both
      noise levels). `init_std` is recorded only (the weights are given).
    - `input_dim`, `output_classes`, `n_units`: the public constructor's sizes; read from the arrays when
      None, checked against them when given.
    - `dtype`: "float32" (the public code's) or "float64" (needs `jax_enable_x64`).

    Every argument and array is checked before the model is built: a missing, extra or mis-shaped entry is
    a ValueError naming the key, the shape found and the shape expected.

    **Returns:** a `NoisyRNN` with the Lipschitz cell (default backend and gradient settings).
    """
    arrays, sizes = check_public_state(state_dict, {"input_dim": input_dim, "output_classes": output_classes,
                                                    "n_units": n_units})
    cfg = _public_config(sizes, solver=solver, eps=eps, beta=beta, gamma_A=gamma_A, gamma_W=gamma_W,
                         alpha=alpha, init_std=init_std, add_noise=add_noise, mult_noise=mult_noise, dtype=dtype)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    as_jax = lambda a: jnp.asarray(a, jnp.dtype(dtype))
    model.encoder.kernel[...] = as_jax(arrays["E.weight"].T)
    model.encoder.bias[...] = as_jax(arrays["E.bias"])
    model.decoder.kernel[...] = as_jax(arrays["D.weight"].T)
    model.decoder.bias[...] = as_jax(arrays["D.bias"])
    model.cell.M_A[...] = as_jax(arrays["B"].T)
    model.cell.M_W[...] = as_jax(arrays["C"].T)
    if model.step_size is not None:
        model.step_size[...] = as_jax(arrays["d"])
    return model


def _check_lipschitz(model) -> None:
    if not isinstance(model, NoisyRNN):
        fail("", "model", type(model).__name__, "expected a nrnn_jax.NoisyRNN")
    if not isinstance(model.cell, cells.LipschitzCell):
        fail("", "model.cfg.cell", model.cfg.cell, "the public code has the Lipschitz cell only (cell='lipschitz')")


def to_public(model: NoisyRNN) -> dict[str, np.ndarray]:
    """The public code's state dict of a Lipschitz-cell model (the layout of `from_public`, inverted).

    **Arguments:**

    - `model`: a `NoisyRNN` with the Lipschitz cell.

    **Returns:** a dict of NumPy arrays in the model's dtype with the keys `E.weight`, `E.bias`, `D.weight`,
    `D.bias`, `B` = M_Aᵀ, `C` = M_Wᵀ and `d`: the step s (convention "reference"), else δ for every unit
    (what the public "base" solver holds and ignores). For PyTorch:
    `public.load_state_dict({k: torch.from_numpy(v) for k, v in to_public(model).items()})`, the public
    model built with `public_args(model)`.
    """
    _check_lipschitz(model)
    d = model.cfg.hidden
    step = (np.asarray(model.step_size[...]) if model.step_size is not None
            else np.full((d,), model.cfg.dt, jnp.dtype(model.cfg.dtype)))
    out = {
        "E.weight": np.asarray(model.encoder.kernel[...]).T,
        "E.bias": np.asarray(model.encoder.bias[...]),
        "D.weight": np.asarray(model.decoder.kernel[...]).T,
        "D.bias": np.asarray(model.decoder.bias[...]),
        "B": np.asarray(model.cell.M_A[...]).T,
        "C": np.asarray(model.cell.M_W[...]).T,
        "d": step,
    }
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def public_args(model: NoisyRNN) -> dict[str, Any]:
    """The public constructor's arguments of a Lipschitz-cell model, so that the public
    `NoisyRNN(**public_args(model))` loaded with `to_public(model)` computes the same logits, and
    `from_public(to_public(model), **public_args(model), dtype=model.cfg.dtype)` is the same model.

    **Arguments:**

    - `model`: a `NoisyRNN` with the Lipschitz cell, under convention "reference" (public solver "noisy")
      or a noise-free convention "sde" (public solver "base"; its test-time step is the Euler step of every
      SDE scheme). An "sde" model with noise has no public counterpart: ValueError; export its test-time
      model with `with_noise(model, 0.0, 0.0)`.

    **Returns:** a dict with `input_dim`, `output_classes`, `n_units`, `eps`, `beta`, `gamma_A`, `gamma_W`,
    `init_std`, `alpha`, `solver`, `add_noise`, `mult_noise`.
    """
    _check_lipschitz(model)
    cfg, cell = model.cfg, model.cell
    if cfg.convention == "reference":
        solver, add, mult = "noisy", cfg.eps_add, cfg.eps_mult
    elif cfg.is_noisy:
        field = "eps_add" if cfg.eps_add else ("eps_mult" if cfg.eps_mult else "diffusion")
        fail("model.cfg", field, getattr(cfg, field), "the public code has no SDE noise (its solver 'base' is "
             "deterministic, its 'noisy' is convention 'reference'); export the test-time model with "
             "with_noise(model, 0.0, 0.0)")
    else:
        solver, add, mult = "base", 0.0, 0.0
    return {"input_dim": cfg.input_dim, "output_classes": cfg.num_classes, "n_units": cfg.hidden, "eps": cfg.dt,
            "beta": cell.beta, "gamma_A": cell.gamma_a, "gamma_W": cell.gamma_w, "init_std": cfg.init_std,
            "alpha": cell.alpha, "solver": solver, "add_noise": add, "mult_noise": mult}


# ------------------------------------------------------------------------------------------------------
# Reading a torch.save file without running code from it.
# ------------------------------------------------------------------------------------------------------
class SavedModule:
    """What `read_public_file` makes of a pickled `torch.nn.Module`: its attributes (`_parameters`,
    `_modules`, the public model's `eps`, `beta`, …), with no method of the original class run."""

    origin = "?"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            for part in state:
                self.__dict__.update(part or {})
        else:
            self.__dict__.update(state)


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading a PyTorch file (torch.save) needs PyTorch: pip install torch (the CPU build "
                          "suffices); the rest of nrnn_jax does not need it") from None
    return torch


def _restricted_pickle(torch, path: str) -> types.ModuleType:
    """A pickle module for `torch.load` whose unpickler builds tensors, parameters, ordered dicts and
    `SavedModule` stand-ins for `torch.nn` modules and the public `NoisyRNN` class, and refuses every other
    global (so no code from the file runs)."""
    import torch._utils as tu

    allowed = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("__builtin__", "set"): set,
               ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
               ("torch.nn.parameter", "Parameter"): torch.nn.Parameter}
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(tu, name):
            allowed[("torch._utils", name)] = getattr(tu, name)
    stand_ins: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return allowed[(module, name)]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module.startswith("torch.nn.modules.") or name == "NoisyRNN":
                if (module, name) not in stand_ins:
                    stand_ins[(module, name)] = type(name, (SavedModule,), {"origin": f"{module}.{name}"})
                return stand_ins[(module, name)]
            raise pickle.UnpicklingError(
                f"{path} refers to {module}.{name}, which the reader does not load: it builds tensors, "
                "torch.nn modules' attributes and the public NoisyRNN's only, and runs no code from the file")

    mod = types.ModuleType("nrnn_jax_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.UnpicklingError = pickle.UnpicklingError
    mod.load = lambda file, **kw: Unpickler(file, **kw).load()
    mod.loads = lambda data, **kw: Unpickler(io.BytesIO(data), **kw).load()
    return mod


def _module_state(obj: SavedModule, prefix: str = "") -> dict[str, Any]:
    """The state dict of a saved module (parameters and persistent buffers, dotted names, as
    `Module.state_dict()` names them)."""
    out: dict[str, Any] = {}
    skip = obj.__dict__.get("_non_persistent_buffers_set") or set()
    for name, value in (obj.__dict__.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (obj.__dict__.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (obj.__dict__.get("_modules") or {}).items():
        if isinstance(child, SavedModule):
            out.update(_module_state(child, prefix + name + "."))
    return out


def read_public_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The arrays and constructor arguments in a `torch.save` file of the public code: a whole module (what
    its driver saves) or a state dict. Needs PyTorch (ImportError naming `pip install torch` without it).

    Nothing from the file is run: the unpickler builds tensors and the attributes of `torch.nn` modules and
    of a class named `NoisyRNN`, and refuses any other global (ValueError naming it).

    **Arguments:**

    - `path`: the file.

    **Returns:** `(state_dict, args)`: the state dict as NumPy arrays (keys as `Module.state_dict()` names
    them); `args` the public constructor arguments the module records (`eps`, `beta`, `gamma_A`, `gamma_W`,
    `alpha`, `solver`, `add_noise`, `mult_noise`; `init_std` is not kept by the public model), None for a
    state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle(torch, str(path)),
                         weights_only=False)
    except pickle.UnpicklingError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # not a torch file, or a corrupt one
        raise ValueError(f"{str(path)!r} could not be read as a torch.save file: {type(e).__name__}: {e}") from None
    if isinstance(obj, SavedModule):
        state, args = _module_state(obj), {k: obj.__dict__[k] for k in PUBLIC_ARGS if k in obj.__dict__}
    elif isinstance(obj, Mapping):
        state, args = dict(obj), None
    else:
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}; expected the public NoisyRNN module "
                         "(torch.save(model)) or its state dict (torch.save(model.state_dict()))")
    return {str(k): _to_numpy(v) for k, v in state.items()}, args


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------
# A model as a run directory; a public file as one.
# ------------------------------------------------------------------------------------------------------
def write_model_run(model: NoisyRNN, run_dir: str | Path, tcfg: TrainConfig, *, data=None, overwrite: bool = False,
                    extra_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a model as a run directory of zero epochs, which `load_run`, `nrnn-robustness`, the analyses
    and `nrnn-train --resume RUN --epochs N` (training on from these weights) accept.

    **Arguments:**

    - `model`: a `NoisyRNN` with a built-in cell.
    - `run_dir`: the run directory (refused if it holds a run, unless `overwrite`).
    - `tcfg`: its training configuration: `dataset`, `data_dir`, `data_options` say the data the model
      applies to; `epochs` should be 0 (nothing was trained here).
    - `data`: the loaded data set (default: `tcfg`'s); its input_dim and num_classes must be the model's.
    - `overwrite`: replace a run in `run_dir`.
    - `extra_summary`: entries added to summary.json (e.g. where the model came from).

    **Returns:** the summary written to summary.json: the clean validation and test metrics and the test
    accuracy under `tcfg.eval_white_noise`, as for a trained run.
    """
    from . import checkpoint, runs
    from .data import load_dataset
    from .evaluate import summarize
    from .state import init_train_state, make_optimizer, metric_names, zero_sums

    if not isinstance(model, NoisyRNN):
        fail("", "model", type(model).__name__, "expected a nrnn_jax.NoisyRNN")
    if model.cfg.cell not in BUILT_IN_CELLS:
        fail("", "model.cfg.cell", model.cfg.cell, "a run directory of a user cell records its factory; train it with "
             "train_and_evaluate(..., cell=factory) instead")
    if tcfg.mode != "deterministic" and not model.cfg.is_noisy:
        fail("TrainConfig", "mode", tcfg.mode, "the model has no noise; use mode='deterministic'")
    if tcfg.data_dir is not None:
        tcfg = tcfg.replace(data_dir=str(Path(tcfg.data_dir).expanduser().resolve()))
    data = data if data is not None else load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))
    for field, want, have in (("input_dim", model.cfg.input_dim, data.input_dim),
                              ("num_classes", model.cfg.num_classes, data.num_classes)):
        if want != have:
            fail("NRNNConfig", field, want, f"the data set {tcfg.dataset!r} has {field}={have}; pick the data set "
                 "(and --data-option) the model was trained on")
    run_dir = Path(run_dir)
    with runs.writer(run_dir):  # the run's one writer (RunBusyError if another process writes it)
        runs.start_run(run_dir, {"model": model.cfg.to_dict(), "train": tcfg.to_dict(), "dataset": data.description},
                       overwrite=overwrite)
        params = nnx.split(model)[1]
        state = init_train_state(params, make_optimizer(tcfg, 1), tcfg.seed)
        checkpoint.save_checkpoint(run_dir / "checkpoints", 0, {"state": state, "sums": zero_sums(metric_names(tcfg))})
        summary = {**summarize(model, data, tcfg), "mode": tcfg.mode, "dataset": data.name, "epochs": tcfg.epochs,
                   "steps": 0, "train_time_s": 0.0, **dict(extra_summary or {})}
        runs.write_json(run_dir / "summary.json", summary)
    return summary


REQUIRED_PUBLIC_ARGS = ("solver", "eps", "beta", "gamma_A", "gamma_W")


def convert_public_file(path: str | Path, run_dir: str | Path, *, dataset: str, data_dir: str | None = None,
                        data_options: Mapping[str, str] | None = None, overwrite: bool = False,
                        dtype: str = "float32", **given: Any) -> tuple[NoisyRNN, dict[str, Any]]:
    """A `torch.save` file of the public code as a run directory (what `nrnn-from-public` does).

    **Arguments:**

    - `path`: the file: a whole public model (its driver's `torch.save(model)`) or its state dict
      (`read_public_file`; needs PyTorch).
    - `run_dir`, `overwrite`: the run directory to write (`write_model_run`).
    - `dataset`, `data_dir`, `data_options`: the data the model was trained on, as for `TrainConfig`
      (the public permuted MNIST feeds raw pixels: `data_options={"pixel_scale": "raw"}`).
    - `dtype`: the model's dtype, as in `from_public`.
    - `given`: public constructor arguments (`solver`, `eps`, `beta`, `gamma_A`, `gamma_W`, `alpha`,
      `init_std`, `add_noise`, `mult_noise`; None: not given). A whole-module file records all but
      `init_std`, and a given value must agree with the file's; a state-dict file records none, so it needs
      at least `solver`, `eps`, `beta`, `gamma_A`, `gamma_W`.

    **Returns:** `(model, summary)`: the converted model (`from_public`) and the run's summary, which also
    records the file (`imported_from`: path, sha256, what it held, the arguments used). The run's mode is
    "implicit" when the model has noise (the public `mode='train'` noise), else "deterministic".
    """
    unknown = sorted(set(given) - set(PUBLIC_ARGS))
    if unknown:
        raise ValueError(f"unknown public argument(s) {unknown}; the public constructor's are {list(PUBLIC_ARGS)}")
    given = {k: v for k, v in given.items() if v is not None}
    check_choice("", "dtype", dtype, ("float32", "float64"))
    tcfg = TrainConfig(dataset=dataset, data_dir=data_dir, data_options=dict(data_options or {}), epochs=0)
    state, recorded = read_public_file(path)
    kind = "state_dict" if recorded is None else "module"
    recorded = recorded or {}
    for name, value in given.items():
        if name in recorded and recorded[name] != value:
            fail("", name, value, f"{str(path)!r} records {name}={recorded[name]!r}; leave the argument out or give "
                 "that value")
    args = {**recorded, **given}
    missing = [k for k in REQUIRED_PUBLIC_ARGS if k not in args]
    if missing:
        raise ValueError(f"{str(path)!r} does not record the public constructor's argument(s) {missing} (a state "
                         f"dict holds arrays only); give them (nrnn-from-public --{' --'.join(missing)})")
    model = from_public(state, **args, dtype=dtype)
    tcfg = tcfg.replace(mode="implicit" if model.cfg.is_noisy else "deterministic")
    source = {"file": str(Path(path).resolve()), "sha256": file_sha256(path),
              "format": kind, "public_args": args}
    summary = write_model_run(model, run_dir, tcfg, overwrite=overwrite, extra_summary={"imported_from": source})
    return model, summary
