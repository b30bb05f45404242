"""The train step: the training objective of each mode, its gradients and the optimizer update with the
divergence guard, on one device or data-parallel over several (docs/theory.md §3.3, (3.18)).

- `loss_fn`: the objective in three modes: `deterministic` (no noise), `implicit` (fresh noise injected into
  the hidden states at every step; the model's own eps_add / eps_mult) and `explicit` (the clean loss plus
  λ times the small-noise explicit regularizer of `nrnn_jax.regularizer`, nothing injected).
- `make_train_step` → `train_step(state, x, y, mask)`, jit-compiled; vmapped over a sweep's stacked states;
  data-parallel over a mesh of devices split along the batch (`data_parallel_sharding`).

The state and the optimizer are built in `nrnn_jax.state`; the loop that calls the step is `nrnn_jax.train`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import prng
from .config import TrainConfig
from .losses import correct, cross_entropy, masked_mean
from .regularizer import explicit_regularizer
from .state import TrainState
from .validation import fail


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


# The generators the data-parallel step can draw with (see make_train_step).
DATA_PARALLEL_PRNGS = ("threefry2x32",)
