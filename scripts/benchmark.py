"""Train-step benchmark: median step time of each backend and mode, as ratios measured in one run.

    python scripts/benchmark.py --shape paper      # T = 784, hidden 128, batch 128 (pixel MNIST)
    python scripts/benchmark.py --shape ecg        # T = 140, hidden 64, batch 64 (ECG5000)
    python scripts/benchmark.py --shape small      # T = 28, hidden 32, batch 32

Variants: eager PyTorch on the same recurrence (skipped with a message if torch is absent), the scan and
diffrax backends in implicit mode (noise injection), deterministic, and explicit training with the probe
(S = 1) and exact regularizers. Reports the median of `--repeats` steps after compilation, ratios against
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

from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, init_train_state, make_optimizer, make_train_step

SHAPES = {
    "paper": dict(T=784, hidden=128, batch=128, input_dim=1, num_classes=10, dt=0.03),
    "ecg": dict(T=140, hidden=64, batch=64, input_dim=1, num_classes=2, dt=0.1),
    "small": dict(T=28, hidden=32, batch=32, input_dim=28, num_classes=10, dt=0.1),
}


def time_jax(shape: dict, backend: str, mode: str, repeats: int, reg_method: str = "probe", eps=(0.02, 0.02)):
    mcfg = NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                      dt=shape["dt"], eps_add=eps[0], eps_mult=eps[1], backend=backend)
    tcfg = TrainConfig(mode=mode, lr=1e-3, reg_method=reg_method, num_probes=1)
    model = NoisyRNN(mcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(tcfg, 100)
    state = init_train_state(params, tx, seed=0)
    step = make_train_step(graphdef, tx, tcfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape["batch"], shape["T"], shape["input_dim"])).astype(np.float32)
    y = rng.integers(0, shape["num_classes"], shape["batch"]).astype(np.int32)
    mask = np.ones(shape["batch"], np.float32)
    compiled = step.lower(state, x, y, mask).compile()
    mem = compiled.memory_analysis()
    temp_mb = None if mem is None else getattr(mem, "temp_size_in_bytes", 0) / 2**20
    state, m = step(state, x, y, mask)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, x, y, mask)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp_mb


def time_torch(shape: dict, repeats: int, eps=(0.02, 0.02)):
    """Eager PyTorch, the same Euler–Maruyama recurrence with noise injection, Adam."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    d, n, T, B, C, dt = shape["hidden"], shape["input_dim"], shape["T"], shape["batch"], shape["num_classes"], shape["dt"]
    beta, gamma = 0.75, 0.001
    enc, dec = torch.nn.Linear(n, d), torch.nn.Linear(d, C)
    MA = torch.nn.Parameter(torch.randn(d, d) * 0.1 / d)
    MW = torch.nn.Parameter(torch.randn(d, d) * 0.1 / d)
    params = [MA, MW, *enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    eye = torch.eye(d)
    x = torch.randn(B, T, n)
    y = torch.randint(0, C, (B,))

    def step():
        A = beta * (MA - MA.T) + (1 - beta) * (MA + MA.T) - gamma * eye
        W = beta * (MW - MW.T) + (1 - beta) * (MW + MW.T) - gamma * eye
        z = enc(x)
        h = torch.zeros(B, d)
        for k in range(T):
            f = h @ A.T + torch.tanh(h @ W.T + z[:, k])
            h = h + dt * f + (dt**0.5) * (eps[0] + eps[1] * h) * torch.randn(B, d)
        loss = torch.nn.functional.cross_entropy(dec(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
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
    parser.add_argument("--variants", default="torch,scan,diffrax,deterministic,probe,exact",
                        help="comma-separated subset of torch,scan,diffrax,deterministic,probe,exact")
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
    plan = [("scan", "scan", "implicit", "probe"), ("diffrax", "diffrax", "implicit", "probe"),
            ("deterministic", "scan", "deterministic", "probe"), ("probe", "scan", "explicit", "probe"),
            ("exact", "scan", "explicit", "exact")]
    names = {"scan": "scan (implicit)", "diffrax": "diffrax (implicit)", "deterministic": "scan (deterministic)",
             "probe": "scan (explicit, probe S=1)", "exact": "scan (explicit, exact)"}
    for key, backend, mode, method in plan:
        if key in wanted:
            rows[names[key]] = time_jax(shape, backend, mode, args.repeats, method)
    torch_t = rows.get("pytorch eager (implicit)", (None,))[0]
    scan_t = rows.get("scan (implicit)", (None,))[0]
    print(f"shape {args.shape}: {shape}; median of {args.repeats} train steps; device {jax.devices()[0].device_kind}")
    print("| variant | median step (s) | vs scan (implicit) | speed-up vs PyTorch | XLA temp memory (MiB) |")
    print("|---|---|---|---|---|")
    out = {"shape": args.shape, **shape, "repeats": args.repeats, "device": jax.devices()[0].device_kind, "rows": {}}
    for name, (t, mem) in rows.items():
        vs_scan = f"{t / scan_t:.2f}x" if scan_t else ""
        vs_torch = f"{torch_t / t:.2f}x" if torch_t else ""
        print(f"| {name} | {t:.4f} | {vs_scan} | {vs_torch} | {'' if mem is None else f'{mem:.1f}'} |")
        out["rows"][name] = {"median_s": t, "temp_mib": mem}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")
    out["peak_rss_mib"] = peak
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
