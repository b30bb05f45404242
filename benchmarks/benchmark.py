"""Train-step benchmark: median step time of each backend and mode, as ratios measured in one run.

    python -m benchmarks.benchmark --shape paper      # T = 784, hidden 128, batch 128 (pixel MNIST)
    python -m benchmarks.benchmark --shape ecg        # T = 140, hidden 64, batch 64 (ECG5000)
    python -m benchmarks.benchmark --shape small      # T = 28, hidden 32, batch 32
    python -m benchmarks.benchmark --t-scaling --variants torch,scan,diffrax   # T = 196, 392, 784

(from the repository root, with the package installed or `PYTHONPATH=src`; see `benchmarks/__init__.py`)

Variants: eager PyTorch on the same recurrence (benchmarks/benchmark_torch.py, in a worker process whose steps
take turns with the JAX variants', like theirs with each other; skipped
with a message if torch is absent; `--torch-variant` picks the formulation: `loop-enc`, the default, applies
the encoder to x[:, k] inside the loop with one torch.randn(B, d) per step: the fastest and steadiest of
those measured, linear in T; `unbind`, `-prenoise`, `-fused` are the others; `slice`, the O(T^2) one this
benchmark used before, reads z[:, k] of a (B, T, d) tensor and is kept only to show that cost), the scan and
diffrax backends in implicit mode (noise injection) with the discrete adjoint (`gradient="adjoint"`, the
default) and with JAX differentiating the loop (`-autodiff`), deterministic, explicit training with the
probe (S = 1) and exact regularizers, and a sweep of `--sweep-size` models (seeds and noise levels) in one
vmapped step, reported as throughput per model against one model alone. The JAX variants run on the
devices `train_and_evaluate` picks for the shape (`--devices auto`: on this CPU, one device per core for a
long sequence, the batch split over them; `nrnn_jax.train._default_devices`), the `-1dev` ones (`scan-1dev`,
`diffrax-1dev`) on one device. Reports the median of `--repeats`
steps after compilation (all variants, PyTorch included, take turns, one step each), ratios against PyTorch and against scan, the compiled step's temporary memory (XLA's memory analysis) and the process's
peak resident memory. `--t-scaling` instead times T = 196, 392, 784 (hidden 128, batch 128) and prints
time per step, time per step / T, the ratio of the latter at 784 to 196 (within 20 % of 1 for a variant
linear in T) and memory per variant (XLA temporary memory; PyTorch: RSS growth of its worker process).
`--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import benchmark_torch  # the eager-PyTorch baseline
from nrnn_jax import host
from nrnn_jax import (NoisyRNN, NRNNConfig, Sweep, TrainConfig, data_parallel_sharding, init_sweep_states,
                      init_train_state, make_optimizer, make_train_step)
from nrnn_jax.cli import _parse_devices as parse_devices
from nrnn_jax.train import _default_devices as default_devices

SHAPES = {
    "paper": dict(T=784, hidden=128, batch=128, input_dim=1, num_classes=10, dt=0.03),
    "ecg": dict(T=140, hidden=64, batch=64, input_dim=1, num_classes=2, dt=0.1),
    "small": dict(T=28, hidden=32, batch=32, input_dim=28, num_classes=10, dt=0.1),
}


def build_jax(shape: dict, backend: str, mode: str, reg_method: str = "probe", eps=(0.02, 0.02),
              gradient: str = "adjoint", prng: str = "threefry2x32", sweep: int = 0, diffrax_loop: str = "steps",
              devices: int = 1):
    """A compiled train step and its arguments; returns (run_one_step, XLA temporary memory in MiB).
    `sweep=N` > 0: N models (seeds 0..N-1, noise levels spread over [eps, 2 eps]) in one vmapped step.
    `devices=n` > 1: data-parallel over n devices (`make_train_step(..., devices=n)`, as
    `train_and_evaluate` runs it); the memory is then one device's."""
    mcfg = NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                      dt=shape["dt"], eps_add=eps[0], eps_mult=eps[1], backend=backend, gradient=gradient,
                      diffrax_loop=diffrax_loop)
    tcfg = TrainConfig(mode=mode, lr=1e-3, reg_method=reg_method, num_probes=1, prng=prng)
    tx = make_optimizer(tcfg, 100)
    extra = ()
    if sweep:
        levels = np.linspace(1.0, 2.0, sweep)[:, None] * np.array(eps)[None, :]
        spec = Sweep(seeds=tuple(range(sweep)), eps_add=tuple(levels[:, 0]), eps_mult=tuple(levels[:, 1]))
        graphdef, state = init_sweep_states(mcfg, tx, spec)
        extra = (jnp.asarray(spec.noise_levels(mcfg), jnp.float32),)
    else:
        graphdef, params = nnx.split(NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
        state = init_train_state(params, tx, seed=0)
    step = make_train_step(graphdef, tx, tcfg, sweep=bool(sweep), devices=devices)
    if devices > 1:
        state = jax.device_put(state, data_parallel_sharding(devices)[1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape["batch"], shape["T"], shape["input_dim"])).astype(np.float32)
    y = rng.integers(0, shape["num_classes"], shape["batch"]).astype(np.int32)
    mask = np.ones(shape["batch"], np.float32)
    if devices > 1:  # placed as the training loop places its batches; the memory is that of the program
        # computing the devices' shares (the update program's is the state's size)
        x, y, mask = jax.device_put((x, y, mask), data_parallel_sharding(devices)[0])
        compiled = step.shares.lower(state, x, y, mask, *extra).compile()
    else:
        compiled = step.lower(state, x, y, mask, *extra).compile()
    mem = compiled.memory_analysis()
    temp_mb = None if mem is None else getattr(mem, "temp_size_in_bytes", 0) / 2**20
    box = [state]

    def run_one():
        t0 = time.perf_counter()
        box[0], _ = step(box[0], x, y, mask, *extra)
        jax.block_until_ready(box[0])
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up: the host heap reaches its steady size (nrnn_jax.host.configure) in a few steps
        run_one()
    return run_one, temp_mb


def time_interleaved(runners: dict, repeats: int) -> dict:
    """Every step time of each runner ({name: [seconds]}), the runners taking turns (so that drifts of the
    machine's speed hit every variant alike)."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return times


def start_torch(shape: dict, args) -> dict:
    """The eager-PyTorch baseline (benchmarks/benchmark_torch.py), one worker process per `--torch-malloc`
    setting, whose steps take turns with the JAX variants': {row name: worker}; empty (with a message) when
    torch is absent."""
    workers = {}
    for malloc in args.torch_malloc.split(","):
        worker = benchmark_torch.TorchWorker.start(shape, args.torch_variant, malloc, args.torch_threads)
        if worker is None:
            print("PyTorch is not installed: skipping the eager PyTorch baseline (pip install torch).", file=sys.stderr)
            break
        workers[f"pytorch eager ({args.torch_variant}, implicit, malloc {malloc})"] = worker
    return workers


# (variant, backend, mode, regularizer, gradient, diffrax loop); "adjoint" and "steps" are the defaults of
# `NRNNConfig.gradient` and `NRNNConfig.diffrax_loop`. Every variant runs on the devices `--devices` gives
# (default: what `train_and_evaluate` picks for the shape), except the "-1dev" ones: one device.
PLAN = [("scan", "scan", "implicit", "probe", "adjoint", "steps"),
        ("scan-1dev", "scan", "implicit", "probe", "adjoint", "steps"),
        ("diffrax-1dev", "diffrax", "implicit", "probe", "adjoint", "steps"),
        ("scan-autodiff", "scan", "implicit", "probe", "autodiff", "steps"),
        ("diffrax", "diffrax", "implicit", "probe", "adjoint", "steps"),
        ("diffrax-autodiff", "diffrax", "implicit", "probe", "autodiff", "steps"),
        ("deterministic", "scan", "deterministic", "probe", "adjoint", "steps"),
        ("probe", "scan", "explicit", "probe", "adjoint", "steps"),
        ("exact", "scan", "explicit", "exact", "adjoint", "steps")]
NAMES = {"scan": "scan (implicit)", "scan-1dev": "scan (implicit, 1 device)",
         "diffrax-1dev": "diffrax (implicit, 1 device)", "scan-autodiff": "scan (implicit, gradient=autodiff)",
         "diffrax": "diffrax (implicit)",
         "diffrax-autodiff": "diffrax (implicit, gradient=autodiff)",
         "deterministic": "scan (deterministic)", "probe": "scan (explicit, probe S=1)",
         "exact": "scan (explicit, exact)"}


def jax_runners(shape: dict, wanted: set, args):
    """The compiled JAX steps of the wanted variants: ({name: run_one}, {name: XLA temp MiB}, sweep name)."""
    runners, mems = {}, {}
    n = devices_for(shape, args)
    for key, backend, mode, method, gradient, loop in PLAN:
        if key in wanted:
            d = 1 if key.endswith("-1dev") else n
            runners[NAMES[key]], mems[NAMES[key]] = build_jax(shape, backend, mode, method, gradient=gradient,
                                                              prng=args.prng, diffrax_loop=loop, devices=d)
    sweep_name = f"sweep of {args.sweep_size} (implicit, one vmapped step)"
    if "sweep" in wanted:
        runners[sweep_name], mems[sweep_name] = build_jax(shape, args.sweep_backend, "implicit", prng=args.prng,
                                                          sweep=args.sweep_size, devices=n)
    return runners, mems, sweep_name


def auto_devices(shape: dict) -> int:
    """What `train_and_evaluate(devices="auto")` uses at this shape (`nrnn_jax.train._default_devices`)."""
    return default_devices(NRNNConfig(hidden=shape["hidden"]), shape["batch"], shape["T"])


def devices_for(shape: dict, args) -> int:
    """The device count of the JAX variants: `--devices`, or for `auto` what `train_and_evaluate` would use."""
    return auto_devices(shape) if args.devices == "auto" else args.devices


SCALING_T = (196, 392, 784)


def t_scaling(args, wanted: set) -> dict:
    """Time per step and per step and unit of T at T = 196, 392, 784 (paper shape otherwise) for PyTorch and
    each requested JAX variant; a linear-in-T variant has (time/T at 784) / (time/T at 196) within 20 % of 1."""
    base = dict(SHAPES["paper"])
    res = {}  # name -> {T: (seconds, memory MiB, memory kind)}
    for T in SCALING_T:
        shape = {**base, "T": T}
        workers = start_torch(shape, args) if "torch" in wanted else {}
        runners, mems = jax_runners(shape, wanted, args)[:2]
        runners = {**{name: w.run_one for name, w in workers.items()}, **runners}
        for name, ts in time_interleaved(runners, args.scaling_repeats).items():
            mem = workers[name].memory()["rss_growth_mib"] if name in workers else mems[name]
            res.setdefault(name, {})[T] = (statistics.median(ts), mem)
            if name in workers:
                print(f"  {name} T = {T}: steps {', '.join(f'{t:.3f}' for t in ts)} s", file=sys.stderr, flush=True)
        for w in workers.values():
            w.close()
        del runners
        print(f"  T = {T} done", file=sys.stderr, flush=True)
    print(f"T scaling (hidden {base['hidden']}, batch {base['batch']}): median of {args.scaling_repeats} train steps; "
          f"memory: XLA temporary memory of the compiled step (JAX), resident-set growth of the worker process "
          f"over its first step and the timed steps (PyTorch)")
    print("| variant | T | median step (s) | step / T (ms) | memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, by_t in res.items():
        for T, (t, mem) in by_t.items():
            print(f"| {name} | {T} | {t:.4f} | {1e3 * t / T:.3f} | {'' if mem is None else f'{mem:.0f}'} |")
    print("| variant | (step/T at 784) / (step/T at 196) | linear (within 20 % of 1) |")
    print("|---|---|---|")
    out = {}
    for name, by_t in res.items():
        if 196 in by_t and 784 in by_t:
            ratio = (by_t[784][0] / 784) / (by_t[196][0] / 196)
            print(f"| {name} | {ratio:.2f} | {'yes' if abs(ratio - 1) <= 0.2 else 'no'} |")
            out[name] = {"ratio_784_196": ratio, **{str(T): {"median_s": t, "mem_mib": m} for T, (t, m) in by_t.items()}}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants",
                        default="torch,scan,scan-autodiff,diffrax,diffrax-autodiff,deterministic,probe,exact,sweep",
                        help="comma-separated subset of torch,scan,scan-1dev,scan-autodiff,diffrax,diffrax-1dev,"
                             "diffrax-autodiff,deterministic,probe,exact,sweep")
    parser.add_argument("--sweep-size", type=int, default=4,
                        help="models in the sweep variant (seeds and noise levels, one vmapped implicit step)")
    parser.add_argument("--sweep-backend", choices=("scan", "diffrax"), default="scan",
                        help="backend of the sweep variant, compared with the same backend's single model")
    parser.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "philox4x32"],
                        help="TrainConfig.prng of the JAX variants")
    parser.add_argument("--torch-variant", default=benchmark_torch.DEFAULT_VARIANT,
                        help="formulation of the eager-PyTorch baseline (benchmarks/benchmark_torch.py): loop-enc "
                             "(default, fastest measured), unbind, slice (the old O(T^2) one), with optional "
                             "-prenoise / -fused modifiers")
    parser.add_argument("--torch-malloc", default="default",
                        help="glibc allocator settings of the PyTorch worker, or several comma-separated, one worker "
                             "each, the fastest being the baseline: default, tuned (raised thresholds), keep (what "
                             "nrnn_jax.host.configure() sets for the JAX process)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads of the PyTorch worker (0: PyTorch's default; 1 gives steady "
                             "times on a shared machine)")
    parser.add_argument("--t-scaling", action="store_true",
                        help="time T = 196, 392, 784 (hidden 128, batch 128) instead of one shape")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="steps timed per T in --t-scaling")
    parser.add_argument("--devices", type=parse_devices, default="auto",
                        help="devices of the JAX variants (data-parallel over the batch), or 'auto': what "
                             "train_and_evaluate picks for the shape (default); the -1dev variants use one")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    host.configure()  # before any JAX computation: one CPU device per core, the keeping allocator
    benchmark_torch.parse_variant(args.torch_variant)
    bad = [m for m in args.torch_malloc.split(",") if m not in benchmark_torch.MALLOC_CHOICES]
    if bad or not args.torch_malloc:
        parser.error(f"--torch-malloc={args.torch_malloc!r} is invalid: expected a comma-separated subset of "
                     + ",".join(benchmark_torch.MALLOC_CHOICES))
    shape = SHAPES[args.shape]
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    known = {key for key, *_ in PLAN} | {"torch", "sweep"}
    if not wanted or wanted - known:
        parser.error(f"--variants={args.variants!r} is invalid: expected a comma-separated subset of "
                     + ",".join(sorted(known)))
    if args.t_scaling:
        out = t_scaling(args, wanted)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"t_scaling": out, "torch_variant": args.torch_variant}, f, indent=2)
        return 0
    rows = {}
    workers = start_torch(shape, args) if "torch" in wanted else {}
    runners, mems, sweep_name = jax_runners(shape, wanted, args)
    runners = {**{name: w.run_one for name, w in workers.items()}, **runners}
    times = time_interleaved(runners, args.repeats)
    for name, ts in times.items():
        rows[name] = (statistics.median(ts), mems.get(name))
    for name, w in workers.items():
        m = w.memory()
        w.close()
        print(f"{name}, its steps taking turns with the JAX variants': steps "
              f"{', '.join(f'{t:.3f}' for t in times[name])} s; peak RSS {m['peak_rss_mib']:.0f} MiB, growth "
              f"over the steps {m['rss_growth_mib']:.0f} MiB; {m['threads']} threads")
    # the baseline is the fastest PyTorch row (the best honest version of the alternative)
    torch_t = min((rows[name][0] for name in workers), default=None)
    scan_t = rows.get("scan (implicit)", (None,))[0]
    n_dev = devices_for(shape, args)
    print(f"shape {args.shape}: {shape}; median of {args.repeats} train steps; prng {args.prng}; "
          f"device {jax.devices()[0].device_kind}; JAX variants on {n_dev} device(s) (the -1dev "
          f"ones on one); host: {host.status()}")
    print("| variant | median step (s) | vs scan (implicit) | speed-up vs PyTorch | XLA temp memory (MiB, per device) |")
    print("|---|---|---|---|---|")
    out = {"shape": args.shape, **shape, "repeats": args.repeats, "prng": args.prng, "device": jax.devices()[0].device_kind,
           "devices": n_dev, "rows": {}}
    for name, (t, mem) in rows.items():
        vs_scan = f"{t / scan_t:.2f}x" if scan_t else ""
        vs_torch = f"{torch_t / t:.2f}x" if torch_t else ""
        print(f"| {name} | {t:.4f} | {vs_scan} | {vs_torch} | {'' if mem is None else f'{mem:.1f}'} |")
        out["rows"][name] = {"median_s": t, "temp_mib": mem}
    if sweep_name in rows:
        t_sweep = rows[sweep_name][0]
        single = rows.get(f"{args.sweep_backend} (implicit)", (None,))[0]
        line = f"sweep: {t_sweep / args.sweep_size:.4f} s per model per step"
        if single:
            line += (f" against {single:.4f} s for one model alone ({args.sweep_backend}, implicit): throughput per model "
                     f"{single * args.sweep_size / t_sweep:.2f}x")
        print(line)
        out["sweep"] = {"size": args.sweep_size, "per_model_s": t_sweep / args.sweep_size, "single_s": single}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")
    out["peak_rss_mib"] = peak
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
