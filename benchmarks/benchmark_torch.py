"""Eager-PyTorch baseline of benchmarks/benchmark.py: the train step of `NoisyRNN` (implicit mode, noise injection)
written as a PyTorch user would, in several formulations.

The recurrence is the one of `nrnn_jax.schemes.EulerMaruyama.step` under the defaults (convention "sde", solver "euler",
noise_kind "diagonal"): Euler–Maruyama

    h_{k+1} = h_k + δ f(h_k, x_k) + √δ σ(h_k) ξ_k,   σ(h) = ε_add I + ε_mult diag(h),   ξ_k ~ N(0, I) (B, d),
    f(h, x) = α A h + tanh(W h + U x + b),   A, W = β (M − Mᵀ) + (1 − β)(M + Mᵀ) − γ I  from M_A, M_W,

h_0 = 0, loss = cross-entropy of a linear decoder of h_T, Adam (lr 1e-3), float32, on CUDA if present.

`--variant` (a base, then optional modifiers joined with "-"):

- `loop-enc` (the default): the encoder applied to `x[:, k]` inside the loop (T small Linear calls instead
  of one batched call); each step's input and its gradient are (B, d): linear in T.
- `unbind`: `z = enc(x)` once for all steps, `for z_k in z.unbind(1)`; each step reads its own (B, d) view,
  and the backward stacks the T slices' gradients once: also linear in T.
- `slice`: the formulation the benchmark used before: `z = enc(x)` once and `z[:, k]` in the loop. Autograd's
  backward of each basic-indexing slice allocates and accumulates a full (B, T, d) gradient, so the backward
  costs O(T²): kept only to show that cost, never a fair baseline.
- modifier `prenoise`: all the noise in one `torch.randn(T, B, d)` before the loop (default: one
  `torch.randn(B, d)` per step, as in the loop of a typical implementation).
- modifier `fused`: one product h @ [A; W]ᵀ per step (what the JAX code does) instead of two.

Why `loop-enc` is the default: on the 2-core CPU of the measurements (shared with another job at the time)
it was the fastest and the steadiest formulation at the paper shape (T 784, d 128, B 128: 0.37 s per step,
every step within 0.36–0.48 s, glibc's default allocator) and the smallest in memory (RSS growth 400 MiB);
`unbind` had steps from 0.6 s to 10 s in the same run (it keeps the (B, T, d) encoder output and its
(B, T, d) gradient alive; the cause of the spread was not isolated, the machine being shared), `-prenoise`
made no difference beyond noise, and `unbind-fused` (0.40–0.49 s on its good steps) did not beat it. Run
`python -m benchmarks.benchmark_torch --compare` (from the repository root) to measure every formulation, each in
a fresh process.

Memory: the peak resident set size of the worker process (`ru_maxrss`), and its growth over the RSS just
before the first train step (after the model, data and PyTorch itself are loaded): the latter is the
activation memory of a step plus allocator slack, comparable in kind (not exactly) to XLA's temporary memory.

glibc's allocator: `--malloc tuned` runs the worker with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
MALLOC_TOP_PAD_ raised (memory is kept instead of returned to the system and re-faulted on every step). It
was what made the old quadratic `slice` baseline tolerable (13.7 s -> 4.0 s per step); for the linear
formulations it did not help in the one measurement made (every variant 10-30 s per step, but the machine's
load rose from 2.6 to 5 during that run, so the comparison is confounded), so the default is `--malloc default`.
(glibc ignores an mmap threshold above 32 MiB, so `tuned` leaves larger blocks mmapped.) `--malloc keep` gives
the worker the settings `nrnn_jax.host.configure()` gives the JAX process (nrnn_jax/host.py: one arena, no
per-block mmap, 2 GiB kept at the heap's top), as GLIBC_TUNABLES.

Threads: `--threads 1` pins PyTorch to one intra-op thread. With PyTorch's default (2 threads on the 2-core
machine) and another job running, single steps took anywhere from 0.4 s to 13 s at T 784 (its threads wait
on each other at every small op); with one thread the steps were steady (0.47-0.48 s at T 784, 0.118 s at
T 196). At a lower load (1.7-2.9), two threads gave 0.37 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BASES = ("unbind", "loop-enc", "slice")
MODIFIERS = ("prenoise", "fused")
DEFAULT_VARIANT = "loop-enc"
COMPARE_VARIANTS = ("loop-enc", "loop-enc-prenoise", "unbind", "unbind-prenoise", "unbind-fused")
SHAPE_KEYS = ("T", "hidden", "batch", "input_dim", "num_classes", "dt")
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000",
                "MALLOC_TOP_PAD_": "1000000000"}
MALLOC_CHOICES = ("default", "tuned", "keep")


def malloc_env(malloc: str) -> dict:
    """The environment variables of a worker with these glibc allocator settings. "keep": the settings
    `nrnn_jax.host.configure()` gives glibc's malloc (`nrnn_jax.host.GLIBC_TUNABLES`), at process start."""
    if malloc == "keep":
        from nrnn_jax.host import GLIBC_TUNABLES
        return {"GLIBC_TUNABLES": GLIBC_TUNABLES}
    return TUNED_MALLOC if malloc == "tuned" else {}


def parse_variant(name: str):
    for base in sorted(BASES, key=len, reverse=True):
        if name == base or name.startswith(base + "-"):
            mods = set(filter(None, name[len(base):].split("-")))
            if not mods <= set(MODIFIERS):
                break
            return base, mods
    raise ValueError(f"unknown PyTorch variant {name!r}: a base in {BASES} then optional modifiers "
                     f"{MODIFIERS} joined with '-'")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_torch_step(T: int, hidden: int, batch: int, input_dim: int, num_classes: int, dt: float,
                     variant: str = DEFAULT_VARIANT, eps=(0.02, 0.02), alpha=1.0, beta=0.75, gamma=0.001,
                     threads: int = 0):
    """One formulation's train step, warmed up: (run_one() -> seconds of one synchronised step, memory() ->
    dict of peak RSS, RSS growth since before the first step, threads, device); None if torch is absent.
    `threads` > 0: torch.set_num_threads(threads) (0: PyTorch's default, one per core)."""
    try:
        import torch
    except ImportError:
        return None
    if threads > 0:
        torch.set_num_threads(threads)
    base, mods = parse_variant(variant)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    d, n, B, C = hidden, input_dim, batch, num_classes
    enc, dec = torch.nn.Linear(n, d).to(dev), torch.nn.Linear(d, C).to(dev)
    MA = torch.nn.Parameter(torch.randn(d, d, device=dev) * 0.1 / d)
    MW = torch.nn.Parameter(torch.randn(d, d, device=dev) * 0.1 / d)
    opt = torch.optim.Adam([MA, MW, *enc.parameters(), *dec.parameters()], lr=1e-3)
    eye = torch.eye(d, device=dev)
    x = torch.randn(B, T, n, device=dev)
    y = torch.randint(0, C, (B,), device=dev)
    sq = dt ** 0.5
    s_add, s_mult = sq * eps[0], sq * eps[1]  # √δ σ(h) = s_add + s_mult h (diagonal)

    def lipschitz(m):
        return beta * (m - m.T) + (1 - beta) * (m + m.T) - gamma * eye

    def step():
        A, W = lipschitz(MA), lipschitz(MW)
        AT, WT = A.T, W.T
        if "fused" in mods:
            MT = torch.cat([A, W]).T  # (d, 2d): M h = (A h, W h) in one product
        if base == "unbind":
            zs = enc(x).unbind(1)
        elif base == "slice":
            z = enc(x)
        if "prenoise" in mods:
            xis = torch.randn(T, B, d, device=dev).unbind(0)
        h = torch.zeros(B, d, device=dev)
        for k in range(T):
            zk = zs[k] if base == "unbind" else (z[:, k] if base == "slice" else enc(x[:, k]))
            if "fused" in mods:
                p = h @ MT
                f = alpha * p[:, :d] + torch.tanh(p[:, d:] + zk)
            else:
                f = alpha * (h @ AT) + torch.tanh(h @ WT + zk)
            xi = xis[k] if "prenoise" in mods else torch.randn(B, d, device=dev)
            h = h + dt * f + (s_add + s_mult * h) * xi
        loss = torch.nn.functional.cross_entropy(dec(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run_one():
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    def memory():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_rss_mib": peak, "rss_growth_mib": peak - rss0, "device": str(dev),
                "threads": torch.get_num_threads(), "variant": variant}

    rss0 = _rss_mib()
    run_one()  # warm-up
    return run_one, memory


def _serve(shape: dict, variant: str, threads: int) -> int:
    """Worker of `TorchWorker`: build and warm up the step, then for each line on stdin "step" run one step
    and print its seconds, "memory" print the memory dict as JSON; stop at end of input."""
    built = build_torch_step(*(shape[k] for k in SHAPE_KEYS), variant=variant, threads=threads)
    print("none" if built is None else "ready", flush=True)
    if built is None:
        return 0
    run_one, memory = built
    for line in sys.stdin:
        print(run_one() if line.strip() == "step" else json.dumps(memory()), flush=True)
    return 0


class TorchWorker:
    """The eager-PyTorch step in a fresh process (its own allocator settings and peak RSS), driven one step
    at a time, so that a benchmark can interleave its steps with the JAX variants' (each process idles while
    the other runs). `TorchWorker.start(...)` returns None when torch is absent; `run_one()` times one step
    (seconds, measured inside the worker); `memory()`; `close()`."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    @classmethod
    def start(cls, shape: dict, variant: str = DEFAULT_VARIANT, malloc: str = "default", threads: int = 0):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--variant", variant,
               "--shape-json", json.dumps(shape), "--threads", str(threads)]
        env = {**os.environ, **malloc_env(malloc)}
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        worker = cls(proc)
        first = worker._read()
        if first != "ready":
            worker.close()
            if first != "none":
                raise RuntimeError(f"the PyTorch worker failed to start (exit status {proc.returncode})")
            return None
        return worker

    def _read(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
        return line.strip()

    def _ask(self, request: str) -> str:
        self._proc.stdin.write(request + "\n")
        self._proc.stdin.flush()
        answer = self._read()
        if not answer:
            raise RuntimeError(f"the PyTorch worker died (exit status {self._proc.returncode})")
        return answer

    def run_one(self) -> float:
        return float(self._ask("step"))

    def memory(self) -> dict:
        return json.loads(self._ask("memory"))

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default=DEFAULT_VARIANT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape-json", default=json.dumps(dict(T=784, hidden=128, batch=128, input_dim=1,
                                                                 num_classes=10, dt=0.03)))
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="default")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: PyTorch's default; 1 is steady on a shared machine)")
    parser.add_argument("--compare", action="store_true",
                        help="time each formulation of --compare-variants in a fresh worker process and print a table")
    parser.add_argument("--compare-variants", default=",".join(COMPARE_VARIANTS))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = json.loads(args.shape_json)
    if args.serve:
        return _serve(shape, args.variant, args.threads)
    variants = args.compare_variants.split(",") if args.compare else [args.variant]
    for v in variants:
        parse_variant(v)
    print(f"shape {shape}; median of {args.repeats} train steps after one warm-up; malloc {args.malloc}")
    print("| PyTorch variant | median step (s) | steps (s) | peak RSS (MiB) | RSS growth (MiB) |")
    print("|---|---|---|---|---|")
    for v in variants:  # each in a fresh worker process, its steps back to back
        worker = TorchWorker.start(shape, v, args.malloc, args.threads)
        if worker is None:
            print("PyTorch is not installed (pip install torch).", file=sys.stderr)
            return 1
        times = [worker.run_one() for _ in range(args.repeats)]
        m = worker.memory()
        worker.close()
        print(f"| {v} | {statistics.median(times):.4f} | {', '.join(f'{t:.3f}' for t in times)} | "
              f"{m['peak_rss_mib']:.0f} | {m['rss_growth_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
