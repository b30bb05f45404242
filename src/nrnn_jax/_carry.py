"""The products P = M h carried beside the state of a diffrax solve, for the discrete adjoint of
`nrnn_jax.recurrence` (which needs the states and products of every step)."""

from __future__ import annotations

import diffrax
import equinox as eqx
from jaxtyping import Array


class WithProducts(eqx.Module):
    """The solve's `args` with the products P = M h of the state a step starts from (`CarryProducts`)."""

    args: tuple
    products: Array


def unpack(y, args):
    """The state h, the args (params, z, p), and the products M h when the solve carries them (None
    otherwise): y is h, or the carried (h, P) itself when diffrax checks the terms against the solve's y0."""
    args, prods = (args.args, args.products) if isinstance(args, WithProducts) else (args, None)
    if isinstance(y, tuple):
        y, prods = y
    return y, args, prods


class CarryProducts(diffrax.AbstractWrappedSolver):
    """Wraps a diffrax solver of the batch state h so that the solve carries the products P = M h beside it:
    the solve's state is (h, P), the wrapped solver steps h with P handed to the drift (which then does not
    multiply again), and the new products M h_{k+1} are formed once, after the step. Valid for solvers that
    evaluate the drift at the start of the step only (every solver the diffrax loop uses: Euler, EulerHeun,
    ItoMilstein). Stepped on the grid by a `lax.scan` (`nrnn_jax._loops`), the scan stacks each step's (h, P)
    for the adjoint, so the products are not formed again after the loop."""

    solver: diffrax.AbstractSolver
    batch: int = eqx.field(static=True)

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return diffrax.LocalLinearInterpolation

    def products(self, h, M):
        """P = M h for every example of the batch state ((B, d), or flat (d,) for one example), as one matrix
        product; (B, p) or (p,)."""
        return (h.reshape(self.batch, -1) @ M.T).reshape(h.shape[:-1] + (-1,))

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0[0], WithProducts(args, y0[1]))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        h1, _, _, solver_state, result = self.solver.step(terms, t0, t1, y0[0], WithProducts(args, y0[1]),
                                                          solver_state, made_jump)
        y1 = (h1, self.products(h1, args[0]))  # args = (M, z, p)
        return y1, None, dict(y0=y0, y1=y1), solver_state, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0[0], WithProducts(args, y0[1]))
