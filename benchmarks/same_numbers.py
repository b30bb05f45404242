"""Whether this checkout computes the same numbers as another git revision, bit for bit, in one process.

    python -m benchmarks.same_numbers --rev main
    python -m benchmarks.same_numbers --base /path/to/other/src/nrnn_jax

(from the repository root, with `PYTHONPATH=src`.) The other revision's package is imported under another
name beside this one (`benchmarks.compare_revisions.import_revision`). For every built-in cell, every scheme
(Euler–Maruyama, Euler–Heun, Milstein, the public code's rule), both noise kinds, both loops (`backend`)
and both gradients, the two versions build the same model (same seed) and compare, to the last bit:

- the first-step loss of the implicit mode (noise injected, one fixed draw) and its gradient;
- the explicit regularizer's value by the exact method and by the probe method (one fixed key), and the
  probe value's gradient.

Prints one line per configuration (for an array that differs, its largest difference relative to the array's
largest magnitude) and a summary; exits 1 if any number differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nrnn_jax

CELLS = ("lipschitz", "antisymmetric", "gru", "tanh", "lstm")
SCHEMES = (dict(solver="euler"), dict(solver="euler_heun"), dict(solver="milstein"), dict(convention="reference"))
NOISES = ("diagonal", "scalar")
BACKENDS = ("scan", "diffrax")
GRADIENTS = ("adjoint", "autodiff")
B, T, N_IN, D, C = 4, 6, 3, 5, 3


def import_base(package: Path):
    spec = importlib.util.spec_from_file_location("nrnn_jax_base", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nrnn_jax_base"] = module
    spec.loader.exec_module(module)
    return module


def configurations():
    """Every combination, in an order that covers every factor early: first each cell with every scheme and
    noise kind, the (backend, gradient) pair turning with them, then the Lipschitz cell (the discrete
    adjoint's product path) in every combination, then the rest."""
    everything = []
    for scheme, noise, backend, gradient, cell in itertools.product(SCHEMES, NOISES, BACKENDS, GRADIENTS, CELLS):
        reference = scheme.get("convention") == "reference"
        if reference and (noise == "scalar" or cell == "lstm"):
            continue  # not defined: the public code's rule has its own noise on one array of hidden units
        eps_add = 0.0 if scheme.get("solver") == "milstein" and noise == "scalar" else 0.2  # commutative noise
        everything.append(dict(cell=cell, noise_kind=noise, backend=backend, gradient=gradient, eps_add=eps_add,
                               eps_mult=0.3, input_dim=N_IN, hidden=D, num_classes=C, dt=0.2, init_std=1.5,
                               **scheme))
    pairs = list(itertools.product(BACKENDS, GRADIENTS))
    first = []
    for i, (scheme, noise) in enumerate(itertools.product(SCHEMES, NOISES)):
        for j, cell in enumerate(CELLS):
            backend, gradient = pairs[(i + j) % len(pairs)]
            first += [f for f in everything if f["cell"] == cell and f["noise_kind"] == noise and f["backend"] ==
                      backend and f["gradient"] == gradient and all(f.get(k) == v for k, v in scheme.items())]
    second = [f for f in everything if f["cell"] == "lipschitz" and f not in first]
    return first + second + [f for f in everything if f not in first and f not in second]


def numbers(nj, fields: dict, x, y, probe_key, noise_key) -> dict[str, np.ndarray]:
    model = nj.NoisyRNN(nj.NRNNConfig(**fields), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    xi = jax.random.normal(noise_key, (B, T, model.noise_dim), jnp.float32)

    def implicit(params):
        m = nnx.merge(graphdef, params)
        logits = m(x, noise=xi)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def probe(params):
        return nj.explicit_regularizer(nnx.merge(graphdef, params), x, y, method="probe", num_probes=2,
                                       key=probe_key).value

    def exact(params):
        return nj.explicit_regularizer(nnx.merge(graphdef, params), x, y, method="exact").value

    # compiled, as training runs them (the same for both versions)
    loss, g_loss = jax.jit(jax.value_and_grad(implicit))(params)
    reg_probe, g_probe = jax.jit(jax.value_and_grad(probe))(params)
    out = {"loss": loss, "reg_probe": reg_probe, "reg_exact": jax.jit(exact)(params)}
    for name, tree in (("grad_loss", g_loss), ("grad_reg_probe", g_probe)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{name}{jax.tree_util.keystr(path)}"] = leaf
    return {k: np.asarray(v) for k, v in out.items()}


def _relative(a, b) -> float:
    """The largest difference of two arrays relative to the larger magnitude of the second (where they differ)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="the git revision to compare with")
    parser.add_argument("--base", type=Path, default=None, help="the other package's directory (instead of --rev)")
    parser.add_argument("--where", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="only the configurations with these NRNNConfig values, e.g. convention=reference")
    args = parser.parse_args(argv)
    only = dict(w.split("=", 1) for w in args.where)
    with tempfile.TemporaryDirectory() as where:
        if args.base is None:
            from benchmarks.compare_revisions import import_revision

            base = import_revision(args.rev, Path(where))
        else:
            base = import_base(args.base)
        print(f"this: {Path(nrnn_jax.__file__).parent}; base: {Path(base.__file__).parent}")
        x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N_IN), jnp.float32)
        y = jnp.arange(B) % C
        keys = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
        differ, count, compared = [], 0, 0
        for fields in configurations():
            if any(str(fields.get(k)) != v for k, v in only.items()):
                continue
            a, b = numbers(nrnn_jax, fields, x, y, *keys), numbers(base, fields, x, y, *keys)
            if a.keys() != b.keys():
                differ.append((fields, f"different outputs {sorted(a.keys() ^ b.keys())}"))
                continue
            bad = [k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k], equal_nan=True)]
            count += 1
            compared += len(a)
            label = ", ".join(f"{k}={v}" for k, v in fields.items() if k in ("cell", "solver", "convention",
                                                                             "noise_kind", "backend", "gradient"))
            rel = {k: _relative(a[k], b[k]) for k in bad if a[k].shape == b[k].shape}
            print(f"{'same' if not bad else 'DIFFERENT'}: {label}"
                  + (" (" + ", ".join(f"{k}: max relative difference {rel[k]:.1e}" if k in rel else f"{k}: shape"
                                      for k in bad) + ")" if bad else ""), flush=True)
            if bad:
                differ.append((fields, bad))
        print(f"{count} configurations, {compared} arrays compared bit for bit; {len(differ)} differ")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
