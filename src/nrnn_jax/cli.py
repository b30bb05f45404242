"""Command-line entry points. `nrnn-train` only parses flags and calls `train_and_evaluate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from .config import NRNNConfig
from .data import load_dataset
from .train import TrainConfig, read_run_config, train_and_evaluate

_AUTO_FROM_DATA = ("input_dim", "num_classes")


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


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (floats shown with 4 decimals)."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


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
    _add_dataclass_flags(parser, TrainConfig, "training")
    _add_dataclass_flags(parser, NRNNConfig, "model (input_dim and num_classes default to the data set's)")
    args = parser.parse_args(argv)

    try:
        if args.resume is not None:
            mcfg, tcfg = read_run_config(args.resume)
            run_dir = args.resume
        else:
            tcfg = TrainConfig(**_collect(args, TrainConfig))
            model_kw = _collect(args, NRNNConfig)
            data = load_dataset(tcfg.dataset, tcfg.data_dir)
            for name, value in (("input_dim", data.input_dim), ("num_classes", data.num_classes)):
                model_kw.setdefault(name, value)
            mcfg = NRNNConfig(**model_kw)
            run_dir = args.out or Path("runs") / f"{tcfg.dataset}-{tcfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        data = load_dataset(tcfg.dataset, tcfg.data_dir)
        result = train_and_evaluate(mcfg, tcfg, run_dir, data=data, progress=not args.no_progress,
                                    resume=args.resume is not None, overwrite=args.overwrite)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nrnn-train: error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    cols = ["mode", "test_acc"] + [k for k in s if k.startswith("test_acc_white")] + ["val_acc", "train_time_s"]
    print(format_table([s], cols))
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
