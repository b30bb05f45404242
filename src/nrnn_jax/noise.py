"""Diffusions: the noise term σ(h, z) dB of the input-driven SDE, one class per kind (docs/theory.md (2.1)–(2.2), §8).

A diffusion maps noise space R^m (m = `noise_dim(hidden)` Brownian motions) to state space R^d, for ONE
example. The discretisations of `nrnn_jax.schemes` and the explicit regularizer use only the methods
below, so a new kind of noise works with every scheme, backend and regularizer method.

- `DiagonalNoise`: σ(h) = ε_add I + ε_mult diag(h) (additive, diagonal multiplicative, or their sum); m = d.
- `ScalarNoise`: σ(h) = [ε_add I | ε_mult h]: additive noise plus ONE multiplicative Brownian motion
  (the case of stochastic stabilisation, docs/theory.md (5.6)); m = d + 1.
- `CustomNoise`: a user σ(h, z) returning a diagonal (d,) or a (d, m) matrix for m Brownian motions.

- `OnParts`: any of these on a fixed selection of coordinates of the (flat) state: σ(h) = E σ₀(Eᵀ h, z),
  E the embedding of the selected coordinates (`NRNNConfig.noise_on`); m = that of σ₀ on the selection.

A diffusion is passed to the model as an object, `NoisyRNN(cfg, rngs=rngs, diffusion=DiagonalNoise(0.1, 0.1))`;
the built-in ones carry their noise levels (ε_add, ε_mult), which the model records in its configuration.
The methods take the levels as an argument, `levels = (ε_add, ε_mult)`, so that a sweep over noise levels
may pass traced values. `nrnn_jax._registry.diffusion(cfg, layout)` builds the diffusion a configuration
describes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

Levels = tuple  # (ε_add, ε_mult): numbers or JAX values (traced in a sweep over noise levels)


class Noise:
    """Base class of diffusions σ(h, z) (the extension point for a new kind of noise). Subclasses give
    `noise_dim`, `operator` and (for speed) `mv`;
    `elementwise` says whether σ is diagonal with entries that depend on their own coordinate only, and
    not on the input z, so that a batch may be treated as one flat state (the diffrax backend's batched
    solve)."""

    elementwise: bool = False

    def noise_dim(self, hidden: int) -> int:
        raise NotImplementedError

    def operator(self, levels: Levels, h, z) -> lx.AbstractLinearOperator:
        """σ(h, z) as a `lineax` operator from (m,) to (d,)."""
        raise NotImplementedError

    def mv(self, levels: Levels, h, z, dw):
        """σ(h, z) ΔW without forming σ."""
        return self.operator(levels, h, z).mv(dw)

    def diagonal(self, levels: Levels, h, z):
        """The diagonal of an elementwise σ, shape (d,)."""
        raise NotImplementedError(f"{type(self).__name__} is not elementwise")

    def column_derivative_sum(self, levels: Levels, h, z):
        """Σ_j (∂σ_j/∂h) σ_j, by forward-mode autodiff (σ_j the j-th column): the Itô–Stratonovich drift
        difference (times ½) and the mean of the Milstein terms."""
        m = self.noise_dim(h.shape[0])
        column = lambda hh, e: self.mv(levels, hh, z, e)
        basis = jnp.eye(m, dtype=h.dtype)
        return jnp.sum(jax.vmap(lambda e: jax.jvp(lambda hh: column(hh, e), (h,), (column(h, e),))[1])(basis), axis=0)

    def milstein_correction(self, levels: Levels, h, z, dw, dt):
        """½ Σ_{i,j} (L^i σ_j)(ΔW_i ΔW_j − δ_ij δ) with L^i = σ_iᵀ ∂/∂h: the Milstein terms for commutative
        noise (L^i σ_j = L^j σ_i), by autodiff: ½ [∂(σ(·)ΔW)[σ ΔW] − δ Σ_j (∂σ_j) σ_j]."""
        noise = self.mv(levels, h, z, dw)
        both = jax.jvp(lambda hh: self.mv(levels, hh, z, dw), (h,), (noise,))[1]
        return 0.5 * (both - dt * self.column_derivative_sum(levels, h, z))


class _Levelled(Noise):
    """A built-in diffusion with its noise levels ε_add, ε_mult ≥ 0 (what the model records in
    `NRNNConfig.eps_add`, `NRNNConfig.eps_mult`)."""

    def __init__(self, eps_add: float = 0.0, eps_mult: float = 0.0):
        for name, value in (("eps_add", eps_add), ("eps_mult", eps_mult)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{type(self).__name__}: {name}={value!r} is invalid; expected a number >= 0")
        self.eps_add, self.eps_mult = float(eps_add), float(eps_mult)

    @property
    def levels(self) -> Levels:
        return self.eps_add, self.eps_mult

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps_add={self.eps_add}, eps_mult={self.eps_mult})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.levels == self.levels

    def __hash__(self) -> int:
        return hash((type(self), self.levels))


class DiagonalNoise(_Levelled):
    """σ(h) = ε_add I + ε_mult diag(h): d independent Brownian motions (docs/theory.md (2.1)).

    **Arguments:** `eps_add`, `eps_mult`: the noise levels (≥ 0)."""

    elementwise = True

    def noise_dim(self, hidden):
        return hidden

    def diagonal(self, levels, h, z):
        eps_add, eps_mult = levels
        return eps_add + eps_mult * h

    def operator(self, levels, h, z):
        return lx.DiagonalLinearOperator(self.diagonal(levels, h, z))

    def mv(self, levels, h, z, dw):
        return self.diagonal(levels, h, z) * dw

    def column_derivative_sum(self, levels, h, z):
        return levels[1] * self.diagonal(levels, h, z)

    def milstein_correction(self, levels, h, z, dw, dt):  # closed form: ½ ε_mult σ_i (ΔW_i² − δ)
        return 0.5 * levels[1] * self.diagonal(levels, h, z) * (dw * dw - dt)


class ScalarNoise(_Levelled):
    """σ(h) = [ε_add I | ε_mult h]: additive noise and one multiplicative Brownian motion β, ε_mult h dβ
    (docs/theory.md (2.2)); noise columns: d additive, then β.

    **Arguments:** `eps_add`, `eps_mult`: the noise levels (≥ 0). Milstein needs commutative noise, which
    this is only with `eps_add = 0`."""

    def noise_dim(self, hidden):
        return hidden + 1

    def operator(self, levels, h, z):
        eps_add, eps_mult = levels
        eye = eps_add * jnp.eye(h.shape[0], dtype=h.dtype)
        return lx.MatrixLinearOperator(jnp.concatenate([eye, eps_mult * h[:, None]], axis=1))

    def mv(self, levels, h, z, dw):
        eps_add, eps_mult = levels
        return eps_add * dw[:h.shape[0]] + eps_mult * h * dw[h.shape[0]]

    def column_derivative_sum(self, levels, h, z):
        return levels[1] ** 2 * h

    def milstein_correction(self, levels, h, z, dw, dt):
        # commutative only without additive noise (the configuration checks it): ½ ε_mult² h (Δβ² − δ)
        return 0.5 * levels[1] ** 2 * h * (dw[-1] ** 2 - dt)


class CustomNoise(Noise):
    """A user diffusion `fn(h, z)` for one example, returning a diagonal (d,) (d Brownian motions, σ =
    diag(fn)) or a (d, m) matrix (m Brownian motions). The noise levels ε_add, ε_mult do not apply: scale σ
    in `fn`. Milstein assumes commutative noise (L^i σ_j = L^j σ_i), e.g. σ_i depending on h_i only.

    **Arguments:** `fn`: σ(h, z) of one example. Its shape (diagonal or matrix, and m) is read from the
    output for the state it is applied to (`custom_shape`)."""

    # elementwise only if σ_i depends on h_i alone, which cannot be told from the shape: a diagonal user σ
    # is still solved one example at a time on the diffrax backend (exact for any σ)
    elementwise = False

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"CustomNoise(fn=...) expects a function sigma(h, z) of one example, got "
                            f"{type(fn).__name__}")
        self.fn = fn

    def __repr__(self) -> str:
        return f"CustomNoise({getattr(self.fn, '__qualname__', self.fn)!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash((type(self), id(self.fn)))

    def noise_dim(self, hidden):
        return custom_shape(self.fn, hidden)[1]

    def operator(self, levels, h, z):
        s = self.fn(h, z)
        return lx.DiagonalLinearOperator(s) if s.ndim == 1 else lx.MatrixLinearOperator(s)

    def mv(self, levels, h, z, dw):
        s = self.fn(h, z)
        return s * dw if s.ndim == 1 else s @ dw


def custom_shape(fn: Callable, hidden: int) -> tuple[bool, int]:
    """(diagonal, m) of a user diffusion from its output shape for h, z of shape (hidden,) (traced once per
    function and size, no numbers computed); ValueError naming the shape otherwise."""
    try:
        return _cached_shape(fn, hidden)
    except TypeError as e:  # an unhashable callable: not cached
        if "unhashable" not in str(e):
            raise
        return _shape(fn, hidden)


@functools.lru_cache(maxsize=256)
def _cached_shape(fn: Callable, hidden: int) -> tuple[bool, int]:
    return _shape(fn, hidden)


def _shape(fn: Callable, hidden: int) -> tuple[bool, int]:
    x = jax.ShapeDtypeStruct((hidden,), jnp.float32)
    try:
        out = jax.eval_shape(fn, x, x)
    except Exception as e:
        raise ValueError(f"NRNNConfig.diffusion: the user diffusion failed for h, z of shape ({hidden},): "
                         f"{type(e).__name__}: {e}") from e
    shape = getattr(out, "shape", None)
    if shape == (hidden,):
        return True, hidden
    if shape is not None and len(shape) == 2 and shape[0] == hidden and shape[1] >= 1:
        return False, int(shape[1])
    got = jax.tree.map(lambda a: tuple(a.shape), out)
    raise ValueError(f"NRNNConfig.diffusion: σ(h, z) must return a diagonal of shape ({hidden},) or a matrix of "
                     f"shape ({hidden}, m) for m Brownian motions; got {got}")


class OnParts(Noise):
    """A diffusion `inner` acting on the coordinates `index` of the flat state only: σ(h, z) = E σ₀(Eᵀ h, z)
    with E (n, len(index)) the embedding of those coordinates; the other coordinates get no noise. The noise
    width is that of `inner` on the selection."""

    def __init__(self, inner: Noise, index: tuple[int, ...], size: int):
        self.inner, self.index, self.size = inner, np.asarray(index), size

    def noise_dim(self, hidden):
        return self.inner.noise_dim(len(self.index))

    def _embed(self, v):
        return jnp.zeros(v.shape[:-1] + (self.size,), v.dtype).at[..., self.index].set(v)

    def operator(self, levels, h, z):
        inner = self.inner.operator(levels, h[self.index], z).as_matrix()
        return lx.MatrixLinearOperator(self._embed(inner.T).T)

    def mv(self, levels, h, z, dw):
        return self._embed(self.inner.mv(levels, h[self.index], z, dw))

    def column_derivative_sum(self, levels, h, z):
        return self._embed(self.inner.column_derivative_sum(levels, h[self.index], z))

    def milstein_correction(self, levels, h, z, dw, dt):
        return self._embed(self.inner.milstein_correction(levels, h[self.index], z, dw, dt))
