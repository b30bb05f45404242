"""Training and evaluation: pure, jit-compiled steps and the one training loop (math.md §1–§2).

- `train_step(state, batch)` in three modes: `deterministic` (no noise), `implicit` (fresh noise injected
  into the hidden states at every step; the model's own eps_add / eps_mult) and `explicit` (the clean loss
  plus λ times the small-noise explicit regularizer of `nrnn_jax.regularizer`, nothing injected).
- `eval_step` / `evaluate`: loss and accuracy with noise off, over fixed-shape padded batches.
- `train_and_evaluate`: the loop; writes a run directory (config, per-epoch metrics, summary, checkpoint).
  With `sweep=Sweep(...)` it trains several seeds and/or noise levels at once (one vmapped step in one
  jit); with `devices=n` it is data-parallel over a mesh of n devices split along the batch.
- `load_run(run_dir)`: the trained model back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import checkpoint
from .config import ConfigMixin, NRNNConfig
from .data import Dataset, batches, epoch_order, load_dataset, prefetch
from .losses import correct, cross_entropy, masked_mean
from .model import NoisyRNN
from .perturbations import Perturbation, white_noise
from .regularizer import explicit_regularizer

MODES = ("deterministic", "implicit", "explicit")
OPTIMIZERS = ("adam", "sgd")
REG_METHODS = ("exact", "probe")
# Counter-based generators whose keys are uint32[2] (so the state's key and checkpoints have one layout).
PRNGS = ("threefry2x32", "philox4x32")


def _fail(field, value, allowed):
    raise ValueError(f"TrainConfig.{field}={value!r} is invalid: {allowed}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """Everything about training that is not the model (validated at construction).

    - `mode`: "deterministic", "implicit" (noise injection) or "explicit" (penalty).
    - `optimizer` "adam" or "sgd" (with `momentum`); `lr`; step decay: the learning rate is multiplied
      by `lr_decay` at each epoch in `lr_decay_epochs` (the paper: × 0.1 at epoch 90); `grad_clip` > 0
      clips the global gradient norm; `weight_decay` adds decoupled weight decay.
    - `reg_weight` (λ), `reg_method` ("exact" or "probe"), `num_probes`: explicit mode only.
    - `checkpoint_every`: also checkpoint every this many steps (0: only at the end of each epoch).
    - `prng`: the generator of the injected noise and the probes: "threefry2x32" (JAX's default) or
      "philox4x32" (Philox4x32-10, about 3x faster to draw on CPU: at the pixel-MNIST shape the noise is
      12.8 M normals per step). Both give independent standard normals; they give different draws.
    - `eval_white_noise`: standard deviations of white input noise at which the final model's test
      accuracy is also reported (math.md §5).
    """

    dataset: str = "digits"
    data_dir: str | None = None
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

    def __post_init__(self):
        if self.mode not in MODES:
            _fail("mode", self.mode, f"expected one of {MODES}")
        if self.optimizer not in OPTIMIZERS:
            _fail("optimizer", self.optimizer, f"expected one of {OPTIMIZERS}")
        if self.prng not in PRNGS:
            _fail("prng", self.prng, f"expected one of {PRNGS}")
        if self.reg_method not in REG_METHODS:
            _fail("reg_method", self.reg_method, f"expected one of {REG_METHODS}")
        for name, lo in (("epochs", 0), ("batch_size", 1), ("eval_batch_size", 1), ("num_probes", 1), ("seed", 0),
                         ("checkpoint_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                _fail(name, v, f"expected an integer >= {lo}")
        for name, lo_open in (("lr", True), ("momentum", False), ("weight_decay", False), ("lr_decay", True),
                              ("grad_clip", False), ("reg_weight", False)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if lo_open else v >= 0)
            if not ok:
                _fail(name, v, "expected a finite real number " + ("> 0" if lo_open else ">= 0"))
        object.__setattr__(self, "lr_decay_epochs", tuple(self.lr_decay_epochs))
        object.__setattr__(self, "eval_white_noise", tuple(float(s) for s in self.eval_white_noise))
        if any((not isinstance(e, int)) or e < 1 for e in self.lr_decay_epochs):
            _fail("lr_decay_epochs", self.lr_decay_epochs, "expected positive integer epochs")
        if any(not (math.isfinite(s) and s >= 0) for s in self.eval_white_noise):
            _fail("eval_white_noise", self.eval_white_noise, "expected finite standard deviations >= 0")


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
        def fail(field, value, allowed):
            raise ValueError(f"Sweep.{field}={value!r} is invalid: {allowed}.")

        seeds = tuple(self.seeds) if isinstance(self.seeds, (list, tuple)) else self.seeds
        if not isinstance(seeds, tuple) or not seeds or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                            for v in seeds):
            fail("seeds", self.seeds, "expected a non-empty sequence of integers >= 0")
        object.__setattr__(self, "seeds", seeds)
        for name in ("eps_add", "eps_mult"):
            v = getattr(self, name)
            if v is None:
                continue
            ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0 for e in v)
            if not ok:
                fail(name, v, "expected None or a non-empty sequence of finite noise levels >= 0")
            object.__setattr__(self, name, tuple(float(e) for e in v))
        lengths = {len(v) for v in (self.seeds, self.eps_add, self.eps_mult) if v is not None} - {1}
        if len(lengths) > 1:
            fail("seeds", self.seeds, f"seeds, eps_add and eps_mult must have one common length (or length 1); "
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
                         self._per_member(self.eps_mult, mcfg.eps_mult)]).T

    def member_config(self, mcfg: NRNNConfig, i: int) -> NRNNConfig:
        levels = self.noise_levels(mcfg)[i]
        return mcfg.replace(eps_add=float(levels[0]), eps_mult=float(levels[1]))


class TrainState(NamedTuple):
    """The whole state of training: parameters, optimizer state, step counter, PRNG key (uint32[2]) and
    `bad_step`, the first step whose loss or gradients were not finite (−1 if none)."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    bad_step: jax.Array


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state before the first step: optimizer initialised, step 0, key from `seed`, no bad step."""
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed + 1),
                      jnp.full((), -1, jnp.int32))


def _metric_names(tcfg: "TrainConfig") -> list[str]:
    return ["loss", "acc", "grad_norm"] + (["reg"] if tcfg.mode == "explicit" else [])


def _zero_sums(names: list[str], members: int | None = None) -> dict[str, jax.Array]:
    shape = () if members is None else (members,)
    return {k: jnp.zeros(shape, jnp.float32) for k in names}


def _host(v, scale: float = 1.0):
    """A metric for the JSON record: a float, or a list of floats (one per sweep member)."""
    a = np.asarray(v, np.float64) * scale
    return float(a) if a.ndim == 0 else a.tolist()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "[" + ", ".join(f"{e:.4f}" for e in v) + "]"


class TrainingDiverged(FloatingPointError):
    """The loss or the gradients became NaN or Inf; the message names the step and the last good checkpoint."""


def make_optimizer(tcfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    boundaries = {int(e) * steps_per_epoch: tcfg.lr_decay for e in tcfg.lr_decay_epochs}
    schedule = optax.piecewise_constant_schedule(tcfg.lr, boundaries)
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    if tcfg.optimizer == "adam":
        parts.append(optax.adamw(schedule, weight_decay=tcfg.weight_decay) if tcfg.weight_decay > 0
                     else optax.adam(schedule))
    else:
        if tcfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(tcfg.weight_decay))
        parts.append(optax.sgd(schedule, momentum=tcfg.momentum or None))
    return optax.chain(*parts)


def loss_fn(graphdef, params, x, y, mask, key, tcfg: TrainConfig, noise_levels=None):
    """The training objective of the mode and its metrics (a pure function of `params`).

    `noise_levels`: optional (eps_add, eps_mult) JAX values replacing the model configuration's (a sweep
    over noise levels traces them)."""
    model = nnx.merge(graphdef, params)
    if noise_levels is not None:
        model.cfg = model.cfg.with_traced_noise(noise_levels[0], noise_levels[1])
    k_noise, k_reg = jax.random.split(key)
    metrics = {}
    if tcfg.mode == "explicit":
        # The clean loss on the path the expansion is taken around, plus λ · the explicit regularizer.
        reg = explicit_regularizer(model, x, y, method=tcfg.reg_method, num_probes=tcfg.num_probes,
                                   key=k_reg, mask=mask)
        logits = reg.logits
        metrics["reg"] = reg.value
    elif tcfg.mode == "implicit":
        logits = model(x, key=k_noise)
    else:
        logits = model(x)
    loss = masked_mean(cross_entropy(logits, y), mask)
    metrics.update(loss=loss, acc=masked_mean(correct(logits, y), mask))
    objective = loss + tcfg.reg_weight * metrics["reg"] if tcfg.mode == "explicit" else loss
    return objective, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, tcfg: TrainConfig, *, sweep: bool = False) -> Callable:
    """A jit-compiled `train_step(state, x, y, mask) -> (state, metrics)`; the state's buffers are donated.

    With `sweep=True`: `train_step(states, x, y, mask, noise_levels)` for a stack of states (leading axis:
    the members) and their (members, 2) noise levels, all on the same batch, vmapped in one jit; the
    metrics have a leading members axis.
    """

    def train_step(state: TrainState, x, y, mask, noise_levels=None):
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key, impl=tcfg.prng))
        key = jax.random.key_data(key)
        grads, metrics = jax.grad(loss_fn, argnums=1, has_aux=True)(graphdef, state.params, x, y, mask, sub, tcfg,
                                                                    noise_levels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        # Divergence guard: a non-finite loss or gradient leaves the state as it was and is recorded.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
        new = TrainState(keep(params, state.params), keep(opt_state, state.opt_state), state.step + 1, key, bad_step)
        return new, metrics

    if sweep:
        return jax.jit(jax.vmap(train_step, in_axes=(0, None, None, None, 0)), donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0)


def _init_model_state(mcfg: NRNNConfig, tx: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState) of a fresh `NoisyRNN(mcfg, rngs=nnx.Rngs(seed))` with its noise key from seed."""
    graphdef, params = nnx.split(NoisyRNN(mcfg, rngs=nnx.Rngs(seed)))
    return graphdef, init_train_state(params, tx, seed)


def init_sweep_states(mcfg: NRNNConfig, tx: optax.GradientTransformation, sweep: Sweep):
    """(graphdef, stacked TrainState): member i initialised exactly as a single run with
    `TrainConfig.seed = seed_i`."""
    graphdef, states = zip(*(_init_model_state(mcfg, tx, seed) for seed in sweep.member_seeds()))
    return graphdef[0], jax.tree.map(lambda *a: jnp.stack(a), *states)


def unstack(tree, n: int) -> list:
    """The n members of a pytree stacked on its leading axis."""
    return [jax.tree.map(lambda a: a[i], tree) for i in range(n)]


def data_parallel_sharding(devices: int | None):
    """(batch sharding, replicated sharding) over a 1-D mesh of the first `devices` devices, or
    (None, None) for `devices=None`. The train step needs nothing else: jit partitions it from the
    shardings of its arguments (the batch split, the state replicated), and gradients are summed across
    devices by the compiler. Works across hosts after `jax.distributed.initialize()` (then `devices`
    counts all processes' devices)."""
    if devices is None:
        return None, None
    available = jax.device_count()
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= available:
        raise ValueError(f"devices={devices!r} is invalid: expected an integer in [1, {available}] "
                         f"(jax.device_count() = {available}; on CPU, set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before importing jax).")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("batch",))
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P("batch")), jax.sharding.NamedSharding(mesh, P())


@partial(jax.jit, static_argnums=0)
def eval_step(graphdef, params, x, y, mask):
    """Sums over the real examples of a padded batch: (loss sum, correct count, count)."""
    model = nnx.merge(graphdef, params)
    logits = model(x)
    mask = mask.astype(logits.dtype)
    return jnp.sum(cross_entropy(logits, y) * mask), jnp.sum(correct(logits, y) * mask), jnp.sum(mask)


def evaluate(
    model: NoisyRNN,
    x,
    y: np.ndarray,
    batch_size: int = 500,
    *,
    perturb: Perturbation | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Loss and accuracy of `model` (noise off) on (x, y), in fixed-shape batches.

    `perturb(x_batch, y_batch, rng)` (see `nrnn_jax.perturbations`) is applied to each batch with a generator
    seeded by `seed`, so perturbed evaluation needs no copy of the whole data set.
    """
    from .validation import check_inputs, check_labels

    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)
    graphdef, params = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    rng = np.random.default_rng(seed)
    totals = np.zeros(3)
    for b in batches(x, y, batch_size):
        xb = b.x if perturb is None else perturb(b.x, b.y, rng)
        totals += np.array([float(v) for v in eval_step(graphdef, params, xb, b.y, b.mask)])
    return {"loss": totals[0] / totals[2], "acc": totals[1] / totals[2]}


@partial(jax.jit, static_argnums=0)
def _logits_step(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def predict_logits(model: NoisyRNN, x, batch_size: int = 500) -> np.ndarray:
    """Logits (noise off) for every example of x, in fixed-shape batches."""
    from .validation import check_inputs

    check_inputs(x, model.cfg.input_dim)
    graphdef, params = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    y = np.zeros(x.shape[0], np.int32)
    out = [np.asarray(_logits_step(graphdef, params, b.x))[b.mask > 0] for b in batches(x, y, batch_size)]
    return np.concatenate(out)


@dataclasses.dataclass
class RunResult:
    """`model`: the trained model (a sweep's first member); `models`: every member (one for a plain run);
    `summary`: final metrics (a sweep: `summary["members"]`, one dict per member); `history`: the epoch
    records (a sweep: lists with one value per member)."""

    model: NoisyRNN
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: Path | None
    models: list[NoisyRNN] = dataclasses.field(default_factory=list)


def _fit_model_cfg(mcfg: NRNNConfig, data: Dataset) -> NRNNConfig:
    if mcfg.input_dim != data.input_dim or mcfg.num_classes != data.num_classes:
        raise ValueError(
            f"NRNNConfig(input_dim={mcfg.input_dim}, num_classes={mcfg.num_classes}) does not match the data "
            f"set {data.name!r} (input_dim={data.input_dim}, num_classes={data.num_classes}); use "
            f"cfg.replace(input_dim={data.input_dim}, num_classes={data.num_classes})."
        )
    return mcfg


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def train_and_evaluate(
    mcfg: NRNNConfig,
    tcfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    data: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int, NoisyRNN], dict[str, float]] | None = None,
    sweep: Sweep | None = None,
    devices: int | None = None,
) -> RunResult:
    """Train a `NoisyRNN` and evaluate it; the one training loop of the library.

    **Arguments:**

    - `mcfg`, `tcfg`: the model and training configurations (input_dim / num_classes must match the data).
    - `run_dir`: where to write `config.json`, `metrics.jsonl` (one JSON line per epoch), `summary.json`
      and `checkpoints/` (orbax); None writes nothing.
    - `data`: a loaded `Dataset` (default: `load_dataset(tcfg.dataset, tcfg.data_dir)`).
    - `progress`: show a progress bar per epoch.
    - `resume`: continue the run in `run_dir` from its latest checkpoint (same configuration required);
      the result equals that of an uninterrupted run.
    - `overwrite`: replace an existing run in `run_dir` (otherwise refused).
    - `on_epoch_end(epoch, model)`: extra measurements merged into the epoch's record (e.g. the explicit
      regularizer along training); called for each member of a sweep.
    - `sweep`: a `Sweep` of seeds and/or noise levels trained at once (one vmapped step); `tcfg.seed` then
      only sets the data order, shared by the members.
    - `devices`: data-parallel training over the first `devices` devices (a mesh split along the batch;
      `batch_size` must be divisible by it). None: the default device. Results equal those of one device
      up to the order of floating-point sums.

    Checkpoints (every `tcfg.checkpoint_every` steps and at each epoch end) hold the whole `TrainState`
    (parameters, optimizer state, step, PRNG key) and the running metric sums; the data order of an epoch
    is a pure function of (seed, epoch), so nothing else is needed to resume exactly. A NaN or Inf loss or
    gradient raises `TrainingDiverged` naming the step; the last good checkpoint is kept.

    **Returns:** a `RunResult` with the trained model, the summary and the per-epoch history.
    """
    data = data if data is not None else load_dataset(tcfg.dataset, tcfg.data_dir)
    mcfg = _fit_model_cfg(mcfg, data)
    member_cfgs = [mcfg] if sweep is None else [sweep.member_config(mcfg, i) for i in range(sweep.size)]
    for i, c in enumerate(member_cfgs):
        who = "" if sweep is None else f" (sweep member {i}: eps_add={c.eps_add}, eps_mult={c.eps_mult})"
        if tcfg.mode == "implicit" and not c.is_noisy:
            raise ValueError(f"TrainConfig.mode='implicit' needs noise{who}: set NRNNConfig.eps_add or eps_mult > 0.")
        if tcfg.mode == "explicit" and not c.is_noisy:
            raise ValueError(f"TrainConfig.mode='explicit' needs the noise levels of the penalty{who}: set "
                             "NRNNConfig.eps_add or eps_mult > 0.")
    n_train = data.x_train.shape[0]
    batch_size = min(tcfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    batch_sharding, replicated = data_parallel_sharding(devices)
    if devices is not None and batch_size % devices:
        raise ValueError(f"TrainConfig.batch_size={batch_size} is invalid for devices={devices}: data-parallel "
                         "training splits each batch evenly, so the batch size must be a multiple of devices.")

    tx = make_optimizer(tcfg, steps_per_epoch)
    n_members = None if sweep is None else sweep.size
    if sweep is None:
        graphdef, state = _init_model_state(mcfg, tx, tcfg.seed)
        step_args = ()
    else:
        graphdef, state = init_sweep_states(mcfg, tx, sweep)
        step_args = (jnp.asarray(sweep.noise_levels(mcfg), jnp.dtype(mcfg.dtype)),)
    if replicated is not None:
        state = jax.device_put(state, replicated)
    metric_names = _metric_names(tcfg)
    sums = _zero_sums(metric_names, n_members)
    history: list[dict[str, Any]] = []
    ckpt_dir = None if run_dir is None else Path(run_dir) / "checkpoints"

    if run_dir is not None:
        run_dir = Path(run_dir)
        config = {"model": mcfg.to_dict(), "train": tcfg.to_dict()}
        if sweep is not None:
            config["sweep"] = sweep.to_dict()
        if resume:
            state, sums, history = _resume(run_dir, config, state, sums)
        else:
            if (run_dir / "config.json").exists() and not overwrite:
                raise ValueError(f"run_dir={str(run_dir)!r} already holds a run; resume it (resume=True, "
                                 "nrnn-train --resume) or pass overwrite=True (--overwrite) to replace it.")
            if ckpt_dir.exists():
                import shutil

                shutil.rmtree(ckpt_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / "config.json", {**config, "dataset": data.description})
            (run_dir / "metrics.jsonl").write_text("")
    elif resume:
        raise ValueError("resume=True needs a run_dir to resume from.")

    train_step = make_train_step(graphdef, tx, tcfg, sweep=sweep is not None)
    first_step = lambda state: int(np.max(np.asarray(state.step)))
    last_saved = [first_step(state) if resume else None]

    def members(state) -> list[NoisyRNN]:
        if sweep is None:
            return [nnx.merge(graphdef, state.params)]
        return [nnx.merge(graphdef, p) for p in unstack(state.params, sweep.size)]

    def save(state, sums):
        bad_steps = np.atleast_1d(np.asarray(state.bad_step))
        if (bad_steps >= 0).any():
            bad = int(bad_steps[bad_steps >= 0].min())
            who = "" if sweep is None else f" (sweep members {np.flatnonzero(bad_steps >= 0).tolist()})"
            where = (f"the last good checkpoint, step {last_saved[0]}, is kept in {ckpt_dir}"
                     if last_saved[0] is not None else "no checkpoint was written before it")
            raise TrainingDiverged(f"Training diverged{who}: the loss or gradients were NaN/Inf at step {bad} "
                                   f"(epoch {bad // steps_per_epoch + 1}); {where}. Lower the learning rate, "
                                   "set grad_clip, or reduce dt / the noise levels.")
        if ckpt_dir is not None:
            checkpoint.save_checkpoint(ckpt_dir, first_step(state), {"state": state, "sums": sums})
            last_saved[0] = first_step(state)

    t_start = time.perf_counter()
    host_step = first_step(state)
    first_epoch, offset = divmod(host_step, steps_per_epoch)
    for epoch in range(first_epoch + 1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(n_train, tcfg.seed, epoch)
        skip = offset if epoch == first_epoch + 1 else 0
        it = prefetch(batches(data.x_train, data.y_train, batch_size, order=order[skip * batch_size:],
                              drop_remainder=True), sharding=batch_sharding)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=steps_per_epoch - skip, desc=f"epoch {epoch}/{tcfg.epochs}", leave=False)
        for b in it:
            state, m = train_step(state, b.x, b.y, b.mask, *step_args)
            sums = {k: sums[k] + m[k] for k in metric_names}
            host_step += 1  # counted on the host: reading state.step would wait for the device every step
            # The last step of an epoch is saved below, after the epoch's record is written.
            if tcfg.checkpoint_every and host_step % tcfg.checkpoint_every == 0 and host_step % steps_per_epoch:
                save(state, sums)
        models = members(state)
        vals = [evaluate(m_, data.x_val, data.y_val, tcfg.eval_batch_size) for m_ in models]
        one = (lambda xs: xs[0]) if sweep is None else (lambda xs: list(xs))
        record = {"epoch": epoch, "step": first_step(state), "time_s": time.perf_counter() - t0,
                  **{f"train_{k}": _host(v, 1.0 / steps_per_epoch) for k, v in sums.items()},
                  "val_loss": one([v["loss"] for v in vals]), "val_acc": one([v["acc"] for v in vals])}
        if on_epoch_end is not None:
            extra = [on_epoch_end(epoch, m_) for m_ in models]
            record.update({k: one([float(e[k]) for e in extra]) for k in extra[0]})
        sums = _zero_sums(metric_names, n_members)
        if (np.asarray(state.bad_step) < 0).all():
            history.append(record)
            if run_dir is not None:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if log:
                log(f"epoch {epoch:3d}  loss {_fmt(record['train_loss'])}  train acc {_fmt(record['train_acc'])}  "
                    f"val acc {_fmt(record['val_acc'])}  ({record['time_s']:.1f}s)")
        save(state, sums)

    models = members(state)
    summaries = [summarize(m_, data, tcfg) for m_ in models]
    common = {"mode": tcfg.mode, "dataset": data.name, "epochs": tcfg.epochs, "steps": first_step(state),
              "train_time_s": time.perf_counter() - t_start}
    if sweep is None:
        summary = {**summaries[0], **common}
    else:
        seeds, levels = sweep.member_seeds(), sweep.noise_levels(mcfg)
        summary = {**common, "sweep": sweep.to_dict(),
                   "members": [{"seed": seeds[i], "eps_add": float(levels[i, 0]), "eps_mult": float(levels[i, 1]),
                                **summaries[i]} for i in range(sweep.size)]}
    if run_dir is not None:
        _write_json(run_dir / "summary.json", summary)
    return RunResult(models[0], summary, history, run_dir, models)


def _resume(run_dir: Path, config: dict, state: TrainState, sums: dict):
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it holds no run ({path} is missing).")
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(config))  # as it would be written (tuples become lists)
    defaults = {"model": NRNNConfig().to_dict(), "train": json.loads(json.dumps(TrainConfig().to_dict()))}
    for part in ("model", "train", "sweep"):
        # fields added to the library after the run was written take their defaults
        old = {**defaults.get(part, {}), **saved[part]} if part in saved else {}
        new = wanted.get(part, {})
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"Cannot resume {str(run_dir)!r}: it was made with a different {part} "
                             f"configuration (fields differing: {diff}). Use the same settings or a new run_dir.")
    if checkpoint.latest_step(run_dir / "checkpoints") is None:
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it has no checkpoint yet; start it afresh with "
                         "overwrite=True (--overwrite).")
    restored, step = checkpoint.restore_checkpoint(run_dir / "checkpoints", {"state": state, "sums": sums})
    state = TrainState(*restored["state"]) if not isinstance(restored["state"], TrainState) else restored["state"]
    history = []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill: that epoch is recomputed
            continue
        if rec["step"] <= step:
            history.append(rec)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return state, restored["sums"], history


def summarize(model: NoisyRNN, data: Dataset, tcfg: TrainConfig) -> dict[str, Any]:
    """Final clean validation / test metrics and test accuracy under white input noise."""
    val = evaluate(model, data.x_val, data.y_val, tcfg.eval_batch_size)
    test = evaluate(model, data.x_test, data.y_test, tcfg.eval_batch_size)
    out = {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"]}
    for std in tcfg.eval_white_noise:
        out[f"test_acc_white_{std:g}"] = evaluate(model, data.x_test, data.y_test, tcfg.eval_batch_size,
                                                  perturb=white_noise(std), seed=tcfg.seed)["acc"]
    return out


def read_run_config(run_dir: str | Path) -> tuple[NRNNConfig, TrainConfig]:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing.")
    cfg = json.loads(path.read_text())
    return NRNNConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"])


def load_run_dataset(run_dir: str | Path) -> Dataset:
    """The data set a run was trained on. A relative `data_dir` is taken as given if it exists from here,
    else relative to the run directory's ancestors (where the run was started), so that a run directory
    can be evaluated from another working directory."""
    _, tcfg = read_run_config(run_dir)
    data_dir = tcfg.data_dir
    if data_dir is not None and not Path(data_dir).is_absolute() and not Path(data_dir).exists():
        for parent in Path(run_dir).resolve().parents:
            if (parent / data_dir).exists():
                data_dir = str(parent / data_dir)
                break
    return load_dataset(tcfg.dataset, data_dir)


def read_run_sweep(run_dir: str | Path) -> Sweep | None:
    """The `Sweep` of a run directory, or None for a single-model run."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    return Sweep.from_dict(cfg["sweep"]) if "sweep" in cfg else None


def load_run(run_dir: str | Path, member: int | None = None) -> NoisyRNN:
    """The trained model of a run directory written by `train_and_evaluate` / `nrnn-train`.

    For a sweep, `member` picks one member (with its own noise levels in its configuration); it is
    required there and must be None for a single-model run."""
    mcfg, tcfg = read_run_config(run_dir)
    sweep = read_run_sweep(run_dir)
    tx = make_optimizer(tcfg, 1)
    if sweep is None:
        if member is not None:
            raise ValueError(f"member={member!r} is invalid: {run_dir} holds a single model, not a sweep.")
        graphdef, target = _init_model_state(mcfg, tx, tcfg.seed)  # the structure, shapes and dtypes to restore into
    else:
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < sweep.size:
            raise ValueError(f"member={member!r} is invalid: {run_dir} holds a sweep of {sweep.size} models; "
                             f"pass member=0..{sweep.size - 1}.")
        graphdef, target = init_sweep_states(mcfg, tx, sweep)
    sums = _zero_sums(_metric_names(tcfg), None if sweep is None else sweep.size)
    restored, _ = checkpoint.restore_checkpoint(Path(run_dir) / "checkpoints", {"state": target, "sums": sums})
    params = restored["state"].params
    if sweep is None:
        return nnx.merge(graphdef, params)
    model = nnx.merge(graphdef, unstack(params, sweep.size)[member])
    model.cfg = sweep.member_config(mcfg, member)
    return model
