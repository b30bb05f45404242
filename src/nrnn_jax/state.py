"""The state of training: parameters, optimizer state, step, PRNG key; the optimizer; how a fresh state (one
model, or the members of a sweep) is built. `nrnn_jax.step` steps it; `nrnn_jax.runs` saves and restores it."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .config import NRNNConfig, Sweep, TrainConfig
from .model import NoisyRNN


class TrainState(NamedTuple):
    """The whole state of training: parameters, optimizer state, step counter, PRNG key (uint32[2]) and
    `bad_step`, the first step whose loss or gradients were not finite (−1 if none)."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    bad_step: jax.Array


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state before the first step: optimizer initialised, step 0, key from `seed`, no bad step.

    **Arguments:**

    - `params`: the model's state, `nnx.split(model)[1]`.
    - `tx`: the optimizer (`make_optimizer`).
    - `seed`: sets the noise key of training (as `TrainConfig.seed` does).

    **Returns:** a `TrainState`.
    """
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed + 1),
                      jnp.full((), -1, jnp.int32))


def metric_names(tcfg: TrainConfig) -> list[str]:
    """The per-step metrics summed over an epoch (and checkpointed with the state)."""
    return ["loss", "acc", "grad_norm"] + (["reg"] if tcfg.mode == "explicit" else [])


def zero_sums(names: list[str], members: int | None = None) -> dict[str, jax.Array]:
    """Zeroed metric sums (one per sweep member when `members` is given)."""
    shape = () if members is None else (members,)
    return {k: jnp.zeros(shape, jnp.float32) for k in names}


def rollback_settings(tcfg: TrainConfig, rollbacks: int = 0) -> tuple[float, float]:
    """(base learning rate, global gradient-norm clip; 0: none) after `rollbacks` divergence rollbacks
    (`TrainConfig.on_divergence="rollback"`): each multiplies the learning rate by `rollback_lr_factor`, and
    from the first on the gradient norm is clipped at `rollback_grad_clip` (or the smaller `grad_clip`)."""
    clip = tcfg.grad_clip
    if rollbacks:
        clip = min(clip, tcfg.rollback_grad_clip) if clip > 0 else tcfg.rollback_grad_clip
    return tcfg.lr * tcfg.rollback_lr_factor**rollbacks, clip


def _schedule(tcfg: TrainConfig, steps_per_epoch: int, rollbacks: int = 0) -> optax.Schedule:
    """The step-decay schedule: the base rate (`rollback_settings`) times `lr_decay` from each decay epoch on."""
    boundaries = {int(e) * steps_per_epoch: tcfg.lr_decay for e in tcfg.lr_decay_epochs}
    schedule = optax.piecewise_constant_schedule(rollback_settings(tcfg, rollbacks)[0], boundaries)

    def at(count):
        with jax.numpy_dtype_promotion("standard"):  # optax mixes the int32 count with float rates
            return schedule(count)

    return at


def _update_rule(tcfg: TrainConfig, clip: float, learning_rate) -> optax.GradientTransformation:
    """Optional global-norm clipping, then Adam / AdamW or SGD with momentum (and decoupled weight decay) at
    `learning_rate` (a value, or a schedule of the step count)."""
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if tcfg.optimizer == "adam":
        parts.append(optax.adamw(learning_rate, weight_decay=tcfg.weight_decay) if tcfg.weight_decay > 0
                     else optax.adam(learning_rate))
    else:
        if tcfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(tcfg.weight_decay))
        parts.append(optax.sgd(learning_rate, momentum=tcfg.momentum or None))
    return optax.chain(*parts)


def make_optimizer(tcfg: TrainConfig, steps_per_epoch: int, rollbacks: int = 0) -> optax.GradientTransformation:
    """Adam (or AdamW) or SGD with momentum, the step-decay schedule of `tcfg` and optional clipping.

    **Arguments:**

    - `tcfg`: the `TrainConfig` (`optimizer`, `lr`, `momentum`, `weight_decay`, `lr_decay`,
      `lr_decay_epochs`, `grad_clip`).
    - `steps_per_epoch`: turns the decay epochs into step counts.
    - `rollbacks`: how many divergence rollbacks have happened (their learning rate and clip:
      `rollback_settings`).

    **Returns:** an `optax.GradientTransformation` built with `optax.inject_hyperparams`: its state records
    the learning rate of the latest step (`learning_rate(opt_state)`), the schedule's value at that step.
    """
    clip = rollback_settings(tcfg, rollbacks)[1]
    return optax.inject_hyperparams(functools.partial(_update_rule, tcfg, clip))(
        learning_rate=_schedule(tcfg, steps_per_epoch, rollbacks))


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest step, as the optimizer state of `make_optimizer` records it (before the
    first step: that of the first); a sweep's stacked state gives one per member."""
    return opt_state.hyperparams["learning_rate"]


def checkpoint_layouts(target: TrainState, tcfg: TrainConfig, steps_per_epoch: int, rollbacks: int = 0) -> list:
    """The layouts a checkpoint of `target` may hold, newest first: (the state to restore into, the function
    turning the restored state into `target`'s layout).

    Besides `make_optimizer`'s own, a checkpoint may hold the optimizer state of the same update rule with the
    schedule applied inside it (`optax.scale_by_schedule`, whose state counts the steps) and no recorded
    learning rate. It is restored into that layout and converted: same moments, same step count, the
    learning rate of the latest step computed from the schedule. Training goes on with the same numbers.
    """
    schedule = _schedule(tcfg, steps_per_epoch, rollbacks)
    scheduled = _update_rule(tcfg, rollback_settings(tcfg, rollbacks)[1], schedule)
    stacked = jnp.ndim(target.step) > 0  # a sweep's members
    init = jax.vmap(scheduled.init) if stacked else scheduled.init
    old = target._replace(opt_state=init(target.params))

    def convert(restored: TrainState) -> TrainState:
        new = target.opt_state
        is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
        counts = [s.count for s in jax.tree.leaves(restored.opt_state, is_leaf=is_schedule) if is_schedule(s)]
        inner = jax.tree.map(lambda s: optax.EmptyState() if is_schedule(s) else s, restored.opt_state,
                             is_leaf=is_schedule)
        if len(counts) != 1 or jax.tree.structure(inner) != jax.tree.structure(new.inner_state):
            raise ValueError("the checkpoint's optimizer state is not that of this update rule")
        count = counts[0]
        lr = jnp.asarray(schedule(jnp.maximum(count - 1, 0)), learning_rate(new).dtype)
        opt_state = new._replace(count=count, hyperparams={**new.hyperparams, "learning_rate": lr},
                                 hyperparams_states=jax.tree.map(lambda _: jnp.copy(count), new.hyperparams_states),
                                 inner_state=inner)
        return restored._replace(opt_state=opt_state)

    return [(target, lambda restored: restored), (old, convert)]


def new_model(mcfg: NRNNConfig, seed: int, cell=None) -> NoisyRNN:
    """`NoisyRNN(mcfg, rngs=nnx.Rngs(seed))`, with the cell `cell(mcfg, rngs=rngs)` when a cell factory (e.g. a
    `Cell` subclass taking (cfg, *, rngs)) is given."""
    rngs = nnx.Rngs(seed)
    return NoisyRNN(mcfg, rngs=rngs, cell=None if cell is None else cell(mcfg, rngs=rngs))


def init_model_state(mcfg: NRNNConfig, tx: optax.GradientTransformation, seed: int, cell=None):
    """(graphdef, TrainState) of a fresh `new_model(mcfg, seed, cell)` with its noise key from seed."""
    graphdef, params = nnx.split(new_model(mcfg, seed, cell))
    return graphdef, init_train_state(params, tx, seed)


def init_sweep_states(mcfg: NRNNConfig, tx: optax.GradientTransformation, sweep: Sweep, cell=None):
    """The states of a sweep's members, stacked: member i initialised exactly as a single run with
    `TrainConfig.seed = seed_i`.

    **Arguments:**

    - `mcfg`: the model configuration; `tx`: the optimizer (`make_optimizer`).
    - `sweep`: the `Sweep`.
    - `cell`: a user cell's factory, as `train_and_evaluate(..., cell=)` takes it (None: the built-in cell).

    **Returns:** (graphdef, `TrainState` with a leading members axis). The graph holds
    `sweep.structure_config(mcfg)` (every noise term any member uses); the members' own levels are passed to
    the step (the initialisation does not depend on them).
    """
    structure = sweep.structure_config(mcfg)
    graphdef, states = zip(*(init_model_state(structure, tx, seed, cell) for seed in sweep.member_seeds()))
    return graphdef[0], jax.tree.map(lambda *a: jnp.stack(a), *states)


def unstack(tree, n: int) -> list:
    """The n members of a pytree stacked on its leading axis."""
    return [jax.tree.map(lambda a: a[i], tree) for i in range(n)]


