"""The small-noise explicit regularizer of noise injection (docs/theory.md §3), by JAX autodiff.

For a noisy recursion h_{k+1} = F_k(h_k) + G_k(h_k) η_k (E η = 0, Cov η = I) and a per-example loss ℓ of
the final state, the small-noise expansion around the deterministic path h̄ (docs/theory.md (3.4)–(3.6)) gives

    E ℓ(h_M) = ℓ(h̄_M) + ∇ℓᵀ m_M + ½ tr(∇²ℓ P_M) + O(ε⁴),
    m_{k+1} = J_k m_k + ½ q_k (+ s_k),   P_{k+1} = J_k P_k J_kᵀ + C_k,   q_k[a] = tr(∇²F_{k,a} P_k),

with J_k = ∂F_k/∂h(h̄_k), C_k = G_k G_kᵀ, and s_k the O(ε²) mean shift of a Stratonovich scheme ((3.5); zero
for Itô schemes). The explicit regularizer is reg = ∇ℓᵀ m_M + ½ tr(∇²ℓ P_M) = (Q + R)/2 with the paper's
Q = 2 ∇ℓᵀ m_M and R = tr(∇²ℓ P_M) (ε² absorbed; (3.7)–(3.9)).

Three computations, all differentiable in the parameters:

- `exact_terms`: the (P, m) recursion (3.4), (3.10); J_k by forward-mode autodiff, q_k by
  forward-over-forward directional derivatives Σ_i ∂²F[e_i, P e_i] — never a d×d×d tensor. O(M d³) per example.
- `probe_terms`: the unbiased estimator (3.12)–(3.14) propagating u_{k+1} = J u + G z,
  v_{k+1} = J v + ½ ∂²F[u, u] (+ s_k) and returning ∇ℓᵀ v + ½ uᵀ ∇²ℓ u; J u and J v + ½ ∂²F[u, u] come from one Taylor-mode pass
  (`jax.experimental.jet`) along h̄ + t u + t² v. O(S M d²).
- `continuous_terms`: the moment ODE (3.15), dP/dt = J P + P Jᵀ + σσᵀ, dm/dt = J m + ½ q(P) (+ s) for the
  SDE, solved by diffrax on each interval of the piecewise-constant input (a fresh solve at every jump).

`explicit_regularizer(model, x, y, ...)` applies them to a `NoisyRNN` under its own configuration.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
from flax import nnx
from jax.experimental import jet
from jaxtyping import Array, Float, PyTree

from . import _registry, cells, prng, recurrence
from ._drive import encode
from ._gradients import matrix_free
from .schemes import noise_levels as _levels
from .losses import cross_entropy, masked_mean
from .validation import ArrayLike, check_choice, check_inputs, check_int, check_labels

StepFn = Callable[[Float[Array, " d"], PyTree], Float[Array, " d"]]
FactorFn = Callable[[Float[Array, " d"], PyTree], lx.AbstractLinearOperator]
ShiftFn = Callable[[Float[Array, " d"], PyTree], Float[Array, " d"]]
LossFn = Callable[[Float[Array, " d"]], Float[Array, ""]]

METHODS = ("exact", "probe", "continuous")
PROBES = ("gaussian", "rademacher")


class Terms(NamedTuple):
    """Per-example (or averaged) pieces of the expansion, in loss units.

    - `loss`: ℓ(h̄_M), the loss on the deterministic path the expansion is taken around.
    - `Q`: 2 ∇ℓᵀ m_M (the paper's Q̂ ε²; no sign).
    - `R`: tr(∇²ℓ P_M) (the paper's R̂ ε²; ≥ 0 for a convex loss of the final state).
    - `h`: the deterministic final state h̄_M.
    """

    loss: Array
    Q: Array
    R: Array
    h: Array

    @property
    def value(self) -> Array:
        return 0.5 * (self.Q + self.R)


class Regularizer(NamedTuple):
    """The explicit regularizer of a batch: E[noisy loss] ≈ `clean_loss` + `value`.

    All fields are batch means (padded examples masked out) except `per_example`, the (batch,) values.
    `value` = (Q + R)/2. `std_err` is the Monte Carlo standard error of `value` due to the probes,
    conditional on the batch (with one probe per example, the pooled spread over examples, an upper
    bound); 0 for the deterministic methods. `logits` (batch, classes) decode the deterministic final
    states the expansion is taken around.
    """

    value: Array
    Q: Array
    R: Array
    clean_loss: Array
    per_example: Array
    std_err: Array
    logits: Array

    def __repr__(self) -> str:  # the scalars only: the per-example arrays would fill a screen
        def num(a):
            try:
                return f"{float(a):.6g}"
            except TypeError:  # a traced or batched value
                return f"{type(a).__name__}{tuple(getattr(a, 'shape', ()))}"

        return (f"Regularizer(value={num(self.value)}, Q={num(self.Q)}, R={num(self.R)}, "
                f"clean_loss={num(self.clean_loss)}, std_err={num(self.std_err)}, "
                f"batch={tuple(self.per_example.shape)[-1:]})")


# ------------------------------------------------------------------------------------------------------
# General pure functions: any step map, noise factor and loss.
# ------------------------------------------------------------------------------------------------------
def _second_directional(F: Callable, h, v, w):
    """∂²F(h)[v, w], a forward-over-forward directional derivative."""
    return jax.jvp(lambda hh: jax.jvp(F, (hh,), (v,))[1], (h,), (w,))[1]


def _trace_hessian_form(F: Callable, h, P):
    """q[a] = tr(∇²F_a(h) P) = Σ_i ∂²F_a[e_i, P e_i], vmapped over i (P symmetric)."""
    basis = jnp.eye(h.shape[0], dtype=h.dtype)
    return jnp.sum(jax.vmap(lambda e, pe: _second_directional(F, h, e, pe))(basis, P), axis=0)


def _loss_terms(loss: LossFn, h, m, P) -> Terms:
    """ℓ(h), Q = 2 ∇ℓᵀ m and R = tr(∇²ℓ P) by one gradient and d Hessian-vector products."""
    value, grad = jax.value_and_grad(loss)(h)
    hvp = lambda v: jax.jvp(jax.grad(loss), (h,), (v,))[1]
    HP = jax.vmap(hvp)(P)  # row i: ∇²ℓ P[i]; P symmetric so tr(∇²ℓ P) = trace of this
    return Terms(value, 2.0 * jnp.dot(grad, m), jnp.trace(HP), h)


def exact_terms(step: StepFn, factor: FactorFn, loss: LossFn, h0, inputs: PyTree, shift: ShiftFn | None = None) -> Terms:
    """The exact second-order terms for one example (docs/theory.md (3.4), q_k by (3.10)).

    **Arguments:**

    - `step(h, u_k)`: the deterministic step map F_k.
    - `factor(h, u_k)`: a `lineax` operator G_k with C_k = G_k G_kᵀ (evaluated on the deterministic path).
    - `loss(h_M)`: the per-example loss of the final state.
    - `h0`: initial state (d,); `inputs`: a pytree whose leaves have leading axis M (one slice per step).
    - `shift(h, u_k)`: an optional O(ε²) deterministic mean shift added to m each step.

    **Returns:** `Terms(loss, Q, R)` for this example.
    """
    d = h0.shape[0]

    def body(carry, u):
        h, P, m = carry
        F = lambda hh: step(hh, u)
        h_next, jvp_fn = jax.linearize(F, h)
        J = jax.vmap(jvp_fn, out_axes=1)(jnp.eye(d, dtype=h.dtype))  # column i = J e_i
        q = _trace_hessian_form(F, h, P)
        G = factor(h, u).as_matrix()
        m_next = J @ m + 0.5 * q
        if shift is not None:
            m_next = m_next + shift(h, u)
        P_next = J @ P @ J.T + G @ G.T
        return (h_next, 0.5 * (P_next + P_next.T), m_next), None

    zeros = jnp.zeros((d, d), h0.dtype)
    (h, P, m), _ = jax.lax.scan(body, (h0, zeros, jnp.zeros_like(h0)), inputs)
    return _loss_terms(loss, h, m, P)


def draw_probes(key, shape: tuple[int, ...], kind: str, dtype) -> Array:
    """Probe vectors with mean 0 and identity covariance: standard normal or Rademacher (±1). `key` may be a
    `prng.Rows` (a data-parallel step's share of the batch's probes)."""
    check_choice("", "probe", kind, PROBES)
    if kind == "gaussian":
        return prng.normal(key, shape, dtype)
    return prng.full_rows(key, shape, lambda k, s: jax.random.rademacher(k, s, dtype))


def probe_terms(
    step: StepFn, factor: FactorFn, loss: LossFn, h0, inputs: PyTree, probes: Float[Array, "M S m"],
    shift: ShiftFn | None = None,
) -> Terms:
    """The unbiased probe estimator for one example, one estimate per probe (docs/theory.md (3.12)–(3.13)).

    `probes[k, s]` is probe s's z_k (mean 0, covariance I); the result's `Q` and `R` have shape (S,)
    and their means over probes are unbiased for the exact terms. `loss` is a scalar.
    """

    def body(carry, xs):
        h, U, V = carry
        u, z = xs
        F = lambda hh: step(hh, u)
        # Taylor mode along the curve h + t a + t² b: one pass gives F(h), J a and 2 (J b + ½ ∂²F[a, a]).
        taylor = lambda a, b: jet.jet(F, (h,), ((a, 2.0 * b),))
        h_next, (JU, twice_V) = jax.vmap(taylor)(U, V)
        G = factor(h, u)
        U_next = JU + jax.vmap(G.mv)(z)
        V_next = 0.5 * twice_V
        if shift is not None:
            V_next = V_next + shift(h, u)[None, :]
        return (h_next[0], U_next, V_next), None

    S = probes.shape[1]
    zeros = jnp.zeros((S, h0.shape[0]), h0.dtype)
    (h, U, V), _ = jax.lax.scan(body, (h0, zeros, zeros), (inputs, probes))
    return _probe_loss_terms(loss, h, U, V)


def _probe_loss_terms(loss: LossFn, h, U, V) -> Terms:
    """ℓ(h), Q = 2 ∇ℓᵀ v and R = uᵀ ∇²ℓ u for each probe's (u, v) (rows of U, V)."""
    value, grad = jax.value_and_grad(loss)(h)
    hvp = lambda a: jax.jvp(jax.grad(loss), (h,), (a,))[1]
    Q = 2.0 * V @ grad
    R = jnp.sum(U * jax.vmap(hvp)(U), axis=-1)
    return Terms(value, Q, R, h)


def _probe_cell(cfg, scheme, sigma, taylor, num_probes: int):
    """The probe recursion of `probe_terms` for a product cell f(h, z) = g(h, M h, z) as a
    `nrnn_jax.recurrence` cell, so that the matrices enter only through the products M s.

    State rows: h̄, then U (S rows), then V (S rows); products rows M s. With F(h) = h + c g(h, M h, z)
    (c = δ, or s(1 − ε_mult/2) under the reference convention), the cell's `drift_taylor` gives g's Taylor
    coefficients along (h̄ + t u + t² v, M h̄ + t M u + t² M v) from the products alone (elementwise work, no
    matrix product): J u = u + c ∂g[u] and J v + ½ ∂²F[u, u] = v + c (∂g[v] + ½ ∂²g[u, u])
    (docs/theory.md (3.14), (8.4)); by Taylor mode by default, in closed form for the Lipschitz cell. The
    inputs of a step are the raw inputs x_k and the probes; the drive z_k = x_k kernel + b is formed here
    (`nrnn_jax._drive.encode`), so no (B, T, d) array of drives or of their cotangents exists. Tests check
    this cell against the general Taylor-mode `probe_terms` (equal to rounding, values and gradients).
    """
    S = num_probes

    def cell(state, prods, x_k, params):
        x_k, eta = x_k  # eta: (S, noise_dim)
        params, kernel, bias = params
        z_k = encode(x_k, kernel, bias)
        h, U, V = state[0], state[1:1 + S], state[1 + S:]
        f, G1, G2 = taylor(h, prods[0], z_k, U, V, prods[1:1 + S], prods[1 + S:])
        c = scheme.mean_step_size(cfg, params)
        c = c[None, :] if jnp.ndim(c) else c  # the reference convention's per-unit step, over the probes
        h_next = h + scheme.mean_step_size(cfg, params) * f  # F_k(h) (docs/theory.md (3.1)-(3.2))
        G_eta = jax.vmap(lambda e: scheme.perturbation_factor_mv(cfg, params, sigma, h, z_k, f, e))(eta)
        V_next = V + c * G2
        if scheme.has_mean_shift:
            V_next = V_next + scheme.mean_shift(cfg, params, sigma, h, z_k, cfg.dt)[None, :]
        # written row block by row block into the state's shape: XLA:CPU fuses a concatenate of the three into
        # one loop with a branch per element, several times slower than these in-place updates
        out = jax.lax.dynamic_update_slice_in_dim(state, h_next[None], 0, axis=0)
        out = jax.lax.dynamic_update_slice_in_dim(out, U + c * G1 + G_eta, 1, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, V_next, 1 + S, axis=0)

    return cell


def _model_probe_terms(cfg, p, scheme, sigma, drift: cells.Drift, decode, encoder, x, y, probes) -> Terms:
    """`probe_terms` for a whole batch of a product cell, run by `nrnn_jax.recurrence` (one batched
    recursion with the discrete adjoint). x (B, T, n) raw inputs, `encoder` = (kernel, bias), probes
    (B, T, S, noise_dim)."""
    B = x.shape[0]
    d = encoder[0].shape[-1]
    S = probes.shape[2]
    state0 = jnp.zeros((B, 1 + 2 * S, d), x.dtype)
    # The SDE schemes step h + δ g + (noise not reading g), so the probe cell is affine with constant
    # coefficients wherever g is; the reference rule's step and noise read g through learned step sizes.
    kept = drift.kept_products if scheme.is_sde else None
    final = recurrence.recurrence(_probe_cell(cfg, scheme, sigma, drift.taylor, S), drift.params,
                                  (matrix_free(cfg, p, x.dtype), *encoder), state0, (x, probes), kept=kept)

    def per_example(s, y_i):
        loss = lambda h: cross_entropy(decode(h), y_i)
        return _probe_loss_terms(loss, s[0], s[1:1 + S], s[1 + S:])

    return jax.vmap(per_example)(final, y)


def continuous_terms(
    drift: StepFn,
    diffusion: FactorFn,
    loss: LossFn,
    h0,
    inputs: PyTree,
    dt: float,
    shift: ShiftFn | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps_per_interval: int = 256,
) -> Terms:
    """The continuous-time terms for one example: the moment ODE of the SDE dh = f dt + σ dB (docs/theory.md (3.15)).

    (h̄, P, m) solve dh̄/dt = f(h̄, x_k), dP/dt = J P + P Jᵀ + σσᵀ, dm/dt = J m + ½ q(P) (+ shift) with
    J = ∂f/∂h and q_a = tr(∇²f_a P). The input is constant on each interval [kδ, (k+1)δ); each interval is
    its own `diffrax.diffeqsolve` (Tsit5, adaptive steps), so the solver never steps across a jump.
    `shift(h, u)` here is a rate (per unit time).
    """
    d = h0.shape[0]

    def rhs(t, y, u):
        h, P, m = y
        f = lambda hh: drift(hh, u)
        f_h, jvp_fn = jax.linearize(f, h)
        J = jax.vmap(jvp_fn, out_axes=1)(jnp.eye(d, dtype=h.dtype))
        S = diffusion(h, u).as_matrix()
        dm = J @ m + 0.5 * _trace_hessian_form(f, h, P)
        if shift is not None:
            dm = dm + shift(h, u)
        JP = J @ P
        return f_h, JP + JP.T + S @ S.T, dm

    term = diffrax.ODETerm(rhs)
    solver = diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    t1 = jnp.asarray(dt, h0.dtype)  # times in the state's dtype (no silent promotion of float32 states)

    def interval(y, u):
        sol = diffrax.diffeqsolve(term, solver, jnp.zeros_like(t1), t1, t1 / 4, y, args=u,
                                  stepsize_controller=controller,
                                  max_steps=max_steps_per_interval,
                                  adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=max_steps_per_interval))
        return jax.tree.map(lambda a: a[-1], sol.ys), None

    zeros = jnp.zeros((d, d), h0.dtype)
    (h, P, m), _ = jax.lax.scan(interval, (h0, zeros, jnp.zeros_like(h0)), inputs)
    return _loss_terms(loss, h, m, P)


# ------------------------------------------------------------------------------------------------------
# The model-level entry point.
# ------------------------------------------------------------------------------------------------------
def _model_pieces(model, noise_levels):
    """The cell's drift, its diffusion, and the per-example step map, perturbation factor and mean shift of
    the model's scheme (docs/theory.md (3.2), (3.5)), on the model's flat state."""
    cfg = model.cfg
    p = model.recurrent_params(noise_levels)
    layout = model.state_layout
    drift = cells.pure(model.cell, layout=layout)
    scheme, sigma = _registry.scheme(cfg), _registry.diffusion(cfg, layout)
    step = lambda h, z: h + scheme.mean_step_size(cfg, p) * drift(h, z)  # F_k (docs/theory.md (3.1)-(3.2))
    factor = lambda h, z: scheme.perturbation_factor(cfg, p, sigma, h, z, drift(h, z))
    shift = None
    if scheme.has_mean_shift:
        shift = lambda h, z: scheme.mean_shift(cfg, p, sigma, h, z, cfg.dt)
    return cfg, p, drift, scheme, sigma, step, factor, shift


def explicit_regularizer(
    model,
    x,
    y,
    *,
    method: str = "exact",
    num_probes: int = 1,
    key: Array | prng.Rows | None = None,
    probe: str = "gaussian",
    mask: ArrayLike | None = None,
    noise_levels=None,
    batch_size: int | None = None,
) -> Regularizer:
    """The explicit regularizer of noise injection for a batch, under the model's own configuration
    (docs/theory.md (3.7)–(3.9)).

    **Arguments:**

    - `model`: a `NoisyRNN`; its `eps_add`, `eps_mult`, `dt`, convention and solver set the noise.
    - `noise_levels`: optional (ε_add, ε_mult) replacing the model's levels (numbers or JAX values, e.g.
      one per member of a vmapped sweep).
    - `x`: inputs (batch, T, input_dim); `y`: integer labels (batch,). The loss is the cross-entropy of
      the decoded final state.
    - `method`: `"exact"` (the P, m recursion (3.4)), `"probe"` (unbiased, (3.12)–(3.13); `num_probes` probes
      per example, needs `key`) or `"continuous"` (the moment ODE (3.15) of the SDE; convention "sde" only).
    - `probe`: `"gaussian"` or `"rademacher"` probe vectors.
    - `mask`: (batch,) weights, 1 for real examples and 0 for padding.
    - `batch_size`: None computes the whole batch at once; an integer computes it in compiled chunks of that
      many examples, so that memory is one chunk's (the probes alone are batch × T × `num_probes` × noise
      dimension normals). The chunks' probes are their rows of the whole batch's draw, so the result is the
      whole batch's up to the order of the floating-point sums.

    **Returns:** a `Regularizer`: `.value` (loss units, E[noisy loss] ≈ `.clean_loss` + `.value`), `.Q`,
    `.R` with value = (Q + R)/2, batch means.

    Which method: `"probe"` for training and for models of more than a few dozen units. One probe carries
    three rows per example along the path (h̄, u, v), so its gradient costs about three deterministic
    gradients plus the probes' draw (the same number of normals as noise injection). `"exact"` carries the
    d × d covariance per example: O(M d³) against the probe's O(M d²), about d probes' worth (measured 26–52×
    one probe at hidden 32–64, and its gradient's memory grows as T d² per example); pick it to check the
    probe, for small models, or where the estimate's variance matters more than its cost.

    Under the reference convention the expansion is around the mean-step path (step s(1 − ε_mult/2)),
    so `.clean_loss` is the loss on that path, not the test-time forward pass (docs/theory.md (3.2)–(3.3));
    explicit training uses the test-time forward pass for its clean loss (`nrnn_jax.step.loss_fn`).
    """
    check_choice("", "method", method, METHODS)
    check_int("", "num_probes", num_probes, 1)
    check_choice("", "probe", probe, PROBES)
    cfg, p, drift, scheme, sigma, step, factor, shift = _model_pieces(model, noise_levels)
    levels = _levels(cfg, p)
    if cfg.diffusion is None and all(isinstance(v, (int, float)) and v == 0 for v in levels):
        warnings.warn("explicit_regularizer: the noise levels are eps_add = eps_mult = 0, so the regularizer is 0; "
                      "pass noise_levels=(eps_add, eps_mult) or use nrnn_jax.with_noise(model, eps_add, eps_mult).",
                      stacklevel=2)
    check_inputs(x, cfg.input_dim)
    check_labels(y, x.shape[0], cfg.num_classes)
    if method == "probe" and key is None:
        raise ValueError("method='probe' needs a PRNG key: explicit_regularizer(..., key=jax.random.PRNGKey(0)).")
    if method == "continuous" and not scheme.is_sde:
        raise ValueError("method='continuous' is defined for convention='sde' only (the reference convention "
                         "is not the discretisation of an SDE); use method='exact' or 'probe'.")
    if batch_size is not None:
        check_int("", "batch_size", batch_size, 1)
        if x.shape[0] > batch_size:
            return _in_chunks(model, x, y, batch_size, mask, noise_levels, method=method, num_probes=num_probes,
                              key=key, probe=probe)
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.asarray(x, dtype)
    z = model.encode(x)
    h0 = jnp.zeros(model.state_size, dtype)
    decode = lambda h: model.decode(h[None])[0]

    def per_example(z_i, y_i, extra):
        loss = lambda h: cross_entropy(decode(h), y_i)
        if method == "exact":
            return exact_terms(step, factor, loss, h0, z_i, shift)
        if method == "probe":
            return probe_terms(step, factor, loss, h0, z_i, extra, shift)
        diffusion = lambda h, u: sigma.operator(levels, h, u)
        rate_shift = None if shift is None else (lambda h, u: scheme.mean_shift(cfg, p, sigma, h, u, 1.0))
        return continuous_terms(drift, diffusion, loss, h0, z_i, cfg.dt, rate_shift)

    B, T = x.shape[0], x.shape[1]
    if method == "probe":
        probes = draw_probes(key, (B, T, num_probes, model.noise_dim), probe, dtype)
        if _registry.gradient(cfg).uses_adjoint(drift):
            encoder = (model.encoder.kernel[...], model.encoder.bias[...])
            terms = _model_probe_terms(cfg, p, scheme, sigma, drift, decode, encoder, x, y, probes)
        else:
            terms = jax.vmap(per_example)(z, y, probes)
        samples = terms.value  # (B, S)
        per_ex_Q, per_ex_R = terms.Q.mean(-1), terms.R.mean(-1)
    else:
        terms = jax.vmap(lambda z_i, y_i: per_example(z_i, y_i, None))(z, y)
        samples = terms.value[:, None]
        per_ex_Q, per_ex_R = terms.Q, terms.R
    per_ex = 0.5 * (per_ex_Q + per_ex_R)
    w = jnp.ones(B, dtype) if mask is None else jnp.asarray(mask, dtype)
    mean = masked_mean(per_ex, w)
    S = samples.shape[1]
    if S >= 2:  # conditional on the batch: the probes' variance only
        var_i = jnp.var(samples, axis=1, ddof=1)
        std_err = jnp.sqrt(jnp.sum(w**2 * var_i / S)) / jnp.maximum(jnp.sum(w), 1.0)
    elif method == "probe":  # one probe per example: pooled over examples (an upper bound)
        n = jnp.maximum(jnp.sum(w), 2.0)
        std_err = jnp.sqrt(jnp.sum(w * (samples[:, 0] - mean) ** 2) / (n - 1.0) / n)
    else:
        std_err = jnp.zeros((), dtype)
    return Regularizer(
        value=mean,
        Q=masked_mean(per_ex_Q, w),
        R=masked_mean(per_ex_R, w),
        clean_loss=masked_mean(terms.loss, w),
        per_example=per_ex,
        std_err=std_err,
        logits=model.decode(terms.h),
    )


@functools.partial(jax.jit, static_argnums=0, static_argnames=("method", "num_probes", "probe", "total"))
def _chunk(graphdef, params, x, y, mask, noise_levels, key, start, *, method, num_probes, probe, total):
    """`explicit_regularizer` on the examples start … start + b − 1 of a `total`-example batch (x, y, mask: those
    b examples); the probe method draws their rows of the whole batch's probes (`prng.Rows`)."""
    model = nnx.merge(graphdef, params)
    if method == "probe":
        key = prng.Rows(key, start, total)
    with warnings.catch_warnings():  # the whole batch's call has warned already
        warnings.simplefilter("ignore")
        return explicit_regularizer(model, x, y, method=method, num_probes=num_probes, key=key, probe=probe,
                                    mask=mask, noise_levels=noise_levels)


def _in_chunks(model, x, y, batch_size, mask, noise_levels, *, method, num_probes, key, probe) -> Regularizer:
    """`explicit_regularizer(..., batch_size=batch_size)`: the chunks' `Regularizer`s combined into the whole
    batch's (means weighted by the chunks' mask sums; the standard error as the whole batch's formula gives)."""
    B = x.shape[0]
    if key is not None and not isinstance(key, prng.Rows) and not jax.dtypes.issubdtype(key.dtype,
                                                                                          jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw key: the typed key of the same numbers
    graphdef, params = nnx.split(model)
    w = jnp.ones(B, jnp.dtype(model.cfg.dtype)) if mask is None else jnp.asarray(mask, jnp.dtype(model.cfg.dtype))
    parts = []
    for start in range(0, B, batch_size):
        rows = slice(start, min(start + batch_size, B))
        parts.append(_chunk(graphdef, params, x[rows], y[rows], w[rows], noise_levels, key, start, method=method,
                            num_probes=num_probes, probe=probe, total=B))
    weights = jnp.stack([jnp.sum(w[start:start + batch_size]) for start in range(0, B, batch_size)])
    total = jnp.maximum(jnp.sum(weights), 1.0)
    mean = lambda field: jnp.sum(weights * jnp.stack([getattr(r, field) for r in parts])) / total
    value = mean("value")
    per_example = jnp.concatenate([r.per_example for r in parts])
    if method != "probe":
        std_err = jnp.zeros((), value.dtype)
    elif num_probes >= 2:  # each chunk's se · its weight is the root of its share of the whole sum
        scaled = jnp.stack([r.std_err * jnp.maximum(wc, 1.0) for r, wc in zip(parts, weights)])
        std_err = jnp.sqrt(jnp.sum(scaled**2)) / total
    else:  # one probe per example: pooled over the whole batch around its mean
        n = jnp.maximum(jnp.sum(w), 2.0)
        std_err = jnp.sqrt(jnp.sum(w * (per_example - value) ** 2) / (n - 1.0) / n)
    return Regularizer(value=value, Q=mean("Q"), R=mean("R"), clean_loss=mean("clean_loss"),
                       per_example=per_example, std_err=std_err,
                       logits=jnp.concatenate([r.logits for r in parts]))


def antithetic_monte_carlo(model, x, y, num_samples: int, key: Array, clean_loss: Array | None = None) -> Array:
    """Monte Carlo samples of E[noisy loss] − clean loss with antithetic pairs (docs/theory.md (3.19)):
    ½[ℓ(h(ξ)) + ℓ(h(−ξ))] − ℓ(h̄), each averaged over the batch.

    **Arguments:**

    - `model`: a `NoisyRNN` with its noise levels.
    - `x`: inputs (batch, T, input_dim); `y`: integer labels (batch,).
    - `num_samples`: antithetic pairs drawn; `key`: a JAX PRNG key.
    - `clean_loss`: ℓ(h̄); default: the loss on the path the expansion is taken around
      (`explicit_regularizer`'s `.clean_loss`).

    **Returns:** the samples, shape (num_samples,). Their mean estimates `explicit_regularizer(...).value` up
    to O(ε⁴).
    """
    if clean_loss is None:
        clean_loss = explicit_regularizer(model, x, y).clean_loss
    x = jnp.asarray(x, jnp.dtype(model.cfg.dtype))
    xi = prng.normal(key, (num_samples,) + x.shape[:2] + (model.noise_dim,), x.dtype)
    loss = lambda noise: jnp.mean(cross_entropy(model(x, noise=noise), y))
    return jax.jit(jax.vmap(lambda s: 0.5 * (loss(s) + loss(-s)) - clean_loss))(xi)
