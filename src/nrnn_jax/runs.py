"""Run directories: what `train_and_evaluate` / `nrnn-train` write, and how a run is read back.

    RUN/config.json        {"model": NRNNConfig, "train": TrainConfig, ["sweep": Sweep], "dataset": text}
    RUN/metrics.jsonl      one JSON record per finished epoch
    RUN/summary.json       final metrics (a sweep: one entry per member)
    RUN/checkpoints/       orbax checkpoints of {"state": TrainState, "sums": metric sums}
    RUN/tensorboard/       TensorBoard event files of the epoch records (`nrnn_jax.metrics_log`; a sweep:
                           one sub-directory per member), unless TrainConfig(tensorboard=False)

`load_run(run_dir)` returns the trained model; `read_run_config`, `read_run_sweep` and `load_run_dataset`
return its configuration, sweep and data set. `start_run` and `resume_run` are the loop's side of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flax import nnx

from . import checkpoint
from .config import NRNNConfig, Sweep, TrainConfig
from .data import Dataset, load_dataset
from .model import NoisyRNN
from .state import TrainState, init_model_state, init_sweep_states, make_optimizer, metric_names, unstack, zero_sums
from .validation import fail


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def start_run(run_dir: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Create a fresh run directory holding `config` (refused if it already holds a run, unless `overwrite`)."""
    if (run_dir / "config.json").exists() and not overwrite:
        raise ValueError(f"run_dir={str(run_dir)!r} already holds a run; resume it (resume=True, "
                         "nrnn-train --resume) or pass overwrite=True (--overwrite) to replace it.")
    if (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config)
    (run_dir / "metrics.jsonl").write_text("")


def resume_run(run_dir: Path, config: dict[str, Any], state: TrainState, sums: dict):
    """(state, sums, history) restored from the latest checkpoint of `run_dir`, which must have been made
    with the same configuration; records of epochs after that checkpoint are dropped (they are redone)."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it holds no run ({path} is missing).")
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(config))  # as it would be written (tuples become lists)
    defaults = {"model": NRNNConfig().to_dict(), "train": json.loads(json.dumps(TrainConfig().to_dict()))}
    for part in ("model", "train", "sweep"):
        # fields added to the library after the run was written take their defaults
        old = {**defaults.get(part, {}), **saved[part]} if part in saved else {}
        new = wanted.get(part, {})
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"Cannot resume {str(run_dir)!r}: it was made with a different {part} "
                             f"configuration (fields differing: {diff}). Use the same settings or a new run_dir.")
    if checkpoint.latest_step(run_dir / "checkpoints") is None:
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it has no checkpoint yet; start it afresh with "
                         "overwrite=True (--overwrite).")
    restored, step = checkpoint.restore_checkpoint(run_dir / "checkpoints", {"state": state, "sums": sums})
    state = restored["state"] if isinstance(restored["state"], TrainState) else TrainState(*restored["state"])
    history = []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill: that epoch is recomputed
            continue
        if rec["step"] <= step:
            history.append(rec)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return state, restored["sums"], history


def read_run_config(run_dir: str | Path) -> tuple[NRNNConfig, TrainConfig]:
    """The model and training configurations of a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing.")
    cfg = json.loads(path.read_text())
    return NRNNConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"])


def read_run_sweep(run_dir: str | Path) -> Sweep | None:
    """The `Sweep` of a run directory, or None for a single-model run."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    return Sweep.from_dict(cfg["sweep"]) if "sweep" in cfg else None


def load_run_dataset(run_dir: str | Path) -> Dataset:
    """The data set a run was trained on. A relative `data_dir` is taken as given if it exists from here,
    else relative to the run directory's ancestors (where the run was started), so that a run directory
    can be evaluated from another working directory."""
    _, tcfg = read_run_config(run_dir)
    data_dir = tcfg.data_dir
    if data_dir is not None and not Path(data_dir).is_absolute() and not Path(data_dir).exists():
        for parent in Path(run_dir).resolve().parents:
            if (parent / data_dir).exists():
                data_dir = str(parent / data_dir)
                break
    return load_dataset(tcfg.dataset, data_dir)


def load_run(run_dir: str | Path, member: int | None = None) -> NoisyRNN:
    """The trained model of a run directory written by `train_and_evaluate` / `nrnn-train`.

    For a sweep, `member` picks one member (with its own noise levels in its configuration); it is
    required there and must be None for a single-model run."""
    mcfg, tcfg = read_run_config(run_dir)
    sweep = read_run_sweep(run_dir)
    tx = make_optimizer(tcfg, 1)
    if sweep is None:
        if member is not None:
            fail("", "member", member, f"{run_dir} holds a single model, not a sweep")
        graphdef, target = init_model_state(mcfg, tx, tcfg.seed)  # the structure, shapes and dtypes to restore into
    else:
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < sweep.size:
            fail("", "member", member, f"{run_dir} holds a sweep of {sweep.size} models; pass member=0..{sweep.size - 1}")
        graphdef, target = init_sweep_states(mcfg, tx, sweep)
    sums = zero_sums(metric_names(tcfg), None if sweep is None else sweep.size)
    restored, _ = checkpoint.restore_checkpoint(Path(run_dir) / "checkpoints", {"state": target, "sums": sums})
    params = restored["state"].params
    if sweep is None:
        return nnx.merge(graphdef, params)
    model = nnx.merge(graphdef, unstack(params, sweep.size)[member])
    model.cfg = sweep.member_config(mcfg, member)
    return model
