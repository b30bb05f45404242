"""Train-step time of this checkout against another git revision, in one process, the two taking turns.

    python -m benchmarks.compare_revisions --rev main --shape ecg --repeats 7
    python -m benchmarks.compare_revisions --rev HEAD~3 --shape paper --variants implicit-diffrax,explicit-probe
    python -m benchmarks.compare_revisions --rev HEAD~3 --shape paper --devices 2   # the data-parallel step

(from the repository root, with the package installed or `PYTHONPATH=src`.)

The revision's `src/nrnn_jax` is exported with `git archive` into a temporary directory and imported from there
under another name (the package uses relative imports only; `sys.path` is left alone), so both versions are
compiled and timed in the same
process, alternating step by step: a drift of the machine's speed hits both alike. Prints the median step
time of each variant for both versions, the ratio this/revision, and whether the two give the same loss and
explicit regularizer on the first step (same initialisation and data; a changed numerical result shows up here).
`--clock cpu` times each step by this process's CPU time instead of wall time: on a machine loaded by other
work it is what the step itself costs (wall time then measures the share of the cores it got).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks.benchmark import SHAPES, time_interleaved  # the shapes; the variants take turns

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (backend, mode, reg_method)
    "implicit-diffrax": ("diffrax", "implicit", "probe"),
    "implicit-scan": ("scan", "implicit", "probe"),
    "explicit-probe": ("scan", "explicit", "probe"),
    "explicit-exact": ("scan", "explicit", "exact"),
}


def import_revision(rev: str, where: Path):
    """The package of `rev` imported as `nrnn_jax_rev` from its files in `where`."""
    blob = subprocess.run(["git", "archive", rev, "src/nrnn_jax"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(where, filter="data")
    package = where / "src" / "nrnn_jax"
    spec = importlib.util.spec_from_file_location("nrnn_jax_rev", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nrnn_jax_rev"] = module  # its relative imports find their package here
    spec.loader.exec_module(module)
    return module


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_step(nj, shape: dict, backend: str, mode: str, method: str, devices: int | None = None):
    """The compiled train step of package `nj` (either revision) at `shape`, and its fresh state."""
    mcfg = nj.NRNNConfig(input_dim=shape["input_dim"], hidden=shape["hidden"], num_classes=shape["num_classes"],
                         dt=shape["dt"], eps_add=0.02, eps_mult=0.02, backend=backend)
    tcfg = nj.TrainConfig(mode=mode, lr=1e-3, reg_method=method, num_probes=1)
    tx = nj.make_optimizer(tcfg, 100)
    graphdef, params = nnx.split(nj.NoisyRNN(mcfg, rngs=nnx.Rngs(0)))
    return nj.make_train_step(graphdef, tx, tcfg, devices=devices), nj.init_train_state(params, tx, seed=0)


def build(nj, shape: dict, backend: str, mode: str, method: str, devices: int = 1, clock=time.perf_counter):
    step, state = train_step(nj, shape, backend, mode, method, devices)
    if devices > 1:  # the data-parallel step: the state replicated and the batch split over the mesh
        batch, replicated = nj.data_parallel_sharding(devices)
        state = jax.device_put(state, replicated)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape["batch"], shape["T"], shape["input_dim"])).astype(np.float32)
    y = rng.integers(0, shape["num_classes"], shape["batch"]).astype(np.int32)
    mask = np.ones(shape["batch"], np.float32)
    if devices > 1:
        x, y, mask = (jax.device_put(a, batch) for a in (x, y, mask))
    box = [state]
    box[0], metrics = step(box[0], x, y, mask)  # compile; the first step's loss
    first_loss = (float(metrics["loss"]), float(metrics.get("reg", 0.0)))  # reg: explicit mode

    def run():
        t0 = clock()
        box[0], _ = step(box[0], x, y, mask)
        jax.block_until_ready(box[0])
        return clock() - t0

    run()
    return run, first_loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with (e.g. a commit hash)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="ecg")
    parser.add_argument("--variants", default="implicit-diffrax,implicit-scan,explicit-probe")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--devices", type=int, default=1,
                        help="data-parallel over this many devices (make_train_step(devices=n)); more than one needs "
                             "that many CPU devices: nrnn_jax.host.configure() gives one per core (default: 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: wall time per step (default); cpu: this process's CPU time per step")
    args = parser.parse_args(argv)
    if args.devices > 1:
        this_host = importlib.import_module("nrnn_jax.host")
        this_host.configure(devices=args.devices)
    import nrnn_jax as this

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        other = import_revision(args.rev, Path(tmp))
        runners, losses = {}, {}
        for name in args.variants.split(","):
            for label, nj in (("this", this), (args.rev, other)):
                runners[(name, label)], losses[(name, label)] = build(nj, shape, *VARIANTS[name], devices=args.devices,
                                                                  clock=CLOCKS[args.clock])
        medians = {name: statistics.median(ts) for name, ts in time_interleaved(runners, args.repeats).items()}
    print(f"{jax.devices()[0].device_kind} x {args.devices}, shape {args.shape} {shape}, median of {args.repeats} steps, "
          f"versions taking turns, {args.clock} time\n")
    print(f"| variant | this checkout (ms) | {args.rev} (ms) | ratio | first-step (loss, reg) equal |")
    print("|---|---|---|---|---|")
    for name in args.variants.split(","):
        a, b = (medians[(name, lab)] for lab in ("this", args.rev))
        same = losses[(name, "this")] == losses[(name, args.rev)]
        shown = ", ".join(f"{v:.7g}" for v in losses[(name, "this")])
        rel = max(abs(u - v) / max(abs(v), 1e-30) for u, v in zip(losses[(name, "this")], losses[(name, args.rev)]))
        print(f"| {name} | {1e3 * a:.1f} | {1e3 * b:.1f} | {a / b:.3f} | {'yes' if same else f'rel. diff {rel:.1e}'} "
              f"({shown}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
