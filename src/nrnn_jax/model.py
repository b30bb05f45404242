"""`NoisyRNN`: linear encoder → noisy recurrent core (any cell) → linear decoder (docs/theory.md §1–§2, §8).

The model is assembled from objects: a cell (`nrnn_jax.cells`), a diffusion (`nrnn_jax.noise`) and a scheme
(`nrnn_jax.schemes`), e.g. `NoisyRNN(cfg, rngs=rngs, cell=GRUCell(cfg, rngs=rngs), diffusion=DiagonalNoise(0.1,
0.1), scheme=EulerHeun())`; what is not passed is built from the configuration (`nrnn_jax._registry`), and
the configuration the model keeps (`model.cfg`) records the objects, so that a run directory can rebuild it.
The module is only the edge that holds parameters; the recursion itself is the pure `solvers.solve_batch`.
Split it with `nnx.split` before `jax.jit` (see `nrnn_jax.train`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from . import _registry, cells, prng, solvers
from .config import NRNNConfig
from .noise import Noise
from .schemes import RecurrentParams, Scheme
from .validation import check_inputs, check_noise, check_noise_levels


class NoisyRNN(nnx.Module):
    """The noisy recurrent neural network of Lim et al. (2021), docs/theory.md §1–§2, for any cell (§8).

    **Arguments:**

    - `cfg`: an `NRNNConfig`.
    - `rngs`: `flax.nnx.Rngs` for the initialisation.
    - `cell`: a cell object (a `flax.nnx.Module` with `drift(h, z)` for one example, see `nrnn_jax.cells`;
      its state may be any pytree, e.g. `FlaxCell(nnx.LSTMCell(d, d, rngs=rngs))`); None builds the built-in
      cell `cfg.cell`. A cell that is not the built-in one `cfg.cell` names is recorded in the model's
      configuration by the import path of its class (`cell="module:Class"`; text, never imported).
    - `diffusion`: `DiagonalNoise(eps_add, eps_mult)`, `ScalarNoise(eps_add, eps_mult)`, `CustomNoise(sigma)`
      or a plain user σ(h, z) for one example returning a diagonal (hidden,) or a (hidden, m) matrix; recorded
      in the model's configuration (`noise_kind`, `eps_add`, `eps_mult`, `diffusion`). None: the
      configuration's diffusion.
    - `scheme`: `EulerMaruyama()`, `EulerHeun()`, `Milstein()` or `PublicCodeRule()` (`nrnn_jax.schemes`);
      recorded in the model's configuration (`solver`, `convention`). None: the configuration's scheme.

    **Parts:** `model.encode(x)` = z (batch, T, hidden), the input drive; `model.cell` the drift;
    `model.decode(h)` the logits of final states. The states are the cell's states laid flat, (state_size,)
    per example (= hidden for a state of one array (hidden,)); `model.state_layout` says where each part of a
    pytree state lies (None for one array), `model.state_tree(h)` gives the pytree back, and the decoder
    reads the cell's output part (the LSTM's h).

    **Calling:**

    - `model(x)`: x of shape (batch, T, input_dim); noise off; returns logits (batch, num_classes).
    - `model(x, noise=xi)`: xi of shape (batch, T, model.noise_dim), standard normals; the recursion of the
      configured scheme with ξ_k = xi[:, k] (for Euler–Maruyama, h_{k+1} = h_k + δ f + √δ σ(h_k) ξ_k).
    - `model(x, key=key)`: draws xi itself.
    - `model.trajectory(x, noise=None, key=None)`: states (batch, T + 1, state_size).
    - Each call also takes `noise_levels=(eps_add, eps_mult)` (numbers or JAX values) replacing the
      configuration's levels, e.g. one pair per member of a vmapped sweep; the configuration still decides
      which noise terms exist.
    - `model.step_size`: the learnable per-unit step `s` of the reference convention (None under "sde").
    """

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs, cell: cells.Cell | None = None,
                 diffusion: Noise | Callable | None = None, scheme: Scheme | None = None):
        if not isinstance(cfg, NRNNConfig):
            raise TypeError(f"NoisyRNN(cfg=...) expects an NRNNConfig, got {type(cfg).__name__}.")
        if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("NRNNConfig.dtype='float64' needs 64-bit JAX: set jax.config.update("
                             "'jax_enable_x64', True) or run inside `with jax.enable_x64(True):`.")
        if diffusion is not None:
            cfg = cfg.replace(**_registry.diffusion_fields(diffusion))
        if scheme is not None:
            cfg = cfg.replace(**_registry.scheme_fields(scheme))
        cfg.check_runnable()
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden
        if cell is not None and not isinstance(cell, str):
            cfg = cfg.replace(cell=_registry.cell_field(cfg, cell))
        self.cfg = cfg
        self.encoder = nnx.Linear(cfg.input_dim, d, rngs=rngs, dtype=dtype, param_dtype=dtype)
        if cell is None:
            cell = _registry.cell(cfg, rngs)
        usable = isinstance(cell, nnx.Module) and callable(getattr(cell, "drift", None))
        layout = cells.state_layout(cell, cfg) if usable else None  # check_cell names what is missing
        cells.check_cell(cell, d, dtype, layout)
        if layout is not None and not self.scheme.is_sde:
            raise ValueError(f"NRNNConfig.convention='reference' is invalid with {type(cell).__name__}, whose "
                             f"state is not one array ({d},): the reference convention's per-unit step and noise "
                             "act on one array of hidden units; use convention='sde'")
        self.cell = cell
        if not self.scheme.is_sde:  # the public code's rule: a learnable per-unit step
            self.step_size = nnx.Param(jnp.full((d,), cfg.dt, dtype))
        else:
            self.step_size = None
        self.decoder = nnx.Linear(d, cfg.num_classes, rngs=rngs, dtype=dtype, param_dtype=dtype)

    @property
    def scheme(self) -> Scheme:
        """The discretisation (`nrnn_jax.schemes`) the configuration records."""
        return _registry.scheme(self.cfg)

    @property
    def diffusion(self) -> Noise:
        """The diffusion σ (`nrnn_jax.noise`) on the model's flat state, as the configuration records it."""
        return _registry.diffusion(self.cfg, self.state_layout)

    # -- the pieces the pure functions need ------------------------------------------------------
    def recurrent_params(self, noise_levels: tuple | None = None) -> RecurrentParams:
        """The parameters of the noise and the scheme: the step size s, and `noise_levels` = (ε_add, ε_mult)
        when given (None: the configuration's levels apply); for the Lipschitz cell also its matrices A, W
        (docs/theory.md (1.4); None for other cells). Negative or non-finite levels are refused."""
        check_noise_levels(noise_levels)
        eps_add, eps_mult = (None, None) if noise_levels is None else noise_levels
        lipschitz = isinstance(self.cell, cells.LipschitzCell)
        return RecurrentParams(
            A=self.cell.A if lipschitz else None,
            W=self.cell.W if lipschitz else None,
            step_size=None if self.step_size is None else self.step_size[...],
            eps_add=eps_add,
            eps_mult=eps_mult,
        )

    def encode(self, x: Float[Array, "batch T n"]) -> Float[Array, "batch T d"]:
        """The input drive z_k = U x_k + b for all steps at once."""
        return self.encoder(x)

    @property
    def state_layout(self) -> cells.StateLayout | None:
        """Where the parts of the cell's state lie in the flat state (`cells.StateLayout`); None when the
        state is one array (hidden,), read whole by the decoder, with the noise on all of it."""
        return cells.state_layout(self.cell, self.cfg)

    @property
    def state_size(self) -> int:
        """The size of one example's flat state: `hidden` for a state of one array (hidden,)."""
        layout = self.state_layout
        return self.cfg.hidden if layout is None else layout.size

    @property
    def noise_dim(self) -> int:
        """The width m of the standard normals: `model(x, noise=xi)` takes xi of shape (batch, T, m). For a state
        of one array (hidden,) it is `cfg.noise_dim`; otherwise that of the configured diffusion on the parts
        `cfg.noise_on` of the state (e.g. 2 hidden for diagonal noise on an LSTM's (c, h), hidden on its h)."""
        return _registry.noise_width(self.cfg, self.state_layout)

    def state_tree(self, h: Float[Array, "*batch s"]):
        """The cell's state pytree of flat states h (..., state_size), leading axes kept (h itself for a state
        of one array)."""
        layout = self.state_layout
        return h if layout is None else layout.unravel(h)

    def decode(self, h: Float[Array, "batch s"]) -> Float[Array, "batch classes"]:
        """The logits of states h (batch, state_size): the decoder applied to the cell's output part."""
        layout = self.state_layout
        return self.decoder(h if layout is None else layout.read(h))

    def _noise(self, x, noise, key):
        if noise is not None and key is not None:
            raise ValueError("NoisyRNN: pass either noise=xi or key=key, not both.")
        if key is not None:
            shape = (x.shape[0], x.shape[1], self.noise_dim)
            return prng.normal(key, shape, jnp.dtype(self.cfg.dtype))
        if noise is not None:
            check_noise(noise, x.shape[0], x.shape[1], self.noise_dim)
            return jnp.asarray(noise, jnp.dtype(self.cfg.dtype))
        return None

    def _solve(self, x, noise, key, save, noise_levels):
        check_inputs(x, self.cfg.input_dim, name="x")
        x = jnp.asarray(x, jnp.dtype(self.cfg.dtype))
        xi = self._noise(x, noise, key)
        p = self.recurrent_params(noise_levels)
        # the raw inputs and the encoder's (kernel, bias): the solver forms z = encode(x) where it pays
        encoder = (self.encoder.kernel.value, self.encoder.bias.value)
        return solvers.solve_batch(self.cfg, p, x, xi, save=save, cell=self.cell, encoder=encoder)

    def __call__(self, x, *, noise=None, key=None, noise_levels=None) -> Float[Array, "batch classes"]:
        return self.decode(self._solve(x, noise, key, "final", noise_levels))

    def final_state(self, x, *, noise=None, key=None, noise_levels=None) -> Float[Array, "batch s"]:
        """h_T for each example, shape (batch, state_size) (the flat state; `state_tree` gives its parts)."""
        return self._solve(x, noise, key, "final", noise_levels)

    def trajectory(self, x, *, noise=None, key=None, noise_levels=None) -> Float[Array, "batch steps s"]:
        """All states h_0 = 0, h_1, …, h_T, shape (batch, T + 1, state_size)."""
        return self._solve(x, noise, key, "all", noise_levels)


def with_noise(model: NoisyRNN, eps_add: float, eps_mult: float) -> NoisyRNN:
    """A copy of `model` with the same parameters (and cell) and other noise levels (e.g. to measure a
    deterministic model's explicit regularizer at the noise levels of a comparison).

    **Arguments:**

    - `model`: a `NoisyRNN` (left unchanged).
    - `eps_add`, `eps_mult`: the copy's noise levels (`NRNNConfig` fields, validated as there).

    **Returns:** a new `NoisyRNN` sharing no mutable state with `model`.
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # a new module sharing no mutable structure with `model`
    copy.cfg = model.cfg.replace(eps_add=eps_add, eps_mult=eps_mult)
    return copy
