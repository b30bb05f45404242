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

Built in, chosen by `NRNNConfig(cell=...)`:

- `"lipschitz"` (`LipschitzCell`, the default): α A h + tanh(W h + z) with the Lipschitz parametrisation of
  A and W (docs/theory.md (1.3)–(1.4)).
- `"antisymmetric"` (`AntisymmetricCell`, Chang et al. 2019): tanh((W − Wᵀ − γ I) h + z).
- `"gru"` (`GRUCell`): the continuous-time GRU (1 − u) ⊙ (g − h), u and r sigmoid gates, g = tanh(W_g (r ⊙ h) + …).
- `"tanh"` (`TanhCell`, the continuous-time RNN): −h + tanh(W h + z).

`FlaxCell` turns any flax `nnx` RNN cell `(carry, x) -> (carry, y)` with an array carry into the drift
f(h, z) = cell(h, z) − h, i.e. the discrete cell is the Euler step of size 1 of that drift.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, PyTree

from ._types import ArrayLike
from .config import NRNNConfig

CELLS = ("lipschitz", "antisymmetric", "gru", "tanh")


class Cell(nnx.Module):
    """Base class of cells: implement `drift(h, z)` for one example ((hidden,), (hidden,) -> (hidden,))."""

    def drift(self, h: Float[Array, " d"], z: Float[Array, " d"]) -> Float[Array, " d"]:
        raise NotImplementedError(f"{type(self).__name__} must implement drift(h, z)")


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


def lipschitz_taylor(alpha: float, h, prods, z, U, V, PU, PV):
    """`drift_taylor` of the Lipschitz drift in closed form (docs/theory.md (3.14)): with r = W h + z,
    G1 = α A u + tanh'(r) ⊙ W u and G2 = α A v + tanh'(r) ⊙ W v + ½ tanh''(r) ⊙ (W u)²."""
    d = h.shape[-1]
    t = jnp.tanh(prods[d:] + z)
    d1 = 1.0 - t * t  # tanh'
    d2 = -2.0 * t * d1  # tanh''
    f = alpha * prods[:d] + t
    G1 = alpha * PU[:, :d] + d1[None, :] * PU[:, d:]
    G2 = alpha * PV[:, :d] + d1[None, :] * PV[:, d:] + 0.5 * d2[None, :] * PU[:, d:] ** 2
    return f, G1, G2


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


def lipschitz_matrix(m: Float[ArrayLike, "d d"], beta: float, gamma: float) -> Float[Array, "d d"]:
    """β (M − Mᵀ) + (1 − β)(M + Mᵀ) − γ I   (docs/theory.md (1.4))."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return beta * (m - m.T) + (1.0 - beta) * (m + m.T) - gamma * eye


def lipschitz_from_products(alpha: float, h, prods, z):
    """α A h + tanh(W h + z) given prods = (A h, W h) (docs/theory.md (1.3))."""
    d = h.shape[-1]
    return alpha * prods[..., :d] + jnp.tanh(prods[..., d:] + z)


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
        return lipschitz_from_products(self.alpha, h, prods, z)

    def drift_taylor(self, h, prods, z, U, V, PU, PV):
        return lipschitz_taylor(self.alpha, h, prods, z, U, V, PU, PV)


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
    """Any flax `nnx` RNN cell `cell(carry, x) -> (new_carry, y)` with an array carry (e.g. `nnx.GRUCell`,
    `nnx.SimpleCell`) as a drift: f(h, z) = new_carry − h, so that the discrete cell is the Euler step of
    size 1 of the SDE's drift. The cell must take inputs and carry of size `hidden`."""

    def __init__(self, cell: nnx.Module):
        if not callable(cell):
            raise TypeError(f"FlaxCell(cell=...) expects a flax nnx RNN cell (carry, x) -> (carry, y), got "
                            f"{type(cell).__name__}")
        self.cell = cell

    def drift(self, h, z):
        carry, _ = self.cell(h, z)
        if not isinstance(carry, jax.Array) or carry.shape != h.shape:
            raise ValueError(f"FlaxCell: the wrapped cell's carry must be an array of the hidden state's shape "
                             f"{h.shape}, got {jax.tree.map(jnp.shape, carry)}")
        return carry - h


_BUILT_IN = {"lipschitz": LipschitzCell, "antisymmetric": AntisymmetricCell, "gru": GRUCell, "tanh": TanhCell}


def make_cell(cfg: NRNNConfig, rngs: nnx.Rngs) -> Cell:
    """The built-in cell named by `cfg.cell`."""
    if cfg.cell not in _BUILT_IN:
        raise ValueError(f"NRNNConfig.cell={cfg.cell!r} names no built-in cell ({', '.join(CELLS)}); a user cell "
                         "is passed as NoisyRNN(cfg, rngs=rngs, cell=my_cell)")
    return _BUILT_IN[cfg.cell](cfg, rngs=rngs)


def is_built_in(cell: Any, name: str) -> bool:
    return name in _BUILT_IN and type(cell) is _BUILT_IN[name]


# ------------------------------------------------------------------------------------------------------
# The pure form the solvers and the regularizer use.
# ------------------------------------------------------------------------------------------------------
class Drift(NamedTuple):
    """A cell as pure functions of its arrays, for use inside traced loops (`cells.pure`).

    - `params`: the arrays: M = `products_matrix()` for a product cell, the cell's `nnx` state otherwise.
    - `fn(params, h, z)`: the drift for one example.
    - `from_products(h, prods, z)`: a product cell's g (None for a generic cell); reads no arrays.
    - `taylor`: a product cell's `drift_taylor` (None for a generic cell).
    """

    params: PyTree
    fn: Callable
    from_products: Callable | None
    taylor: Callable | None = None

    def __call__(self, h, z):
        return self.fn(self.params, h, z)

    @property
    def has_products(self) -> bool:
        return self.from_products is not None


@dataclasses.dataclass(frozen=True)
class _GraphDrift:
    """fn(state, h, z) of a module's drift, hashable by its graph (so a jit may take it as static)."""

    graphdef: Any

    def __call__(self, state, h, z):
        return nnx.merge(self.graphdef, state).drift(h, z)


@functools.lru_cache(maxsize=None)
def _matrix_lipschitz_fn(alpha: float) -> Callable:
    return lambda M, h, z: lipschitz_from_products(alpha, h, M @ h, z)


def pure(cell, products: bool = True) -> Drift:
    """The `Drift` of a cell (a `Cell`, or `MatrixLipschitz`). `products=False` gives the generic form even for
    a product cell; its `fn` is then hashable (usable as a static argument of `jax.jit`)."""
    if isinstance(cell, MatrixLipschitz):
        return Drift(cell.products_matrix(), _matrix_lipschitz_fn(cell.alpha),
                     cell.drift_from_products if products else None, cell.drift_taylor if products else None)
    if isinstance(cell, ProductCell) and products:
        g = cell.drift_from_products
        return Drift(cell.products_matrix(), lambda M, h, z: g(h, M @ h, z), g, cell.drift_taylor)
    graphdef, state = nnx.split(cell)
    return Drift(state, _GraphDrift(graphdef), None)


class MatrixLipschitz:
    """The Lipschitz drift from given matrices A, W (what `solvers.solve(cfg, RecurrentParams(A, W), ...)`
    runs): a product cell that is not a module (`alpha` a Python float)."""

    def __init__(self, alpha: float, A, W):
        self.alpha, self.A, self.W = alpha, A, W

    @classmethod
    def of(cls, cfg: NRNNConfig, p, where: str) -> "MatrixLipschitz":
        """The Lipschitz drift of the matrices in `p` (a `RecurrentParams`); ValueError if `p` has none."""
        if p.A is None or p.W is None:
            raise ValueError(f"{where}: pass cell=model.cell, or RecurrentParams with the matrices A and W of the "
                             "Lipschitz drift")
        return cls(cfg.alpha, p.A, p.W)

    def products_matrix(self):
        return jnp.concatenate([self.A, self.W], axis=0)

    def drift_from_products(self, h, prods, z):
        return lipschitz_from_products(self.alpha, h, prods, z)

    def drift(self, h, z):
        return self.drift_from_products(h, self.products_matrix() @ h, z)

    def drift_taylor(self, h, prods, z, U, V, PU, PV):
        return lipschitz_taylor(self.alpha, h, prods, z, U, V, PU, PV)


def check_cell(cell: Any, hidden: int, dtype) -> None:
    """Clear errors for a user cell: no `drift`, or a drift of the wrong shape or dtype (checked abstractly,
    without computing anything)."""
    if isinstance(cell, str):
        raise TypeError(f"NoisyRNN(cell={cell!r}): cell= takes a cell module; a built-in cell is chosen by name with "
                        f"NRNNConfig(cell={cell!r}) ({', '.join(CELLS)})")
    if not callable(getattr(cell, "drift", None)):
        raise TypeError(f"NoisyRNN(cell=...): a cell needs a method drift(h, z) for one example (h, z of shape "
                        f"({hidden},)) returning dh/dt of shape ({hidden},); {type(cell).__name__} has none. "
                        "Subclass nrnn_jax.Cell, or wrap a flax RNN cell in nrnn_jax.FlaxCell.")
    if not isinstance(cell, nnx.Module):
        raise TypeError(f"NoisyRNN(cell=...): a cell must be a flax.nnx.Module (subclass nrnn_jax.Cell), got "
                        f"{type(cell).__name__}")
    h = jax.ShapeDtypeStruct((hidden,), dtype)
    try:
        out = jax.eval_shape(lambda hh, zz: pure(cell)(hh, zz), h, h)
    except Exception as e:  # the user's code failed on the contract's shapes: say which call
        raise ValueError(f"NoisyRNN(cell=...): {type(cell).__name__}.drift(h, z) failed for h, z of shape "
                         f"({hidden},) and dtype {jnp.dtype(dtype).name}: {type(e).__name__}: {e}") from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (hidden,) or out.dtype != jnp.dtype(dtype):
        got = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", out)
        raise ValueError(f"NoisyRNN(cell=...): {type(cell).__name__}.drift(h, z) must return dh/dt of shape "
                         f"({hidden},) and dtype {jnp.dtype(dtype).name} for one example; got {got}")
