"""Train-step benchmark: median step time of each backend and mode, as ratios measured in one run.

    python scripts/benchmark.py --shape paper      # T = 784, hidden 128, batch 128 (pixel MNIST)
    python scripts/benchmark.py --shape ecg        # T = 140, hidden 64, batch 64 (ECG5000)
    python scripts/benchmark.py --shape small      # T = 28, hidden 32, batch 32

Variants: eager PyTorch on the same recurrence (skipped with a message if torch is absent), the scan and
diffrax backends in implicit mode (noise injection) with the discrete adjoint (`gradient="adjoint"`, the
default) and with JAX differentiating the loop (`-autodiff`), deterministic, explicit training with the
probe (S = 1) and exact regularizers, and a sweep of `--sweep-size` models (seeds and noise levels) in one
vmapped step, reported as throughput per model against one model alone. Reports the median of `--repeats` steps after compilation (the JAX variants take turns), ratios against
PyTorch and against scan, the compiled step's temporary memory (XLA's memory analysis) and the process's
peak resident memory. `--json PATH` writes the figures.
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

from nrnn_jax import (NoisyRNN, NRNNConfig, Sweep, TrainConfig, init_sweep_states, init_train_state, make_optimizer,
                      make_train_step)

SHAPES = {
    "paper": dict(T=784, hidden=128, batch=128, input_dim=1, num_classes=10, dt=0.03),
    "ecg": dict(T=140, hidden=64, batch=64, input_dim=1, num_classes=2, dt=0.1),
    "small": dict(T=28, hidden=32, batch=32, input_dim=28, num_classes=10, dt=0.1),
}


def build_jax(shape: dict, backend: str, mode: str, reg_method: str = "probe", eps=(0.02, 0.02),
              gradient: str = "adjoint", prng: str = "threefry2x32", sweep: int = 0):
    """A compiled train step and its arguments; returns (run_one_step, XLA temporary memory in MiB).
    `sweep=N` > 0: N models (seeds 0..N-1, noise levels spread over [eps, 2 eps]) in one vmapped step."""
    mcfg = NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                      dt=shape["dt"], eps_add=eps[0], eps_mult=eps[1], backend=backend, gradient=gradient)
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
    step = make_train_step(graphdef, tx, tcfg, sweep=bool(sweep))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape["batch"], shape["T"], shape["input_dim"])).astype(np.float32)
    y = rng.integers(0, shape["num_classes"], shape["batch"]).astype(np.int32)
    mask = np.ones(shape["batch"], np.float32)
    compiled = step.lower(state, x, y, mask, *extra).compile()
    mem = compiled.memory_analysis()
    temp_mb = None if mem is None else getattr(mem, "temp_size_in_bytes", 0) / 2**20
    box = [state]

    def run_one():
        t0 = time.perf_counter()
        box[0], _ = step(box[0], x, y, mask, *extra)
        jax.block_until_ready(box[0])
        return time.perf_counter() - t0

    run_one()  # warm-up
    return run_one, temp_mb


def time_interleaved(runners: dict, repeats: int) -> dict:
    """Median step time of each runner, the runners taking turns (so that drifts of the machine's speed
    hit every variant alike)."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_torch(shape: dict, repeats: int, eps=(0.02, 0.02)):
    """Eager PyTorch, the same Euler–Maruyama recurrence with noise injection, Adam (on CUDA if present)."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    d, n, T, B, C, dt = shape["hidden"], shape["input_dim"], shape["T"], shape["batch"], shape["num_classes"], shape["dt"]
    beta, gamma = 0.75, 0.001
    enc, dec = torch.nn.Linear(n, d).to(dev), torch.nn.Linear(d, C).to(dev)
    MA = torch.nn.Parameter(torch.randn(d, d, device=dev) * 0.1 / d)
    MW = torch.nn.Parameter(torch.randn(d, d, device=dev) * 0.1 / d)
    params = [MA, MW, *enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    eye = torch.eye(d, device=dev)
    x = torch.randn(B, T, n, device=dev)
    y = torch.randint(0, C, (B,), device=dev)

    def step():
        A = beta * (MA - MA.T) + (1 - beta) * (MA + MA.T) - gamma * eye
        W = beta * (MW - MW.T) + (1 - beta) * (MW + MW.T) - gamma * eye
        z = enc(x)
        h = torch.zeros(B, d, device=dev)
        for k in range(T):
            f = h @ A.T + torch.tanh(h @ W.T + z[:, k])
            h = h + dt * f + (dt**0.5) * (eps[0] + eps[1] * h) * torch.randn(B, d, device=dev)
        loss = torch.nn.functional.cross_entropy(dec(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# glibc's allocator returns and re-faults memory on every step of a long eager autograd graph, which made
# eager PyTorch 4x slower at T = 784 here (20 s against 4.7 s per step). The baseline is timed in a
# subprocess with these settings, the favourable case for PyTorch.
TORCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000",
             "MALLOC_TOP_PAD_": "1000000000"}


def time_torch_subprocess(shape_name: str, repeats: int):
    import os
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--torch-worker", "--shape", shape_name, "--repeats", str(repeats)],
                          env={**os.environ, **TORCH_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    value = proc.stdout.strip().splitlines()[-1]
    return None if value == "none" else float(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants",
                        default="torch,scan,scan-autodiff,diffrax,diffrax-autodiff,deterministic,probe,exact,sweep",
                        help="comma-separated subset of torch,scan,scan-autodiff,diffrax,diffrax-autodiff,"
                             "deterministic,probe,exact,sweep")
    parser.add_argument("--sweep-size", type=int, default=4,
                        help="models in the sweep variant (seeds and noise levels, one vmapped implicit step)")
    parser.add_argument("--sweep-backend", choices=("scan", "diffrax"), default="scan",
                        help="backend of the sweep variant, compared with the same backend's single model")
    parser.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "philox4x32"],
                        help="TrainConfig.prng of the JAX variants")
    parser.add_argument("--json", default=None)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.torch_worker:
        t = time_torch(shape, args.repeats)
        print("none" if t is None else t)
        return 0
    wanted = set(args.variants.split(","))
    rows = {}
    if "torch" in wanted:
        t = time_torch_subprocess(args.shape, args.repeats)
        if t is None:
            print("PyTorch is not installed: skipping the eager PyTorch baseline (pip install torch).", file=sys.stderr)
        else:
            rows["pytorch eager (implicit)"] = (t, None)
    # (variant, backend, mode, regularizer, gradient); "adjoint" is the default `NRNNConfig.gradient`.
    plan = [("scan", "scan", "implicit", "probe", "adjoint"),
            ("scan-autodiff", "scan", "implicit", "probe", "autodiff"),
            ("diffrax", "diffrax", "implicit", "probe", "adjoint"),
            ("diffrax-autodiff", "diffrax", "implicit", "probe", "autodiff"),
            ("deterministic", "scan", "deterministic", "probe", "adjoint"),
            ("probe", "scan", "explicit", "probe", "adjoint"),
            ("exact", "scan", "explicit", "exact", "adjoint")]
    names = {"scan": "scan (implicit)", "scan-autodiff": "scan (implicit, gradient=autodiff)",
             "diffrax": "diffrax (implicit)", "diffrax-autodiff": "diffrax (implicit, gradient=autodiff)",
             "deterministic": "scan (deterministic)", "probe": "scan (explicit, probe S=1)",
             "exact": "scan (explicit, exact)"}
    runners, mems = {}, {}
    for key, backend, mode, method, gradient in plan:
        if key in wanted:
            runners[names[key]], mems[names[key]] = build_jax(shape, backend, mode, method, gradient=gradient,
                                                              prng=args.prng)
    sweep_name = f"sweep of {args.sweep_size} (implicit, one vmapped step)"
    if "sweep" in wanted:
        runners[sweep_name], mems[sweep_name] = build_jax(shape, args.sweep_backend, "implicit", prng=args.prng,
                                                          sweep=args.sweep_size)
    for name, t in time_interleaved(runners, args.repeats).items():
        rows[name] = (t, mems[name])
    torch_t = rows.get("pytorch eager (implicit)", (None,))[0]
    scan_t = rows.get("scan (implicit)", (None,))[0]
    print(f"shape {args.shape}: {shape}; median of {args.repeats} train steps; prng {args.prng}; "
          f"device {jax.devices()[0].device_kind}")
    print("| variant | median step (s) | vs scan (implicit) | speed-up vs PyTorch | XLA temp memory (MiB) |")
    print("|---|---|---|---|---|")
    out = {"shape": args.shape, **shape, "repeats": args.repeats, "prng": args.prng, "device": jax.devices()[0].device_kind, "rows": {}}
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
