"""Training and evaluation: pure, jit-compiled steps and the one training loop (math.md §1–§2).

- `train_step(state, batch)` in three modes: `deterministic` (no noise), `implicit` (fresh noise injected
  into the hidden states at every step; the model's own eps_add / eps_mult) and `explicit` (the clean loss
  plus λ times the small-noise explicit regularizer of `nrnn_jax.regularizer`, nothing injected).
- `eval_step` / `evaluate`: loss and accuracy with noise off, over fixed-shape padded batches.
- `train_and_evaluate`: the loop; writes a run directory (config, per-epoch metrics, summary, checkpoint).
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

    def __post_init__(self):
        if self.mode not in MODES:
            _fail("mode", self.mode, f"expected one of {MODES}")
        if self.optimizer not in OPTIMIZERS:
            _fail("optimizer", self.optimizer, f"expected one of {OPTIMIZERS}")
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


def _zero_sums(names: list[str]) -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in names}


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


def loss_fn(graphdef, params, x, y, mask, key, tcfg: TrainConfig):
    """The training objective of the mode and its metrics (a pure function of `params`)."""
    model = nnx.merge(graphdef, params)
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


def make_train_step(graphdef, tx: optax.GradientTransformation, tcfg: TrainConfig) -> Callable:
    """A jit-compiled `train_step(state, x, y, mask) -> (state, metrics)`; the state's buffers are donated."""

    def train_step(state: TrainState, x, y, mask):
        key, sub = jax.random.split(state.key)
        grads, metrics = jax.grad(loss_fn, argnums=1, has_aux=True)(graphdef, state.params, x, y, mask, sub, tcfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        # Divergence guard: a non-finite loss or gradient leaves the state as it was and is recorded.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
        new = TrainState(keep(params, state.params), keep(opt_state, state.opt_state), state.step + 1, key, bad_step)
        return new, metrics

    return jax.jit(train_step, donate_argnums=0)


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
    model: NoisyRNN
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: Path | None


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
      regularizer along training).

    Checkpoints (every `tcfg.checkpoint_every` steps and at each epoch end) hold the whole `TrainState`
    (parameters, optimizer state, step, PRNG key) and the running metric sums; the data order of an epoch
    is a pure function of (seed, epoch), so nothing else is needed to resume exactly. A NaN or Inf loss or
    gradient raises `TrainingDiverged` naming the step; the last good checkpoint is kept.

    **Returns:** a `RunResult` with the trained model, the summary and the per-epoch history.
    """
    data = data if data is not None else load_dataset(tcfg.dataset, tcfg.data_dir)
    mcfg = _fit_model_cfg(mcfg, data)
    if tcfg.mode == "implicit" and not mcfg.is_noisy:
        raise ValueError("TrainConfig.mode='implicit' needs noise: set NRNNConfig.eps_add or eps_mult > 0.")
    if tcfg.mode == "explicit" and not mcfg.is_noisy:
        raise ValueError("TrainConfig.mode='explicit' needs the noise levels of the penalty: set "
                         "NRNNConfig.eps_add or eps_mult > 0.")
    n_train = data.x_train.shape[0]
    batch_size = min(tcfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size

    model = NoisyRNN(mcfg, rngs=nnx.Rngs(tcfg.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(tcfg, steps_per_epoch)
    state = init_train_state(params, tx, tcfg.seed)
    metric_names = _metric_names(tcfg)
    sums = _zero_sums(metric_names)
    history: list[dict[str, Any]] = []
    ckpt_dir = None if run_dir is None else Path(run_dir) / "checkpoints"

    if run_dir is not None:
        run_dir = Path(run_dir)
        config = {"model": mcfg.to_dict(), "train": tcfg.to_dict()}
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

    train_step = make_train_step(graphdef, tx, tcfg)
    last_saved = [int(state.step) if resume else None]

    def save(state, sums):
        bad = int(state.bad_step)
        if bad >= 0:
            where = (f"the last good checkpoint, step {last_saved[0]}, is kept in {ckpt_dir}"
                     if last_saved[0] is not None else "no checkpoint was written before it")
            raise TrainingDiverged(f"Training diverged: the loss or gradients were NaN/Inf at step {bad} "
                                   f"(epoch {bad // steps_per_epoch + 1}); {where}. Lower the learning rate, "
                                   "set grad_clip, or reduce dt / the noise levels.")
        if ckpt_dir is not None:
            checkpoint.save_checkpoint(ckpt_dir, int(state.step), {"state": state, "sums": sums})
            last_saved[0] = int(state.step)

    t_start = time.perf_counter()
    host_step = int(state.step)
    first_epoch, offset = divmod(host_step, steps_per_epoch)
    for epoch in range(first_epoch + 1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(n_train, tcfg.seed, epoch)
        skip = offset if epoch == first_epoch + 1 else 0
        it = prefetch(batches(data.x_train, data.y_train, batch_size, order=order[skip * batch_size:],
                              drop_remainder=True))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=steps_per_epoch - skip, desc=f"epoch {epoch}/{tcfg.epochs}", leave=False)
        for b in it:
            state, m = train_step(state, b.x, b.y, b.mask)
            sums = {k: sums[k] + m[k] for k in metric_names}
            host_step += 1  # counted on the host: reading state.step would wait for the device every step
            # The last step of an epoch is saved below, after the epoch's record is written.
            if tcfg.checkpoint_every and host_step % tcfg.checkpoint_every == 0 and host_step % steps_per_epoch:
                save(state, sums)
        model = nnx.merge(graphdef, state.params)
        val = evaluate(model, data.x_val, data.y_val, tcfg.eval_batch_size)
        record = {"epoch": epoch, "step": int(state.step), "time_s": time.perf_counter() - t0,
                  **{f"train_{k}": float(v) / steps_per_epoch for k, v in sums.items()},
                  "val_loss": val["loss"], "val_acc": val["acc"]}
        if on_epoch_end is not None:
            record.update({k: float(v) for k, v in on_epoch_end(epoch, model).items()})
        sums = _zero_sums(metric_names)
        if int(state.bad_step) < 0:
            history.append(record)
            if run_dir is not None:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if log:
                log(f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  train acc {record['train_acc']:.4f}  "
                    f"val acc {val['acc']:.4f}  ({record['time_s']:.1f}s)")
        save(state, sums)

    model = nnx.merge(graphdef, state.params)
    summary = summarize(model, data, tcfg)
    summary.update({"mode": tcfg.mode, "dataset": data.name, "epochs": tcfg.epochs, "steps": int(state.step),
                    "train_time_s": time.perf_counter() - t_start})
    if run_dir is not None:
        _write_json(run_dir / "summary.json", summary)
    return RunResult(model, summary, history, run_dir)


def _resume(run_dir: Path, config: dict, state: TrainState, sums: dict):
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it holds no run ({path} is missing).")
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(config))  # as it would be written (tuples become lists)
    for part in ("model", "train"):
        old, new = saved.get(part, {}), wanted[part]
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


def load_run(run_dir: str | Path) -> NoisyRNN:
    """The trained model of a run directory written by `train_and_evaluate` / `nrnn-train`."""
    mcfg, tcfg = read_run_config(run_dir)
    model = NoisyRNN(mcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(tcfg, 1)
    target = init_train_state(params, tx, tcfg.seed)  # the structure, shapes and dtypes to restore into
    sums = _zero_sums(_metric_names(tcfg))
    restored, _ = checkpoint.restore_checkpoint(Path(run_dir) / "checkpoints", {"state": target, "sums": sums})
    return nnx.merge(graphdef, restored["state"].params)
