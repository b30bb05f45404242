"""Cells: the drift f(h, z) of the input-driven SDE dh = f(h, z(t)) dt + σ(h) dB (docs/theory.md §1, §8).

A cell is a `flax.nnx.Module` with a method `drift(h, z)` for ONE example: `h` the hidden state
(hidden,), `z` the encoded input of the step, `model.encode(x)[:, k]`, of shape (hidden,); it returns
dh/dt of shape (hidden,). The library vmaps it over the batch, and every noise scheme, discretisation,
solver backend and the explicit regularizer act on it unchanged.

Cells whose recurrent matrices enter only through ONE matrix product per step, f(h, z) = g(h, M h, z),
subclass `ProductCell` and get the fast paths: the discrete adjoint of `nrnn_jax.recurrence` and a probe
recursion that never differentiates through the product. Any other cell runs through the generic paths
(JAX autodiff of the scan or of the diffrax solve; Taylor-mode and forward-over-forward derivatives for the
regularizer), which serve every cell.

Built in, chosen by name with `NRNNConfig(cell=...)` (`nrnn_jax._registry` maps the names to the classes)
or passed as objects, `NoisyRNN(cfg, rngs=rngs, cell=GRUCell(cfg, rngs=rngs))`:

- `"lipschitz"` (`LipschitzCell`, the default): α A h + tanh(W h + z) with the Lipschitz parametrisation of
  A and W (docs/theory.md (1.3)–(1.4)).
- `"antisymmetric"` (`AntisymmetricCell`, Chang et al. 2019): tanh((W − Wᵀ − γ I) h + z).
- `"gru"` (`GRUCell`): the continuous-time GRU (1 − u) ⊙ (g − h), u and r sigmoid gates, g = tanh(W_g (r ⊙ h) + …).
- `"tanh"` (`TanhCell`, the continuous-time RNN): −h + tanh(W h + z).

- `"lstm"` (`LSTMCell`): flax's `nnx.OptimizedLSTMCell` through `FlaxCell`, state (c, h), the decoder
  reading h.

`FlaxCell` turns any flax `nnx` RNN cell `(carry, x) -> (carry, y)` into the drift f(carry, z) =
cell(carry, z) − carry, i.e. the discrete cell is the Euler step of size 1 of that drift.

**A state of any shape.** A cell's state may be any pytree of arrays (an array, a tuple (c, h), a dict):
`Cell.state_shape(hidden, dtype)` declares it (default: one array (hidden,)), `drift(state, z)` returns a
pytree of the same structure, and `Cell.output(state)` names the part the decoder reads (one array of
shape (hidden,); default: the state itself). The numerical core (schemes, solvers, regularizer, analyses)
steps ONE flat vector per example, the leaves of the state laid end to end (`StateLayout`); the cell sees
its pytree, unravelled at the cell's boundary. `NRNNConfig.noise_on` chooses the parts the noise enters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, PyTree

from .config import BUILT_IN_CELLS, NRNNConfig
from .validation import ArrayLike


class Cell(nnx.Module):
    """Base class of cells: implement `drift(h, z)` for one example ((hidden,), (hidden,) -> (hidden,)).

    A cell whose state is not one array (hidden,) also overrides `state_shape` (its state for one example,
    any pytree) and `output` (the part of the state the decoder reads); `drift(state, z)` then takes and
    returns pytrees of that structure.
    """

    def drift(self, h: Float[Array, " d"], z: Float[Array, " d"]) -> Float[Array, " d"]:
        raise NotImplementedError(f"{type(self).__name__} must implement drift(h, z)")

    def state_shape(self, hidden: int, dtype) -> PyTree:
        """The state of one example as a pytree of arrays or `jax.ShapeDtypeStruct`s (only their shapes and
        dtypes are read).

        **Arguments:**

        - `hidden`: `NRNNConfig.hidden`, the width of the input drive z and of the decoder's input.
        - `dtype`: the model's dtype.

        **Returns:** one array (hidden,) unless a subclass says otherwise.
        """
        return jax.ShapeDtypeStruct((hidden,), jnp.dtype(dtype))

    def output(self, state: PyTree) -> PyTree:
        """The part of `state` the decoder reads: one of its leaves, of shape (hidden,).

        **Arguments:**

        - `state`: the state of one example (the pytree of `state_shape`).

        **Returns:** the leaf the decoder reads (default: the state itself, an array).
        """
        return state


class ProductCell(Cell):
    """A cell of the form f(h, z) = g(h, M h, z): the recurrent matrices enter only through the product
    M h with `products_matrix()` M of shape (p, hidden).

    Implement `products_matrix()` and `drift_from_products(h, prods, z)` (one example, prods = M h of
    shape (p,)). `drift_from_products` must read no parameter arrays: everything learnable goes through M
    (a bias can live in the encoder, whose output z = U x + b already has one). Then the solvers use the
    discrete adjoint (one matrix product per step forward and backward, the matrix gradient as one product
    after the loop) and the explicit regularizer's probe recursion runs in the same form.
    """

    def products_matrix(self) -> Float[Array, "p d"]:
        raise NotImplementedError(f"{type(self).__name__} must implement products_matrix()")

    def drift_from_products(self, h: Float[Array, " d"], prods: Float[Array, " p"], z: Float[Array, " d"]) -> Float[Array, " d"]:
        raise NotImplementedError(f"{type(self).__name__} must implement drift_from_products(h, prods, z)")

    def drift(self, h, z):
        return self.drift_from_products(h, self.products_matrix() @ h, z)

    def kept_products(self) -> tuple[int, int] | None:
        """The columns [start, stop) of the products M h that g's derivatives read, where g is affine with
        constant coefficients in all the others (then so are its Taylor coefficients in those columns of M u,
        M v); the discrete adjoint keeps only these columns for its backward pass. None (default): all."""
        return None

    def drift_taylor(self, h, prods, z, U, V, PU, PV):
        """g and its Taylor coefficients along the curves (h + t u + t² v, M h + t M u + t² M v), one curve per
        row of U, V (S, d) with products PU = U Mᵀ, PV = V Mᵀ (S, p): returns (g, G1, G2) with g (d,) the drift,
        G1 (S, d) the rows ∂g[u, M u] and G2 (S, d) the rows ∂g[v, M v] + ½ ∂²g[(u, M u), (u, M u)]
        (docs/theory.md (8.4)). By Taylor mode (`jax.experimental.jet`); a cell may override it with a closed
        form (the Lipschitz cell does)."""
        return taylor_by_jet(self.drift_from_products, h, prods, z, U, V, PU, PV)


def taylor_by_jet(from_products, h, prods, z, U, V, PU, PV):
    """`ProductCell.drift_taylor` by one Taylor-mode pass of g per curve."""
    from jax.experimental import jet

    g = lambda hh, pp: from_products(hh, pp, z)
    taylor = lambda u, v, pu, pv: jet.jet(g, (h, prods), ((u, 2.0 * v), (pu, 2.0 * pv)))
    fs, (G1, G2) = jax.vmap(taylor)(U, V, PU, PV)
    return fs[0], G1, 0.5 * G2


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


def lipschitz_matrix(m: Float[ArrayLike, "d d"], beta: float, gamma: float) -> Float[Array, "d d"]:
    """β (M − Mᵀ) + (1 − β)(M + Mᵀ) − γ I   (docs/theory.md (1.4))."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return beta * (m - m.T) + (1.0 - beta) * (m + m.T) - gamma * eye


@dataclasses.dataclass(frozen=True)
class LipschitzDrift:
    """The Lipschitz drift f(h, z) = α A h + tanh(W h + z) in product form g(h, M h, z), M = [A; W]
    (docs/theory.md (1.3)): the one definition, used by `LipschitzCell` and by the solvers and analyses
    given the matrices A, W without a cell (`lipschitz_drift`). Hashable, so usable as a static argument.

    - `self(M, h, z)`: f for one example from the matrix M = [A; W] (2 d, d);
    - `from_products(h, prods, z)`: g from prods = (A h, W h), with any leading axes;
    - `taylor(h, prods, z, U, V, PU, PV)`: `ProductCell.drift_taylor` in closed form (docs/theory.md
      (3.14)): with r = W h + z, G1 = α A u + tanh'(r) ⊙ W u and G2 = α A v + tanh'(r) ⊙ W v
      + ½ tanh''(r) ⊙ (W u)².
    """

    alpha: float

    def __call__(self, M, h, z):
        return self.from_products(h, M @ h, z)

    def from_products(self, h, prods, z):
        d = h.shape[-1]
        return self.alpha * prods[..., :d] + jnp.tanh(prods[..., d:] + z)

    def taylor(self, h, prods, z, U, V, PU, PV):
        d = h.shape[-1]
        t = jnp.tanh(prods[d:] + z)
        d1 = 1.0 - t * t  # tanh'
        d2 = -2.0 * t * d1  # tanh''
        f = self.alpha * prods[:d] + t
        G1 = self.alpha * PU[:, :d] + d1[None, :] * PU[:, d:]
        G2 = self.alpha * PV[:, :d] + d1[None, :] * PV[:, d:] + 0.5 * d2[None, :] * PU[:, d:] ** 2
        return f, G1, G2


class LipschitzCell(ProductCell):
    """The Lipschitz RNN drift f(h, z) = α A h + tanh(W h + z) (docs/theory.md (1.3)–(1.4)): A and W from
    free matrices M_A, M_W (entries N(0, (init_std / hidden)²)) as β(M − Mᵀ) + (1 − β)(M + Mᵀ) − γ I with
    γ = `gamma_a`, `gamma_w`. Fields of `NRNNConfig` used: hidden, alpha, beta, gamma_a, gamma_w, init_std, dtype."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.alpha, self.beta, self.gamma_a, self.gamma_w = cfg.alpha, cfg.beta, cfg.gamma_a, cfg.gamma_w
        self.M_A = _normal(rngs, (d, d), cfg.init_std / d, dtype)
        self.M_W = _normal(rngs, (d, d), cfg.init_std / d, dtype)

    @property
    def A(self) -> Array:
        return lipschitz_matrix(self.M_A[...], self.beta, self.gamma_a)

    @property
    def W(self) -> Array:
        return lipschitz_matrix(self.M_W[...], self.beta, self.gamma_w)

    def products_matrix(self):
        return jnp.concatenate([self.A, self.W], axis=0)

    def drift_from_products(self, h, prods, z):
        return LipschitzDrift(self.alpha).from_products(h, prods, z)

    def drift_taylor(self, h, prods, z, U, V, PU, PV):
        return LipschitzDrift(self.alpha).taylor(h, prods, z, U, V, PU, PV)

    def kept_products(self):
        d = self.M_A.shape[0]
        return (d, 2 * d)  # g = α (A h) + tanh(W h + z): affine in A h with the constant α


class AntisymmetricCell(ProductCell):
    """The antisymmetric RNN of Chang et al. (2019) as a drift: f(h, z) = tanh((W − Wᵀ − γ I) h + z), with
    γ = `gamma_w` (the diffusion that keeps the Euler step stable) and W ~ N(0, 1/hidden) (LeCun normal).
    The Jacobian's matrix W − Wᵀ − γ I has eigenvalues with real part −γ: the ODE neither explodes nor
    forgets."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.gamma = cfg.gamma_w
        self.M_W = _normal(rngs, (d, d), d ** -0.5, dtype)

    @property
    def W(self) -> Array:
        m = self.M_W[...]
        return m - m.T - self.gamma * jnp.eye(m.shape[0], dtype=m.dtype)

    def products_matrix(self):
        return self.W

    def drift_from_products(self, h, prods, z):
        return jnp.tanh(prods + z)


class TanhCell(ProductCell):
    """The continuous-time RNN f(h, z) = −h + tanh(W h + z), W ~ N(0, 1/hidden): its Euler step of size 1
    is the plain tanh RNN h ← tanh(W h + z)."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W = _normal(rngs, (d, d), d ** -0.5, dtype)

    def products_matrix(self):
        return self.W[...]

    def drift_from_products(self, h, prods, z):
        return jnp.tanh(prods + z) - h


class GRUCell(Cell):
    """A continuous-time GRU (cf. GRU-ODE, De Brouwer et al. 2019): f(h, z) = (1 − u) ⊙ (g − h) with

        u = σ(W_u h + V_u z + b_u),  r = σ(W_r h + V_r z + b_r),  g = tanh(W_g (r ⊙ h) + V_g z + b_g).

    Its Euler step of size 1 is the GRU update h ← u ⊙ h + (1 − u) ⊙ g. W ~ N(0, 1/hidden), V ~ N(0, 1/hidden),
    b = 0. The reset gate multiplies h before the product W_g (r ⊙ h), so this cell is not a `ProductCell`:
    it runs on the generic paths."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W_ur = _normal(rngs, (2 * d, d), d ** -0.5, dtype)
        self.W_g = _normal(rngs, (d, d), d ** -0.5, dtype)
        self.V = _normal(rngs, (3 * d, d), d ** -0.5, dtype)
        self.b = nnx.Param(jnp.zeros((3 * d,), dtype))

    def drift(self, h, z):
        d = h.shape[0]
        inp = self.V[...] @ z + self.b[...]
        gates = jax.nn.sigmoid(self.W_ur[...] @ h + inp[:2 * d])
        u, r = gates[:d], gates[d:]
        g = jnp.tanh(self.W_g[...] @ (r * h) + inp[2 * d:])
        return (1.0 - u) * (g - h)


class FlaxCell(Cell):
    """Any flax `nnx` RNN cell `cell(carry, x) -> (new_carry, y)` as a drift: f(carry, z) = new_carry − carry,
    so that the discrete cell is the Euler step of size 1 of the SDE's drift. The carry may be any pytree
    (`nnx.LSTMCell`'s and `nnx.OptimizedLSTMCell`'s (c, h), the array of `nnx.GRUCell` and `nnx.SimpleCell`);
    the decoder reads the part of the carry that the cell emits as its output y (the LSTM's h). The cell
    takes inputs of size `hidden` and emits y of size `hidden`.

    **Arguments:**

    - `cell`: the flax cell. A cell with `in_features` and `initialize_carry` (every flax `nnx` RNN cell)
      declares its carry itself; any other callable is taken to have an array carry (hidden,).
    """

    def __init__(self, cell: nnx.Module):
        if not callable(cell):
            raise TypeError(f"FlaxCell(cell=...) expects a flax nnx RNN cell (carry, x) -> (carry, y), got "
                            f"{type(cell).__name__}")
        self.cell = cell
        # which leaf of the new carry is the output y: found once, by tracing one step (no numbers computed)
        self.output_leaf = None
        if callable(getattr(cell, "initialize_carry", None)) and isinstance(getattr(cell, "in_features", None), int):
            dtype = getattr(cell, "param_dtype", jnp.float32)
            self.output_leaf = self._emitted_leaf(self.state_shape(cell.in_features, dtype),
                                                  jax.ShapeDtypeStruct((cell.in_features,), jnp.dtype(dtype)))

    def _emitted_leaf(self, carry, x) -> int | None:
        found = []

        def one(carry, x):
            new_carry, y = self.cell(carry, x)
            found.extend(i for i, leaf in enumerate(jax.tree.leaves(new_carry)) if leaf is y)
            return new_carry

        try:
            jax.eval_shape(one, carry, x)
        except Exception:  # the model's checks call the cell again and report what fails
            return None
        return found[0] if found else -1

    def state_shape(self, hidden, dtype):
        init = getattr(self.cell, "initialize_carry", None)
        if not callable(init):
            return super().state_shape(hidden, dtype)
        return jax.eval_shape(lambda: init((hidden,), rngs=nnx.Rngs(0)))

    def output(self, state):
        if self.output_leaf is None:
            return state if isinstance(state, (jax.Array, jax.ShapeDtypeStruct)) else None
        leaves = jax.tree.leaves(state)
        return leaves[self.output_leaf] if 0 <= self.output_leaf < len(leaves) else None

    def drift(self, h, z):
        carry, _ = self.cell(h, z)
        if jax.tree.structure(carry) != jax.tree.structure(h):
            raise ValueError(f"FlaxCell: the wrapped cell's carry has the structure {jax.tree.structure(carry)}, "
                             f"its input carry {jax.tree.structure(h)}")
        return jax.tree.map(jnp.subtract, carry, h)


class LSTMCell(FlaxCell):
    """The LSTM as a drift: flax's `nnx.OptimizedLSTMCell(hidden, hidden)` through `FlaxCell`, state (c, h)
    of 2 `hidden` numbers, the decoder reading h. At δ = 1 without noise the model is the discrete LSTM.
    Fields of `NRNNConfig` used: hidden, dtype."""

    def __init__(self, cfg: NRNNConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        super().__init__(nnx.OptimizedLSTMCell(cfg.hidden, cfg.hidden, rngs=rngs, dtype=dtype, param_dtype=dtype))


# ------------------------------------------------------------------------------------------------------
# The pure form the solvers and the regularizer use.
# ------------------------------------------------------------------------------------------------------
class Drift(NamedTuple):
    """A cell as pure functions of its arrays, for use inside traced loops (`cells.pure`).

    - `params`: the arrays: M = `products_matrix()` for a product cell, the cell's `nnx` state otherwise.
    - `fn(params, h, z)`: the drift for one example, on the flat state h.
    - `from_products(h, prods, z)`: a product cell's g (None for a generic cell); reads no arrays.
    - `taylor`: a product cell's `drift_taylor` (None for a generic cell).
    - `layout`: how the cell's pytree state lies in the flat state (None: the state is one array (hidden,)).
    - `kept_products`: a product cell's `kept_products()`.
    """

    params: PyTree
    fn: Callable
    from_products: Callable | None
    taylor: Callable | None = None
    layout: "StateLayout | None" = None
    kept_products: tuple[int, int] | None = None

    def __call__(self, h, z):
        return self.fn(self.params, h, z)

    @property
    def has_products(self) -> bool:
        return self.from_products is not None


@dataclasses.dataclass(frozen=True)
class _GraphDrift:
    """fn(state, h, z) of a module's drift, hashable by its graph (so a jit may take it as static); with a
    `layout`, h is the flat state, unravelled into the cell's pytree and the drift ravelled back."""

    graphdef: Any
    layout: "StateLayout | None" = None

    def __call__(self, state, h, z):
        cell = nnx.merge(self.graphdef, state)
        if self.layout is None:
            return cell.drift(h, z)
        return self.layout.ravel(cell.drift(self.layout.unravel(h), z))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where the parts (leaves) of a cell's pytree state lie in the flat state vector the numerical core
    steps, one vector per example: the leaves laid end to end in `jax.tree` order. Hashable (static).

    - `cell`: the cell's class name (for messages); `treedef`: the state's structure.
    - `shapes`, `names`: each leaf's shape and name (its key path, e.g. "0", "1" for a tuple (c, h), "h" for
      a dict entry).
    - `output`: the index of the leaf the decoder reads.
    - `noise`: the flat coordinates the noise enters (None: the whole state).
    """

    cell: str
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    output: int
    noise: tuple[int, ...] | None = None

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=int)) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0,) + self.sizes)[:-1])

    @property
    def size(self) -> int:
        """The flat state's size n."""
        return sum(self.sizes)

    @property
    def noise_size(self) -> int:
        """How many coordinates the noise enters."""
        return self.size if self.noise is None else len(self.noise)

    def unravel(self, s: Array) -> PyTree:
        """The state pytree of flat states s (..., n) (leading axes kept on every leaf)."""
        lead = s.shape[:-1]
        leaves = [s[..., o:o + n].reshape(lead + shape) for o, n, shape in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree.unflatten(self.treedef, leaves)

    def ravel(self, tree: PyTree) -> Array:
        """The flat vector (n,) of one example's state pytree."""
        leaves = self.treedef.flatten_up_to(tree)
        return jnp.concatenate([jnp.reshape(a, (-1,)) for a in leaves])

    def read(self, s: Array) -> Array:
        """The part the decoder reads, (..., hidden), of flat states s (..., n)."""
        o, n = self.offsets[self.output], self.sizes[self.output]
        return s[..., o:o + n]


def _part_names(paths) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr(path, simple=True, separator=".") for path in paths)


def state_layout(cell: Any, cfg: NRNNConfig) -> StateLayout | None:
    """The `StateLayout` of a cell's state under `cfg` (hidden, dtype, noise_on); None when the state is one
    array (hidden,) read whole by the decoder with the noise on all of it (every cell of the paper's kind:
    the numerical core then steps the state itself). ValueError naming the cell, the shapes found and what is
    expected when the declared state or its output part cannot be used, or `noise_on` names no part."""
    own = cell_name(cell)
    names_on = tuple(cfg.noise_on)
    state_shape = getattr(cell, "state_shape", None)
    if isinstance(cell, ProductCell) or state_shape is None:  # one array (hidden,)
        declared = jax.ShapeDtypeStruct((cfg.hidden,), jnp.dtype(cfg.dtype))
    else:
        try:
            declared = state_shape(cfg.hidden, jnp.dtype(cfg.dtype))
        except Exception as e:
            raise ValueError(f"NoisyRNN(cell=...): {own}.state_shape(hidden={cfg.hidden}, dtype="
                             f"{jnp.dtype(cfg.dtype).name}) failed: {type(e).__name__}: {e}") from e
    paths, treedef = jax.tree_util.tree_flatten_with_path(declared)
    leaves = [leaf for _, leaf in paths]
    names = _part_names(p for p, _ in paths)
    found = ", ".join(f"{n or 'state'}: {_describe(a)}" for n, a in zip(names, leaves))
    if not leaves or not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in leaves):
        raise ValueError(f"NoisyRNN(cell=...): {own}.state_shape must return a pytree of arrays or "
                         f"jax.ShapeDtypeStruct (the state of one example); got {declared!r}")
    bad = [n or "state" for n, a in zip(names, leaves) if jnp.dtype(a.dtype) != jnp.dtype(cfg.dtype)]
    if bad:
        raise ValueError(f"NoisyRNN(cell=...): {own}'s state ({found}) must have NRNNConfig.dtype="
                         f"{jnp.dtype(cfg.dtype).name}; parts {bad} do not (build a flax cell with dtype= and "
                         "param_dtype= the model's dtype)")
    sentinels = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    if getattr(type(cell), "output", Cell.output) is Cell.output and treedef.num_nodes == 1:
        out = sentinels[0]  # the default: the state itself, one array
    else:
        out = _output_of(cell, treedef, sentinels, own, found)
    where = [i for i, a in enumerate(sentinels) if out is a]
    if not where:
        raise ValueError(f"NoisyRNN(cell=...): the decoder cannot read {own}'s output: {own}.output(state) must "
                         f"return one part of the state ({found}) of shape ({cfg.hidden},), got "
                         f"{jax.tree.map(_describe, out) if out is not None else None}")
    k = where[0]
    if tuple(leaves[k].shape) != (cfg.hidden,):
        raise ValueError(f"NoisyRNN(cell=...): the decoder reads {own}'s output part "
                         f"{names[k] or 'state'}: {_describe(leaves[k])}, which must have shape ({cfg.hidden},) "
                         f"(NRNNConfig.hidden); the state is ({found})")
    layout = StateLayout(own, treedef, tuple(tuple(int(n) for n in a.shape) for a in leaves), names, k)
    chosen = set()
    for name in names_on:
        if name == "output":
            chosen.add(k)
        elif name in names and name:
            chosen.add(names.index(name))
        else:
            allowed = ["output"] + [n for n in names if n]
            raise ValueError(f"NRNNConfig.noise_on={names_on!r} is invalid for {own}: {name!r} names no part of "
                             f"its state ({found}); allowed: {', '.join(map(repr, allowed))}, or () for the "
                             "whole state")
    if chosen and len(chosen) < len(leaves):
        noise = tuple(i for j in sorted(chosen) for i in range(layout.offsets[j], layout.offsets[j] + layout.sizes[j]))
        layout = dataclasses.replace(layout, noise=noise)
    if layout.noise is None and len(leaves) == 1 and layout.shapes[0] == (cfg.hidden,):
        return None
    return layout


def _output_of(cell, treedef, sentinels, own: str, found: str):
    """`cell.output` of the declared state, traced (no numbers): the sentinel leaf it returns, else the
    shapes of what it returns."""
    picked = []

    def read(*leaves):
        out = cell.output(jax.tree.unflatten(treedef, list(leaves)))
        picked.extend(i for i, a in enumerate(leaves) if out is a)
        return out

    try:
        out = jax.eval_shape(read, *sentinels)
    except Exception as e:
        raise ValueError(f"NoisyRNN(cell=...): {own}.output(state) failed for the declared state ({found}): "
                         f"{type(e).__name__}: {e}") from e
    return sentinels[picked[0]] if picked else out


def cell_name(cell) -> str:
    """The class name of a cell for messages; a `FlaxCell` with the flax cell it wraps."""
    inner = getattr(cell, "cell", None) if isinstance(cell, FlaxCell) else None
    return type(cell).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


def _describe(a) -> str:
    shape = getattr(a, "shape", None)
    return f"{jnp.dtype(a.dtype).name}{list(shape)}" if shape is not None else type(a).__name__


def lipschitz_drift(cfg: NRNNConfig, p, where: str) -> Drift:
    """The `Drift` of the Lipschitz drift of the matrices A, W in `p` (a `RecurrentParams`), as
    `solvers.solve(cfg, RecurrentParams(A, W), ...)` runs it without a cell; ValueError naming `where` if `p`
    has none."""
    if p.A is None or p.W is None:
        raise ValueError(f"{where}: pass cell=model.cell, or RecurrentParams with the matrices A and W of the "
                         "Lipschitz drift")
    g = LipschitzDrift(cfg.alpha)
    d = p.A.shape[0]
    return Drift(jnp.concatenate([p.A, p.W], axis=0), g, g.from_products, g.taylor, kept_products=(d, 2 * d))


def pure(cell, products: bool = True, layout: StateLayout | None = None) -> Drift:
    """The `Drift` of a cell (a `Cell`, or already a `Drift`). `products=False` gives the generic form even for
    a product cell; its `fn` is then hashable (usable as a static argument of `jax.jit`). `layout`: the
    cell's `state_layout` (None: the state is one array (hidden,)); the drift then acts on the flat state."""
    if isinstance(cell, Drift):
        return cell if products else cell._replace(from_products=None, taylor=None, kept_products=None)
    if isinstance(cell, ProductCell) and products:
        g = cell.drift_from_products
        return Drift(cell.products_matrix(), lambda M, h, z: g(h, M @ h, z), g, cell.drift_taylor,
                     kept_products=cell.kept_products())
    graphdef, state = nnx.split(cell)
    return Drift(state, _GraphDrift(graphdef, layout), None, None, layout)


def check_cell(cell: Any, hidden: int, dtype, layout: StateLayout | None = None) -> None:
    """Clear errors for a user cell: no `drift`, or a drift of the wrong structure, shape or dtype (checked
    abstractly, without computing anything). `layout`: the cell's `state_layout` (None: one array
    (hidden,))."""
    if isinstance(cell, str):
        raise TypeError(f"NoisyRNN(cell={cell!r}): cell= takes a cell module; a built-in cell is chosen by name with "
                        f"NRNNConfig(cell={cell!r}) ({', '.join(BUILT_IN_CELLS)})")
    if not callable(getattr(cell, "drift", None)):
        raise TypeError(f"NoisyRNN(cell=...): a cell needs a method drift(h, z) for one example (h, z of shape "
                        f"({hidden},)) returning dh/dt of shape ({hidden},); {type(cell).__name__} has none. "
                        "Subclass nrnn_jax.Cell, or wrap a flax RNN cell in nrnn_jax.FlaxCell.")
    if not isinstance(cell, nnx.Module):
        raise TypeError(f"NoisyRNN(cell=...): a cell must be a flax.nnx.Module (subclass nrnn_jax.Cell), got "
                        f"{type(cell).__name__}")
    dt = jnp.dtype(dtype)
    z = jax.ShapeDtypeStruct((hidden,), dtype)
    if layout is None:
        state = z
        expected = f"({hidden},) and dtype {dt.name}"
        given = "h, z of shape"
    else:
        state = jax.tree.unflatten(layout.treedef, [jax.ShapeDtypeStruct(s, dt) for s in layout.shapes])
        parts = ", ".join(f"{n}: {dt.name}{list(s)}" for n, s in zip(layout.names, layout.shapes))
        expected = f"the structure and shapes of its declared state ({parts})"
        given = f"h the declared state ({parts}) and z of shape"
    try:
        out = jax.eval_shape(lambda hh, zz: cell.drift(hh, zz), state, z)
    except Exception as e:  # the user's code failed on the contract's shapes: say which call
        raise ValueError(f"NoisyRNN(cell=...): {cell_name(cell)}.drift(h, z) failed for {given} "
                         f"({hidden},) and dtype {dt.name}: {type(e).__name__}: {e}") from e
    got = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", out)
    same = (jax.tree.structure(out) == jax.tree.structure(state) and all(
        isinstance(a, jax.ShapeDtypeStruct) and a.shape == b.shape and a.dtype == dt
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state))))
    if not same:
        raise ValueError(f"NoisyRNN(cell=...): {cell_name(cell)}.drift(h, z) must return dh/dt of shape "
                         f"{expected} for one example; got {got}")
