"""The one validation idiom of the library.

Every check raises a `ValueError` (or `TypeError` for a wrong array dtype) whose message names the field,
the value and what is allowed, e.g. ``NRNNConfig.hidden=0 is invalid: expected an integer >= 1.`` — never an
XLA shape error. `owner` is the class whose field is checked (``"NRNNConfig"``), or ``""`` for a plain
function argument. Configuration objects call the scalar checks in `__post_init__`; public entry points
call the array checks before tracing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

# What public functions accept: JAX or NumPy arrays (annotations, checked at run time in the tests).
ArrayLike = Array | np.ndarray


def fail(owner: str, field: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError("{owner}.{field}={value!r} is invalid: {allowed}.")``."""
    prefix = f"{owner}." if owner else ""
    raise ValueError(f"{prefix}{field}={value!r} is invalid: {allowed}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def check_int(owner: str, field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (no bools); returns it as a Python int."""
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        fail(owner, field, value, f"expected an integer >= {minimum}{upper}")
    return int(value)


def check_real(owner: str, field: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *,
               lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] (or (lo, hi] with `lo_open`); returns it as a Python float."""
    ok = _is_real(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open or not math.isfinite(lo) else "["
        right = "]" if math.isfinite(hi) else ")"
        fail(owner, field, value, f"expected a finite real number in {left}{lo}, {hi}{right}")
    return float(value)


def check_choice(owner: str, field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        fail(owner, field, value, "expected one of " + ", ".join(repr(c) for c in choices))


def check_bool(owner: str, field: str, value: Any) -> bool:
    """True or False (also numpy's bools; not 0 or 1, not a string)."""
    if not isinstance(value, (bool, np.bool_)):
        fail(owner, field, value, "expected True or False")
    return bool(value)


def _check_tuple(owner, field, value, ok, convert, what: str, nonempty: bool) -> tuple:
    if not (isinstance(value, (list, tuple)) and (len(value) > 0 or not nonempty) and all(ok(v) for v in value)):
        fail(owner, field, value, f"expected {'a non-empty sequence' if nonempty else 'a sequence'} of {what}")
    return tuple(convert(v) for v in value)


def check_int_tuple(owner: str, field: str, value: Any, minimum: int, *, nonempty: bool = False) -> tuple[int, ...]:
    """A sequence of integers >= minimum; returns a tuple."""
    return _check_tuple(owner, field, value, lambda v: _is_int(v) and v >= minimum, int,
                        f"integers >= {minimum}", nonempty)


def check_real_tuple(owner: str, field: str, value: Any, lo: float = -math.inf, *,
                     nonempty: bool = False) -> tuple[float, ...]:
    """A sequence of finite real numbers >= lo; returns a tuple of floats."""
    return _check_tuple(owner, field, value, lambda v: _is_real(v) and v >= lo, float,
                        f"finite real numbers >= {lo}", nonempty)


# ------------------------------------------------------------------------------------------------------
# Arrays given to public entry points.
# ------------------------------------------------------------------------------------------------------
def _shape_of(a):
    return tuple(getattr(a, "shape", np.shape(a)))


def _dtype_of(a):
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def _is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def _listing(values, k: int = 5) -> str:
    """The first `k` of `values` as a list, with the count of the rest: `[3, 8, 9] and 2 more`."""
    values = np.asarray(values)
    head = "[" + ", ".join(str(v) for v in values[:k].tolist()) + "]"
    return head if values.size <= k else f"{head} and {values.size - k} more"


def describe_nonfinite(x, name: str) -> str | None:
    """None when every value of the array `x` (examples along its first axis) is finite; else what is not:
    ``x_train has 3 NaN or Inf value(s) in example(s) [4, 17] (first: x_train[4, 0, 2] = nan)``. Read in
    blocks of examples, so no full-size temporary is made."""
    n = _shape_of(x)[0] if len(_shape_of(x)) else 1
    per = max(1, int(np.prod(_shape_of(x)[1:], dtype=np.int64)))
    block = max(1, (1 << 22) // per)
    count, rows, first = 0, [], None
    for start in range(0, n, block):
        a = np.asarray(x[start:start + block]) if len(_shape_of(x)) else np.asarray(x)
        bad = ~np.isfinite(a)
        if bad.any():
            count += int(bad.sum())
            rows.extend((start + np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))).tolist())
            if first is None:
                at = tuple(int(i) for i in np.argwhere(bad)[0])
                first = (start + at[0],) + at[1:], a[at]
    if count == 0:
        return None
    where = ", ".join(str(i) for i in first[0])
    return (f"{name} has {count} NaN or Inf value(s) in example(s) {_listing(rows)} "
            f"(first: {name}[{where}] = {first[1]})")


def describe_bad_labels(y, num_classes: int, name: str) -> str | None:
    """None when every label of `y` lies in [0, num_classes); else which do not:
    ``y_train has 2 label(s) outside [0, 10) at index(es) [4, 17] (value(s) [-1, 10])``."""
    a = np.asarray(y)
    bad = (a < 0) | (a >= num_classes)
    if not bad.any():
        return None
    idx = np.flatnonzero(bad)
    return (f"{name} has {idx.size} label(s) outside [0, {num_classes}) at index(es) {_listing(idx)} "
            f"(value(s) {_listing(a.reshape(-1)[idx])})")


def check_inputs(x, input_dim: int, *, name: str = "x") -> None:
    """x must be a real array of shape (batch, T, input_dim) with batch, T ≥ 1 and no NaN/Inf."""
    shape = _shape_of(x)
    if len(shape) != 3 or shape[2] != input_dim or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{name} has shape {shape}; expected (batch, T, input_dim) = (B ≥ 1, T ≥ 1, {input_dim})."
        )
    dtype = _dtype_of(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} has dtype {dtype}; expected a real (float or integer) array.")
    # Lazy containers (data.PaddedSequences) check finiteness at construction; arrays are checked here.
    if isinstance(x, (np.ndarray, jax.Array)) and not _is_tracer(x):
        bad = describe_nonfinite(x, name)
        if bad is not None:
            raise ValueError(bad.replace(f"{name} has", f"{name} contains", 1) + "; inputs must be finite.")


def check_noise_levels(levels, *, name: str = "noise_levels") -> None:
    """`levels` = (eps_add, eps_mult), the noise levels replacing a configuration's: two finite real numbers
    >= 0 (Python numbers, NumPy or JAX values). None passes; values being traced (a vmapped sweep's, checked
    where they are made, `Sweep`) are not checked."""
    if levels is None or _is_tracer(levels):
        return
    allowed = "expected a pair (eps_add, eps_mult) of finite real numbers >= 0"
    try:
        pair = list(levels)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2:
        fail("", name, levels, allowed)
    for field, v in zip(("eps_add", "eps_mult"), pair):
        if _is_tracer(v):
            continue
        a = np.asarray(v)
        real = np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
        if a.shape != () or not real or not np.isfinite(a) or a < 0:
            fail("", name, levels, f"{allowed} ({field}={v!r})")


def check_noise(xi, batch: int, steps: int, noise_dim: int, *, name: str = "noise") -> None:
    shape = _shape_of(xi)
    if shape != (batch, steps, noise_dim):
        raise ValueError(
            f"{name} has shape {shape}; expected (batch, T, noise_dim) = ({batch}, {steps}, {noise_dim}) "
            "(noise_dim is NoisyRNN.noise_dim: for a state of one array, hidden for diagonal noise, hidden + 1 "
            "for scalar noise, 2 * hidden for the reference convention; for a pytree state, that of the parts "
            "NRNNConfig.noise_on, e.g. 2 * hidden for an LSTM's (c, h))."
        )


def check_labels(y, batch: int, num_classes: int, *, name: str = "y") -> None:
    shape = _shape_of(y)
    if shape != (batch,):
        raise ValueError(f"{name} has shape {shape}; expected ({batch},) integer class labels.")
    dtype = _dtype_of(y)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} has dtype {dtype}; expected integer class labels in [0, {num_classes}).")
    if not _is_tracer(y):
        arr = np.asarray(y)
        bad = describe_bad_labels(arr, num_classes, name)
        if bad is not None:
            raise ValueError(f"{name} has labels in [{arr.min()}, {arr.max()}]; expected labels in [0, {num_classes}) "
                             f"({bad.removeprefix(name + ' has ')}).")
