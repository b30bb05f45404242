"""Command-line entry points. `nrnn-train` only parses flags and calls `train_and_evaluate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from .config import NRNNConfig, Sweep, TrainConfig
from .data import load_dataset
from .runs import read_run_config, read_run_sweep
from .tables import format_table
from .train import train_and_evaluate


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip()) if text.strip() else ()

    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip=()) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        kwargs: dict = {"default": None, "dest": f"{cls.__name__}.{f.name}", "metavar": f.name.upper()}
        default = f.default
        if origin is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
            kwargs.pop("metavar")
        elif origin is tuple:
            elem = typing.get_args(hint)[0]
            kwargs["type"] = _parse_tuple(elem)
            default = ",".join(str(v) for v in default)
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # Optional[str]
            kwargs["type"] = str
        group.add_argument(_flag(f.name), help=f"(default: {default})", **kwargs)


def _collect(args, cls) -> dict:
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nrnn-train",
        description="Train a noisy Lipschitz RNN (deterministic, implicit noise injection or explicit "
                    "penalty) and write a run directory: config.json, metrics.jsonl, summary.json, "
                    "checkpoints/.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<dataset>-<mode>-<time>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its latest checkpoint, with its own config")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    par = parser.add_argument_group("sweeps and devices")
    par.add_argument("--sweep-seeds", type=_parse_tuple(int), default=None, metavar="S1,S2,...",
                     help="train these seeds at once (one vmapped step); --seed then sets only the data order")
    par.add_argument("--sweep-eps-add", type=_parse_tuple(float), default=None, metavar="E1,E2,...",
                     help="additive noise level of each sweep member")
    par.add_argument("--sweep-eps-mult", type=_parse_tuple(float), default=None, metavar="E1,E2,...",
                     help="multiplicative noise level of each sweep member")
    par.add_argument("--devices", type=int, default=None,
                     help="data-parallel over this many devices (the batch is split across them)")
    par.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() first (several hosts; set up by the cluster's "
                          "environment variables or launcher)")
    from .presets import PRESETS

    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="start from a named preset of the public pixel-MNIST runs (nrnn_jax.presets; needs "
                             "--dataset mnist_pixel or mnist_permuted); other flags override its fields: "
                             + "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items()))
    parser.add_argument("--data-option", action="append", default=None, metavar="NAME=VALUE",
                        help="an option of the data set's loader (repeatable), e.g. pixel_scale=raw, permutation=numpy")
    _add_dataclass_flags(parser, TrainConfig, "training", skip=("data_options",))
    _add_dataclass_flags(parser, NRNNConfig, "model (input_dim and num_classes default to the data set's)")
    args = parser.parse_args(argv)

    try:
        if args.distributed:
            import jax

            jax.distributed.initialize()
        if args.resume is not None:
            mcfg, tcfg = read_run_config(args.resume)
            sweep = read_run_sweep(args.resume)
            data = load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))
            run_dir = args.resume
        else:
            sweep = None
            if any(v is not None for v in (args.sweep_seeds, args.sweep_eps_add, args.sweep_eps_mult)):
                sweep = Sweep(seeds=args.sweep_seeds or (0,), eps_add=args.sweep_eps_add, eps_mult=args.sweep_eps_mult)
            train_kw, model_kw = _collect(args, TrainConfig), _collect(args, NRNNConfig)
            if args.preset is not None:
                from .presets import get_preset

                p_mcfg, p_tcfg = get_preset(args.preset, train_kw.get("dataset", "mnist_pixel"))
                train_kw = {**p_tcfg.to_dict(), **train_kw}
                model_kw = {**p_mcfg.to_dict(), **model_kw}
            if args.data_option:
                pairs = [o.split("=", 1) for o in args.data_option]
                if any(len(pair) != 2 for pair in pairs):
                    raise ValueError(f"--data-option={args.data_option} is invalid: expected NAME=VALUE.")
                train_kw["data_options"] = {**dict(train_kw.get("data_options", ())), **dict(pairs)}
            tcfg = TrainConfig(**train_kw)
            data = load_dataset(tcfg.dataset, tcfg.data_dir, **dict(tcfg.data_options))
            for name, value in (("input_dim", data.input_dim), ("num_classes", data.num_classes)):
                model_kw.setdefault(name, value)
            mcfg = NRNNConfig(**model_kw)
            run_dir = args.out or Path("runs") / f"{tcfg.dataset}-{tcfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train_and_evaluate(mcfg, tcfg, run_dir, data=data, progress=not args.no_progress,
                                    resume=args.resume is not None, overwrite=args.overwrite, sweep=sweep,
                                    devices=args.devices)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nrnn-train: error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    rows = [s] if "members" not in s else [{"mode": s["mode"], **m} for m in s["members"]]
    cols = (["mode"] + (["seed", "eps_add", "eps_mult"] if "members" in s else []) + ["test_acc"]
            + [k for k in rows[0] if k.startswith("test_acc_white")] + ["val_acc"])
    print(format_table(rows, cols))
    print(f"training time: {s['train_time_s']:.1f} s")
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())


def compare_main(argv: list[str] | None = None) -> int:
    """`nrnn-compare`: deterministic vs implicit vs explicit, trained and analysed (see nrnn_jax.compare)."""
    from .compare import CompareConfig, run_compare

    parser = argparse.ArgumentParser(
        prog="nrnn-compare",
        description="Train deterministic, implicit (noise injection) and explicit (penalty) models for each seed, "
                    "choose explicit's λ on validation, and measure robustness, flatness, margins and stability. "
                    "Writes OUT/<mode>/<run>/, OUT/summary.json, OUT/results.md and PNG plots.")
    from .presets import PRESETS

    parser.add_argument("--dataset", default="ecg5000")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="model, training and data settings of a named preset of the public pixel-MNIST runs "
                             "(with --dataset mnist_pixel or mnist_permuted; noisy presets only): "
                             + "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items()))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=_parse_tuple(int), default=(0, 1, 2), help="comma-separated (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="override the data set's default")
    parser.add_argument("--lambdas", type=_parse_tuple(float), default=None, help="explicit λ grid, comma-separated")
    parser.add_argument("--backend", choices=("scan", "diffrax"), default="scan")
    parser.add_argument("--analysis-examples", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        cc = CompareConfig(dataset=args.dataset, data_dir=args.data_dir, preset=args.preset, seeds=args.seeds,
                           epochs=args.epochs,
                           lambdas=args.lambdas, backend=args.backend, analysis_examples=args.analysis_examples)
        summary = run_compare(cc, args.out)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nrnn-compare: error: {e}", file=sys.stderr)
        return 2
    print((args.out / "results.md").read_text())
    print(f"written: {args.out}/summary.json, results.md, robustness.png, hessian.png, margins.png, stability.png "
          f"({summary['time_s']:.0f} s)")
    return 0


def robustness_main(argv: list[str] | None = None) -> int:
    """`nrnn-robustness RUN_DIR ...`: test accuracy of saved runs under a perturbation of several strengths."""
    from .analysis import KINDS, robustness_curve
    from .runs import load_run, load_run_dataset

    parser = argparse.ArgumentParser(prog="nrnn-robustness",
                                     description="Accuracy of saved runs against perturbation strength (docs/theory.md §6).")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="white")
    parser.add_argument("--strengths", type=_parse_tuple(float), default=(0.0, 0.5, 1.0))
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    try:
        for run_dir in args.run_dirs:
            mcfg, tcfg = read_run_config(run_dir)
            x, y = load_run_dataset(run_dir).split(args.split)
            accs = robustness_curve(load_run(run_dir), x, y, args.kind, args.strengths, seed=args.seed)
            rows.append({"run": str(run_dir), "mode": tcfg.mode, **{f"{args.kind} {s:g}": float(a)
                                                                  for s, a in zip(args.strengths, accs)}})
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nrnn-robustness: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, ["run", "mode"] + [f"{args.kind} {s:g}" for s in args.strengths]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
