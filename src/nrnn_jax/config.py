"""Configurations: frozen, self-validating objects for the model (`NRNNConfig`), training (`TrainConfig`)
and several models trained at once (`Sweep`).

Every field is checked at construction by the helpers of `nrnn_jax.validation`; a bad value raises
`ValueError` naming the field, the value and what is allowed, so that mistakes surface before any tracing
or compilation happens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from .validation import (check_bool, check_choice, check_int, check_int_tuple, check_real, check_real_tuple, fail)


def check_options(owner: str, field: str, value: Any) -> tuple[tuple[str, str], ...]:
    """Loader options as sorted (name, value) string pairs, from a dict or a sequence of pairs (as JSON
    gives them back)."""
    items = list(value.items()) if isinstance(value, dict) else value
    ok = isinstance(items, (list, tuple)) and all(
        isinstance(it, (list, tuple)) and len(it) == 2 and all(isinstance(v, str) for v in it) for it in items)
    if not ok or len({it[0] for it in items}) != len(items):
        fail(owner, field, value, "expected a dict or a sequence of (name, value) pairs of strings with distinct names")
    return tuple(sorted((str(k), str(v)) for k, v in items))

# The string values of the serialisable description; `nrnn_jax._registry` turns them into objects.
BUILT_IN_CELLS = ("lipschitz", "antisymmetric", "gru", "tanh", "lstm")
# "custom": how run directories written before user cells were recorded by import path mark a user cell
# (its factory then under "cell_factory" in config.json); still read.
CELLS = BUILT_IN_CELLS + ("custom",)
CONVENTIONS = ("sde", "reference")
NOISE_KINDS = ("diagonal", "scalar", "custom")
SOLVERS = ("euler", "euler_heun", "milstein")
BACKENDS = ("diffrax", "scan")
# "diffeqsolve" is read for run directories that name it and runs the same loop as "steps" (same numbers).
DIFFRAX_LOOPS = ("steps", "diffeqsolve")
GRADIENTS = ("adjoint", "autodiff")
DTYPES = ("float32", "float64")
MODES = ("deterministic", "implicit", "explicit")
OPTIMIZERS = ("adam", "sgd")
REG_METHODS = ("exact", "probe")
# Counter-based generators whose keys are uint32[2] (so the state's key and checkpoints have one layout).
PRNGS = ("threefry2x32", "philox4x32")
DIVERGENCE_POLICIES = ("raise", "rollback")


class ImportPath(str):
    """The import path 'module:qualname' of user code, kept as text and never imported by the library: what
    `read_run_config` puts in `NRNNConfig.diffusion` for a run's recorded user diffusion that was neither
    passed nor trusted. A configuration holding one can be read, compared and written back, not run (a
    model of it is refused, naming the path). A plain string given as `NRNNConfig(diffusion="module:name")`
    is the caller naming the code, and is imported."""

    def __repr__(self) -> str:
        return f"ImportPath({str.__repr__(self)})"


def is_import_path(text: str) -> bool:
    """Whether `text` has the form 'module:qualname' of an import path."""
    module, sep, qualname = str(text).partition(":")
    return bool(sep and module and qualname)


def import_path(obj) -> str:
    """'module:qualname' of a function or class, how run directories record user code (an `ImportPath`
    is its own)."""
    if isinstance(obj, ImportPath):
        return obj
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class Unimportable(Exception):
    """Why an import path 'module:name' names nothing importable (`resolve_import_path`); the message says
    which module or attribute is missing."""


def resolve_import_path(path: str, searched: str = "the Python path (sys.path)"):
    """The object an import path 'module:qualname' names, imported.

    **Arguments:**

    - `path`: `"module:qualname"`, e.g. `"mycells:LeakyCell"` or `"mypkg.noise:sigma"`.
    - `searched`: where modules are looked up, in words, for the message of a missing module.

    **Returns:** the object. **Raises:** `Unimportable` saying what is missing: a malformed path, code
    defined in a notebook, a script's `__main__` or a function (which no import reaches), a module that is
    not found, a module whose own import fails on a missing module, or a missing attribute (with close
    names of that module). Other errors raised by the module's own code propagate."""
    import difflib
    import importlib

    module, sep, qualname = str(path).partition(":")
    if not is_import_path(path):
        raise Unimportable("expected an import path 'module:name', e.g. 'mycells:LeakyCell'")
    if module == "__main__" or "<locals>" in qualname:
        raise Unimportable("it is defined in a notebook, a script's __main__ or a function, which no import "
                               "reaches")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if module == missing or module.startswith(missing + "."):
            raise Unimportable(f"no module named {missing!r} (searched {searched})") from None
        raise Unimportable(f"importing module {module!r} failed: {e}") from None
    except ImportError as e:
        raise Unimportable(f"importing module {module!r} failed: {e}") from None
    owner = f"module {module!r}" + (f" ({obj.__file__})" if getattr(obj, "__file__", None) else "")
    done = []
    for part in qualname.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("__")], n=3)
            hint = f"; close names: {', '.join(map(repr, close))}" if close else ""
            raise Unimportable(f"{owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        done.append(part)
        owner = f"{module}:{'.'.join(done)}"
    return obj


_PASS_THE_OBJECT = "pass the object itself, e.g. load_run(run_dir, cell=factory, diffusion=sigma)"


def import_object(owner: str, field: str, path: str, searched: str = "the Python path (sys.path)",
                 remedy: str | None = _PASS_THE_OBJECT):
    """The object an import path names; a ValueError names the field, says what is missing
    (`resolve_import_path`) and adds `remedy`."""
    try:
        return resolve_import_path(path, searched)
    except Unimportable as e:
        fail(owner, field, path, f"this user code cannot be imported from here: {e}" + (f"; {remedy}" if remedy else ""))


class ConfigMixin:
    """`replace`, `to_dict` and `from_dict` for the frozen configuration dataclasses, rejecting unknown
    field names with the list of known ones."""

    @classmethod
    def _check_names(cls, names) -> None:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields are {known}.")

    def replace(self, **changes: Any):
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        cls._check_names(d)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class NRNNConfig(ConfigMixin):
    """Hyper-parameters of a noisy RNN: its cell, noise, discretisation and backend (docs/theory.md §1–§2, §8).

    **Arguments:**

    - `cell`: the drift f(h, z) (`nrnn_jax.cells`): `"lipschitz"` (default, the Lipschitz RNN below),
      `"antisymmetric"`, `"gru"`, `"tanh"`, `"lstm"` (state (c, h), the decoder reading h); or the import
      path `"module:name"` of a user cell, the record a model makes of a cell passed as
      `NoisyRNN(cfg, rngs=rngs, cell=my_cell)` (text, never imported by the model: a model of it needs the
      cell passed). `"custom"` (a user cell whose factory the run directory records) is read too.
    - `input_dim`, `hidden`, `num_classes`: sizes n, d and the number of output classes.
    - `dt`: the step size δ of the Euler–Maruyama discretisation (the initial per-unit step `s` of the
      reference convention).
    - `alpha`, `beta`, `gamma_a`, `gamma_w`: drift f(h, x) = α A h + tanh(W h + U x + b) with
      A = β(M_A − M_Aᵀ) + (1 − β)(M_A + M_Aᵀ) − γ_A I and the same for W. β = 1, α = 0 is the
      antisymmetric RNN; `eps_add = eps_mult = 0` is the deterministic Lipschitz RNN.
    - `eps_add`, `eps_mult`: noise levels. Under `convention="sde"` the diffusion is
      σ(h) = ε_add I + ε_mult diag(h) (`noise_kind="diagonal"`) or ε_add dB + ε_mult h dβ with one scalar
      Brownian motion β (`noise_kind="scalar"`).
    - `init_std`: entries of M_A, M_W are drawn from N(0, (init_std / hidden)²).
    - `convention`: `"sde"` (the paper's Euler–Maruyama scheme, default) or `"reference"` (the public
      PyTorch code: h ← h + (s ⊙ u) ⊙ f + ε_add ξ with u ~ U[1 − ε_mult, 1]^d and a learnable step s).
    - `noise_kind`: `"diagonal"` (d independent Brownian motions) or `"scalar"` (multiplicative part driven
      by one Brownian motion; the case of stochastic stabilisation, docs/theory.md (5.6)), or `"custom"`: the
      user diffusion `diffusion`. Only for `"sde"`.
    - `diffusion`: a user σ(h, z) for one example (h, z of shape (hidden,)), returning a diagonal (hidden,)
      or a (hidden, m) matrix for m Brownian motions (`nrnn_jax.noise.CustomNoise`); it requires
      `noise_kind="custom"` (`NoisyRNN(cfg, rngs=..., diffusion=sigma)` sets both), and ε_add = ε_mult = 0
      (scale σ itself). Recorded in run directories by its import path; `read_run_config` gives it back as
      an `ImportPath` (text, not imported) unless the function is passed or the run is trusted. A string
      given here is imported.
    - `noise_on`: the parts of the cell's state the noise enters: `()` (default) the whole state; else
      names of parts: `"output"` (the part the decoder reads, e.g. h of the LSTM) or the name of a leaf of
      the state (its key path: `"0"`, `"1"` for a tuple (c, h), `"h"` for a dict entry). The noise width
      `NoisyRNN.noise_dim` follows from it. Not with the reference convention.
    - `solver`: `"euler"` (Itô Euler–Maruyama, default), `"euler_heun"` (Stratonovich Euler–Heun) or
      `"milstein"` (Itô Milstein; requires commutative noise, so not scalar noise together with additive
      noise). Under `"reference"` only `"euler"` is defined.
    - `backend`: `"diffrax"` (default; a diffrax solver on the step grid) or `"scan"` (a `lax.scan` of the
      library's own step, giving the same numbers).
    - `diffrax_loop` (diffrax backend): `"steps"`, a `lax.scan` of the diffrax solver's `step` on the grid
      (diffrax's manual stepping; `nrnn_jax._loops.DiffraxLoop`). `"diffeqsolve"` is accepted for
      configurations that name it and runs the same loop: `diffrax.diffeqsolve` with `StepTo` on the same
      grid took the same steps and gave the same numbers, at a higher cost per step.
    - `gradient`: `"adjoint"` (default; the exact discrete adjoint of `nrnn_jax.recurrence`: a reverse
      scan of the hidden-state cotangent, the matrix gradients as one product after the loop — the same
      gradients, faster, reverse mode only) or `"autodiff"` (JAX differentiates the backend's loop; use it
      to take `jax.jvp` / `jax.jacfwd` through the model).
    - `dtype`: `"float32"` or `"float64"` for parameters and states (float64 needs `jax_enable_x64`).
    """

    input_dim: int = 1
    hidden: int = 64
    num_classes: int = 2
    dt: float = 0.1
    alpha: float = 1.0
    beta: float = 0.75
    gamma_a: float = 0.001
    gamma_w: float = 0.001
    eps_add: float = 0.0
    eps_mult: float = 0.0
    init_std: float = 0.1
    convention: Literal["sde", "reference"] = "sde"
    noise_kind: Literal["diagonal", "scalar", "custom"] = "diagonal"
    solver: Literal["euler", "euler_heun", "milstein"] = "euler"
    backend: Literal["diffrax", "scan"] = "diffrax"
    diffrax_loop: Literal["steps", "diffeqsolve"] = "steps"
    gradient: Literal["adjoint", "autodiff"] = "adjoint"
    dtype: Literal["float32", "float64"] = "float32"
    cell: str = "lipschitz"
    diffusion: Any = None
    noise_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        own = "NRNNConfig"
        if not (isinstance(self.cell, str) and (self.cell in CELLS or is_import_path(self.cell))):
            fail(own, "cell", self.cell, f"expected a built-in cell ({', '.join(BUILT_IN_CELLS)}) or the import path "
                 "'module:name' of a user cell (a user cell is passed as NoisyRNN(cfg, rngs=rngs, cell=my_cell))")
        names = self.noise_on
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(
                isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            fail(own, "noise_on", names, "expected a tuple of distinct part names of the cell's state, e.g. "
                 "('output',) or ('1',), or () for the whole state")
        object.__setattr__(self, "noise_on", tuple(names))
        if self.noise_on and self.convention == "reference":
            fail(own, "noise_on", self.noise_on, "the reference convention injects its own noise into the whole "
                 "state; use noise_on=() or convention='sde'")
        for name, minimum in (("input_dim", 1), ("hidden", 1), ("num_classes", 2)):
            check_int(own, name, getattr(self, name), minimum)
        check_real(own, "dt", self.dt, 0.0, lo_open=True)
        check_real(own, "alpha", self.alpha)
        check_real(own, "beta", self.beta, 0.0, 1.0)
        for name in ("gamma_a", "gamma_w", "eps_add", "eps_mult", "init_std"):
            check_real(own, name, getattr(self, name), 0.0)
        for name, choices in (("convention", CONVENTIONS), ("noise_kind", NOISE_KINDS), ("solver", SOLVERS),
                              ("backend", BACKENDS), ("diffrax_loop", DIFFRAX_LOOPS), ("gradient", GRADIENTS),
                              ("dtype", DTYPES)):
            check_choice(own, name, getattr(self, name), choices)
        if self.convention == "reference":
            if self.eps_mult > 1.0:
                fail(own, "eps_mult", self.eps_mult, "the reference convention draws u ~ U[1 - eps_mult, 1], "
                      "so eps_mult must lie in [0, 1]")
            if self.noise_kind != "diagonal":
                fail(own, "noise_kind", self.noise_kind, "the reference convention has its own noise (no scalar "
                      "or user diffusion); use noise_kind='diagonal' or convention='sde'")
            if self.solver != "euler":
                fail(own, "solver", self.solver, "the reference convention is a fixed update rule; "
                      "use solver='euler' or convention='sde'")
        if isinstance(self.diffusion, str) and not isinstance(self.diffusion, ImportPath):  # named by the caller
            object.__setattr__(self, "diffusion", import_object(own, "diffusion", self.diffusion))
        if (self.diffusion is None) != (self.noise_kind != "custom"):
            fail(own, "noise_kind" if self.diffusion is None else "diffusion",
                 self.noise_kind if self.diffusion is None else self.diffusion,
                 "a user diffusion goes with noise_kind='custom' and noise_kind='custom' needs diffusion=sigma "
                 "(sigma(h, z) for one example); NoisyRNN(cfg, rngs=..., diffusion=sigma) sets both")
        if self.diffusion is not None:
            code = not isinstance(self.diffusion, ImportPath)  # an ImportPath is text: nothing to call or check
            if code and not callable(self.diffusion):
                fail(own, "diffusion", self.diffusion, "expected a function sigma(h, z) of one example")
            if self.eps_add or self.eps_mult:
                fail(own, "eps_add" if self.eps_add else "eps_mult", self.eps_add or self.eps_mult,
                     "the noise levels do not apply to a user diffusion: set them to 0 and scale sigma itself")
            if code:
                from .noise import custom_shape  # validates the shape: (hidden,) or (hidden, m)

                custom_shape(self.diffusion, self.hidden)
        if self.solver == "milstein" and self.noise_kind == "scalar" and self.eps_add > 0:
            fail(own, "solver", self.solver, "Milstein needs commutative noise, which scalar multiplicative "
                  "noise with eps_add > 0 is not; set eps_add=0, use noise_kind='diagonal', or pick "
                  "solver='euler' or 'euler_heun'")

    @property
    def noise_dim(self) -> int:
        """Width of the standard-normal noise array `xi` of shape (batch, T, noise_dim) for a cell whose state
        is one array (hidden,); `NoisyRNN.noise_dim` gives it for any cell.

        `hidden` for diagonal SDE noise; `hidden + 1` for scalar noise (d additive components, then the
        one multiplicative Brownian motion); `2 * hidden` for the reference convention (additive normals,
        then normals mapped to U[1 - eps_mult, 1] by the normal CDF).
        """
        from ._registry import noise_width  # the registry builds the configured scheme and diffusion

        return noise_width(self)

    @property
    def is_noisy(self) -> bool:
        return self.eps_add > 0 or self.eps_mult > 0 or self.diffusion is not None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.diffusion is not None:
            d["diffusion"] = import_path(self.diffusion)
        return d

    def check_runnable(self) -> None:
        """Refuse (ValueError naming the path) a configuration whose user diffusion is an `ImportPath`,
        i.e. recorded text that was not imported: no model can be built or run from it."""
        if isinstance(self.diffusion, ImportPath):
            fail("NRNNConfig", "diffusion", self.diffusion, "this is a run's recorded import path, which was not "
                 "imported, so no model can run with it; pass the function (load_run(run_dir, diffusion=sigma), "
                 "read_run_config(run_dir, diffusion=sigma)), or, if you trust the run directory and the code "
                 "it names, trust_code=True")

    @property
    def has_additive_noise(self) -> bool:
        return self.eps_add > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """Everything about training that is not the model (validated at construction).

    - `dataset`, `data_dir`: the task (`nrnn_jax.load_dataset`) and where its files are.
    - `data_options`: keyword options of the data set's loader, as (name, value) pairs or a dict, e.g.
      `{"permutation": "public", "pixel_scale": "raw"}` for MNIST (`nrnn_jax.data.load_mnist`); stored as
      sorted pairs so that the configuration stays hashable and a run directory reloads the same data.
    - `mode`: "deterministic", "implicit" (noise injection) or "explicit" (penalty).
    - `batch_size`: examples per training step, at most the N of the training split (`train_and_evaluate`
      refuses more). An epoch takes ⌊N / batch_size⌋ batches from its shuffled order; the last
      N mod batch_size examples of that order sit the epoch out (others in each epoch), which the run's
      log states when it starts.
    - `optimizer` "adam" or "sgd" (with `momentum`); `lr`; step decay: the learning rate is multiplied
      by `lr_decay` at each epoch in `lr_decay_epochs` (the paper: × 0.1 at epoch 90); `grad_clip` > 0
      clips the global gradient norm; `weight_decay` adds decoupled weight decay.
    - `reg_weight` (λ), `reg_method` ("exact" or "probe"), `num_probes`: explicit mode only.
    - `checkpoint_every`: also checkpoint every this many steps (0: only at the end of each epoch).
    - `prng`: the generator of the injected noise and the probes: "threefry2x32" (JAX's default; drawn by
      `nrnn_jax.prng.normal`, which gives `jax.random.normal`'s numbers in one fused pass) or "philox4x32"
      (Philox4x32-10, through `jax.random.normal`). Both give independent standard normals; they give
      different draws.
    - `on_divergence`: what a non-finite loss or gradient does. "raise" (default): stop with
      `TrainingDiverged`, keeping the last good checkpoint. "rollback": go back to the state at the start of
      the epoch, multiply the learning rate by `rollback_lr_factor`, clip the global gradient norm at
      `rollback_grad_clip` (or the smaller `grad_clip`), restart the optimizer's moments, and redo the epoch;
      at most `max_rollbacks` times, then raise. Each rollback is a record in metrics.jsonl and the summary.
    - `eval_white_noise`: standard deviations of white input noise at which the final model's test
      accuracy is also reported (docs/theory.md (6.1)).
    - `tensorboard`: write TensorBoard event files of the per-epoch metrics into the run directory
      (`RUN/tensorboard/`, `nrnn_jax._tensorboard`); False writes none.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    data_options: tuple[tuple[str, str], ...] = ()
    mode: Literal["deterministic", "implicit", "explicit"] = "deterministic"
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 500
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 0.1
    lr_decay_epochs: tuple[int, ...] = ()
    grad_clip: float = 0.0
    seed: int = 0
    reg_weight: float = 1.0
    reg_method: Literal["exact", "probe"] = "probe"
    num_probes: int = 1
    eval_white_noise: tuple[float, ...] = (1.0,)
    checkpoint_every: int = 0
    prng: Literal["threefry2x32", "philox4x32"] = "threefry2x32"
    on_divergence: Literal["raise", "rollback"] = "raise"
    rollback_lr_factor: float = 0.5
    rollback_grad_clip: float = 1.0
    max_rollbacks: int = 3
    tensorboard: bool = True

    def __post_init__(self):
        own = "TrainConfig"
        object.__setattr__(self, "tensorboard", check_bool(own, "tensorboard", self.tensorboard))
        for name, choices in (("mode", MODES), ("optimizer", OPTIMIZERS), ("prng", PRNGS),
                              ("reg_method", REG_METHODS), ("on_divergence", DIVERGENCE_POLICIES)):
            check_choice(own, name, getattr(self, name), choices)
        for name, minimum in (("epochs", 0), ("batch_size", 1), ("eval_batch_size", 1), ("num_probes", 1),
                              ("seed", 0), ("checkpoint_every", 0), ("max_rollbacks", 0)):
            check_int(own, name, getattr(self, name), minimum)
        for name in ("lr", "lr_decay", "rollback_grad_clip"):
            check_real(own, name, getattr(self, name), 0.0, lo_open=True)
        check_real(own, "rollback_lr_factor", self.rollback_lr_factor, 0.0, 1.0, lo_open=True)
        for name in ("momentum", "weight_decay", "grad_clip", "reg_weight"):
            check_real(own, name, getattr(self, name), 0.0)
        object.__setattr__(self, "data_options", check_options(own, "data_options", self.data_options))
        object.__setattr__(self, "lr_decay_epochs", check_int_tuple(own, "lr_decay_epochs", self.lr_decay_epochs, 1))
        object.__setattr__(self, "eval_white_noise",
                           check_real_tuple(own, "eval_white_noise", self.eval_white_noise, 0.0))


@dataclasses.dataclass(frozen=True)
class Sweep(ConfigMixin):
    """Several models trained at once: member i has initialisation and noise seed `seeds[i]` and noise
    levels (`eps_add[i]`, `eps_mult[i]`) (None: the model configuration's). Fields of length 1 are
    broadcast to the others. All members see the same batches (data order from `TrainConfig.seed`); the
    train step is the single-model step vmapped over the members, so a sweep of N costs one compilation.

    `Sweep.grid(seeds=..., noise_levels=[(eps_add, eps_mult), ...])` builds every combination.
    """

    seeds: tuple[int, ...] = (0,)
    eps_add: tuple[float, ...] | None = None
    eps_mult: tuple[float, ...] | None = None

    def __post_init__(self):
        own = "Sweep"
        object.__setattr__(self, "seeds", check_int_tuple(own, "seeds", self.seeds, 0, nonempty=True))
        for name in ("eps_add", "eps_mult"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_real_tuple(own, name, getattr(self, name), 0.0, nonempty=True))
        lengths = {len(v) for v in (self.seeds, self.eps_add, self.eps_mult) if v is not None} - {1}
        if len(lengths) > 1:
            fail(own, "seeds", self.seeds, f"seeds, eps_add and eps_mult must have one common length (or length 1); "
                 f"got lengths {len(self.seeds)}, {None if self.eps_add is None else len(self.eps_add)}, "
                 f"{None if self.eps_mult is None else len(self.eps_mult)}")

    @classmethod
    def grid(cls, seeds=(0,), noise_levels=None) -> "Sweep":
        """Every (seed, noise level) combination; `noise_levels` is a sequence of (eps_add, eps_mult)."""
        if noise_levels is None:
            return cls(seeds=tuple(seeds))
        pairs = [(s, a, m) for (a, m) in noise_levels for s in seeds]
        return cls(seeds=tuple(p[0] for p in pairs), eps_add=tuple(p[1] for p in pairs),
                   eps_mult=tuple(p[2] for p in pairs))

    @property
    def size(self) -> int:
        return max(len(v) for v in (self.seeds, self.eps_add, self.eps_mult) if v is not None)

    def _per_member(self, values, default=None) -> list:
        """A field broadcast to one value per member (None: `default` for every member)."""
        if values is None:
            return [default] * self.size
        return list(values) * self.size if len(values) == 1 else list(values)

    def member_seeds(self) -> list[int]:
        return self._per_member(self.seeds)

    def noise_levels(self, mcfg: NRNNConfig) -> np.ndarray:
        """(size, 2) array of each member's (eps_add, eps_mult)."""
        return np.array([self._per_member(self.eps_add, mcfg.eps_add),
                         self._per_member(self.eps_mult, mcfg.eps_mult)], np.float64).T

    def member_config(self, mcfg: NRNNConfig, i: int) -> NRNNConfig:
        """Member i's model configuration (its own noise levels)."""
        levels = self.noise_levels(mcfg)[i]
        return mcfg.replace(eps_add=float(levels[0]), eps_mult=float(levels[1]))

    def structure_config(self, mcfg: NRNNConfig) -> NRNNConfig:
        """The configuration that fixes the shape of the vmapped step: each noise level the largest over the
        members, so that a noise term exists whenever some member uses it (it is exactly zero for a member
        whose level is 0). The members' own levels are passed to the step as arrays."""
        levels = self.noise_levels(mcfg)
        return mcfg.replace(eps_add=float(levels[:, 0].max()), eps_mult=float(levels[:, 1].max()))


# One line per field, for `nrnn-train --help` / `nrnn-compare --help` (the class docstrings above hold the
# long form). tests/test_cli_workflow.py checks that every field of both classes has an entry.
FIELD_HELP: dict[str, dict[str, str]] = {
    "NRNNConfig": {
        "diffusion": "a user diffusion sigma(h, z) as an import path module:function, a module in the current "
                     "directory found (with --noise-kind custom and no eps levels)",
        "cell": "the drift f(h, z): lipschitz, antisymmetric, gru, tanh or lstm (a user cell: --cell-factory)",
        "noise_on": "comma-separated parts of the cell's state the noise enters, e.g. output (the LSTM's h); "
                    "none: the whole state",
        "input_dim": "input features per step",
        "hidden": "hidden units d",
        "num_classes": "output classes",
        "dt": "step size δ of the discretisation (the initial per-unit step s under --convention reference)",
        "alpha": "α in the drift α A h + tanh(W h + U x + b)",
        "beta": "β in [0, 1]: A = β(M − Mᵀ) + (1 − β)(M + Mᵀ) − γ_A I (1: antisymmetric), same for W",
        "gamma_a": "γ_A ≥ 0, the diagonal shift of A",
        "gamma_w": "γ_W ≥ 0, the diagonal shift of W (and γ of the antisymmetric cell)",
        "eps_add": "additive noise level ε_add ≥ 0",
        "eps_mult": "multiplicative noise level ε_mult ≥ 0",
        "init_std": "entries of M_A, M_W drawn from N(0, (init_std / hidden)²)",
        "convention": "sde: the paper's Euler–Maruyama scheme; reference: the public PyTorch update rule",
        "noise_kind": "diagonal: d Brownian motions; scalar: one for the multiplicative part (sde only)",
        "solver": "euler (Itô), euler_heun (Stratonovich) or milstein (Itô, commutative noise)",
        "backend": "diffrax (a diffrax solver on the step grid) or scan (the library's own step, same numbers)",
        "diffrax_loop": "steps (a lax.scan of the diffrax solver's step); diffeqsolve, the name older runs "
                        "record, runs the same loop",
        "gradient": "adjoint (exact discrete adjoint, reverse mode) or autodiff (JAX through the loop)",
        "dtype": "float32 or float64 (float64 needs jax_enable_x64)",
    },
    "TrainConfig": {
        "dataset": "the task (nrnn_jax.load_dataset)",
        "data_dir": "directory with the data files (else $NRNN_DATA, else ~/.cache/nrnn_jax); stored absolute",
        "mode": "deterministic, implicit (noise injection) or explicit (penalty)",
        "epochs": "number of epochs to train (with --resume: a larger value extends the run)",
        "batch_size": "training batch size",
        "eval_batch_size": "evaluation batch size (memory only; may change with --resume)",
        "optimizer": "adam or sgd (with --momentum)",
        "lr": "learning rate",
        "momentum": "SGD momentum",
        "weight_decay": "decoupled weight decay (AdamW for adam)",
        "lr_decay": "factor applied to the learning rate at each epoch of --lr-decay-epochs",
        "lr_decay_epochs": "comma-separated epochs at which the learning rate is multiplied by --lr-decay "
                           "(absolute epoch numbers: unaffected by --epochs, so a resume that extends a run keeps them)",
        "grad_clip": "clip the global gradient norm to this (0: no clipping)",
        "seed": "initialisation, noise and data-order seed",
        "reg_weight": "λ, the weight of the explicit regularizer (explicit mode)",
        "reg_method": "explicit regularizer: exact or probe (Hutchinson-type estimate; explicit mode)",
        "num_probes": "probes of the probe estimator (explicit mode)",
        "eval_white_noise": "comma-separated white-noise stds at which the final test accuracy is also reported",
        "checkpoint_every": "also checkpoint every this many steps (0: only at each epoch end)",
        "prng": "generator of the injected noise and probes: threefry2x32 or philox4x32",
        "data_options": "options of the data set's loader, e.g. {\"pixel_scale\": \"raw\"} (CLI: --data-option)",
        "on_divergence": "on a NaN/Inf loss: raise (stop, keep the last good checkpoint) or rollback (redo the "
                         "epoch with a lower learning rate and clipping)",
        "rollback_lr_factor": "learning-rate factor of each divergence rollback, in (0, 1]",
        "rollback_grad_clip": "gradient-norm clip from the first divergence rollback on",
        "max_rollbacks": "divergence rollbacks allowed before training stops with TrainingDiverged",
        "tensorboard": "write TensorBoard event files into the run directory (RUN/tensorboard/)",
    },
}
