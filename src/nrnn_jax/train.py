"""Training: the jit-compiled train step in three modes and the one training loop (docs/theory.md §3.3, (3.18)).

- `make_train_step` → `train_step(state, x, y, mask)` in three modes: `deterministic` (no noise),
  `implicit` (fresh noise injected into the hidden states at every step; the model's own eps_add /
  eps_mult) and `explicit` (the clean loss plus λ times the small-noise explicit regularizer of
  `nrnn_jax.regularizer`, nothing injected).
- `train_and_evaluate`: the loop; writes a run directory (`nrnn_jax.runs`). With `sweep=Sweep(...)` it
  trains several seeds and/or noise levels at once (one vmapped step in one jit); with `devices=n` it is
  data-parallel over a mesh of n devices split along the batch.

Configurations live in `nrnn_jax.config`, the training state and optimizer in `nrnn_jax.state`,
evaluation in `nrnn_jax.evaluate`, run directories in `nrnn_jax.runs`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import _registry, checkpoint, metrics_log, prng, runs
from .config import NRNNConfig, Sweep, TrainConfig, import_path
from .data import Dataset, batches, epoch_order, load_dataset, prefetch
from .evaluate import evaluate, summarize
from .losses import correct, cross_entropy, masked_mean
from .model import NoisyRNN
from .regularizer import explicit_regularizer
from .state import (TrainState, init_model_state, init_sweep_states, make_optimizer, metric_names, rollback_settings,
                    unstack, zero_sums)
from .validation import fail


def _host(v, scale: float = 1.0):
    """A metric for the JSON record: a float, or a list of floats (one per sweep member)."""
    a = np.asarray(v, np.float64) * scale
    return float(a) if a.ndim == 0 else a.tolist()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "[" + ", ".join(f"{e:.4f}" for e in v) + "]"


class TrainingDiverged(FloatingPointError):
    """The loss or the gradients became NaN or Inf; the message names the step and the last good checkpoint."""


class _Rollback(Exception):
    """Raised inside the loop under `on_divergence="rollback"`: redo the epoch from its starting state."""

    def __init__(self, bad_step: int):
        self.bad_step = bad_step


def loss_fn(graphdef, params, x, y, mask, key, tcfg: TrainConfig, noise_levels=None, rows=None):
    """The training objective of the mode and its metrics (a pure function of `params`).

    `noise_levels`: optional (eps_add, eps_mult) JAX values replacing the model configuration's (a sweep
    over noise levels traces them; the configuration still decides which noise terms exist).

    `rows`: optional (start, total): `x` is rows start … start + len(x) − 1 of a batch of `total` examples (a
    device's share in a data-parallel step). The noise and probes drawn are then exactly those rows of the
    whole batch's draw (`prng.Rows`), so the step gives one device's numbers.

    Explicit mode: the clean loss of the test-time forward pass (the one `evaluate` uses) plus λ times the
    explicit regularizer (docs/theory.md (3.18)). Under the SDE convention the expansion is taken around that
    very path, so its logits are reused; under the reference convention it is taken around the mean-step
    path (step s(1 − ε_mult/2)), so the clean loss comes from a separate test-time forward pass."""
    model = nnx.merge(graphdef, params)
    k_noise, k_reg = jax.random.split(key)
    if rows is not None:
        k_noise, k_reg = prng.Rows(k_noise, *rows), prng.Rows(k_reg, *rows)
    metrics = {}
    if tcfg.mode == "explicit":
        reg = explicit_regularizer(model, x, y, method=tcfg.reg_method, num_probes=tcfg.num_probes,
                                   key=k_reg, mask=mask, noise_levels=noise_levels)
        logits = reg.logits if model.scheme.expands_around_test_path else model(x)
        metrics["reg"] = reg.value
    elif tcfg.mode == "implicit":
        logits = model(x, key=k_noise, noise_levels=noise_levels)
    else:
        logits = model(x)
    loss = masked_mean(cross_entropy(logits, y), mask)
    metrics.update(loss=loss, acc=masked_mean(correct(logits, y), mask))
    objective = loss + tcfg.reg_weight * metrics["reg"] if tcfg.mode == "explicit" else loss
    return objective, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, tcfg: TrainConfig, *, sweep: bool = False,
                    devices: int | None = None) -> Callable:
    """A jit-compiled `train_step(state, x, y, mask) -> (state, metrics)` in the mode of `tcfg`.

    **Arguments:**

    - `graphdef`: the model's graph, `nnx.split(model)[0]`.
    - `tx`: the optimizer (`make_optimizer`).
    - `tcfg`: the `TrainConfig` (mode, regularizer settings, PRNG).
    - `sweep`: the step of a sweep's stacked states (below).
    - `devices`: data-parallel over this many devices (below); None or 1: one device.

    **Returns:** the compiled step. `metrics` holds the batch's `loss`, `acc`, `grad_norm` and, in explicit
    mode, `reg`; `mask` (batch,) is 1 for real examples and 0 for padding.

    With `sweep=True`: `train_step(states, x, y, mask, noise_levels)` for a stack of states (leading axis:
    the members) and their (members, 2) noise levels, all on the same batch, vmapped in one jit; the
    metrics have a leading members axis.

    With `devices=n` > 1: data-parallel over the first n devices, the batch split evenly (its size must be a
    multiple of n). Each device computes the gradients of its rows of the batch, with exactly the noise and
    probes of those rows on one device (`loss_fn(rows=)`), weighted by its count of real examples; the
    weighted sums are added and divided by the batch's count, so the result is one device's up to the order
    of floating-point sums. The state stays replicated (a `jax.Array` over the mesh of
    `data_parallel_sharding(n)`). Within one process the step runs no collective operation: one program
    computes every device's share side by side, the shares are copied to every device, and each device applies
    the same update to its copy of the state. (XLA:CPU's in-process all-reduce can deadlock when its threads
    are busy and then aborts the process: docs/xla_cpu_all_reduce.md.) Across processes
    (`jax.distributed`), the shares are combined by one all-reduce inside the program.

    The one-device step donates the state's buffers; the data-parallel step leaves the caller's state intact.
    """
    if devices is not None and devices > 1:
        if tcfg.prng not in DATA_PARALLEL_PRNGS:
            fail("TrainConfig", "prng", tcfg.prng, f"the data-parallel step (devices={devices}) draws each device's "
                 "noise inside jax.shard_map, where JAX cannot lower philox4x32 ('Unable to convert MHLO to "
                 f"StableHLO'); expected one of {DATA_PARALLEL_PRNGS}, or devices=1 (devices='auto' picks 1 for it)")
        return _data_parallel_step(graphdef, tx, tcfg, sweep, devices)

    def train_step(state: TrainState, x, y, mask, noise_levels=None):
        key, grads, metrics = _gradients(graphdef, tcfg, state, x, y, mask, noise_levels)
        return _apply_update(tx, state, grads, metrics, key)

    if sweep:
        return jax.jit(jax.vmap(train_step, in_axes=(0, None, None, None, 0)), donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0)


def _gradients(graphdef, tcfg: TrainConfig, state: TrainState, x, y, mask, noise_levels, rows=None):
    """(the state's next key, gradients of `loss_fn`, metrics) for one step, on the step's own key."""
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key, impl=tcfg.prng))
    grads, metrics = jax.grad(loss_fn, argnums=1, has_aux=True)(graphdef, state.params, x, y, mask, sub, tcfg,
                                                                noise_levels, rows)
    return key, grads, metrics


def _apply_update(tx, state: TrainState, grads, metrics, key):
    """The optimizer update of one step, with the divergence guard."""
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts with floats
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    # Divergence guard: a non-finite loss or gradient leaves the state as it was and is recorded.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
    new = TrainState(keep(params, state.params), keep(opt_state, state.opt_state), state.step + 1,
                     jax.random.key_data(key), bad_step)
    return new, metrics


def _device_share(graphdef, tcfg: TrainConfig, devices: int, state: TrainState, x, y, mask, noise_levels=None):
    """One device's share of a data-parallel step (inside `shard_map` over the 'batch' axis): the next key,
    and (gradients × n, metrics × n, n) with n the device's count of real examples. Every gradient and metric
    of `loss_fn` is a mean over the device's real examples, so the shares' sums divided by the summed n are
    the batch's means."""
    b = x.shape[0]
    rows = (jax.lax.axis_index("batch") * b, b * devices)
    key, grads, metrics = _gradients(graphdef, tcfg, state, x, y, mask, noise_levels, rows)
    n = jnp.sum(mask.astype(jnp.float32))
    return key, (jax.tree.map(lambda g: g * n.astype(g.dtype), grads), jax.tree.map(lambda m: m * n, metrics), n)


def _combine(tx, state: TrainState, key, share):
    """The update of a data-parallel step from the shares' sums (`_device_share`)."""
    grads, metrics, total = share
    total = jnp.maximum(total, 1.0)
    grads = jax.tree.map(lambda g: g / total.astype(g.dtype), grads)
    metrics = jax.tree.map(lambda m: m / total, metrics)
    return _apply_update(tx, state, grads, metrics, key)


def _data_parallel_step(graphdef, tx, tcfg: TrainConfig, sweep: bool, devices: int) -> Callable:
    """`make_train_step(..., devices=n)`, n > 1: see there."""
    P = jax.sharding.PartitionSpec
    mesh = _mesh(devices)
    share = functools.partial(_device_share, graphdef, tcfg, devices)
    combine = functools.partial(_combine, tx)
    if sweep:
        share = jax.vmap(share, in_axes=(0, None, None, None, 0))
        combine = jax.vmap(combine)
    specs = (P(), P("batch"), P("batch"), P("batch")) + ((P(),) if sweep else ())
    # check_vma=False: the solvers' loops start from zero carries that the shard's inputs then make
    # device-varying, which the check would require marking at every loop. What is returned replicated is
    # the same on every device by construction (the key split from the replicated state's; the update of
    # summed shares).
    if jax.process_count() > 1:
        def local_step(state, x, y, mask, noise_levels=None):
            key, summed = share(state, x, y, mask, noise_levels)
            return combine(state, key, jax.lax.psum(summed, "batch"))

        return jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=False))

    def local_shares(state, x, y, mask, noise_levels=None):
        key, weighted = share(state, x, y, mask, noise_levels)
        return key, jax.tree.map(lambda a: a[None], weighted)  # stacked: device i's share at index i

    shares = jax.jit(jax.shard_map(local_shares, mesh=mesh, in_specs=specs, out_specs=(P(), P("batch")),
                                   check_vma=False))

    def update(state, key, stacked):
        summed = jax.tree.map(lambda *a: functools.reduce(jnp.add, a)[0], *stacked)  # in device order
        return combine(state, key, summed)

    return _SharesStep(shares, jax.jit(update), mesh)


class _SharesStep:
    """The in-process data-parallel step (`make_train_step(..., devices=n)`): `shares`, one program over
    the mesh, computes every device's share (`_device_share`) with no collective; each share is copied to
    every device, where `update` (one program per device) adds them in device order and updates that
    device's copy of the state. The results are assembled into arrays replicated over the mesh."""

    def __init__(self, shares, update, mesh: jax.sharding.Mesh):
        P = jax.sharding.PartitionSpec
        self.shares, self.update, self.devices = shares, update, list(mesh.devices.flat)
        self.batch = jax.sharding.NamedSharding(mesh, P("batch"))
        self.replicated = jax.sharding.NamedSharding(mesh, P())

    def __call__(self, state: TrainState, x, y, mask, *noise_levels):
        state, noise_levels = jax.device_put((state, noise_levels), self.replicated)
        x, y, mask = jax.device_put((x, y, mask), self.batch)
        key, stacked = self.shares(state, x, y, mask, *noise_levels)
        shares = _by_device(stacked, self.devices)
        results = [self.update(s, k, jax.device_put(shares, d))
                   for d, s, k in zip(self.devices, _by_device(state, self.devices), _by_device(key, self.devices))]
        return jax.tree.map(self._replicated, *results)

    def _replicated(self, *copies):
        return jax.make_array_from_single_device_arrays(copies[0].shape, self.replicated, list(copies))


def _by_device(tree, devices) -> list:
    """For each of `devices`, `tree` with each array replaced by its shard on that device (no copy)."""
    leaves, treedef = jax.tree.flatten(tree)
    shards = [{s.device: s.data for s in a.addressable_shards} for a in leaves]
    return [treedef.unflatten([by_device[d] for by_device in shards]) for d in devices]


def _mesh(devices: int) -> jax.sharding.Mesh:
    """The 1-D mesh ('batch') of the first `devices` devices; refuses a count JAX does not have."""
    available = jax.device_count()
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= available:
        fail("", "devices", devices, f"expected an integer in [1, {available}], or 'auto' for train_and_evaluate "
             f"(jax.device_count() = {available}; on CPU, nrnn_jax.host.configure() before JAX starts gives one "
             "device per core, configure(devices=N) N devices; or set "
             "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("batch",))


def data_parallel_sharding(devices: int | None):
    """Where a data-parallel step (`make_train_step(..., devices=n)`) wants its batches and state.

    **Arguments:**

    - `devices`: the number of devices of the 1-D mesh (the first `devices` devices), or None. Across hosts,
      after `jax.distributed.initialize()`, it counts all processes' devices.

    **Returns:** (batch sharding along the mesh's "batch" axis, replicated sharding), or (None, None) for
    `devices=None`.
    """
    if devices is None:
        return None, None
    mesh, P = _mesh(devices), jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P("batch")), jax.sharding.NamedSharding(mesh, P())


# The least work per device (examples × steps × hidden², the recurrent products' multiply-adds over the
# matrix width) for which `devices="auto"` splits a CPU batch. Measured on a 2-core CPU (README, "Speed"): at
# the pixel-MNIST shape (64 × 784 × 128² ≈ 8.2e8 per device) two devices took the step from 283–298 to
# 207 ms; at the ECG shape (32 × 140 × 64² ≈ 1.8e7) 12.3 against 11.5 ms; at T 28, hidden 32, batch 32 the
# split step was twice as slow (the all-reduce and its rendezvous cost more than the halved work saves).
AUTO_MIN_WORK = 1e8


# The generators the data-parallel step can draw with (see make_train_step).
DATA_PARALLEL_PRNGS = ("threefry2x32",)


def default_devices(mcfg: NRNNConfig, batch_size: int, steps: int, prng: str = "threefry2x32") -> int:
    """What `devices="auto"` resolves to: on a CPU backend in one process, the most CPU devices (at most
    `jax.local_device_count()`, one per core after `nrnn_jax.host.configure()`) that divide the batch and leave each
    at least `AUTO_MIN_WORK` (batch share × steps × hidden²); else 1. Accelerators get 1: training on
    several is asked for with `devices=n`. A generator the data-parallel step cannot draw with
    (`prng` not in `DATA_PARALLEL_PRNGS`) gets 1."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1 or prng not in DATA_PARALLEL_PRNGS:
        return 1
    best = 1
    for n in range(2, jax.local_device_count() + 1):
        if batch_size % n == 0 and batch_size // n * steps * mcfg.hidden**2 >= AUTO_MIN_WORK:
            best = n
    return best


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
      device. `"auto"` (the default): `default_devices(...)`, i.e. on CPU the host's cores (one CPU device
      each after `nrnn_jax.host.configure()`) where each gets enough work for the split to pay (a long sequence such
      as pixel MNIST), else one device. Results equal those of one device up to the order of floating-point
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
    if tcfg.data_dir is not None:  # stored absolute, so that the run can be used from any working directory
        tcfg = tcfg.replace(data_dir=str(Path(tcfg.data_dir).expanduser().resolve()))
    data = data if data is not None else load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))
    mcfg = _fit_model_cfg(mcfg, data)
    if cell is not None:
        if not callable(cell):
            fail("", "cell", cell, "expected a factory cell(cfg, rngs=rngs) -> Cell, e.g. a Cell subclass")
        mcfg = mcfg.replace(cell=_registry.factory_field(cell))
    elif not _registry.is_built_in_cell(mcfg.cell):
        raise ValueError(f"NRNNConfig.cell={mcfg.cell!r} records a user cell, which training needs: "
                         "train_and_evaluate(..., cell=factory) with factory(cfg, rngs=rngs) -> Cell")
    member_cfgs = [mcfg] if sweep is None else [sweep.member_config(mcfg, i) for i in range(sweep.size)]
    # A sweep may hold noise-free members (its deterministic baseline, trained on the same batches); it
    # needs noise in at least one member, a single run in itself.
    noisy = mcfg.is_noisy if sweep is None else sweep.structure_config(mcfg).is_noisy
    who = "" if sweep is None else " (in at least one sweep member)"
    if tcfg.mode == "implicit" and not noisy:
        raise ValueError(f"TrainConfig.mode='implicit' needs noise{who}: set NRNNConfig.eps_add or eps_mult > 0.")
    if tcfg.mode == "explicit" and not noisy:
        raise ValueError(f"TrainConfig.mode='explicit' needs the noise levels of the penalty{who}: set "
                         "NRNNConfig.eps_add or eps_mult > 0.")
    n_train = data.x_train.shape[0]
    batch_size = tcfg.batch_size
    if batch_size > n_train:
        fail("TrainConfig", "batch_size", batch_size, f"expected at most the {n_train} examples of the training "
             f"split of {data.name!r} (each step takes a full batch)")
    steps_per_epoch = n_train // batch_size
    if log and n_train % batch_size:
        log(f"each epoch trains on {steps_per_epoch * batch_size} of the {n_train} training examples: "
            f"{steps_per_epoch} batch(es) of {batch_size} from the epoch's shuffled order, whose last "
            f"{n_train % batch_size} sit that epoch out (others in each epoch)")
    if isinstance(devices, str) and devices == "auto":
        devices = default_devices(mcfg, batch_size, int(data.x_train.shape[1]), tcfg.prng)
    if type(devices) is int and devices == 1:  # the plain step (batches placed on a 1-device mesh cost more)
        devices = None
    batch_sharding, replicated = data_parallel_sharding(devices)
    if devices is not None and batch_size % devices:
        raise ValueError(f"TrainConfig.batch_size={batch_size} is invalid for devices={devices}: data-parallel "
                         "training splits each batch evenly, so the batch size must be a multiple of devices.")

    # Rollbacks of an interrupted run (recorded in its metrics.jsonl up to its last checkpoint) set the
    # optimizer it resumes with.
    rollbacks = runs.read_rollbacks(Path(run_dir)) if resume and run_dir is not None else []
    tx = make_optimizer(tcfg, steps_per_epoch, len(rollbacks))
    n_members = None if sweep is None else sweep.size
    if sweep is None:
        graphdef, state = init_model_state(mcfg, tx, tcfg.seed, cell)
        step_args = ()
    else:
        graphdef, state = init_sweep_states(mcfg, tx, sweep, cell)
        step_args = (jnp.asarray(sweep.noise_levels(mcfg), jnp.dtype(mcfg.dtype)),)
    if replicated is not None:
        state = jax.device_put(state, replicated)
    names = metric_names(tcfg)
    sums = zero_sums(names, n_members)
    history: list[dict[str, Any]] = []
    ckpt_dir = None if run_dir is None else Path(run_dir) / "checkpoints"

    if run_dir is not None:
        run_dir = Path(run_dir)
        config = {"model": mcfg.to_dict(), "train": tcfg.to_dict()}
        if cell is not None:
            config["cell_factory"] = import_path(cell)
        if sweep is not None:
            config["sweep"] = sweep.to_dict()
        if resume:
            state, sums, history = runs.resume_run(run_dir, config, state, sums, log=log)
        else:
            runs.start_run(run_dir, {**config, "dataset": data.description}, overwrite=overwrite)
    elif resume:
        raise ValueError("resume=True needs a run_dir to resume from.")
    if replicated is not None:  # restored from a checkpoint onto one device: where the step's outputs are
        state, sums = jax.device_put((state, sums), replicated)

    train_step = make_train_step(graphdef, tx, tcfg, sweep=sweep is not None, devices=devices)
    first_step = lambda state: int(np.max(np.asarray(state.step)))
    last_saved = [checkpoint.latest_step(ckpt_dir) if resume else None]

    def members(state) -> list[NoisyRNN]:
        models = [nnx.merge(graphdef, p) for p in ([state.params] if sweep is None else unstack(state.params, sweep.size))]
        for model, cfg in zip(models, member_cfgs):
            model.cfg = cfg  # a sweep member's own noise levels
        return models

    def save(state, sums):
        bad_steps = np.atleast_1d(np.asarray(state.bad_step))
        if (bad_steps >= 0).any():
            bad = int(bad_steps[bad_steps >= 0].min())
            if tcfg.on_divergence == "rollback" and len(rollbacks) < tcfg.max_rollbacks:
                raise _Rollback(bad)
            who = "" if sweep is None else f" (sweep members {np.flatnonzero(bad_steps >= 0).tolist()})"
            where = (f"the last good checkpoint, step {last_saved[0]}, is kept in {ckpt_dir}"
                     if last_saved[0] is not None else "no checkpoint was written before it")
            after = f" after {len(rollbacks)} rollback(s)" if rollbacks else ""
            raise TrainingDiverged(f"Training diverged{who}{after}: the loss or gradients were NaN/Inf at step {bad} "
                                   f"(epoch {bad // steps_per_epoch + 1}); {where}. Lower the learning rate, "
                                   "set grad_clip, reduce dt / the noise levels, or set "
                                   "TrainConfig.on_divergence='rollback'.")
        if ckpt_dir is not None:
            checkpoint.save_checkpoint(ckpt_dir, first_step(state), {"state": state, "sums": sums})
            last_saved[0] = first_step(state)
            # this session's training time so far, kept should the process be killed before its summary
            session.update(last_step=last_saved[0], train_time_s=time.perf_counter() - t_start)
            runs.write_sessions(run_dir, sessions + [session])

    def roll_back(good: TrainState, bad: int, epoch: int) -> TrainState:
        """The epoch's starting state with the optimizer of one more rollback (fresh moments), recorded."""
        nonlocal tx, train_step
        _, clip = rollback_settings(tcfg, len(rollbacks) + 1)
        event = {"event": "rollback", "epoch": epoch, "step": first_step(good), "bad_step": bad,
                 "lr_factor": tcfg.rollback_lr_factor ** (len(rollbacks) + 1), "grad_clip": clip}
        rollbacks.append(event)
        tx = make_optimizer(tcfg, steps_per_epoch, len(rollbacks))
        train_step = make_train_step(graphdef, tx, tcfg, sweep=sweep is not None, devices=devices)
        opt_state = tx.init(good.params) if sweep is None else jax.vmap(tx.init)(good.params)
        state = good._replace(opt_state=opt_state, bad_step=jnp.full_like(good.bad_step, -1))
        if replicated is not None:
            state = jax.device_put(state, replicated)
        if run_dir is not None:
            checkpoint.delete_after(ckpt_dir, event["step"])
            runs.append_record(run_dir, event)
        if log:
            log(f"epoch {epoch:3d}  NaN/Inf at step {bad}: rolled back to step {event['step']}, learning rate × "
                f"{event['lr_factor']:g}, gradient norm clipped at {event['grad_clip']:g}")
        return state

    t_start = time.perf_counter()
    host_step = first_step(state)
    host_step_at_start = host_step
    # the training time of the run's earlier sessions, and this one's (RUN/train_time.json)
    sessions = runs.read_sessions(run_dir) if resume else []
    session = {"first_step": host_step, "last_step": host_step, "train_time_s": 0.0}
    first_epoch, offset = divmod(host_step, steps_per_epoch)
    if resume and log:
        log(f"resumed at epoch {first_epoch + 1}, step {host_step} (training to epoch {tcfg.epochs})"
            if first_epoch < tcfg.epochs else
            f"resumed at epoch {first_epoch}, step {host_step}: the run has finished its {tcfg.epochs} epochs")
    tb = metrics_log.EpochLog.open(run_dir, mcfg, tcfg, sweep, resume=resume, first_epoch=first_epoch + 1)
    epoch = first_epoch
    while epoch < tcfg.epochs:
        epoch += 1
        t0 = time.perf_counter()
        order = epoch_order(n_train, tcfg.seed, epoch)
        skip = offset if epoch == first_epoch + 1 else 0
        # The epoch's starting state, kept (the step donates its buffers) when divergence may roll back to it.
        good = jax.tree.map(jnp.copy, state) if tcfg.on_divergence == "rollback" else None
        it = prefetch(batches(data.x_train, data.y_train, batch_size, order=order[skip * batch_size:],
                              drop_remainder=True), sharding=batch_sharding)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=steps_per_epoch - skip, desc=f"epoch {epoch}/{tcfg.epochs}", leave=False)
        good_sums = sums
        try:
            for b in it:
                state, m = train_step(state, b.x, b.y, b.mask, *step_args)
                sums = {k: sums[k] + m[k] for k in names}
                host_step += 1  # counted on the host: reading state.step would wait for the device every step
                # The last step of an epoch is saved below, after the epoch's record is written.
                if tcfg.checkpoint_every and host_step % tcfg.checkpoint_every == 0 and host_step % steps_per_epoch:
                    save(state, sums)
            if tcfg.on_divergence == "rollback" and (np.asarray(state.bad_step) >= 0).any():
                save(state, sums)  # raises _Rollback (or TrainingDiverged after the last allowed one)
        except _Rollback as r:
            state, sums = roll_back(good, r.bad_step, epoch), good_sums
            host_step = first_step(state)
            epoch -= 1  # redo this epoch
            continue
        models = members(state)
        vals = [evaluate(m_, data.x_val, data.y_val, tcfg.eval_batch_size) for m_ in models]
        one = (lambda xs: xs[0]) if sweep is None else (lambda xs: list(xs))
        record = {"epoch": epoch, "step": first_step(state), "time_s": time.perf_counter() - t0,
                  **{f"train_{k}": _host(v, 1.0 / steps_per_epoch) for k, v in sums.items()},
                  "val_loss": one([v["loss"] for v in vals]), "val_acc": one([v["acc"] for v in vals])}
        if on_epoch_end is not None:
            extra = [on_epoch_end(epoch, m_) for m_ in models]
            record.update({k: one([float(e[k]) for e in extra]) for k in extra[0]})
        sums = zero_sums(names, n_members)
        if (np.asarray(state.bad_step) < 0).all():
            history.append(record)
            if run_dir is not None:
                runs.append_record(run_dir, record)
                if tb is not None:  # TensorBoard: the same record, as scalars (RUN/tensorboard/)
                    tb.write(record, rollbacks=len(rollbacks))
            if log:
                log(f"epoch {epoch:3d}  loss {_fmt(record['train_loss'])}  train acc {_fmt(record['train_acc'])}  "
                    f"val acc {_fmt(record['val_acc'])}  ({record['time_s']:.1f}s)")
        save(state, sums)

    models = members(state)
    summaries = [summarize(m_, data, tcfg) for m_ in models]
    # A run's training time adds that of all its sessions, killed ones included (up to their last checkpoint);
    # a resume that trains nothing keeps the recorded time.
    if first_step(state) > host_step_at_start or not resume:
        session.update(last_step=first_step(state), train_time_s=time.perf_counter() - t_start)
        sessions = sessions + [session]
        if run_dir is not None:
            runs.write_sessions(run_dir, sessions)
    common = {"mode": tcfg.mode, "dataset": data.name, "epochs": tcfg.epochs, "steps": first_step(state),
              "train_time_s": sum(s["train_time_s"] for s in sessions)}
    if rollbacks:
        common["rollbacks"] = rollbacks
    if sweep is None:
        summary = {**summaries[0], **common}
    else:
        seeds, levels = sweep.member_seeds(), sweep.noise_levels(mcfg)
        summary = {**common, "sweep": sweep.to_dict(),
                   "members": [{"seed": seeds[i], "eps_add": float(levels[i, 0]), "eps_mult": float(levels[i, 1]),
                                **summaries[i]} for i in range(sweep.size)]}
    if run_dir is not None:
        runs.write_json(run_dir / "summary.json", summary)
    return RunResult(models[0], summary, history, run_dir, models)
