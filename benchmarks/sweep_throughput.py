"""Throughput of a sweep (models trained per minute) on one device, on several devices of one process, and over
several processes joined by `jax.distributed`, measured in one invocation.

    python -m benchmarks.sweep_throughput                                  # ECG5000 if --data-dir has it, else digits
    python -m benchmarks.sweep_throughput --data-dir ../shared/data --members 8 --epochs 2

(from the repository root, with the package installed or `PYTHONPATH=src`; see `benchmarks/__init__.py`)

Each configuration trains the same sweep with `nrnn-train --sweep-seeds` (implicit mode, the members on a
leading axis of one program) in fresh processes, the configurations taking turns `--repeats` times:

- `1 device`: one process, one CPU device (`XLA_FLAGS=--xla_force_host_platform_device_count=1`);
- `N devices`: one process, N CPU devices, each batch split over them (`--devices N`);
- `P processes × D devices`: P processes on this machine with D CPU devices each, joined through a
  coordinator on 127.0.0.1 and gloo (`--coordinator/--num-processes/--process-id`), each batch split over
  all P × D devices.

The time is the training time the run records (`summary.json`'s `train_time_s`, from the first step to the
last: compilation of the first step included, start-up and evaluation of the test split not), median over
repeats; models per minute = members / that time × 60. On a CPU the devices are virtual: N devices share the
host's cores, so more devices than cores cannot train faster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN = [sys.executable, "-c", "import sys; from nrnn_jax.cli import train_main; sys.exit(train_main(sys.argv[1:]))"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def train_time(args: list[str], processes: int, devices: int, out: Path) -> float:
    """Train the sweep `args` with `processes` processes of `devices` CPU devices each into `out`; its recorded
    training time in seconds."""
    flags = args + ["--out", str(out), "--devices", str(processes * devices), "--host-devices", str(devices)]
    if processes == 1:
        procs = [subprocess.Popen(TRAIN + flags, env=_env(devices), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)]
    else:
        port = _free_port()
        procs = [subprocess.Popen(TRAIN + flags + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                                   str(processes), "--process-id", str(i)],
                                  env=_env(devices), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(processes)]
    for i, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"process {i} of {processes} × {devices} devices failed:\n{err[-3000:]}")
    return float(json.loads((out / "summary.json").read_text())["train_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="where ECG5000 is (default: $NRNN_DATA; none: digits)")
    parser.add_argument("--members", type=int, default=8, help="sweep members (seeds)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="N of the one-process N-device configuration")
    parser.add_argument("--processes", type=int, default=2, help="P of the P-process configuration")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    data_dir = args.data_dir or os.environ.get("NRNN_DATA")
    if data_dir and (Path(data_dir) / "ecg5000").exists() or data_dir and any(Path(data_dir).glob("ECG5000*")):
        task = ["--dataset", "ecg5000", "--data-dir", str(data_dir), "--hidden", "64", "--dt", "0.1",
                "--batch-size", "32"]
    else:
        task = ["--dataset", "digits", "--hidden", "32", "--dt", "0.1", "--batch-size", "32"]
    sweep = task + ["--mode", "implicit", "--eps-add", "0.3", "--eps-mult", "0.3", "--epochs", str(args.epochs),
                    "--backend", "scan", "--eval-white-noise=", "--no-progress", "--no-tensorboard",
                    "--sweep-seeds", ",".join(map(str, range(args.members)))]
    if args.devices % args.processes:
        parser.error(f"--devices={args.devices} must be a multiple of --processes={args.processes}")
    configs = [("1 device", 1, 1), (f"{args.devices} devices, one process", 1, args.devices),
               (f"{args.processes} processes × {args.devices // args.processes} devices", args.processes,
                args.devices // args.processes)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, processes, devices) in enumerate(configs):
                times[name].append(train_time(sweep, processes, devices, Path(tmp) / f"run{r}-{i}"))
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    print(f"\nsweep of {args.members} members, {args.epochs} epochs ({task[1]}), {os.cpu_count()} host cores; "
          f"median of {args.repeats}\n")
    print("| configuration | training time | models per minute | / 1 device |\n|---|---|---|---|")
    base = statistics.median(times["1 device"])
    rows = []
    for name, _, _ in configs:
        t = statistics.median(times[name])
        rows.append({"configuration": name, "train_time_s": t, "models_per_minute": args.members / t * 60,
                     "speedup": base / t, "times": times[name]})
        print(f"| {name} | {t:.2f} s | {args.members / t * 60:.1f} | {base / t:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"members": args.members, "epochs": args.epochs, "task": task[1],
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
