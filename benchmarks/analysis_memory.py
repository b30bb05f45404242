"""Memory of the measurements `nrnn-compare` makes of one trained model (`nrnn_jax.compare.analyse`), at the
shape of a preset (default: `nrnn-small` on pixel MNIST, T = 784, hidden 128).

    PYTHONPATH=src python -m benchmarks.analysis_memory                   # XLA's figures, compiled only
    PYTHONPATH=src python -m benchmarks.analysis_memory --measure 32      # run analyse on 32 examples: peak RSS

(from the repository root, with the package installed or `PYTHONPATH=src`; see `benchmarks/__init__.py`)

The first form compiles, without running, each computation of the measurements on a freshly initialised model
and random inputs (N, T, input_dim) and prints XLA's memory analysis (temporary, argument and output bytes):
the Hessian-vector product of the flatness measures (`nrnn_jax.analysis.flatness.chunk_hvp`), a DeepFool
batch, a robustness evaluation batch (`nrnn_jax.evaluate.eval_step`), the explicit regularizer
(one compiled chunk of `explicit_regularizer(..., batch_size=)`: probe method at hidden > 64, exact below) and the Lyapunov paths (at
the preset's "-sde" variant when the preset's convention is "reference", which has none). Each at the
batch compare uses, and the chunked ones also at all `--examples` in one batch.

`--measure N` instead runs `compare.analyse` once on a fresh model with random data of N examples per split
(analysis_examples N, the data set's robustness curves on the N test examples) in a process set up as
`nrnn-compare` sets it up (`nrnn_jax.host.configure()`: glibc's malloc keeps large freed blocks), and prints
the process's peak resident set size. It uses only `compare.analyse`, so it measures any revision.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

from nrnn_jax import host

MIB = 2**20


def _row(name: str, batch: int, compiled) -> dict:
    m = compiled.memory_analysis()
    row = dict(computation=name, batch=batch, temp=m.temp_size_in_bytes / MIB, argument=m.argument_size_in_bytes / MIB,
               output=m.output_size_in_bytes / MIB)
    print(f"| {name} | {batch} | {row['temp']:.0f} | {row['argument']:.1f} | {row['output']:.2f} |", flush=True)
    return row


def compiled_figures(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nrnn_jax import NoisyRNN, _registry, cells, regularizer
    from nrnn_jax.analysis import deepfool
    from nrnn_jax.analysis import stability
    from nrnn_jax.analysis.flatness import chunk_hvp
    from nrnn_jax.evaluate import eval_step
    from nrnn_jax.presets import get_preset

    cfg = get_preset(args.preset, args.dataset)[0].replace(backend=args.backend)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    T = args.T
    x = lambda n: jax.ShapeDtypeStruct((n, T, cfg.input_dim), jnp.float32)
    y = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    w = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)
    print(f"{args.preset} ({args.dataset}), backend {args.backend}: T {T}, hidden {cfg.hidden}, input "
          f"{cfg.input_dim}, {cfg.num_classes} classes; {args.examples} analysis examples\n")
    print("| computation | batch | temp MiB | argument MiB | output MiB |\n|---|---|---|---|---|")
    rows = []
    for n in dict.fromkeys((args.examples, args.hvp_batch)):
        rows.append(_row("Hessian-vector product (flatness)", n,
                         chunk_hvp.lower(graphdef, params, params, x(n), y(n), w(n)).compile()))
    df = jax.jit(lambda p, xx: deepfool(nnx.merge(graphdef, p), xx, max_iter=args.deepfool_iter))
    rows.append(_row(f"DeepFool, {args.deepfool_iter} iterations (input margins)", args.deepfool_batch,
                     df.lower(params, x(args.deepfool_batch)).compile()))
    rows.append(_row("evaluation batch (robustness curves)", args.eval_batch,
                     eval_step.lower(graphdef, params, x(args.eval_batch), y(args.eval_batch),
                                     w(args.eval_batch)).compile()))
    method = "exact" if cfg.hidden <= 64 else "probe"
    key = jax.random.wrap_key_data(jax.random.PRNGKey(0))
    for n in dict.fromkeys((args.examples, args.reg_batch)):
        rows.append(_row(f"explicit regularizer ({method}, {args.probes} probes)", n,
                         regularizer._chunk.lower(graphdef, params, x(n), y(n), w(n), None, key, 0, method=method,
                                                  num_probes=args.probes, probe="gaussian",
                                                  total=args.examples).compile()))
    # lyapunov_exponent's compiled paths (h0, ξ) of the unforced scheme, additive noise off
    lcfg = cfg if cfg.convention != "reference" else get_preset(args.preset + "-sde", args.dataset)[0]
    lcfg = lcfg.replace(eps_add=0.0, backend=args.backend)
    lmodel = NoisyRNN(lcfg, rngs=nnx.Rngs(0))
    layout = cells.state_layout(lmodel.cell, lcfg)
    drift = cells.pure(lmodel.cell, products=False, layout=layout)
    steps, paths = int(round(args.lyapunov_time / lcfg.dt)), 16
    h0 = jax.ShapeDtypeStruct((paths, lcfg.hidden if layout is None else layout.size), jnp.float32)
    xi = jax.ShapeDtypeStruct((paths, steps, _registry.noise_width(lcfg, layout)), jnp.float32)
    lower = stability._path_exponents.lower(lcfg, lmodel.recurrent_params(), drift.fn, drift.params, h0, xi, 1e-6,
                                            layout)
    rows.append(_row(f"Lyapunov paths ({steps} steps, convention {lcfg.convention})", paths, lower.compile()))
    return rows


def measure(args) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from nrnn_jax import NoisyRNN, NRNNConfig
    from nrnn_jax.compare import CompareConfig, analyse, compare_settings
    from nrnn_jax.data import Dataset

    cc = CompareConfig(dataset=args.dataset, preset=args.preset, backend=args.backend, seeds=(0,),
                       analysis_examples=args.measure, lanczos_steps=args.lanczos_steps,
                       hutchinson_samples=args.hutchinson_samples)
    st = compare_settings(cc)
    cfg = NRNNConfig(input_dim=1, num_classes=10, backend=args.backend, **st.model)
    rng = np.random.default_rng(0)
    n = args.measure
    split = lambda: (rng.random((n, args.T, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32))
    data = Dataset("random", *split(), *split(), *split(), num_classes=10)
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = analyse(model, data, st.curves, dataclasses.replace(cc, curve_examples=n), 0, cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"analyse on {n} examples at T {args.T} ({args.preset}, {args.backend}; jax {jax.__version__}): "
          f"peak RSS {peak:.0f} MiB (before the measurements {before:.0f} MiB), {seconds:.0f} s; "
          f"reg_value {out['reg_value']:.6g}, hessian_top {out['hessian_top']:.6g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nrnn-small")
    parser.add_argument("--dataset", default="mnist_pixel", choices=("mnist_pixel", "mnist_permuted"))
    parser.add_argument("--backend", default="scan", choices=("scan", "diffrax"))
    parser.add_argument("--T", type=int, default=784, help="sequence length of the random inputs")
    parser.add_argument("--examples", type=int, default=256, help="CompareConfig.analysis_examples")
    parser.add_argument("--hvp-batch", type=int, default=64, help="hessian_lanczos / hessian_trace batch_size")
    parser.add_argument("--reg-batch", type=int, default=64, help="explicit_regularizer batch_size (compare.ANALYSIS_CHUNK)")
    parser.add_argument("--probes", type=int, default=8, help="probes of the measured regularizer")
    parser.add_argument("--deepfool-batch", type=int, default=250, help="input_margins batch_size")
    parser.add_argument("--deepfool-iter", type=int, default=50)
    parser.add_argument("--eval-batch", type=int, default=500, help="robustness_curve batch_size")
    parser.add_argument("--lyapunov-time", type=float, default=50.0, help="CompareConfig.lyapunov_time")
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="run compare.analyse on N random examples per split and print the peak RSS")
    parser.add_argument("--lanczos-steps", type=int, default=4, help="with --measure (memory does not depend on it)")
    parser.add_argument("--hutchinson-samples", type=int, default=3, help="with --measure")
    args = parser.parse_args()
    host.configure()  # as nrnn-compare sets up the process: before JAX starts
    if args.measure:
        measure(args)
    else:
        compiled_figures(args)


if __name__ == "__main__":
    main()
