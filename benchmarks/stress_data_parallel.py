"""Stress test of the data-parallel CPU train step: long trainings, each in a fresh process.

    python -m benchmarks.stress_data_parallel --processes 8 --steps 400          # pixel-MNIST shape, 2 devices
    python -m benchmarks.stress_data_parallel --processes 4 --steps 400 --loop steps --concurrent 2

(from the repository root, with the package installed or `PYTHONPATH=src`)

Each process trains on synthetic data of the pixel-MNIST shape (T 784, input 1, hidden 128,
batch 128, 10 classes) in implicit mode with `devices=--devices` (default 2: one CPU device per core of a
2-core machine, what `devices="auto"` picks there), for `--steps` steps (whole epochs of `--steps-per-epoch`
steps): `--loop train` (the default) through `train_and_evaluate`, `--loop steps` through `make_train_step`
dispatched back to back without waiting, as a hand-written loop does (the host runs ahead of the devices). `--concurrent` processes run at once: a busy machine (another training, a test suite) is where a
step that waits on its threads is most likely to be starved. A process passes when it exits 0 having trained
every step; one that aborts (e.g. XLA:CPU's "Termination timeout for `all reduce ...`", exit 134) or outlives
`--timeout` fails. Prints one line per process and a closing `N passed, M failed` line; exit 1 if any failed.
`--json PATH` writes the per-process results. See docs/xla_cpu_all_reduce.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time
import jax
jax.config.update("jax_num_cpu_devices", {devices})
import numpy as np
import nrnn_jax as nj

T, H, B, spe, epochs = 784, 128, 128, {steps_per_epoch}, {epochs}
rng = np.random.default_rng({seed})
n = B * spe
x = rng.standard_normal((n, T, 1)).astype(np.float32)
y = rng.integers(0, 10, n).astype(np.int32)
xv, yv = x[:B], y[:B]
data = nj.Dataset("stress", x, y, xv, yv, xv, yv, num_classes=10)
mcfg = nj.NRNNConfig(input_dim=1, num_classes=10, hidden=H, dt=0.03, eps_add=0.02, eps_mult=0.02)
tcfg = nj.TrainConfig(mode="implicit", epochs=epochs, batch_size=B, lr=1e-3, eval_white_noise=(), seed={seed})
t0 = time.time()
if "{loop}" == "train":
    r = nj.train_and_evaluate(mcfg, tcfg, data=data, progress=False, log=None, devices={devices})
    steps, loss = r.summary["steps"], r.history[-1]["train_loss"]
else:  # a hand-written loop: steps dispatched back to back, the host running ahead of the devices
    from flax import nnx
    tx = nj.make_optimizer(tcfg, spe)
    graphdef, params = nnx.split(nj.NoisyRNN(mcfg, rngs=nnx.Rngs({seed})))
    batch, replicated = nj.data_parallel_sharding({devices})
    state = jax.device_put(nj.init_train_state(params, tx, {seed}), replicated)
    step = nj.make_train_step(graphdef, tx, tcfg, devices={devices})
    xs = [jax.device_put(a, batch) for a in (x[:B], y[:B], np.ones(B, np.float32))]
    for _ in range(spe * epochs):
        state, metrics = step(state, *xs)
    steps, loss = int(state.step), float(metrics["loss"])
print(json.dumps({{"steps": steps, "wall_s": time.time() - t0, "loss": loss}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--steps", type=int, default=400, help="train steps per process (rounded up to whole epochs)")
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--loop", choices=("train", "steps"), default="train",
                   help="train_and_evaluate, or make_train_step dispatched back to back (default: train)")
    p.add_argument("--concurrent", type=int, default=1, help="processes running at once")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per process")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("processes", "steps", "steps_per_epoch", "devices", "concurrent"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a positive integer")
    epochs = -(-args.steps // args.steps_per_epoch)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results, pending, running = [], list(range(args.processes)), []
    t_start = time.time()
    while pending or running:
        while pending and len(running) < args.concurrent:
            i = pending.pop(0)
            code = WORKER.format(loop=args.loop, devices=args.devices, steps_per_epoch=args.steps_per_epoch, epochs=epochs, seed=i)
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            running.append((i, proc, time.time()))
        time.sleep(0.5)
        for item in list(running):
            i, proc, t0 = item
            timed_out = time.time() - t0 > args.timeout
            if proc.poll() is None and not timed_out:
                continue
            if timed_out:
                proc.kill()
            out, err = proc.communicate()
            running.remove(item)
            rec = {"process": i, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1),
                   "timed_out": timed_out}
            lines = out.strip().splitlines()
            if proc.returncode == 0 and lines:
                rec.update(json.loads(lines[-1]))
            fatal = [ln for ln in err.splitlines() if ln.startswith("F") and "rendezvous" in ln]
            rec["ok"] = proc.returncode == 0 and rec.get("steps") == epochs * args.steps_per_epoch
            rec["error"] = (fatal[0][:300] if fatal else err.strip().splitlines()[-1][:300]) if not rec["ok"] and err.strip() else None
            results.append(rec)
            print(f"process {i}: {'ok' if rec['ok'] else 'FAILED'}  exit {proc.returncode}  {rec['wall_s']} s"
                  + (f"  steps {rec['steps']}" if "steps" in rec else "")
                  + (f"  {rec['error']}" if rec["error"] else ""), flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{args.processes} processes x {epochs * args.steps_per_epoch} steps ({args.loop} loop), devices {args.devices}, "
          f"{args.concurrent} at once, {time.time() - t_start:.0f} s")
    print(f"{passed} passed, {len(results) - passed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
