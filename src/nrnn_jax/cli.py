"""Command-line entry points. `nrnn-train` only parses flags and calls `train_and_evaluate`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
import warnings
from pathlib import Path

from .config import (BACKENDS, FIELD_HELP, MODES, ImportPath, NRNNConfig, Sweep, TrainConfig,
                     import_object, import_path)
from .data import LOADERS, load_dataset
from .errors import RunBusyError, RunDamageWarning, RunWriteError
from .host import DistributedError
from .runs import (RESUMABLE_TRAIN_FIELDS, refuse_code, unsupplied_code, load_run_dataset, read_config_file, read_run_config,
                   read_run_sweep, recorded_code, run_cell_factory, run_data_dir, writer)
from .tables import format_table
from .train import TrainingDiverged, train_and_evaluate


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip()) if text.strip() else ()

    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip=(), defaults=None, only=None,
                         notes=None) -> None:
    """One flag per field of `cls` (or of the fields named in `only`); its help is `FIELD_HELP`, then `notes`'
    text for the field, then the default (`defaults` overrides how a default is described, e.g. "the data
    set's"). The parsed default is None: a flag given is a flag set."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    defaults, notes = defaults or {}, notes or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
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
            default = ",".join(str(v) for v in default) or "none"
        elif hint is bool:  # --name / --no-name
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar")
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # Optional[str]
            kwargs["type"] = str
        text = FIELD_HELP[cls.__name__][f.name]
        if cls is TrainConfig and f.name == "dataset":
            text += "; one of " + ", ".join(LOADERS)
        text += notes.get(f.name, "")
        default = defaults.get(f.name, default)
        group.add_argument(_flag(f.name), help=f"{text} (default: {default})".replace("%", "%%"), **kwargs)


def _collect(args, cls) -> dict:
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _parse_devices(text: str):
    """--devices: 'auto' or a positive integer (also `python -m benchmarks.benchmark --devices`)."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--devices={text!r} is invalid: expected 'auto' or a positive integer")
    return n


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
    """--host-devices / --host-allocator: the process set-up of `nrnn_jax.host.configure`."""
    group = parser.add_argument_group("host set-up (nrnn_jax.host.configure, applied before JAX starts)")
    group.add_argument("--host-devices", default=None, metavar="auto|system|N", type=_parse_host_devices,
                       help="CPU devices: 'auto' one per host core (the data-parallel step splits long-sequence "
                            "batches over them), 'system' JAX's default, or N (default: $NRNN_JAX_HOST_DEVICES, "
                            "else auto)")
    group.add_argument("--host-allocator", default=None, choices=("keep", "system"),
                       help="'keep': glibc's malloc keeps XLA's large freed buffers for reuse; 'system': leave it "
                            "(default: $NRNN_JAX_HOST_MALLOC, else keep)")


def _parse_host_devices(text: str):
    """--host-devices: 'auto', 'system' or a positive integer (checked by `nrnn_jax.host`)."""
    from .host import device_count

    value = int(text) if text.strip().isdigit() else text
    try:
        device_count(value, "--host-devices")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _configure_host(args) -> None:
    """The programs own their process: `host.configure` before any JAX computation. A main called as a
    function inside a program whose JAX has already started (a notebook, a test) leaves the host alone."""
    from . import host

    if host._backends_started():
        return
    host.configure(devices=args.host_devices, allocator=args.host_allocator)


DISTRIBUTED_FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
                     "process_id": "--process-id", "timeout_s": "--distributed-timeout",
                     "heartbeat_timeout_s": "--heartbeat-timeout", "cpu_collectives": "--cpu-collectives"}


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--distributed / --coordinator / --num-processes / --process-id: a multi-process job
    (`nrnn_jax.host.initialize_distributed`; docs/guide/distributed.md)."""
    group = parser.add_argument_group(
        "several processes (jax.distributed; every process runs the same command, training is data-parallel over "
        "all their devices, process 0 writes the files, which must be on a shared filesystem)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process job set up by the launcher's environment (SLURM srun, Open MPI "
                            "mpirun), as jax.distributed.initialize() detects it (default: off)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="a manual launch: the address of process 0 and a free port, where process 0 serves the "
                            "coordinator; needs --num-processes and --process-id (default: none)")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="a manual launch: the number of processes (default: none)")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="a manual launch: this process's id in 0..N-1 (default: none)")
    group.add_argument("--distributed-timeout", dest="timeout_s", type=int, default=300, metavar="SECONDS",
                       help="how long to wait for the coordinator and every process to join (default: %(default)s)")
    group.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=int, default=100, metavar="SECONDS",
                       help="a process whose peer has stopped answering for this long ends, naming it "
                            "(default: %(default)s)")
    group.add_argument("--cpu-collectives", choices=("gloo", "mpi", "none"), default="gloo",
                       help="how CPU devices of different processes exchange data (default: %(default)s)")


def _distributed_settings(args) -> dict | None:
    """The arguments of `host.initialize_distributed` the flags ask for, checked (a ValueError names the flag);
    None for a single process."""
    from .host import check_distributed

    settings = {k: getattr(args, k) for k in DISTRIBUTED_FLAGS}
    if not args.distributed and all(settings[k] is None for k in ("coordinator", "num_processes", "process_id")):
        return None
    check_distributed(**settings, names=DISTRIBUTED_FLAGS)
    return settings


def _start_distributed(settings: dict | None, prog: str) -> None:
    """Join the multi-process job of `settings` (`_distributed_settings`), once per process."""
    from . import host

    if settings is not None:
        host.initialize_distributed(**settings, log=lambda line: print(f"{prog}: {line}", file=sys.stderr))


def _add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on when stderr is a terminal, so that logs hold no bars)")


def _add_preset_flag(parser: argparse.ArgumentParser, text: str) -> None:
    """`--preset NAME`: its help is `text` followed by every preset's one-line description."""
    from .presets import PRESETS

    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help=text + ": " + "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items()))


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


# User code: what the user types (--cell-factory, --diffusion) is imported, with the current directory first on
# the import path, as `python -m` has it (a module next to the user). Import paths read from a run directory
# or a configuration file are imported only with --trust-code, and on the process's own path.
TRUST_CODE_HELP = ("import the user code (a cell factory, a diffusion) that a run directory or configuration file "
                   "names by import path; importing a module runs it, so only for files you trust (default: off; "
                   "built-in cells and noises need no code)")


def _add_trust_code_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


@contextlib.contextmanager
def _current_directory_on_path():
    """The current directory first on `sys.path` for the duration (imports of what the user typed)."""
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        yield
    finally:
        sys.path.remove(here)


def _import_typed(flag: str, path: str):
    """The object of an import path the user typed as `flag` (see `_current_directory_on_path`); a ValueError
    names the flag and the missing module or attribute."""
    with _current_directory_on_path():
        return import_object("", flag, path, searched=f"the current directory {os.getcwd()}, then the Python path",
                            remedy=None)


def _code_flags(fields) -> str:
    return ", ".join(("--cell-factory " if field == "cell_factory" else "--diffusion ") + path
                     for field, path in fields.items())


# Flags that `--resume` applies: they cannot change what was already trained (runs.RESUMABLE_TRAIN_FIELDS, and
# --progress, --devices, --distributed). Every other flag given with --resume must repeat the run's value.
RESUME_APPLIED = (", ".join(_flag(k) for k in RESUMABLE_TRAIN_FIELDS) + ", --progress/--no-progress, --devices, "
                  "--distributed and the other flags of several processes")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nrnn-train",
        description="Train a noisy RNN (a built-in cell, --cell, or a user cell, --cell-factory; deterministic, "
                    "implicit noise injection or explicit penalty) and write a run directory: config.json, "
                    "metrics.jsonl, summary.json, "
                    "checkpoints/. Settings come from the flags, or from --config FILE with the flags "
                    "overriding it. Paths are stored absolute, so a run works from any directory.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<dataset>-<mode>-<time>)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="JSON file {\"model\": {...}, \"train\": {...}, \"sweep\": {...}} (a run's config.json "
                             "works) for a new run; flags given beside it override it; a relative data_dir in it "
                             "is relative to the file (default: none, flags and built-in defaults only)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its latest checkpoint with its own config; "
                             "--epochs N larger than the run's extends it to N epochs (the learning-rate "
                             "decay epochs are absolute, so the first epochs are as before); also applied: "
                             f"{RESUME_APPLIED}; any other flag that differs from the run's is refused "
                             "(default: none, a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out (default: refuse)")
    _add_trust_code_flag(parser)
    _add_progress_flag(parser)
    par = parser.add_argument_group("sweeps and devices")
    par.add_argument("--sweep-seeds", type=_parse_tuple(int), default=None, metavar="S1,S2,...",
                     help="train these seeds at once (one vmapped step); --seed then sets only the data order "
                          "(default: no sweep)")
    par.add_argument("--sweep-eps-add", type=_parse_tuple(float), default=None, metavar="E1,E2,...",
                     help="additive noise level of each sweep member (default: --eps-add for all)")
    par.add_argument("--sweep-eps-mult", type=_parse_tuple(float), default=None, metavar="E1,E2,...",
                     help="multiplicative noise level of each sweep member (default: --eps-mult for all)")
    par.add_argument("--devices", type=_parse_devices, default="auto",
                     help="data-parallel over this many devices, the batch split across them; 'auto': on CPU the "
                          "host's cores where each gets enough work for the split to pay (long sequences), else "
                          "one device (default: auto)")
    _add_preset_flag(parser, "start from a named preset of the public pixel-MNIST runs (nrnn_jax.presets; needs "
                     "--dataset mnist_pixel or mnist_permuted); other flags override its fields (default: none)")
    parser.add_argument("--cell-factory", default=None, metavar="MODULE:NAME",
                        help=CELL_FACTORY_HELP + ". The run records the path; "
                             "--resume imports it again only when given the same --cell-factory or --trust-code. "
                             "Built-in cells: --cell (default: none, the built-in cell of --cell)")
    parser.add_argument("--data-option", action="append", default=None, metavar="NAME=VALUE",
                        help="an option of the data set's loader (repeatable), e.g. pixel_scale=raw, "
                             "permutation=numpy (default: the loader's defaults)")
    _add_dataclass_flags(parser, TrainConfig, "training", skip=("data_options",))
    _add_dataclass_flags(parser, NRNNConfig, "model (input_dim and num_classes default to the data set's)",
                         defaults={"input_dim": "the data set's", "num_classes": "the data set's"})
    _add_host_flags(parser)
    _add_distributed_flags(parser)
    return parser


def _resume_settings(args, train_flags: dict, model_flags: dict, cell=None):
    """(model config, train config, sweep, data, cell factory) of `--resume RUN` with the flags that may change
    applied; a flag that would change the past raises ValueError naming it. The run's user code is what the
    user typed (`cell`, model_flags' diffusion: the run's own paths) or, with --trust-code, its recorded paths;
    without either, a ValueError names the paths before anything is imported."""
    run = args.resume
    if args.config is not None:
        raise ValueError("--config starts a new run; it cannot be combined with --resume (the run has its config)")
    # user code: what the user typed must be the run's own; the rest of the run's recorded code needs --trust-code
    typed = {"cell_factory": cell, "model.diffusion": model_flags.pop("diffusion", None)}
    recorded = recorded_code(run)
    for field, obj in typed.items():
        if obj is not None and import_path(obj) != recorded.get(field):
            flag = "--cell-factory" if field == "cell_factory" else "--diffusion"
            raise ValueError(f"--resume continues {str(run)!r} with its own code; refused: {flag}={import_path(obj)!r} "
                             f"(the run records {field}={recorded.get(field)!r}). Give the run's own path or none.")
    missing = unsupplied_code(run, typed["cell_factory"], typed["model.diffusion"])
    if missing and not args.trust_code:
        refuse_code(run, missing, f"name it yourself on the command line ({_code_flags(missing)}), or, if you trust "
                              "this run directory and the code it names, pass --trust-code")
    mcfg, tcfg = read_run_config(run, typed["model.diffusion"], args.trust_code)
    cell = run_cell_factory(run, cell, args.trust_code)
    sweep = read_run_sweep(run)
    refused = []
    if args.overwrite:
        refused.append("--overwrite")
    if args.out is not None and args.out.resolve() != run.resolve():
        refused.append("--out")
    saved_sweep = sweep or Sweep()
    for flag, given, saved in (("--sweep-seeds", args.sweep_seeds, saved_sweep.seeds),
                               ("--sweep-eps-add", args.sweep_eps_add, saved_sweep.eps_add),
                               ("--sweep-eps-mult", args.sweep_eps_mult, saved_sweep.eps_mult)):
        if given is not None and (sweep is None or tuple(given) != saved):
            refused.append(flag)
    applied = {}
    for k, v in train_flags.items():
        if k in RESUMABLE_TRAIN_FIELDS:
            applied[k] = v
        elif TrainConfig.from_dict({**tcfg.to_dict(), k: v}) != tcfg:
            refused.append(_flag(k))
    for k, v in model_flags.items():
        if mcfg.replace(**{k: v}) != mcfg:
            refused.append(_flag(k))
    if refused:
        raise ValueError(f"--resume continues {str(run)!r} with its own configuration; refused: "
                         f"{', '.join(refused)} (they would change what was already trained; start a new run "
                         f"instead). Applied on resume: {RESUME_APPLIED}.")
    data = load_run_dataset(run, applied.get("data_dir"))
    found = run_data_dir(run, applied.get("data_dir"))
    if found is not None:  # absolute (an older run's relative data_dir is made absolute); a missing one is kept
        applied["data_dir"] = found
    return mcfg, tcfg.replace(**applied), sweep, data, cell


def _new_run_settings(args, train_flags: dict, model_flags: dict):
    """(model config, train config, sweep, data) of a new run: --config FILE, then the flags."""
    file = read_config_file(args.config) if args.config is not None else {}
    train_kw = {**file.get("train", {}), **train_flags}
    model_kw = {**file.get("model", {}), **model_flags}
    named = model_kw.get("diffusion")
    if isinstance(named, ImportPath):  # the file's, not overridden by --diffusion: imported only with consent
        if not args.trust_code:
            raise ValueError(f"config file {str(args.config)!r} names user code by its import path: "
                             f"model.diffusion={str(named)!r}. Reading a configuration file imports no code by itself: "
                             f"name it yourself on the command line (--diffusion {named}), or, if you trust this "
                             "file and the code it names, pass --trust-code.")
        model_kw["diffusion"] = import_object("NRNNConfig", "diffusion", named)
    if "dataset" in train_flags and train_flags["dataset"] != file.get("train", {}).get("dataset", train_flags["dataset"]):
        for name in ("input_dim", "num_classes"):  # another data set: its sizes, unless given as flags
            if name not in model_flags:
                model_kw.pop(name, None)
    sweep_kw = dict(file.get("sweep", {}))
    for name, given in (("seeds", args.sweep_seeds), ("eps_add", args.sweep_eps_add), ("eps_mult", args.sweep_eps_mult)):
        if given is not None:
            sweep_kw[name] = given
    sweep = Sweep(**sweep_kw) if sweep_kw else None
    if args.preset is not None:  # the preset's fields, under the file's and the flags'
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
    return NRNNConfig(**model_kw), tcfg, sweep, data


@contextlib.contextmanager
def _warnings_as_lines(prog: str):
    """Within the block, a `RunDamageWarning` is shown as one line `prog: warning: message` on stderr."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RunDamageWarning):
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


# What the programs report as one line "PROG: error: ..." (exit status 2).
REPORTED_ERRORS = (ValueError, TypeError, FileNotFoundError, RunBusyError, RunWriteError)


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    try:
        with _warnings_as_lines("nrnn-train"), contextlib.ExitStack() as held:
            distributed = _distributed_settings(args)  # checked before anything is done
            _configure_host(args)
            _start_distributed(distributed, "nrnn-train")
            # One writer per run: a run being written, or an --out that cannot be written, is refused here,
            # before any data is read (train_and_evaluate holds the same lock for a run directory named later).
            if (args.resume or args.out) is not None:
                held.enter_context(writer(args.resume or args.out))
            train_flags, model_flags = _collect(args, TrainConfig), _collect(args, NRNNConfig)
            cell = None if args.cell_factory is None else _import_typed("--cell-factory", args.cell_factory)
            if "diffusion" in model_flags:
                model_flags["diffusion"] = _import_typed("--diffusion", model_flags["diffusion"])
            if args.resume is not None:
                mcfg, tcfg, sweep, data, cell = _resume_settings(args, train_flags, model_flags, cell)
                run_dir = args.resume
            else:
                mcfg, tcfg, sweep, data = _new_run_settings(args, train_flags, model_flags)
                run_dir = args.out or Path("runs") / f"{tcfg.dataset}-{tcfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            result = train_and_evaluate(mcfg, tcfg, run_dir, data=data, progress=_progress(args),
                                        resume=args.resume is not None, overwrite=args.overwrite, sweep=sweep,
                                        devices=args.devices, cell=cell)
    except (*REPORTED_ERRORS, DistributedError) as e:
        print(f"nrnn-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # the run's outcome, not a bad setting: its last good checkpoint is kept
        print(f"nrnn-train: error: {e}", file=sys.stderr)
        return 1
    s = result.summary
    rows = [s] if "members" not in s else [{"mode": s["mode"], **m} for m in s["members"]]
    cols = (["mode"] + (["seed", "eps_add", "eps_mult"] if "members" in s else []) + ["test_acc"]
            + [k for k in rows[0] if k.startswith("test_acc_white")] + ["val_acc"])
    print(format_table(rows, cols))
    print(f"training time: {s['train_time_s']:.1f} s")
    print(f"run directory: {run_dir}")
    return 0


CELL_FACTORY_HELP = ("a user cell: the import path of a factory NAME(cfg, rngs=rngs) -> Cell, e.g. a Cell subclass; a "
                     "module in the current directory is found")


# The TrainConfig fields nrnn-compare has a flag for; each sets CompareConfig.train, in every mode.
COMPARE_TRAIN_FLAGS = ("lr", "lr_decay", "lr_decay_epochs", "batch_size", "grad_clip", "on_divergence",
                       "rollback_lr_factor", "rollback_grad_clip", "max_rollbacks")


def compare_parser() -> argparse.ArgumentParser:
    from .compare import DEFAULTS, CompareConfig

    parser = argparse.ArgumentParser(
        prog="nrnn-compare",
        description="Train deterministic, implicit (noise injection) and explicit (penalty) models for each seed, "
                    "choose explicit's λ on validation, and measure robustness, flatness, margins and stability. "
                    "Writes OUT/<mode>/<run>/, OUT/summary.json, OUT/results.md and PNG plots. Every setting is "
                    "checked before training starts; a line per epoch of every run shows the progress.")
    parser.add_argument("--dataset", default="ecg5000",
                        help="the task, one of " + ", ".join(DEFAULTS) + " (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the data files (default: $NRNN_DATA, else ~/.cache/nrnn_jax)")
    _add_preset_flag(parser, "model, training and data settings of a named preset of the public pixel-MNIST runs "
                     "(with --dataset mnist_pixel or mnist_permuted; noisy presets only; default: the data set's)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (required; no default)")
    parser.add_argument("--seeds", type=_parse_tuple(int), default=(0, 1, 2),
                        help="comma-separated seeds, one run per mode each (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the data set's)")
    parser.add_argument("--lambdas", type=_parse_tuple(float), default=None,
                        help="explicit λ grid, comma-separated, chosen on validation (default: the data set's)")
    parser.add_argument("--backend", choices=BACKENDS, default=CompareConfig.backend,
                        help="model backend, as nrnn-train's --backend: diffrax (a diffrax solver on the step grid) "
                             "or scan (the library's own step, same numbers) (default: %(default)s)")
    parser.add_argument("--cell-factory", default=None, metavar="MODULE:NAME",
                        help=CELL_FACTORY_HELP + "; every mode trains it, and --resume reuses runs of the same "
                             "factory (default: none, the built-in cell of --cell)")
    parser.add_argument("--modes", type=_parse_tuple(str.strip), default=MODES, metavar="M1,M2,...",
                        help="the modes to train and measure, out of " + ",".join(MODES) + " (default: all); "
                             "e.g. one process per mode, then a last --resume call over all modes gathers them")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs and measurements already in --out made with the same settings, "
                             "continue interrupted runs from their checkpoints, and do the rest (default: train "
                             "every run afresh)")
    parser.add_argument("--analysis-examples", type=int, default=256,
                        help="training examples for the Hessian, test examples for DeepFool and the "
                             "regularizer (default: %(default)s)")
    parser.add_argument("--curve-examples", type=int, default=None,
                        help="test examples for the robustness curves (default: the whole test split)")
    preset_default = {name: "the data set's or preset's" for name in ("lr", "lr_decay_epochs", "batch_size",
                                                                      "grad_clip")}
    preset_default["lr_decay"] = f"{TrainConfig.lr_decay}, or the preset's"
    _add_dataclass_flags(parser, TrainConfig, "training (every mode; overrides of the data set's or preset's)",
                         only=COMPARE_TRAIN_FLAGS, defaults=preset_default,
                         notes={"on_divergence": "; with --resume a stopped run continues under it and finished "
                                                 "runs are reused"})
    _add_dataclass_flags(parser, NRNNConfig, "model (overrides of the data set's comparison defaults)",
                         skip=("input_dim", "num_classes", "backend"),
                         defaults={f.name: "the data set's" for f in dataclasses.fields(NRNNConfig)
                                   if any(f.name in spec.get("model", {}) for spec in DEFAULTS.values())})
    _add_host_flags(parser)
    _add_distributed_flags(parser)
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    """`nrnn-compare`: deterministic vs implicit vs explicit, trained and analysed (see nrnn_jax.compare)."""
    from .compare import CompareConfig, check_compare_config, run_compare

    args = compare_parser().parse_args(argv)
    try:
        distributed = _distributed_settings(args)  # checked before anything is done
        _configure_host(args)
        _start_distributed(distributed, "nrnn-compare")
        # what the user typed is the only code nrnn-compare imports (a resumed run is loaded with it)
        model = _collect(args, NRNNConfig)
        if "diffusion" in model:
            model["diffusion"] = _import_typed("--diffusion", model["diffusion"])
        cell = None if args.cell_factory is None else _import_typed("--cell-factory", args.cell_factory)
        cc = CompareConfig(dataset=args.dataset, data_dir=args.data_dir, preset=args.preset, seeds=args.seeds,
                           epochs=args.epochs,
                           lambdas=args.lambdas, backend=args.backend, analysis_examples=args.analysis_examples,
                           curve_examples=args.curve_examples, modes=args.modes, model=model, cell_factory=cell,
                           train=_collect(args, TrainConfig))
        check_compare_config(cc)  # before anything is loaded or trained
        summary = run_compare(cc, args.out, resume=args.resume)
    except (*REPORTED_ERRORS, DistributedError) as e:
        print(f"nrnn-compare: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # the run's outcome, not a bad setting: its last good checkpoint is kept
        print(f"nrnn-compare: error: {e}", file=sys.stderr)
        return 1
    import jax

    from . import host

    if not host.is_primary():  # run_compare returns once process 0 has written the outputs
        print(f"process {jax.process_index()}: done; process 0 wrote {args.out}/summary.json, results.md and the plots "
              f"({summary['time_s']:.0f} s)")
        return 0
    print((args.out / "results.md").read_text())
    print(f"written: {args.out}/summary.json, results.md, robustness.png, hessian.png, margins.png, stability.png "
          f"({summary['time_s']:.0f} s)")
    return 0


def robustness_parser() -> argparse.ArgumentParser:
    from .analysis import KINDS

    parser = argparse.ArgumentParser(prog="nrnn-robustness",
                                     description="Accuracy of saved runs against perturbation strength "
                                                 "(docs/theory.md §6).")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (nrnn-train or nrnn-compare)")
    parser.add_argument("--kind", choices=KINDS, default="white", help="perturbation (default: %(default)s)")
    parser.add_argument("--strengths", type=_parse_tuple(float), default=(0.0, 0.5, 1.0),
                        help="comma-separated strengths (default: 0,0.5,1)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="split evaluated (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="read the data from here instead of the runs' stored data_dir (default: the stored "
                             "one if it exists, else $NRNN_DATA, else ~/.cache/nrnn_jax)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here (default: none)")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help="also plot accuracy against strength, one line per run, to FILE (PNG; default: none)")
    _add_trust_code_flag(parser)
    _add_host_flags(parser)
    return parser


def robustness_main(argv: list[str] | None = None) -> int:
    """`nrnn-robustness RUN_DIR ...`: test accuracy of saved runs under a perturbation of several strengths."""
    from .analysis import robustness_curve
    from .runs import load_run

    args = robustness_parser().parse_args(argv)
    rows = []
    cols = [f"{args.kind} {s:g}" for s in args.strengths]
    try:
        for run_dir in args.run_dirs:  # every run's user code, before any work
            missing = unsupplied_code(run_dir)
            if missing and not args.trust_code:
                refuse_code(run_dir, missing, "if you trust this run directory and the code it names, pass --trust-code; "
                                          "or load the run in Python with the objects, nrnn_jax.load_run(run_dir, "
                                          "cell=factory, diffusion=sigma), and use nrnn_jax.analysis.robustness_curve")
        _configure_host(args)
        for run_dir in args.run_dirs:
            mcfg, tcfg = read_run_config(run_dir)
            data = load_run_dataset(run_dir, args.data_dir)
            x, y = data.split(args.split)
            accs = robustness_curve(load_run(run_dir, trust_code=args.trust_code), x, y, args.kind, args.strengths,
                                    seed=args.seed)
            rows.append({"run": str(run_dir), "dataset": data.name, "mode": tcfg.mode,
                         **{c: float(a) for c, a in zip(cols, accs)}})
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nrnn-robustness: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, ["run", "dataset", "mode"] + cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot_robustness(rows, args.strengths, args.kind, args.split, args.plot)
        print(f"plot: {args.plot}")
    return 0


def from_public_parser() -> argparse.ArgumentParser:
    """`nrnn-from-public`: the flags (the public constructor's arguments under its own names, with - or _)."""
    from .interchange import PUBLIC_SOLVERS

    parser = argparse.ArgumentParser(
        prog="nrnn-from-public",
        description="Convert a model saved by the public PyTorch code (erichson/NoisyRNN) into a run directory "
                    "that load_run, nrnn-robustness, the analyses and nrnn-train --resume read (zero epochs; "
                    "summary.json holds its validation and test metrics). Needs PyTorch to read the file (pip "
                    "install torch); no code from the file is run. Layout: docs/theory.md §2.")
    parser.add_argument("file", type=Path, help="the torch.save file: the whole model (the public driver's .pkl) "
                                                "or its state_dict()")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write (required; no default)")
    parser.add_argument("--dataset", required=True,
                        help="the data the model was trained on, one of " + ", ".join(LOADERS) + " (required; no "
                             "default)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the data files (default: $NRNN_DATA, else ~/.cache/nrnn_jax)")
    parser.add_argument("--data-option", action="append", default=None, metavar="NAME=VALUE",
                        help="an option of the data set's loader (repeatable); the public permuted MNIST feeds raw "
                             "pixels: pixel_scale=raw (default: the loader's defaults)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="the model's dtype; float64 needs JAX_ENABLE_X64=1 (default: %(default)s, the public code's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --out (default: refuse)")
    group = parser.add_argument_group(
        "the public constructor's arguments (a whole-model file records all but --init-std, and a flag given must "
        "agree with it; a state-dict file needs --solver, --eps, --beta, --gamma-A, --gamma-W)")
    group.add_argument("--solver", choices=PUBLIC_SOLVERS, default=None,
                       help="noisy: convention 'reference' with the learned step d; base: the fixed step --eps "
                            "(default: the file's; none for a state dict)")
    helps = {"eps": "the step (solver base), the initial value of d (noisy)", "beta": "β in [0, 1]",
             "gamma_A": "γ_A ≥ 0", "gamma_W": "γ_W ≥ 0", "alpha": "α", "init_std": "recorded only",
             "add_noise": "additive noise level (noisy)", "mult_noise": "multiplicative noise level in [0, 1] (noisy)"}
    defaults = {"alpha": "1", "add_noise": "0", "mult_noise": "0"}
    for name, text in helps.items():
        flags = [_flag(name)] + (["--" + name] if "_" in name else [])
        default = ("0.1; no file records it" if name == "init_std" else
                   "the file's; " + (f"{defaults[name]} for a state dict" if name in defaults else "none for a state dict"))
        group.add_argument(*flags, dest=name, type=float, default=None, metavar=name.upper(),
                           help=f"{text} (default: {default})")
    return parser


def from_public_main(argv: list[str] | None = None) -> int:
    """`nrnn-from-public FILE --out RUN --dataset NAME`: a public PyTorch model as a run directory."""
    from .interchange import PUBLIC_ARGS, convert_public_file

    args = from_public_parser().parse_args(argv)
    try:
        pairs = [o.split("=", 1) for o in args.data_option or ()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"--data-option={args.data_option} is invalid: expected NAME=VALUE.")
        model, summary = convert_public_file(args.file, args.out, dataset=args.dataset, data_dir=args.data_dir,
                                             data_options=dict(pairs), overwrite=args.overwrite, dtype=args.dtype,
                                             **{k: getattr(args, k) for k in PUBLIC_ARGS})
    except (*REPORTED_ERRORS, ImportError) as e:
        print(f"nrnn-from-public: error: {e}", file=sys.stderr)
        return 2
    print(format_table([{"convention": model.cfg.convention, **summary}],
                       ["convention", "mode", "dataset", "val_acc", "test_acc"]))
    print(f"run directory: {args.out}")
    return 0


def plot_robustness(rows: list[dict], strengths, kind: str, split: str, path: Path) -> None:
    """Accuracy against strength, one line per run (matplotlib's object API: no global backend is set)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for row in rows:
        ax.plot(strengths, [row[f"{kind} {s:g}"] for s in strengths], marker="o",
                label=f"{row['run']} ({row['mode']}, {row['dataset']})")
    ax.set_xlabel(f"{kind} strength")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(f"robustness to {kind} perturbations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
