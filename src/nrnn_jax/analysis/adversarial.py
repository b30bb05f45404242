"""Adversarial input perturbations of a trained model: FGSM, PGD (L∞ and L2) and DeepFool.

FGSM and PGD are docs/theory.md (6.4)–(6.6), DeepFool (4.5).

All attacks act on the deterministic model (noise off) and are jit-compiled over fixed-shape batches.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ..losses import cross_entropy
from ..validation import check_choice, check_inputs, check_labels, check_real

NORMS = ("linf", "l2")


def _check(model, x, y, norm: str, eps: float) -> None:
    check_choice("", "norm", norm, NORMS)
    check_real("", "eps", eps, 0.0)
    check_inputs(x, model.cfg.input_dim)
    check_labels(y, x.shape[0], model.cfg.num_classes)


def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))


def _input_grad(graphdef, params, x, y):
    model = nnx.merge(graphdef, params)
    return jax.grad(lambda xx: jnp.sum(cross_entropy(model(xx), y)))(x)


def _ascent_direction(g, norm):
    if norm == "linf":
        return jnp.sign(g)
    return g / jnp.maximum(_per_example_norm(g), 1e-12)


def _project(delta, eps, norm):
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    n = _per_example_norm(delta)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))


@partial(jax.jit, static_argnums=(0, 5, 6))
def _pgd(graphdef, params, x, y, eps, norm, steps, step_size):
    def body(delta, _):
        g = _input_grad(graphdef, params, x + delta, y)
        return _project(delta + step_size * _ascent_direction(g, norm), eps, norm), None

    delta, _ = jax.lax.scan(body, jnp.zeros_like(x), None, length=steps)
    return x + delta


def fgsm(model, x, y, eps: float, norm: Literal["linf", "l2"] = "linf"):
    """One signed-gradient (L∞) or normalised-gradient (L2) step of size eps (Goodfellow et al., 2015)."""
    _check(model, x, y, norm, eps)
    graphdef, params = nnx.split(model)
    return _pgd(graphdef, params, jnp.asarray(x), jnp.asarray(y), eps, norm, 1, eps)


def pgd(model, x, y, eps: float, norm: Literal["linf", "l2"] = "linf", steps: int = 10, step_size: float | None = None):
    """Projected gradient ascent on the loss within the eps-ball (Madry et al., 2018); step 2.5 eps / steps."""
    _check(model, x, y, norm, eps)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    graphdef, params = nnx.split(model)
    return _pgd(graphdef, params, jnp.asarray(x), jnp.asarray(y), eps, norm, int(steps), step_size)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _deepfool(graphdef, params, x, max_iter, num_classes, overshoot):
    model = nnx.merge(graphdef, params)
    logits_of = lambda xi: model(xi[None])[0]
    label = jnp.argmax(jax.vmap(logits_of)(x), axis=-1)

    def one(xi, yi):
        def body(carry, _):
            r_total, done = carry
            xa = xi + (1.0 + overshoot) * r_total
            logits = logits_of(xa)
            jac = jax.jacrev(logits_of)(xa)  # (C, T, n)
            w = jac - jac[yi][None]
            f = logits - logits[yi]
            wn = jnp.sqrt(jnp.sum(w**2, axis=(1, 2))) + 1e-12
            ratio = jnp.where(jnp.arange(num_classes) == yi, jnp.inf, jnp.abs(f) / wn)
            l = jnp.argmin(ratio)
            r = (jnp.abs(f[l]) + 1e-4) / wn[l] ** 2 * w[l]
            done = done | (jnp.argmax(logits) != yi)
            return (jnp.where(done, r_total, r_total + r), done), None

        (r_total, done), _ = jax.lax.scan(body, (jnp.zeros_like(xi), False), None, length=max_iter)
        return (1.0 + overshoot) * r_total, done

    return jax.vmap(one)(x, label)


def deepfool(model, x, max_iter: int = 50, overshoot: float = 0.02):
    """DeepFool (Moosavi-Dezfooli et al., 2016): the smallest L2 perturbation that changes the predicted
    class, by linearising the decision boundaries. Returns (perturbation, found) per example;
    ‖perturbation‖₂ is the input-space margin (docs/theory.md (4.5))."""
    check_inputs(x, model.cfg.input_dim)
    graphdef, params = nnx.split(model)
    return _deepfool(graphdef, params, jnp.asarray(x), int(max_iter), model.cfg.num_classes, float(overshoot))
