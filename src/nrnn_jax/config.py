"""Model configuration: one frozen, self-validating object (math.md §1).

Every field is checked at construction; a bad value raises `ValueError` naming the field, the value and
what is allowed, so that mistakes surface before any tracing or compilation happens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

CONVENTIONS = ("sde", "reference")
NOISE_KINDS = ("diagonal", "scalar")
SOLVERS = ("euler", "euler_heun", "milstein")
BACKENDS = ("diffrax", "scan")
GRADIENTS = ("adjoint", "autodiff")
DTYPES = ("float32", "float64")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"NRNNConfig.{field}={value!r} is invalid: {allowed}.")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"expected an integer >= {minimum}")


def _check_real(field: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = "]" if math.isfinite(hi) else ")"
        _fail(field, value, f"expected a finite real number in {left}{lo}, {hi}{right}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, "expected one of " + ", ".join(repr(c) for c in choices))


class ConfigMixin:
    """`replace`, `to_dict` and `from_dict` for the frozen configuration dataclasses, rejecting unknown
    field names with the list of known ones."""

    @classmethod
    def _check_names(cls, names) -> None:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields are {known}.")

    def replace(self, **changes: Any):
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        cls._check_names(d)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class NRNNConfig(ConfigMixin):
    """Hyper-parameters of a noisy Lipschitz RNN (math.md §1).

    **Arguments:**

    - `input_dim`, `hidden`, `num_classes`: sizes n, d and the number of output classes.
    - `dt`: the step size δ of the Euler–Maruyama discretisation (the initial per-unit step `s` of the
      reference convention).
    - `alpha`, `beta`, `gamma_a`, `gamma_w`: drift f(h, x) = α A h + tanh(W h + U x + b) with
      A = β(M_A − M_Aᵀ) + (1 − β)(M_A + M_Aᵀ) − γ_A I and the same for W. β = 1, α = 0 is the
      antisymmetric RNN; `eps_add = eps_mult = 0` is the deterministic Lipschitz RNN.
    - `eps_add`, `eps_mult`: noise levels. Under `convention="sde"` the diffusion is
      σ(h) = ε_add I + ε_mult diag(h) (`noise_kind="diagonal"`) or ε_add dB + ε_mult h dβ with one scalar
      Brownian motion β (`noise_kind="scalar"`).
    - `init_std`: entries of M_A, M_W are drawn from N(0, (init_std / hidden)²).
    - `convention`: `"sde"` (the paper's Euler–Maruyama scheme, default) or `"reference"` (the public
      PyTorch code: h ← h + (s ⊙ u) ⊙ f + ε_add ξ with u ~ U[1 − ε_mult, 1]^d and a learnable step s).
    - `noise_kind`: `"diagonal"` (d independent Brownian motions) or `"scalar"` (multiplicative part driven
      by one Brownian motion; the case of stochastic stabilisation, math.md §4). Only for `"sde"`.
    - `solver`: `"euler"` (Itô Euler–Maruyama, default), `"euler_heun"` (Stratonovich Euler–Heun) or
      `"milstein"` (Itô Milstein; requires commutative noise, so not scalar noise together with additive
      noise). Under `"reference"` only `"euler"` is defined.
    - `backend`: `"diffrax"` (default; `diffrax.diffeqsolve` on the step grid) or `"scan"` (a `lax.scan`
      fast path giving the same numbers).
    - `gradient`: `"adjoint"` (default; the exact discrete adjoint of `nrnn_jax.recurrence`: a reverse
      scan of the hidden-state cotangent, the matrix gradients as one product after the loop — the same
      gradients, faster, reverse mode only) or `"autodiff"` (JAX differentiates the backend's loop; use it
      to take `jax.jvp` / `jax.jacfwd` through the model).
    - `dtype`: `"float32"` or `"float64"` for parameters and states (float64 needs `jax_enable_x64`).
    """

    input_dim: int = 1
    hidden: int = 64
    num_classes: int = 2
    dt: float = 0.1
    alpha: float = 1.0
    beta: float = 0.75
    gamma_a: float = 0.001
    gamma_w: float = 0.001
    eps_add: float = 0.0
    eps_mult: float = 0.0
    init_std: float = 0.1
    convention: Literal["sde", "reference"] = "sde"
    noise_kind: Literal["diagonal", "scalar"] = "diagonal"
    solver: Literal["euler", "euler_heun", "milstein"] = "euler"
    backend: Literal["diffrax", "scan"] = "diffrax"
    gradient: Literal["adjoint", "autodiff"] = "adjoint"
    dtype: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        _check_int("input_dim", self.input_dim, 1)
        _check_int("hidden", self.hidden, 1)
        _check_int("num_classes", self.num_classes, 2)
        _check_real("dt", self.dt, 0.0, lo_open=True)
        _check_real("alpha", self.alpha, -math.inf)
        _check_real("beta", self.beta, 0.0, 1.0)
        _check_real("gamma_a", self.gamma_a, 0.0)
        _check_real("gamma_w", self.gamma_w, 0.0)
        _check_real("eps_add", self.eps_add, 0.0)
        _check_real("eps_mult", self.eps_mult, 0.0)
        _check_real("init_std", self.init_std, 0.0)
        _check_choice("convention", self.convention, CONVENTIONS)
        _check_choice("noise_kind", self.noise_kind, NOISE_KINDS)
        _check_choice("solver", self.solver, SOLVERS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("gradient", self.gradient, GRADIENTS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.convention == "reference":
            if self.eps_mult > 1.0:
                _fail("eps_mult", self.eps_mult, "the reference convention draws u ~ U[1 - eps_mult, 1], "
                      "so eps_mult must lie in [0, 1]")
            if self.noise_kind != "diagonal":
                _fail("noise_kind", self.noise_kind, "the reference convention has no scalar noise; "
                      "use noise_kind='diagonal' or convention='sde'")
            if self.solver != "euler":
                _fail("solver", self.solver, "the reference convention is a fixed update rule; "
                      "use solver='euler' or convention='sde'")
        if self.solver == "milstein" and self.noise_kind == "scalar" and self.eps_add > 0:
            _fail("solver", self.solver, "Milstein needs commutative noise, which scalar multiplicative "
                  "noise with eps_add > 0 is not; set eps_add=0, use noise_kind='diagonal', or pick "
                  "solver='euler' or 'euler_heun'")

    @property
    def noise_dim(self) -> int:
        """Width of the standard-normal noise array `xi` of shape (batch, T, noise_dim).

        `hidden` for diagonal SDE noise; `hidden + 1` for scalar noise (d additive components, then the
        one multiplicative Brownian motion); `2 * hidden` for the reference convention (additive normals,
        then normals mapped to U[1 - eps_mult, 1] by the normal CDF).
        """
        if self.convention == "reference":
            return 2 * self.hidden
        return self.hidden + 1 if self.noise_kind == "scalar" else self.hidden

    @property
    def is_noisy(self) -> bool:
        return self.eps_add > 0 or self.eps_mult > 0

    @property
    def has_additive_noise(self) -> bool:
        return self.eps_add > 0

    def with_traced_noise(self, eps_add, eps_mult) -> "NRNNConfig":
        """A copy whose noise levels are JAX values (e.g. one per member of a vmapped sweep), for use
        inside a traced function only. It is not validated and counts as noisy: the noise terms are always
        built, and are exactly zero for a member whose level is 0."""
        new = object.__new__(_TracedNoiseConfig)
        for f in dataclasses.fields(self):
            object.__setattr__(new, f.name, getattr(self, f.name))
        object.__setattr__(new, "eps_add", eps_add)
        object.__setattr__(new, "eps_mult", eps_mult)
        return new


class _TracedNoiseConfig(NRNNConfig):
    """`NRNNConfig.with_traced_noise`: noise levels that may be tracers, so every static question about
    them has the answer "present"."""

    @property
    def is_noisy(self) -> bool:
        return True

    @property
    def has_additive_noise(self) -> bool:
        return True

    def __hash__(self):  # tracers are not hashable; the traced copy is never a static argument
        return id(self)
