"""A batched recurrence whose matrices enter only through one product per step, with an exact discrete
adjoint (a custom VJP).

Every scheme of this library (docs/theory.md §2) and the probe recursion of the explicit regularizer
(docs/theory.md (3.12)–(3.14)) have the form

    s_{k+1} = g(s_k, M s_k, x_k, θ)          s_k: (K, d) per example,  M: (p, d),  θ: small parameters,

where g acts on one example and sees the matrices only through the products M s_k (for the Lipschitz
drift M = [A; W] and g evaluates α a + tanh(w + z)). Differentiating a `lax.scan` of this step makes JAX
accumulate the (p, d) parameter cotangent inside the reverse loop, two small matrix products per step.
The adjoint here propagates only the state cotangent backwards,

    λ_k = ∂g/∂s ᵀ λ_{k+1} + Mᵀ μ_k,    μ_k = ∂g/∂(M s) ᵀ λ_{k+1},

and forms the matrix cotangent ∂L/∂M = Σ_k μ_k s_kᵀ. For a state of one row per example (the schemes) it is
ONE product after the loop over all steps and examples; for several rows (K > 1: the probe recursion's h̄, U,
V) it accumulates inside the reverse loop, one product of K·B rows per step, so that no (T, B, K, p) stack
of the μ_k is kept: as fast on this CPU, and the largest buffer of the explicit train step gone. The
gradients are those of the plain scan (tests check it); only the order of the floating-point sums differs.

The forward pass is pluggable: `scan_forward` (a `lax.scan`) or any function returning the same states,
e.g. a `diffrax.diffeqsolve` on the step grid (`nrnn_jax.solvers`), which then gets this adjoint too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .validation import check_choice

# g(state (K, d), products (K, p), x_k (pytree, one example), params) -> state (K, d)
Cell = Callable[[Array, Array, PyTree, Any], Array]
# forward(cell, M, params, state0 (B, K, d), xs (leaves (B, T, ...)))
#   -> (states (T or T + 1, B, K, d), final (B, K, d), products (T or T + 1, B, K, p) or None)
# where states[k] is the state entering step k (a forward that saves T + 1 states, the final one last, returns
# them whole: the adjoint reads the first T in place rather than copying them out)
Forward = Callable[..., tuple[Array, Array, Array | None]]


def _products(states, M):
    """states @ Mᵀ over all leading axes as one 2-D matrix product (XLA's CPU dot is much faster on a
    plain 2-D product than on an einsum with several free axes)."""
    flat = states.reshape(-1, states.shape[-1]) @ M.T
    return flat.reshape(states.shape[:-1] + (M.shape[0],))


def _outer_sum(a, b):
    """Σ over all leading axes of a[..., p] b[..., d]ᵀ, as one 2-D matrix product."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def _transposed_outer(s, mu):
    """Σ over the leading axes of s[..., d] mu[..., p]ᵀ, (d, p): s transposed into its own buffer first, then
    a plain (d, n) @ (n, p) product. XLA:CPU's dot contracting both operands' leading axis (`_outer_sum`) is
    markedly slower per step than this form, transposition included."""
    sT = jax.lax.optimization_barrier(s.reshape(-1, s.shape[-1]).T)  # keeps XLA from folding it into the dot
    return sT @ mu.reshape(-1, mu.shape[-1])


def _batched(cell: Cell):
    return jax.vmap(cell, in_axes=(0, 0, 0, None))


def _at_step(xs, k):
    """Step k of batch-major inputs (leaves (B, T, ...)): read in place, no transposed copy of the inputs."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False), xs)


def num_steps(xs) -> int:
    return jax.tree.leaves(xs)[0].shape[1]


def scan_forward(cell: Cell, M, params, state0, xs, kept: tuple[int, int] | None = None):
    """The forward recursion as a `lax.scan` over time; returns the state entering every step, the final
    state and the products of every step (kept for the backward pass; with `kept` = (start, stop), only
    those columns)."""
    step = _batched(cell)

    def body(s, k):
        prods = _products(s, M)
        return step(s, prods, _at_step(xs, k), params), (s, _columns(prods, kept))

    final, (states_in, prods) = jax.lax.scan(body, state0, jnp.arange(num_steps(xs)))
    return states_in, final, prods


def _columns(prods, kept):
    return prods if kept is None or prods is None else prods[..., kept[0]:kept[1]]


def _all_columns(prods, kept, p: int):
    """The products with the columns outside `kept` set to zero (the cell's derivatives do not read them)."""
    if kept is None:
        return prods
    full = jnp.zeros(prods.shape[:-1] + (p,), prods.dtype)
    return jax.lax.dynamic_update_slice_in_dim(full, prods, kept[0], axis=-1)


def _output(states, final, save_all: bool, T: int):
    if not save_all:
        return final
    return states if states.shape[0] == T + 1 else jnp.concatenate([states, final[None]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _recurrence(cell, forward, save_all, kept, M, params, state0, xs):
    states, final, _ = forward(cell, M, params, state0, xs)
    return _output(states, final, save_all, num_steps(xs))


def _recurrence_fwd(cell, forward, save_all, kept, M, params, state0, xs):
    T = num_steps(xs)
    if kept is not None and forward is scan_forward:
        states, final, prods = scan_forward(cell, M, params, state0, xs, kept)
    else:
        states, final, prods = forward(cell, M, params, state0, xs)
        prods = _columns(prods, kept)
    if prods is None:
        prods = _columns(_products(states[:T], M), kept)  # one product over all steps and examples
    return _output(states, final, save_all, T), (M, params, states, prods, xs)


def _recurrence_bwd(cell, forward, save_all, kept, residuals, g):
    M, params, states, prods, xs = residuals
    T = num_steps(xs)
    step = _batched(cell)
    if save_all:
        g_final, g_steps = g[-1], g[:-1]
    else:
        g_final, g_steps = g, None

    # K > 1 rows per example: ∂L/∂M accumulates in the loop (see the module's docstring)
    in_loop = states.shape[-2] > 1

    def body(carry, inputs):
        lam, dparams, dM = carry
        k, g_k = inputs
        # read in place (they may hold a last row beyond step T - 1); plain dynamic slices, not NumPy
        # indexing with its negative-index and bounds handling
        s, prod = (jax.lax.dynamic_index_in_dim(a, k, 0, keepdims=False) for a in (states, prods))
        prod = _all_columns(prod, kept, M.shape[0])
        _, vjp = jax.vjp(step, s, prod, _at_step(xs, k), params)
        ds, dprod, dx, dtheta = vjp(lam)
        lam_prev = ds + _products(dprod, M.T)  # + Mᵀ μ_k
        if g_k is not None:
            lam_prev = lam_prev + g_k
        dparams = jax.tree.map(jnp.add, dparams, dtheta)
        if in_loop:  # (∂L/∂M)ᵀ += s_kᵀ μ_k with s_kᵀ laid out first (see _transposed_outer)
            return (lam_prev, dparams, dM + _transposed_outer(s, dprod)), (None, dx)
        return (lam_prev, dparams, dM), (dprod, dx)

    # μ_k are stacked in a new buffer rather than written over prods[k]: where XLA fuses the reads of
    # prods[k] into operations after such a write, it copies the whole buffer at every step.
    zeros = jax.tree.map(jnp.zeros_like, params)
    dM0 = jnp.zeros_like(M.T if in_loop else M)
    (lam0, dparams, dM), (dprods, dxs) = jax.lax.scan(body, (g_final, zeros, dM0), (jnp.arange(T), g_steps),
                                                      reverse=True)
    if in_loop:
        dM = dM.T
    else:
        dM = _outer_sum(dprods, states[:T])  # one product over all steps and examples
    return dM, dparams, lam0, jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), dxs)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrence(
    cell: Cell,
    M: Float[Array, "p d"],
    params: PyTree,
    state0: Float[Array, "B K d"],
    xs: PyTree,
    *,
    forward: Forward = scan_forward,
    save: str = "final",
    kept: tuple[int, int] | None = None,
) -> Array:
    """Run s_{k+1} = cell(s_k, M s_k, x_k, params) for a batch, differentiable by the discrete adjoint.

    **Arguments:**

    - `cell(s, prods, x_k, params)`: one step for ONE example; `s` (K, d), `prods = s @ Mᵀ` (K, p), `x_k`
      this example's slice of `xs` at step k. It must read `M` only through `prods` (pass every other
      array through `params` or `xs`: a closed-over array would get no gradient).
    - `M`: the (p, d) matrix; `params`: a pytree of parameters shared by the batch (may be None).
    - `state0`: (B, K, d) initial states; `xs`: a pytree whose leaves have shape (B, T, ...) (batch-major,
      as the data come; step k is read in place).
    - `forward`: how the forward states are computed (default `scan_forward`); it returns the states
      entering each step, the final state and the products (or None: they are then computed after the
      loop in one matrix product). The backward pass is the adjoint above whatever computed them.
    - `save`: `"final"` for (B, K, d), `"all"` for (T + 1, B, K, d).
    - `kept`: (start, stop): the backward pass keeps only these columns of the products, the others set to
      zero when it differentiates the cell. Only for a cell affine with constant coefficients in those other
      columns (its derivatives do not read them); None: all columns kept.

    Reverse mode only (`jax.grad`, `jax.vjp` and forward-over-reverse such as Hessian-vector products);
    `jax.jvp` of this function itself is not defined — use `gradient="autodiff"` in the model config.
    """
    if save not in ("final", "all"):
        check_choice("", "save", save, ("final", "all"))
    return _recurrence(cell, forward, save == "all", None if kept is None else tuple(kept), M, params, state0, xs)
