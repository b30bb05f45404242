"""Run directories: what `train_and_evaluate` / `nrnn-train` write, and how a run is read back.

    RUN/config.json        {"model": NRNNConfig, "train": TrainConfig, ["sweep": Sweep], "dataset": text}
    RUN/metrics.jsonl      one JSON record per finished epoch
    RUN/summary.json       final metrics (a sweep: one entry per member)
    RUN/checkpoints/       orbax checkpoints of {"state": TrainState, "sums": metric sums}
    RUN/tensorboard/       TensorBoard event files of the epoch records (`nrnn_jax.metrics_log`; a sweep:
                           one sub-directory per member), unless TrainConfig(tensorboard=False)

`load_run(run_dir)` returns the trained model; `read_run_config`, `read_run_sweep` and `load_run_dataset`
return its configuration, sweep and data set. `start_run` and `resume_run` are the loop's side of it.

Reading a run directory imports no code by itself. A run of user code records its import paths
(`recorded_code`: a user cell's `cell_factory`, a user diffusion's `model.diffusion`); they are imported
only when the caller says so (`trust_code=True`, `--trust-code`), otherwise the caller passes the objects
(`cell=`, `diffusion=`) or gets a `ValueError` naming each path before anything is imported. Checkpoints are
arrays read by orbax (no unpickling); the JSON files are data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flax import nnx

from . import checkpoint
from .config import ImportPath, NRNNConfig, Sweep, TrainConfig, _resolve_import_path, _Unimportable
from .data import Dataset, load_dataset
from .model import NoisyRNN
from .state import TrainState, init_model_state, init_sweep_states, make_optimizer, metric_names, unstack, zero_sums
from .validation import fail


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (epoch records and events) in order, skipping a line cut off by a kill."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by the kill: that epoch is recomputed
            continue
    return records


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (a temporary file of this process, then a rename): a reader never sees
    a partial file, also while other processes write the same path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


# Training settings that a resumed run may change: they cannot change what was already trained. `epochs`
# may only grow (the learning-rate decay boundaries are epochs, not fractions of the total, so a longer
# run has the same past); `data_dir` says where the files are now; `eval_batch_size` is memory only (the
# validation loss may move by float rounding); `eval_white_noise` only adds columns to the final summary;
# `checkpoint_every` only says when to save. The new values are recorded in config.json.
RESUMABLE_TRAIN_FIELDS = ("epochs", "data_dir", "eval_batch_size", "eval_white_noise", "checkpoint_every")


def resume_run(run_dir: Path, config: dict[str, Any], state: TrainState, sums: dict):
    """(state, sums, history) restored from the latest checkpoint of `run_dir`, which must have been made
    with the same configuration except for `RESUMABLE_TRAIN_FIELDS` (`epochs` may only grow); records of
    epochs after that checkpoint are dropped (they are redone)."""
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
        free = RESUMABLE_TRAIN_FIELDS if part == "train" else ()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in free)
        if diff:
            raise ValueError(f"Cannot resume {str(run_dir)!r}: it was made with a different {part} "
                             f"configuration (fields differing: {diff}). Use the same settings or a new run_dir.")
    old_epochs, new_epochs = saved["train"].get("epochs", TrainConfig().epochs), wanted["train"]["epochs"]
    if new_epochs < old_epochs:
        raise ValueError(f"Cannot resume {str(run_dir)!r} with epochs={new_epochs}: the run was configured for "
                         f"{old_epochs} epochs, and epochs may only grow on resume.")
    if checkpoint.latest_step(run_dir / "checkpoints") is None:
        raise ValueError(f"Cannot resume {str(run_dir)!r}: it has no checkpoint yet; start it afresh with "
                         "overwrite=True (--overwrite).")
    restored, step = checkpoint.restore_checkpoint(run_dir / "checkpoints", {"state": state, "sums": sums})
    state = restored["state"] if isinstance(restored["state"], TrainState) else TrainState(*restored["state"])
    # epoch records up to the checkpoint; rollback events strictly before it (an event at the checkpoint's own
    # step happened after that checkpoint was written, so it is redone)
    kept = [r for r in _records(run_dir) if r["step"] < step or (r["step"] == step and "event" not in r)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    changed = {k: wanted["train"][k] for k in RESUMABLE_TRAIN_FIELDS if saved["train"].get(k) != wanted["train"][k]}
    if changed:  # record the new settings (other keys, such as the data set's description, are kept)
        write_json(path, {**saved, "train": {**saved["train"], **changed}})
    return state, restored["sums"], [r for r in kept if "event" not in r]


def read_rollbacks(run_dir: Path) -> list[dict[str, Any]]:
    """The divergence rollbacks recorded in a run's metrics.jsonl up to its latest checkpoint (the ones the
    checkpointed optimizer has seen), oldest first."""
    step = checkpoint.latest_step(run_dir / "checkpoints")
    if step is None:
        return []
    return [r for r in _records(run_dir) if r.get("event") == "rollback" and r["step"] < step]


def previous_train_time(run_dir: Path) -> float:
    """The `train_time_s` of the run's summary.json (0 when none was written, e.g. a killed first session)."""
    path = Path(run_dir) / "summary.json"
    return float(json.loads(path.read_text()).get("train_time_s", 0.0)) if path.exists() else 0.0


def _run_json(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing.")
    return json.loads(path.read_text())


def recorded_code(run_dir: str | Path) -> dict[str, str]:
    """The user code a run directory names by import path; reading it imports nothing.

    **Arguments:**

    - `run_dir`: a run directory (its config.json is read as JSON).

    **Returns:** `{field: "module:name"}` with `"cell_factory"` (the factory of a user cell, for a run with
    `model.cell="custom"`) and `"model.diffusion"` (a user diffusion) where the run has them; empty for a run
    of built-in cells and noises, which needs no code of the user's."""
    return _recorded_code(run_dir, _run_json(run_dir))


def _recorded_code(run_dir, saved: dict[str, Any]) -> dict[str, str]:
    model = saved.get("model", {})
    code = {"cell_factory": saved.get("cell_factory") if model.get("cell") == "custom" else None,
            "model.diffusion": model.get("diffusion")}
    for field, path in code.items():
        if path is not None and not isinstance(path, str):
            raise ValueError(f"{Path(run_dir) / 'config.json'}: {field}={path!r} is invalid: expected an import "
                             "path 'module:name'.")
    return {field: path for field, path in code.items() if path is not None}


def _refuse(run_dir, missing: dict[str, str], ways: str | None = None) -> None:
    """The ValueError of recorded user code imported without consent: names each path and the ways forward
    (`ways`; default: the Python API's)."""
    named = ", ".join(f"{field}={path!r}" for field, path in missing.items())
    if ways is None:
        objects = ", ".join("cell=factory" if field == "cell_factory" else "diffusion=sigma" for field in missing)
        ways = (f"pass the code yourself, load_run(run_dir, {objects}), or, if you trust this run directory and "
                "the code it names, import it with trust_code=True")
    raise ValueError(f"{run_dir} names user code by its import path: {named}. Reading a run directory imports "
                     f"no code by itself: {ways}.")


def _unsupplied(run_dir, cell=None, diffusion=None) -> dict[str, str]:
    """The recorded import paths that reading `run_dir` with these objects would import: those of its user
    code not passed as objects (`cell`, `diffusion`)."""
    passed = {"cell_factory": cell, "model.diffusion": diffusion}
    return {field: path for field, path in recorded_code(run_dir).items() if passed[field] is None}


def _consent(run_dir, cell=None, diffusion=None, trust_code: bool = False) -> None:
    """Refuse (`_refuse`, before anything is imported) to read `run_dir` if that would import recorded user
    code the caller neither passed nor trusted."""
    missing = _unsupplied(run_dir, cell, diffusion)
    if missing and not trust_code:
        _refuse(run_dir, missing)


def read_run_config(run_dir: str | Path, diffusion=None, trust_code: bool = False) -> tuple[NRNNConfig, TrainConfig]:
    """The model and training configurations of a run directory, importing nothing unless told to.

    **Arguments:**

    - `run_dir`: a run directory.
    - `diffusion`: the user diffusion σ(h, z) the run was trained with, for a run that has one (refused for a
      run without).
    - `trust_code`: import a user diffusion from the run's recorded import path.

    **Returns:** `(NRNNConfig, TrainConfig)`. A user diffusion that is neither passed nor trusted stays its
    recorded import path, `NRNNConfig.diffusion = ImportPath("module:name")`: the configuration can be read
    and compared, and a model of it is refused. A user cell is `cell="custom"` (its factory:
    `recorded_code`)."""
    cfg = _run_json(run_dir)
    model = dict(cfg["model"])
    recorded = _recorded_code(run_dir, cfg).get("model.diffusion")
    if diffusion is not None:
        if recorded is None:
            fail("", "diffusion", diffusion, f"{run_dir} was trained without a user diffusion; pass none")
        model["diffusion"] = diffusion
    elif recorded is not None:  # a plain string is imported by NRNNConfig; an ImportPath is kept as text
        model["diffusion"] = recorded if trust_code else ImportPath(recorded)
    return NRNNConfig.from_dict(model), TrainConfig.from_dict(cfg["train"])


def _read_train_config(run_dir: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(_run_json(run_dir)["train"])


def read_run_sweep(run_dir: str | Path) -> Sweep | None:
    """The `Sweep` of a run directory, or None for a single-model run."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    return Sweep.from_dict(cfg["sweep"]) if "sweep" in cfg else None


def run_data_dir(run_dir: str | Path, data_dir: str | Path | None = None) -> str | None:
    """Where a run's data is read from: `data_dir` if given (an override, made absolute), else the run's
    stored `data_dir` if it exists, else None ($NRNN_DATA, else ~/.cache/nrnn_jax).

    Runs store an absolute `data_dir` (made absolute when the run starts). A relative one, written by older
    versions, is taken as given if it exists from here, else relative to the run directory's ancestors."""
    if data_dir is not None:
        return str(Path(data_dir).expanduser().resolve())
    tcfg = _read_train_config(run_dir)
    stored = tcfg.data_dir
    if stored is None:
        return None
    path = Path(stored).expanduser()
    if path.exists():
        return str(path.resolve())
    if not path.is_absolute():
        for parent in Path(run_dir).resolve().parents:
            if (parent / path).exists():
                return str(parent / path)
    return None  # moved or on another machine: $NRNN_DATA, else the default directory


def load_run_dataset(run_dir: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """The data set a run was trained on, read from `run_data_dir(run_dir, data_dir)`: `data_dir` overrides
    the run's stored directory; a stored directory that no longer exists falls back to $NRNN_DATA."""
    tcfg = _read_train_config(run_dir)
    where = run_data_dir(run_dir, data_dir)
    try:
        return load_dataset(tcfg.dataset, where, **dict(tcfg.data_options))
    except (FileNotFoundError, ValueError) as e:
        if where is None and tcfg.data_dir is not None:
            raise type(e)(f"{e} (the run's data_dir {tcfg.data_dir!r} does not exist from here; pass "
                          "data_dir= / --data-dir or set $NRNN_DATA)") from None
        raise


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A configuration file for a new run: JSON holding {"model": {...}, "train": {...}} and optionally
    "sweep" (every part optional; a run's own config.json qualifies, its "dataset" description is ignored).
    Fields are checked against the configuration classes. A relative `train.data_dir` is taken relative to
    the file's directory, so that the file means the same from any working directory. A user diffusion named
    in the file is returned as an `ImportPath` (text; nothing is imported)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid JSON ({e}); only JSON is read") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {str(path)!r} must hold a JSON object with keys 'model', 'train', 'sweep'")
    unknown = sorted(set(cfg) - {"model", "train", "sweep", "dataset"})
    if unknown:
        raise ValueError(f"config file {str(path)!r} has unknown key(s) {unknown}; expected 'model', 'train' "
                         "and optionally 'sweep'")
    out = {}
    for part, cls in (("model", NRNNConfig), ("train", TrainConfig), ("sweep", Sweep)):
        if part in cfg:
            if not isinstance(cfg[part], dict):
                raise ValueError(f"config file {str(path)!r}: {part!r} must be a JSON object")
            cls._check_names(cfg[part])
            out[part] = dict(cfg[part])
    if isinstance(out.get("model", {}).get("diffusion"), str):  # the file's text: imported only with consent
        out["model"]["diffusion"] = ImportPath(out["model"]["diffusion"])
    data_dir = out.get("train", {}).get("data_dir")
    if data_dir is not None and not Path(data_dir).expanduser().is_absolute():
        out["train"]["data_dir"] = str((path.resolve().parent / data_dir).resolve())
    return out


def run_cell_factory(run_dir: str | Path, cell=None, trust_code: bool = False):
    """The cell factory a run needs: None for a built-in cell; for a user cell (`cell="custom"`) the given
    `cell`, else, with `trust_code`, the one recorded in config.json, imported (a factory defined in a
    notebook or a script's `__main__` cannot be imported: pass it). Without either, a ValueError names the
    recorded path."""
    saved = _run_json(run_dir)
    name = saved["model"].get("cell", "lipschitz")
    if name != "custom":
        if cell is not None:
            fail("", "cell", cell, f"{run_dir} was trained with the built-in cell {name!r}; pass no cell")
        return None
    if cell is not None:
        return cell
    path = _recorded_code(run_dir, saved).get("cell_factory")
    if path is None:
        fail("", "cell", None, f"{run_dir} was trained with a user cell; pass its factory: load_run(run_dir, cell=factory)")
    if not trust_code:
        _refuse(run_dir, {"cell_factory": path})
    try:
        return _resolve_import_path(path)
    except _Unimportable as e:
        raise ValueError(f"{run_dir} was trained with a user cell ({path}) that cannot be imported from here ({e}); "
                         "pass the same factory: load_run(run_dir, cell=factory)") from None


def load_run(run_dir: str | Path, member: int | None = None, cell=None, diffusion=None,
             trust_code: bool = False) -> NoisyRNN:
    """The trained model of a run directory written by `train_and_evaluate` / `nrnn-train`.

    **Arguments:**

    - `run_dir`: the run directory.
    - `member`: for a sweep, the member to return (with its own noise levels in its configuration); required
      there, and None for a single-model run.
    - `cell`: for a run of a user cell, the factory it was trained with (`train_and_evaluate(..., cell=factory)`).
    - `diffusion`: for a run of a user diffusion, the function σ(h, z) it was trained with.
    - `trust_code`: import the user code the run records (`recorded_code`) instead, for what `cell` /
      `diffusion` do not give. Only for run directories whose code you trust: importing a module runs it.

    **Returns:** the `NoisyRNN` with the checkpoint's parameters. A run of built-in cells and noises needs
    none of `cell`, `diffusion`, `trust_code`; for one with user code that is neither passed nor trusted a
    ValueError names each recorded import path before anything is imported or restored."""
    _consent(run_dir, cell, diffusion, trust_code)
    cell = run_cell_factory(run_dir, cell, trust_code)
    mcfg, tcfg = read_run_config(run_dir, diffusion, trust_code)
    sweep = read_run_sweep(run_dir)
    tx = make_optimizer(tcfg, 1, len(read_rollbacks(Path(run_dir))))  # the optimizer state's structure
    if sweep is None:
        if member is not None:
            fail("", "member", member, f"{run_dir} holds a single model, not a sweep")
        graphdef, target = init_model_state(mcfg, tx, tcfg.seed, cell)  # the structure, shapes and dtypes to restore into
    else:
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < sweep.size:
            fail("", "member", member, f"{run_dir} holds a sweep of {sweep.size} models; pass member=0..{sweep.size - 1}")
        graphdef, target = init_sweep_states(mcfg, tx, sweep, cell)
    sums = zero_sums(metric_names(tcfg), None if sweep is None else sweep.size)
    restored, _ = checkpoint.restore_checkpoint(Path(run_dir) / "checkpoints", {"state": target, "sums": sums})
    params = restored["state"].params
    if sweep is None:
        return nnx.merge(graphdef, params)
    model = nnx.merge(graphdef, unstack(params, sweep.size)[member])
    model.cfg = sweep.member_config(mcfg, member)
    return model
