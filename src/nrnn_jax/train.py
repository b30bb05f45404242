"""The training loop (docs/theory.md §3.3): `train_and_evaluate` trains a `NoisyRNN`, or a sweep of them at
once, evaluates it after every epoch and writes a run directory (`nrnn_jax.runs`).

The loop reads as a list of named parts:

- `_Members`: the models trained together, one or a sweep's members stacked on a leading axis of the state
  (one vmapped step); what differs between the two lives here and nowhere else.
- `_Trainer`: the optimizer (`nrnn_jax.state`), the compiled step (`nrnn_jax.step`) and the devices it runs
  on; a rollback rebuilds the optimizer.
- `_Epochs`: the batches of each epoch, a pure function of (seed, epoch).
- `_train_epoch`: the steps of one epoch, with a checkpoint every `checkpoint_every` steps.
- `_evaluate_epoch`: the epoch's record (training means, validation loss and accuracy, `on_epoch_end`).
- `_Divergence`: what a NaN/Inf does (`TrainConfig.on_divergence`): raise `TrainingDiverged`, or roll back to
  the epoch's start with a smaller learning rate.
- `_Records` / `_RunDirectory`: what the run keeps: the training time of its sessions in memory, or the whole
  run directory (start or resume, checkpoints, records, TensorBoard events, training time, summary).

In a multi-process job (`nrnn_jax.host.initialize_distributed`) every process runs this same loop on the same
batches: the step is data-parallel over the devices of all processes (its gradients summed across them), and
each process evaluates its own copy of the replicated parameters. Process 0 writes the run directory; every
process takes part in saving and restoring checkpoints (orbax's multi-process checkpointing), so the run
directory must be on a filesystem all processes share.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from . import _registry, _tensorboard, checkpoint, host, runs
from .config import NRNNConfig, Sweep, TrainConfig, import_path
from .data import Dataset, batches, epoch_order, load_dataset, prefetch
from .evaluate import evaluate, summarize
from .model import NoisyRNN
from .state import (TrainState, checkpoint_layouts, init_model_state, init_sweep_states, learning_rate,
                    make_optimizer, metric_names, rollback_settings, unstack, zero_sums)
from .step import DATA_PARALLEL_PRNGS, data_parallel_sharding, make_train_step
from .validation import fail


class TrainingDiverged(FloatingPointError):
    """The loss or the gradients became NaN or Inf; the message names the step and the last good checkpoint."""


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


@runs.writes_run
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
    devices: int | str | None = "auto",
    cell: Callable | None = None,
) -> RunResult:
    """Train a `NoisyRNN` and evaluate it; the one training loop of the library.

    **Arguments:**

    - `mcfg`, `tcfg`: the model and training configurations (input_dim / num_classes must match the data).
    - `run_dir`: where to write `config.json`, `metrics.jsonl` (one JSON line per epoch), `summary.json`
      and `checkpoints/` (orbax); None writes nothing.
    - `data`: a loaded `Dataset` (default: `load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))`).
    - `progress`: show a progress bar per epoch.
    - `resume`: continue the run in `run_dir` from its newest intact checkpoint (same configuration required,
      except `runs.RESUMABLE_TRAIN_FIELDS`: a larger `epochs` extends the run); the result equals that of an
      uninterrupted run. A damaged checkpoint is set aside with a warning naming the file; a run without a
      complete checkpoint starts from the beginning (`runs.resume_run`). `summary["train_time_s"]` adds
      the training time of every session (process) that worked on the run, a killed one's up to its last
      checkpoint (recorded in `RUN/train_time.json`).
    - `overwrite`: replace an existing run in `run_dir` (otherwise refused).
    - `on_epoch_end(epoch, model)`: extra measurements merged into the epoch's record (e.g. the explicit
      regularizer along training); called for each member of a sweep.
    - `sweep`: a `Sweep` of seeds and/or noise levels trained at once (one vmapped step); `tcfg.seed` then
      only sets the data order, shared by the members.
    - `devices`: data-parallel training over the first `devices` devices (a mesh split along the batch;
      `batch_size` must be divisible by it; `make_train_step(..., devices=n)`). None or 1: the default
      device. `"auto"` (the default): on CPU the host's cores (one CPU device
      each after `nrnn_jax.host.configure()`) where each gets enough work for the split to pay (a long sequence such
      as pixel MNIST), else one device; in a multi-process job, all devices of all processes (the only
      count allowed there). Results equal those of one device up to the order of floating-point
      sums (the same noise and probes are drawn for every example).
    - `cell`: a user cell as a factory `cell(mcfg, rngs=rngs) -> Cell` (a `Cell` subclass with that
      constructor qualifies), called once per model; the run records the factory's import path (as
      `NRNNConfig.cell` and `cell_factory`), from which `load_run` rebuilds it. None: the built-in `mcfg.cell`.

    Checkpoints (every `tcfg.checkpoint_every` steps and at each epoch end) hold the whole `TrainState`
    (parameters, optimizer state, step, PRNG key) and the running metric sums; the data order of an epoch
    is a pure function of (seed, epoch), so nothing else is needed to resume exactly. A NaN or Inf loss or
    gradient raises `TrainingDiverged` naming the step; the last good checkpoint is kept.

    With a `run_dir`, the call is its one writer (`runs.writer`): a run another process is writing raises
    `RunBusyError` before any work. A write that fails (no space, permission, read-only filesystem, quota)
    raises `RunWriteError` naming the file, what the run keeps (its last complete checkpoint and the records
    before it) and how to continue it (`resume=True`).

    **Returns:** a `RunResult` with the trained model, the summary and the per-epoch history.
    """
    tcfg, data = _with_data(tcfg, data)
    members = _Members(_fit_model_cfg(mcfg, data), sweep, cell, tcfg)
    epochs = _Epochs(data, tcfg, log)
    run = _RunDirectory(Path(run_dir), resume) if run_dir is not None else _Records(resume)
    trainer = _Trainer(members, tcfg, epochs.steps, len(run.rollbacks), _resolve_devices(devices, members, tcfg, data))
    layouts = lambda: checkpoint_layouts(trainer.initial, tcfg, epochs.steps, len(run.rollbacks))
    state, sums, history = run.open({**members.config(), "train": tcfg.to_dict()}, data.description, trainer.initial,
                                    zero_sums(metric_names(tcfg), members.axis), layouts, overwrite=overwrite, log=log)
    state, sums = trainer.place((state, sums))  # restored from a checkpoint onto one device: where the step works
    step = int(np.max(np.asarray(state.step)))
    epoch, offset = divmod(step, epochs.steps)
    run.begin(step, epoch, members, tcfg, log)
    divergence = _Divergence(tcfg, epochs.steps, run, members)

    while epoch < tcfg.epochs:
        t0 = time.perf_counter()
        # The epoch's start, kept (the step donates its buffers) when divergence may roll back to it.
        start = (jax.tree.map(jnp.copy, state) if divergence.rolls_back else None), sums, step
        it = epochs.batches(epoch + 1, offset, trainer.batch_sharding, progress)
        state, sums, step, bad = _train_epoch(trainer, state, sums, step, it, divergence, run)
        if bad is None:
            bad = divergence.check(state)
        if bad is not None:  # roll back (`check` has raised where the policy does not): the epoch again
            state, sums, step = trainer.roll_back(start[0], len(run.rollbacks) + 1), start[1], start[2]
            run.rolled_back(divergence.rolled_back(epoch + 1, step, bad), log)
            continue
        epoch, offset = epoch + 1, 0
        record = _evaluate_epoch(members, trainer.models(state), data, tcfg, epoch, step, sums, epochs.steps, t0,
                                 on_epoch_end)
        history.append(record)
        run.record(record, learning_rate(state.opt_state))
        if log:
            log(f"epoch {epoch:3d}  loss {_fmt(record['train_loss'])}  train acc {_fmt(record['train_acc'])}  "
                f"val acc {_fmt(record['val_acc'])}  ({record['time_s']:.1f}s)")
        sums = trainer.place(zero_sums(metric_names(tcfg), members.axis))
        run.save(state, sums, step)

    models = trainer.models(state)
    common = {"mode": tcfg.mode, "dataset": data.name, "epochs": tcfg.epochs, "steps": step,
              "train_time_s": run.finish(step)}
    if run.rollbacks:
        common["rollbacks"] = run.rollbacks
    summary = members.summary([summarize(m, data, tcfg) for m in models], common)
    run.write_summary(summary)
    return RunResult(models[0], summary, history, run.path, models)


def _with_data(tcfg: TrainConfig, data: Dataset | None) -> tuple[TrainConfig, Dataset]:
    """`tcfg` with an absolute `data_dir` (so that the run can be used from any working directory), and the data
    set: `data`, or the one `tcfg` names."""
    if tcfg.data_dir is not None:
        tcfg = tcfg.replace(data_dir=str(Path(tcfg.data_dir).expanduser().resolve()))
    return tcfg, data if data is not None else load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))


def _fit_model_cfg(mcfg: NRNNConfig, data: Dataset) -> NRNNConfig:
    if mcfg.input_dim != data.input_dim or mcfg.num_classes != data.num_classes:
        raise ValueError(
            f"NRNNConfig(input_dim={mcfg.input_dim}, num_classes={mcfg.num_classes}) does not match the data "
            f"set {data.name!r} (input_dim={data.input_dim}, num_classes={data.num_classes}); use "
            f"cfg.replace(input_dim={data.input_dim}, num_classes={data.num_classes})."
        )
    return mcfg


def _resolve_devices(devices, members: "_Members", tcfg: TrainConfig, data: Dataset) -> int | None:
    """The data-parallel device count of `train_and_evaluate(devices=)`: "auto" resolved (`_default_devices`),
    None for one device (batches placed on a 1-device mesh cost more); the count checked against the batch."""
    if isinstance(devices, str) and devices == "auto":
        devices = _default_devices(members.mcfg, tcfg.batch_size, int(data.x_train.shape[1]), tcfg.prng)
    if jax.process_count() > 1 and devices != jax.device_count():
        fail("", "devices", devices, f"a multi-process job ({jax.process_count()} processes) trains data-parallel "
             f"over all {jax.device_count()} devices of its processes: expected 'auto' or {jax.device_count()}")
    if type(devices) is int and devices == 1:
        return None
    data_parallel_sharding(devices)  # checks the count against the devices JAX has
    if devices is not None and tcfg.batch_size % devices:
        raise ValueError(f"TrainConfig.batch_size={tcfg.batch_size} is invalid for devices={devices}: data-parallel "
                         "training splits each batch evenly, so the batch size must be a multiple of devices.")
    return devices


# The least work per device (examples × steps × hidden², the recurrent products' multiply-adds over the
# matrix width) for which `devices="auto"` splits a CPU batch: below it, the split's synchronisation costs more
# than the halved work saves (docs/performance.md).
AUTO_MIN_WORK = 1e8


def _default_devices(mcfg: NRNNConfig, batch_size: int, steps: int, prng: str = "threefry2x32") -> int:
    """What `devices="auto"` resolves to: in a multi-process job, all devices of all processes
    (`jax.device_count()`); on a CPU backend in one process, the most CPU devices (at most
    `jax.local_device_count()`, one per core after `nrnn_jax.host.configure()`) that divide the batch and leave each
    at least `AUTO_MIN_WORK` (batch share × steps × hidden²); else 1. Accelerators get 1: training on
    several is asked for with `devices=n`. A generator the data-parallel step cannot draw with
    (`prng` not in `DATA_PARALLEL_PRNGS`) gets 1."""
    if jax.process_count() > 1:
        return jax.device_count()
    if jax.default_backend() != "cpu" or prng not in DATA_PARALLEL_PRNGS:
        return 1
    best = 1
    for n in range(2, jax.local_device_count() + 1):
        if batch_size % n == 0 and batch_size // n * steps * mcfg.hidden**2 >= AUTO_MIN_WORK:
            best = n
    return best


class _Members:
    """The models trained together: one (`sweep=None`), or the members of a `Sweep`, whose states are stacked
    on a leading members axis (`axis`: its length, None for one model) and trained by one vmapped step, each
    with its own noise levels, on the same batches."""

    def __init__(self, mcfg: NRNNConfig, sweep: Sweep | None, cell, tcfg: TrainConfig):
        if cell is not None:
            if not callable(cell):
                fail("", "cell", cell, "expected a factory cell(cfg, rngs=rngs) -> Cell, e.g. a Cell subclass")
            mcfg = mcfg.replace(cell=_registry.factory_field(cell))
        elif not _registry.is_built_in_cell(mcfg.cell):
            raise ValueError(f"NRNNConfig.cell={mcfg.cell!r} records a user cell, which training needs: "
                             "train_and_evaluate(..., cell=factory) with factory(cfg, rngs=rngs) -> Cell")
        self.mcfg, self.sweep, self.cell = mcfg, sweep, cell
        self.axis = None if sweep is None else sweep.size
        self.configs = [mcfg] if sweep is None else [sweep.member_config(mcfg, i) for i in range(sweep.size)]
        # A sweep may hold noise-free members (its deterministic baseline, trained on the same batches); it
        # needs noise in at least one member, a single run in itself.
        noisy = mcfg.is_noisy if sweep is None else sweep.structure_config(mcfg).is_noisy
        who = "" if sweep is None else " (in at least one sweep member)"
        if tcfg.mode == "implicit" and not noisy:
            raise ValueError(f"TrainConfig.mode='implicit' needs noise{who}: set NRNNConfig.eps_add or eps_mult > 0.")
        if tcfg.mode == "explicit" and not noisy:
            raise ValueError(f"TrainConfig.mode='explicit' needs the noise levels of the penalty{who}: set "
                             "NRNNConfig.eps_add or eps_mult > 0.")

    def init(self, tx, seed: int):
        """(graphdef, fresh `TrainState`, the step's extra arguments: a sweep's (members, 2) noise levels)."""
        if self.sweep is None:
            return (*init_model_state(self.mcfg, tx, seed, self.cell), ())
        levels = jnp.asarray(self.sweep.noise_levels(self.mcfg), jnp.dtype(self.mcfg.dtype))
        return (*init_sweep_states(self.mcfg, tx, self.sweep, self.cell), (levels,))

    def init_optimizer(self, tx, params):
        return tx.init(params) if self.sweep is None else jax.vmap(tx.init)(params)

    def models(self, graphdef, params) -> list[NoisyRNN]:
        """The members as models, each with its own configuration (a sweep member's noise levels)."""
        models = [nnx.merge(graphdef, p) for p in ([params] if self.sweep is None else unstack(params, self.axis))]
        for model, cfg in zip(models, self.configs):
            model.cfg = cfg
        return models

    def one(self, values: list):
        """A per-member list as a record holds it: the value of a single model, the list of a sweep's."""
        return values[0] if self.sweep is None else list(values)

    def who(self, bad_steps: np.ndarray) -> str:
        return "" if self.sweep is None else f" (sweep members {np.flatnonzero(bad_steps >= 0).tolist()})"

    def config(self) -> dict[str, Any]:
        """What config.json records of the models (besides "train" and "dataset")."""
        config = {"model": self.mcfg.to_dict()}
        if self.cell is not None:
            config["cell_factory"] = import_path(self.cell)
        if self.sweep is not None:
            config["sweep"] = self.sweep.to_dict()
        return config

    def summary(self, summaries: list[dict], common: dict) -> dict[str, Any]:
        if self.sweep is None:
            return {**summaries[0], **common}
        seeds, levels = self.sweep.member_seeds(), self.sweep.noise_levels(self.mcfg)
        return {**common, "sweep": self.sweep.to_dict(),
                "members": [{"seed": seeds[i], "eps_add": float(levels[i, 0]), "eps_mult": float(levels[i, 1]),
                             **summaries[i]} for i in range(self.axis)]}


class _Trainer:
    """The members' optimizer and compiled step on their devices (`devices`: None for one, else data-parallel
    over n). `initial` is the fresh state; `roll_back` rebuilds the optimizer after one more rollback."""

    def __init__(self, members: _Members, tcfg: TrainConfig, steps_per_epoch: int, rollbacks: int,
                 devices: int | None):
        self.members, self.tcfg, self.steps_per_epoch, self.devices = members, tcfg, steps_per_epoch, devices
        self.batch_sharding, self.replicated = data_parallel_sharding(devices)
        self.tx = make_optimizer(tcfg, steps_per_epoch, rollbacks)
        self.graphdef, state, self.step_args = members.init(self.tx, tcfg.seed)
        self.initial = self.place(state)
        self.step = make_train_step(self.graphdef, self.tx, tcfg, sweep=members.axis is not None, devices=devices)

    def __call__(self, state: TrainState, batch):
        return self.step(state, batch.x, batch.y, batch.mask, *self.step_args)

    def place(self, tree):
        """`tree` where the step's outputs are (replicated over the data-parallel mesh). In a multi-process job
        each process places its own copy (JAX sends no array that is on one device to other processes'
        devices): every process holds the same values."""
        if self.replicated is None:
            return tree
        if jax.process_count() > 1:
            tree = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) and a.is_fully_addressable
                                else a, tree)
        return jax.device_put(tree, self.replicated)

    def models(self, state: TrainState) -> list[NoisyRNN]:
        """The members with the state's parameters; in a multi-process job, this process's copy of them (the
        state is replicated), on which it evaluates without the other processes."""
        return self.members.models(self.graphdef, jax.tree.map(_local_copy, state.params))

    def roll_back(self, start: TrainState, rollbacks: int) -> TrainState:
        """`start` with the optimizer after `rollbacks` rollbacks (its learning rate and clip, fresh moments)."""
        self.tx = make_optimizer(self.tcfg, self.steps_per_epoch, rollbacks)
        self.step = make_train_step(self.graphdef, self.tx, self.tcfg, sweep=self.members.axis is not None,
                                    devices=self.devices)
        return self.place(start._replace(opt_state=self.members.init_optimizer(self.tx, start.params),
                                         bad_step=jnp.full_like(start.bad_step, -1)))


class _Epochs:
    """The batches of each epoch: `steps` full batches from the epoch's shuffled order, a pure function of
    (seed, epoch) (`data.epoch_order`); the last `n_train % batch_size` examples of the order sit it out."""

    def __init__(self, data: Dataset, tcfg: TrainConfig, log):
        n_train = data.x_train.shape[0]
        if tcfg.batch_size > n_train:
            fail("TrainConfig", "batch_size", tcfg.batch_size, f"expected at most the {n_train} examples of the "
                 f"training split of {data.name!r} (each step takes a full batch)")
        self.data, self.tcfg, self.steps = data, tcfg, n_train // tcfg.batch_size
        if log and n_train % tcfg.batch_size:
            log(f"each epoch trains on {self.steps * tcfg.batch_size} of the {n_train} training examples: "
                f"{self.steps} batch(es) of {tcfg.batch_size} from the epoch's shuffled order, whose last "
                f"{n_train % tcfg.batch_size} sit that epoch out (others in each epoch)")

    def batches(self, epoch: int, skip: int, sharding, progress: bool) -> Iterator:
        """The batches of (1-based) `epoch` after its first `skip`, prefetched onto `sharding`."""
        data, size = self.data, self.tcfg.batch_size
        order = epoch_order(data.x_train.shape[0], self.tcfg.seed, epoch)
        it = prefetch(batches(data.x_train, data.y_train, size, order=order[skip * size:], drop_remainder=True),
                      sharding=sharding)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=self.steps - skip, desc=f"epoch {epoch}/{self.tcfg.epochs}", leave=False)
        return it


def _train_epoch(trainer: _Trainer, state: TrainState, sums: dict, step: int, batches: Iterator,
                 divergence: "_Divergence", run: "_Records"):
    """The steps of one epoch: (state, metric sums, step, the first bad step or None). Every `checkpoint_every`
    steps (the epoch's last is saved after its record) the state is checked (`divergence.check`) and saved; a
    bad step ends the epoch there."""
    every = trainer.tcfg.checkpoint_every
    # In a multi-process job each program runs to its end before the next is launched: with a step and the
    # sums' addition in flight together, two processes were seen to wait on each other for ever (XLA:CPU, gloo).
    one_at_a_time = jax.block_until_ready if jax.process_count() > 1 else (lambda tree: tree)
    for batch in batches:
        state, metrics = one_at_a_time(trainer(state, batch))
        sums = one_at_a_time({k: sums[k] + metrics[k] for k in sums})
        step += 1  # counted on the host: reading state.step would wait for the device every step
        if every and step % every == 0 and step % trainer.steps_per_epoch:
            bad = divergence.check(state)
            if bad is not None:
                return state, sums, step, bad
            run.save(state, sums, step)
    return state, sums, step, None


def _evaluate_epoch(members: _Members, models: list[NoisyRNN], data: Dataset, tcfg: TrainConfig, epoch: int,
                    step: int, sums: dict, steps_per_epoch: int, t0: float, on_epoch_end) -> dict[str, Any]:
    """The record of an epoch: its training metrics' means, the validation loss and accuracy (noise off), its
    time since `t0`, and what `on_epoch_end(epoch, model)` measures; one value per member for a sweep."""
    vals = [evaluate(m, data.x_val, data.y_val, tcfg.eval_batch_size) for m in models]
    record = {"epoch": epoch, "step": step, "time_s": time.perf_counter() - t0,
              **{f"train_{k}": _host(v, 1.0 / steps_per_epoch) for k, v in sums.items()},
              "val_loss": members.one([v["loss"] for v in vals]), "val_acc": members.one([v["acc"] for v in vals])}
    if on_epoch_end is not None:
        extra = [on_epoch_end(epoch, m) for m in models]
        record.update({k: members.one([float(e[k]) for e in extra]) for k in extra[0]})
    return record


def _local_copy(a):
    """An array replicated over the devices of several processes as this process's copy; others as they are."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return a.addressable_data(0)
    return a


def _host(v, scale: float = 1.0):
    """A metric for the JSON record: a float, or a list of floats (one per sweep member)."""
    a = np.asarray(v, np.float64) * scale
    return float(a) if a.ndim == 0 else a.tolist()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "[" + ", ".join(f"{e:.4f}" for e in v) + "]"


class _Divergence:
    """What a step whose loss or gradients are not finite does (`TrainConfig.on_divergence`). The step's guard
    keeps the state as it was and records the first such step (`TrainState.bad_step`); `check` reads it at
    every checkpoint and at each epoch's end. Under "raise", and under "rollback" once `max_rollbacks` are
    spent, it raises `TrainingDiverged`; otherwise it returns the bad step and the loop redoes the epoch from
    its start with the optimizer of one more rollback (`rolled_back` makes its record)."""

    def __init__(self, tcfg: TrainConfig, steps_per_epoch: int, run: "_Records", members: _Members):
        self.tcfg, self.steps_per_epoch, self.run, self.members = tcfg, steps_per_epoch, run, members
        self.rolls_back = tcfg.on_divergence == "rollback"

    def check(self, state: TrainState) -> int | None:
        bad_steps = np.atleast_1d(np.asarray(state.bad_step))
        if (bad_steps < 0).all():
            return None
        bad = int(bad_steps[bad_steps >= 0].min())
        rollbacks = len(self.run.rollbacks)
        if self.rolls_back and rollbacks < self.tcfg.max_rollbacks:
            return bad
        after = f" after {rollbacks} rollback(s)" if rollbacks else ""
        raise TrainingDiverged(f"Training diverged{self.members.who(bad_steps)}{after}: the loss or gradients were "
                               f"NaN/Inf at step {bad} (epoch {bad // self.steps_per_epoch + 1}); {self.run.kept()}. "
                               "Lower the learning rate, set grad_clip, reduce dt / the noise levels, or set "
                               "TrainConfig.on_divergence='rollback' (--on-divergence rollback), also on resume.")

    def rolled_back(self, epoch: int, step: int, bad: int) -> dict[str, Any]:
        """The record of a rollback of `epoch` to its start, `step`, after the bad step `bad`."""
        n = len(self.run.rollbacks) + 1
        return {"event": "rollback", "epoch": epoch, "step": step, "bad_step": bad,
                "lr_factor": self.tcfg.rollback_lr_factor ** n, "grad_clip": rollback_settings(self.tcfg, n)[1]}


class _Records:
    """What a run without a run directory keeps: its rollbacks and the training time of this session. The loop
    calls the same methods on a `_RunDirectory`, which also writes them."""

    path: Path | None = None

    def __init__(self, resume: bool):
        if resume:
            raise ValueError("resume=True needs a run_dir to resume from.")
        self.resume, self.rollbacks, self.sessions = False, [], []

    def open(self, config, description, state, sums, layouts, *, overwrite, log):
        """(state, sums, history) to start from: the fresh `state`, or the run's checkpoint restored into the
        first of `layouts()` it holds (`state.checkpoint_layouts`)."""
        return state, sums, []

    def begin(self, step: int, epoch: int, members: _Members, tcfg: TrainConfig, log) -> None:
        """Start this session's clock at `step`, in (0-based) `epoch`."""
        self.step_at_start = step
        self.session = {"first_step": step, "last_step": step, "train_time_s": 0.0}
        self.t_start = time.perf_counter()

    def save(self, state: TrainState, sums: dict, step: int) -> None:
        pass

    def kept(self) -> str:
        """What is left of the run after a divergence (for `TrainingDiverged`)."""
        return "no checkpoint was written before it"

    def record(self, record: dict[str, Any], lr) -> None:
        pass

    def rolled_back(self, event: dict[str, Any], log) -> None:
        self.rollbacks.append(event)
        if log:
            log(f"epoch {event['epoch']:3d}  NaN/Inf at step {event['bad_step']}: rolled back to step "
                f"{event['step']}, learning rate × {event['lr_factor']:g}, gradient norm clipped at "
                f"{event['grad_clip']:g}")

    def finish(self, step: int) -> float:
        """The run's training time: all its sessions', this one's included unless it trained nothing (a resume
        of a finished run keeps the recorded time)."""
        if step > self.step_at_start or not self.resume:
            self.session.update(last_step=step, train_time_s=time.perf_counter() - self.t_start)
            self.sessions = self.sessions + [self.session]
            self._write_sessions(self.sessions)
        return sum(s["train_time_s"] for s in self.sessions)

    def _write_sessions(self, sessions: list[dict]) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass


class _RunDirectory(_Records):
    """The run directory as the loop writes it (`nrnn_jax.runs`): config.json and a fresh metrics.jsonl, or a
    resume from the newest intact checkpoint; checkpoints (`nrnn_jax.checkpoint`) with the training time so
    far (train_time.json, kept should the process be killed); the epoch records and rollback events
    (metrics.jsonl) and TensorBoard events; summary.json.

    In a multi-process job only process 0 (`writes`) writes files; every process reads the run it resumes and
    takes part in saving and restoring checkpoints (orbax synchronises the processes)."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume, self.ckpt_dir = path, resume, path / "checkpoints"
        self.writes = host.is_primary()
        # rollbacks of an interrupted run (up to its last checkpoint) set the optimizer it resumes with
        self.rollbacks = runs.read_rollbacks(path) if resume else []
        self.sessions = runs.read_sessions(path) if resume else []
        self.last_saved = checkpoint.latest_step(self.ckpt_dir) if resume else None

    def open(self, config, description, state, sums, layouts, *, overwrite, log):
        if self.resume:
            opened = runs.resume_run(self.path, config, state, sums, log=log if self.writes else None,
                                     layouts=layouts(), write=self.writes)
        else:
            runs.check_new_run(self.path, overwrite=overwrite)  # every process refuses alike ...
            host.barrier(f"nrnn_jax: checked {self.path}")  # ... before process 0 writes
            if self.writes:
                runs.start_run(self.path, {**config, "dataset": description}, overwrite=overwrite)
            opened = state, sums, []
        host.barrier(f"nrnn_jax: opened {self.path}")  # the others write nothing before process 0 has
        return opened

    def begin(self, step, epoch, members, tcfg, log):
        super().begin(step, epoch, members, tcfg, log)
        if self.resume and log:
            log(f"resumed at epoch {epoch + 1}, step {step} (training to epoch {tcfg.epochs})" if epoch < tcfg.epochs
                else f"resumed at epoch {epoch}, step {step}: the run has finished its {tcfg.epochs} epochs")
        self.tb = (_tensorboard.EpochLog.open(self.path, members.mcfg, tcfg, members.sweep, resume=self.resume,
                                             first_epoch=epoch + 1) if self.writes else None)

    def save(self, state, sums, step):
        checkpoint.save_checkpoint(self.ckpt_dir, step, {"state": state, "sums": sums})
        self.last_saved = step
        self.session.update(last_step=step, train_time_s=time.perf_counter() - self.t_start)
        self._write_sessions(self.sessions + [self.session])

    def kept(self):
        if self.last_saved is None:
            return super().kept()
        return f"the last good checkpoint, step {self.last_saved}, is kept in {self.ckpt_dir}"

    def record(self, record, lr):
        if not self.writes:
            return
        runs.append_record(self.path, record)
        if self.tb is not None:  # TensorBoard: the same record, as scalars (RUN/tensorboard/)
            self.tb.write(record, lr)

    def rolled_back(self, event, log):
        checkpoint.delete_after(self.ckpt_dir, event["step"])
        self.last_saved = checkpoint.latest_step(self.ckpt_dir)
        if self.writes:
            runs.append_record(self.path, event)
        super().rolled_back(event, log)

    def _write_sessions(self, sessions):
        if self.writes:
            runs.write_sessions(self.path, sessions)

    def write_summary(self, summary):
        if self.writes:
            runs.write_json(self.path / "summary.json", summary)
