"""Implicit vs explicit vs deterministic, end to end (docs/theory.md §4–§6): the experiment behind `nrnn-compare`.

For each seed: a deterministic model, an implicit model (noise injection) and explicit models (the penalty,
same noise levels) for each λ of a small grid, the λ chosen on the validation split (mean of the clean
validation accuracy and the validation accuracies under the white-noise strengths of the selection list);
then, for each selected model, robustness curves on the test split, Hessian flatness on training data,
output and DeepFool margins, the stability certificate and Lyapunov exponent, and the explicit regularizer.

Output layout (a public contract):

    OUT/deterministic/seed<S>/            run directories (load with nrnn_jax.load_run)
    OUT/implicit/seed<S>/
    OUT/explicit/seed<S>-lam<λ>/          one per λ of the grid; the chosen one is in summary.json
    OUT/summary.json                      settings, the examples each measurement uses, per-run measurements,
                                          per-mode mean ± std
    OUT/results.md                        the Markdown table
    OUT/robustness.png, hessian.png, margins.png, stability.png

Each run directory also holds `compare.json`: the run's summary, history and measurements with the settings
they were made under. `run_compare(..., resume=True)` reuses a run whose `compare.json` matches the settings,
continues an interrupted one from its checkpoint, and trains the others; `CompareConfig.modes` restricts a call
to some modes. So a comparison can be split over processes, devices or sessions (one per mode) and then
gathered by a last `resume=True` call over all modes that trains and measures nothing again. (Processes that
share one GPU gain nothing: it time-slices them.)

An explicit model whose training diverges (`TrainingDiverged`: under `on_divergence="raise"`, or after
`max_rollbacks` rollbacks) is left out of the choice of λ and named in summary.json (`lambda_diverged`) and
results.md; the comparison stops with `TrainingDiverged` only when every λ of a seed diverged. A later
`resume=True` call continues a diverged run from its last good checkpoint (e.g. under
`on_divergence="rollback"`).

In a multi-process job (`nrnn_jax.host.initialize_distributed`, `nrnn-compare --coordinator ...`) every process
runs the same sequence of runs, each run data-parallel over the devices of all processes, and measures its own
copy of each trained model; process 0 writes everything above (the others write nothing), so `out` must be on a
filesystem all processes share.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from . import host
from .analysis import (
    certificate,
    hessian_lanczos,
    hessian_trace,
    input_margins,
    lyapunov_exponent,
    output_margins,
    robustness_curve,
)
from .config import BACKENDS, BUILT_IN_CELLS, MODES, NRNNConfig, TrainConfig, import_path
from .data import Dataset, load_dataset
from .evaluate import evaluate, white_noise
from .model import with_noise
from .regularizer import explicit_regularizer
from .runs import DIVERGENCE_POLICY_FIELDS, load_run, write_json
from .tables import format_table
from .train import TrainingDiverged, train_and_evaluate
from .validation import check_choice, check_int, check_int_tuple, check_real, check_real_tuple, fail

# Examples per compiled chunk of the analyses whose memory grows with the examples (the Hessian-vector
# products, the explicit regularizer): about 0.4 GiB each at the pixel-MNIST shape (docs/performance.md).
ANALYSIS_CHUNK = 64

# Defaults per data set: model and training settings (or a named preset of nrnn_jax.presets), robustness curves (white
# noise strengths in units of [0, 1] pixels: scaled by 255 for raw 0–255 inputs), the explicit λ grid and the white
# strengths of its selection. ECG5000: the settings of the README's results.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ecg5000": dict(model=dict(hidden=64, dt=0.1, eps_add=0.3, eps_mult=0.3),
                    train=dict(epochs=40, batch_size=32, lr=3e-3),
                    curves=dict(white=[0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5], multiplicative=[0, 0.5, 1.0, 1.5, 2.0],
                                salt_pepper=[0, 0.05, 0.1, 0.2, 0.3], pgd_linf=[0, 0.05, 0.1, 0.2]),
                    lambdas=[0.5, 1.0, 2.0], select_white=[1.0]),
    "mnist_rows": dict(model=dict(hidden=128, dt=0.3, eps_add=0.1, eps_mult=0.1),
                       train=dict(epochs=10, batch_size=128, lr=3e-3, lr_decay_epochs=(8,), reg_method="probe"),
                       curves=dict(white=[0, 0.1, 0.2, 0.3, 0.4, 0.5], multiplicative=[0, 0.5, 1.0, 1.5],
                                   salt_pepper=[0, 0.05, 0.1, 0.2], pgd_linf=[0, 0.01, 0.02, 0.05]),
                       lambdas=[1.0], select_white=[0.3]),
    # Pixel MNIST: the `nrnn-small` preset (the public "Noisy RNN, small noise" run, docs/theory.md Table 7.1:
    # convention "reference", δ 0.01, ε_add = ε_mult = 0.02, lr 1e-3, 100 epochs, × 0.1 at 90, seed 1; permuted:
    # the public permutation and raw 0–255 pixels). `CompareConfig(preset=...)` picks another preset.
    "mnist_pixel": dict(preset="nrnn-small",
                        curves=dict(white=[0, 0.1, 0.2, 0.3, 0.4], salt_pepper=[0, 0.05, 0.1, 0.2]),
                        lambdas=[1.0], select_white=[0.2]),
    "mnist_permuted": dict(preset="nrnn-small",
                           curves=dict(white=[0, 0.1, 0.2, 0.3, 0.4], salt_pepper=[0, 0.05, 0.1, 0.2]),
                           lambdas=[1.0], select_white=[0.2]),
    "digits": dict(model=dict(hidden=32, dt=0.5, eps_add=0.3, eps_mult=0.3),
                   train=dict(epochs=10, batch_size=32, lr=3e-3),
                   curves=dict(white=[0, 0.2, 0.4, 0.6], salt_pepper=[0, 0.1, 0.2], pgd_linf=[0, 0.05, 0.1]),
                   lambdas=[0.5, 1.0], select_white=[0.4]),
}
DEFAULTS["mnist1d"] = DEFAULTS["digits"]
# CIFAR-10 (docs/theory.md §7): the Lipschitz-RNN-paper sizes, the pixel-MNIST noise levels scaled to the step;
# starting points rather than tuned settings (GPU-sized: 1,024 or 1,000 steps for the pixel and padded views).
_CIFAR_CURVES = dict(white=[0, 0.05, 0.1, 0.2, 0.3], salt_pepper=[0, 0.05, 0.1, 0.2])
DEFAULTS["cifar10_rows"] = dict(model=dict(hidden=128, dt=0.1, eps_add=0.05, eps_mult=0.05),
                                train=dict(epochs=40, batch_size=128, lr=3e-3, lr_decay_epochs=(30,)),
                                curves=_CIFAR_CURVES, lambdas=[1.0], select_white=[0.1])
DEFAULTS["cifar10_pixel"] = dict(model=dict(hidden=128, dt=0.03, eps_add=0.02, eps_mult=0.02),
                                 train=dict(epochs=100, batch_size=128, lr=3e-3, lr_decay_epochs=(90,)),
                                 curves=_CIFAR_CURVES, lambdas=[1.0], select_white=[0.1])
DEFAULTS["cifar10_noise_padded"] = dict(model=dict(hidden=256, dt=0.03, eps_add=0.02, eps_mult=0.02),
                                        train=dict(epochs=100, batch_size=128, lr=3e-3, lr_decay_epochs=(90,)),
                                        curves=_CIFAR_CURVES, lambdas=[1.0], select_white=[0.1])


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison; unset fields take the data set's defaults (`DEFAULTS`).

    `preset`: a name of `nrnn_jax.presets.PRESETS` (for its data sets, "mnist_pixel" / "mnist_permuted"): the
    comparison then uses the preset's model, training and data settings; the implicit and explicit modes
    use the preset's noise (convention and levels), the deterministic mode the same model without noise. A
    noise-free preset (lipschitz, antisymmetric) is refused: there is no noise to compare. `epochs`,
    `lambdas` and `backend` still override.

    `backend`: the model backend, `"diffrax"` by default as for `NRNNConfig` (`"scan"`: the same numbers).
    `cell_factory`: a user cell for every mode, a factory `cell_factory(cfg, rngs=rngs) -> Cell` (as
    `train_and_evaluate(..., cell=)`); the runs record its import path, and reused runs are loaded with it.
    """

    dataset: str = "ecg5000"
    data_dir: str | None = None
    preset: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None
    lambdas: tuple[float, ...] | None = None
    backend: str = "diffrax"
    analysis_examples: int = 256  # training examples for the Hessian; test examples for DeepFool / reg
    lanczos_steps: int = 20
    hutchinson_samples: int = 30
    lyapunov_time: float = 50.0
    track_regularizer: bool = False  # record the explicit regularizer (probe) after every epoch
    curve_examples: int | None = None  # test examples for the robustness curves (None: the whole test split)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # NRNNConfig fields overriding DEFAULTS' model
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig fields overriding the training
    modes: tuple[str, ...] = MODES  # the modes this call trains and measures (summary.json holds those)
    cell_factory: Callable | None = None  # a user cell (None: the built-in cell of model["cell"])


def check_compare_config(cc: CompareConfig) -> "CompareSettings":
    """Validate every setting before anything is loaded or trained and resolve them (`compare_settings`, with
    `cc.model`'s overrides of the model fields). A bad value raises `ValueError` naming it."""
    own = "CompareConfig"
    check_int_tuple(own, "seeds", cc.seeds, 0, nonempty=True)
    if len(set(cc.seeds)) != len(tuple(cc.seeds)):
        fail(own, "seeds", cc.seeds, "expected distinct seeds (each names its run directory)")
    if cc.epochs is not None:
        check_int(own, "epochs", cc.epochs, 1)
    if cc.lambdas is not None:
        check_real_tuple(own, "lambdas", cc.lambdas, 0.0, nonempty=True)
    check_choice(own, "backend", cc.backend, BACKENDS)
    for name in ("analysis_examples", "lanczos_steps", "hutchinson_samples"):
        check_int(own, name, getattr(cc, name), 1)
    check_real(own, "lyapunov_time", cc.lyapunov_time, 0.0, lo_open=True)
    if cc.curve_examples is not None:
        check_int(own, "curve_examples", cc.curve_examples, 1)
    if (isinstance(cc.modes, str) or not isinstance(cc.modes, (tuple, list)) or not cc.modes
            or any(m not in MODES for m in cc.modes) or len(set(cc.modes)) != len(cc.modes)):
        fail(own, "modes", cc.modes,
             "expected a non-empty tuple of distinct modes out of " + ", ".join(map(repr, MODES)))
    if not isinstance(cc.model, dict):
        fail(own, "model", cc.model, "expected a dict of NRNNConfig fields")
    for name in ("input_dim", "num_classes", "backend"):
        if name in cc.model:
            fail(own, "model", cc.model, f"{name} is not set here (the data set's, or CompareConfig.backend)")
    NRNNConfig._check_names(cc.model)
    if cc.cell_factory is not None:
        if not callable(cc.cell_factory):
            fail(own, "cell_factory", cc.cell_factory, "expected a factory cell(cfg, rngs=rngs) -> Cell, e.g. a "
                 "Cell subclass, or None")
        if cc.model.get("cell") in BUILT_IN_CELLS:
            fail(own, "model", cc.model, f"cell={cc.model['cell']!r} is a built-in cell, and cell_factory gives a "
                 "user cell; give one of them")
    if not isinstance(cc.train, dict):
        fail(own, "train", cc.train, "expected a dict of TrainConfig fields")
    for name in ("dataset", "data_dir", "data_options", "mode", "seed", "reg_weight", "epochs"):
        if name in cc.train:
            fail(own, "train", cc.train, f"{name} is set by the comparison itself (CompareConfig.dataset, "
                 "data_dir, preset, seeds, lambdas, epochs), not here")
    TrainConfig._check_names(cc.train)
    st = compare_settings(cc)
    st = dataclasses.replace(st, model={**st.model, **cc.model}, train={**st.train, **cc.train})
    base = NRNNConfig(backend=cc.backend, **_model_fields(cc, st.model))  # validates the model settings
    if not base.is_noisy:
        fail(own, "model", cc.model, "the comparison needs noise (implicit and explicit modes): set eps_add or "
             "eps_mult > 0")
    TrainConfig(dataset=cc.dataset, data_dir=cc.data_dir, data_options=st.data_options, **st.train)  # validates
    return st


def _model_fields(cc: CompareConfig, model: dict[str, Any]) -> dict[str, Any]:
    """The NRNNConfig fields of the comparison's model: `model`, with a user cell recorded by its factory's
    import path."""
    return {**model, "cell": import_path(cc.cell_factory)} if cc.cell_factory is not None else model


def _mean_std(values):
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def _selection_score(model, data: Dataset, whites, seed) -> float:
    scores = [evaluate(model, data.x_val, data.y_val)["acc"]]
    scores += [evaluate(model, data.x_val, data.y_val, perturb=white_noise(s), seed=seed)["acc"] for s in whites]
    return float(np.mean(scores))


def analyse(model, data: Dataset, curves: dict, cc: CompareConfig, seed: int, noise: NRNNConfig) -> dict[str, Any]:
    """Every measurement of one trained model. The explicit regularizer and the Lyapunov exponent with
    multiplicative noise are measured at the comparison's noise levels (`noise.eps_add`, `noise.eps_mult`)
    for every mode, so that the modes are compared on the same penalty. The Hessian-vector products and the
    explicit regularizer are evaluated in chunks of `ANALYSIS_CHUNK` examples, so that their memory does not grow with
    `cc.analysis_examples` (docs/performance.md, "Memory of the analyses")."""
    n = cc.analysis_examples
    rng = np.random.default_rng(seed)
    tr = rng.choice(data.x_train.shape[0], min(n, data.x_train.shape[0]), replace=False)
    te = rng.choice(data.x_test.shape[0], min(n, data.x_test.shape[0]), replace=False)
    x_tr, y_tr = np.asarray(data.x_train[np.sort(tr)]), data.y_train[np.sort(tr)]
    x_te, y_te = np.asarray(data.x_test[np.sort(te)]), data.y_test[np.sort(te)]
    out: dict[str, Any] = {"curves": {}}
    m = data.x_test.shape[0] if cc.curve_examples is None else min(cc.curve_examples, data.x_test.shape[0])
    for kind, strengths in curves.items():
        acc = robustness_curve(model, data.x_test[:m], data.y_test[:m], kind, strengths, seed=seed)
        out["curves"][kind] = {"strengths": list(map(float, strengths)), "acc": acc.tolist()}
    ritz = hessian_lanczos(model, x_tr, y_tr, num_steps=cc.lanczos_steps, seed=seed, batch_size=ANALYSIS_CHUNK)
    trace, trace_se = hessian_trace(model, x_tr, y_tr, num_samples=cc.hutchinson_samples, seed=seed,
                                    batch_size=ANALYSIS_CHUNK)
    margins = output_margins(model, data.x_test, data.y_test)
    dist, found = input_margins(model, x_te)
    noisy_model = with_noise(model, noise.eps_add, noise.eps_mult)
    cfg = noisy_model.cfg
    p = model.recurrent_params()
    # the certificate's assumptions hold for the Lipschitz cell and the built-in noises only (docs/theory.md §5);
    # other cells or a user diffusion: None
    cert = certificate(cfg.replace(eps_add=0.0), p) if p.A is not None and cfg.noise_kind != "custom" else None
    lam = lam_se = lam_det = None
    if cfg.convention != "reference":  # not an SDE discretisation: no Lyapunov exponents (docs/theory.md §2)
        try:
            lam, lam_se = lyapunov_exponent(cfg.replace(eps_add=0.0), p, t_max=cc.lyapunov_time, seed=seed,
                                            cell=model.cell)
            lam_det, _ = lyapunov_exponent(cfg.replace(eps_add=0.0, eps_mult=0.0), p, t_max=cc.lyapunov_time,
                                           num_paths=2, seed=seed, cell=model.cell)
        except ValueError as e:  # h = 0 is not an equilibrium of this trained cell: nothing to measure
            if "not an equilibrium" not in str(e):
                raise
    reg = explicit_regularizer(noisy_model, x_te, y_te, method="exact" if cfg.hidden <= 64 else "probe",
                               num_probes=8, key=jax.random.PRNGKey(seed), batch_size=ANALYSIS_CHUNK)
    out.update({
        "hessian_ritz": ritz.tolist(), "hessian_top": float(ritz[-1]), "hessian_trace": trace,
        "hessian_trace_se": trace_se,
        "output_margins": margins.tolist(), "output_margin_median": float(np.median(margins)),
        "deepfool_margins": dist[found].tolist(), "deepfool_margin_median": float(np.median(dist[found])) if found.any() else None,
        **({"c1": cert.c1, "c2": cert.c2, "c3": cert.c3, "bound_mult_noise": cert.bound} if cert is not None
           else {"c1": None, "c2": None, "c3": None, "bound_mult_noise": None}),
        "lyapunov_mult_noise": lam, "lyapunov_mult_noise_se": lam_se, "lyapunov_deterministic": lam_det,
        "reg_value": float(reg.value), "reg_Q": float(reg.Q), "reg_R": float(reg.R),
    })
    return out


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """What a `CompareConfig` resolves to before any data is loaded: the noisy model configuration (the
    implicit and explicit modes; the deterministic mode drops its noise), the training fields common to the
    modes, the loader options, the robustness curves and the explicit λ grid with its selection strengths."""

    preset: str | None
    model: dict[str, Any]
    train: dict[str, Any]
    data_options: dict[str, str]
    curves: dict[str, list[float]]
    lambdas: tuple[float, ...]
    select_white: list[float]
    input_scale: float


# Perturbations whose strengths are in input units (scaled with the pixel range).
_ADDITIVE_KINDS = ("white", "fgsm_linf", "fgsm_l2", "pgd_linf", "pgd_l2")


def compare_settings(cc: CompareConfig) -> CompareSettings:
    """Resolve `cc` against `DEFAULTS` and, when set (by `cc.preset` or the data set's defaults), a preset."""
    from .presets import PRESETS, get_preset

    check_choice("CompareConfig", "dataset", cc.dataset, sorted(DEFAULTS))
    spec = DEFAULTS[cc.dataset]
    name = cc.preset if cc.preset is not None else spec.get("preset")
    if name is not None:
        mcfg, tcfg = get_preset(name, cc.dataset)
        if not mcfg.is_noisy:
            fail("CompareConfig", "preset", name, "a comparison needs the noise of the implicit and explicit modes; "
                 "expected a noisy preset: " + ", ".join(repr(n) for n, p in PRESETS.items() if p.is_noisy))
        model = {k: v for k, v in mcfg.to_dict().items() if k not in ("input_dim", "num_classes", "backend")}
        # the preset's own training fields (its seed is replaced by the comparison's seeds, its mode by each mode)
        fields = {**PRESETS[name].train, **PRESETS[name].dataset_train.get(cc.dataset, {})}
        train = {k: getattr(tcfg, k) for k in fields if k not in ("mode", "seed")}
        data_options = dict(tcfg.data_options)
    else:
        model, train, data_options = dict(spec["model"]), dict(spec["train"]), dict(spec.get("data", {}))
    if cc.epochs is not None:
        train["epochs"] = cc.epochs
    scale = 255.0 if data_options.get("pixel_scale") == "raw" else 1.0
    curves = {k: [v * scale for v in vs] if k in _ADDITIVE_KINDS else list(vs) for k, vs in spec["curves"].items()}
    return CompareSettings(preset=name, model=model, train=train, data_options=data_options, curves=curves,
                           lambdas=tuple(cc.lambdas or spec["lambdas"]),
                           select_white=[v * scale for v in spec["select_white"]], input_scale=scale)


def _as_json(obj: Any) -> Any:
    """`obj` as it reads back from a JSON file (tuples become lists), so that stored and new values compare."""
    return json.loads(json.dumps(obj))


class _RunRecord:
    """`run_dir/compare.json`: the run's result (summary and history) under the run's configuration `key`, and
    each measurement of it with the settings it was made with. When resuming, `get(part, compute, settings)`
    returns the stored part if it was made under the same key and settings, else computes and stores it;
    retraining (the "run" part) drops the measurements of the previous model."""

    def __init__(self, run_dir: Path, key: dict, resume: bool):
        host.barrier(f"nrnn_jax: compare record {run_dir}")  # every process reads what process 0 has written
        self.path, self.key, self.writes = run_dir / "compare.json", _as_json(key), host.is_primary()
        saved = json.loads(self.path.read_text()) if resume and self.path.exists() else {}
        same = saved.get("key") is not None and self._identity(saved["key"]) == self._identity(self.key)
        self.parts: dict[str, Any] = dict(saved.get("parts", {})) if same else {}

    @staticmethod
    def _identity(key: dict) -> dict:
        """`key` without the divergence policy (`runs.DIVERGENCE_POLICY_FIELDS`): it says what a later divergence
        would do, not what was trained, so a finished run is reused under either policy (an unfinished one is
        continued by `train_and_evaluate`, which applies the new policy)."""
        train = {k: v for k, v in key.get("train", {}).items() if k not in DIVERGENCE_POLICY_FIELDS}
        return {**key, "train": train}

    def get(self, part: str, compute, settings: Any = None):
        settings = _as_json(settings)
        if part not in self.parts or self.parts[part]["settings"] != settings:
            entry = {"settings": settings, "value": _as_json(compute())}
            self.parts = {part: entry} if part == "run" else {**self.parts, part: entry}
            if self.writes:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, {"key": self.key, "parts": self.parts})
        return self.parts[part]["value"]


def run_compare(cc: CompareConfig, out: str | Path, *, log=print, resume: bool = False) -> dict[str, Any]:
    """Train and analyse the modes `cc.modes` (default: all) for all seeds; write the layout of the module
    docstring.

    **Arguments:**

    - `cc`: the settings (checked before anything is loaded or trained).
    - `out`: the output directory.
    - `log`: called with each progress line: one per epoch of every run (prefixed with the data set, seed and
      mode), one when a run's measurements start, one per finished run. None: silent.
    - `resume`: reuse what earlier calls into `out` trained and measured under the same settings (each run's
      compare.json), continue interrupted runs from their checkpoints (a run made with other settings is
      refused with the reason), and do the rest. False trains every run afresh, replacing it.

    **Returns:** the summary written to `out/summary.json`."""
    say = log or (lambda message: None)
    st = check_compare_config(cc)  # every setting, before anything is loaded or trained
    data = load_dataset(cc.dataset, cc.data_dir, **st.data_options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, backend=cc.backend,
                      **_model_fields(cc, st.model))
    train_kw = dict(st.train)
    white_eval = tuple(s for s in st.curves.get("white", []) if s > 0)
    runs: dict[str, list[dict]] = {m: [] for m in MODES if m in cc.modes}
    t0 = time.perf_counter()
    track = None
    if cc.track_regularizer:
        n = min(cc.analysis_examples, data.x_val.shape[0])
        x_v, y_v = np.asarray(data.x_val[:n]), data.y_val[:n]

        def track(epoch, model):
            noisy = with_noise(model, base.eps_add, base.eps_mult)
            reg = explicit_regularizer(noisy, x_v, y_v, method="probe", num_probes=16, key=jax.random.PRNGKey(epoch),
                                       batch_size=ANALYSIS_CHUNK)
            return {"val_reg": float(reg.value)}
    # what a run's measurements depend on besides its own configuration
    measured_with = {"noise": base.to_dict(), "curves": st.curves,
                     **{k: getattr(cc, k) for k in ("analysis_examples", "lanczos_steps", "hutchinson_samples",
                                                    "lyapunov_time", "curve_examples")}}
    # a user cell is part of a run's key by its import path (no key changes for built-in cells)
    cell_key = {} if cc.cell_factory is None else {"cell_factory": import_path(cc.cell_factory)}

    def trained(mcfg: NRNNConfig, tcfg: TrainConfig, run_dir: Path, label: str):
        """(record, {"summary", "history"}, model()) of the run in `run_dir`: reused, continued or trained."""
        # read before the record's barrier, after which process 0 may start writing the run
        continuing = resume and (run_dir / "config.json").exists()
        record = _RunRecord(run_dir, {"model": mcfg.to_dict(), "train": tcfg.to_dict(),
                                      "track_regularizer": cc.track_regularizer, **cell_key}, resume)
        fresh = []

        def train():
            r = train_and_evaluate(mcfg, tcfg, run_dir, data=data, progress=False, resume=continuing,
                                   log=None if log is None else lambda line: log(f"{label}: {line}"),
                                   overwrite=not continuing, on_epoch_end=track, cell=cc.cell_factory)
            fresh.append(r.model)
            return {"summary": r.summary, "history": r.history}

        run = record.get("run", train)
        # a reused run is loaded with this comparison's own code (cell, diffusion): nothing the run directory
        # names is imported
        return record, run, lambda: fresh[0] if fresh else load_run(run_dir, cell=cc.cell_factory,
                                                                    diffusion=mcfg.diffusion)

    def measured(record, model, seed: int, label: str):
        def measure():
            say(f"{label}: measuring (robustness curves, Hessian, margins, stability, explicit regularizer)")
            return analyse(model(), data, st.curves, cc, seed, base)

        return record.get("analysis", measure, measured_with)

    for seed in cc.seeds:
        common = dict(dataset=cc.dataset, data_dir=cc.data_dir, data_options=st.data_options, seed=seed,
                      eval_white_noise=white_eval, **train_kw)
        for mode in ("deterministic", "implicit"):
            if mode not in cc.modes:
                continue
            mcfg = base if mode == "implicit" else base.replace(eps_add=0.0, eps_mult=0.0)
            run_dir = out / mode / f"seed{seed}"
            label = f"[{cc.dataset}] seed {seed} {mode}"
            record, run, model = trained(mcfg, TrainConfig(mode=mode, **common), run_dir, label)
            say(f"{label}: test acc {run['summary']['test_acc']:.4f}")
            runs[mode].append({"seed": seed, "run_dir": str(run_dir), **run,
                               "analysis": measured(record, model, seed, label)})
        if "explicit" not in cc.modes:
            continue
        candidates, diverged = [], {}
        for lam in st.lambdas:
            run_dir = out / "explicit" / f"seed{seed}-lam{lam:g}"
            label = f"[{cc.dataset}] seed {seed} explicit λ={lam:g}"
            try:
                record, run, model = trained(base, TrainConfig(mode="explicit", reg_weight=lam, **common), run_dir,
                                             label)
            except TrainingDiverged as e:  # one weight of the grid: the others are still candidates
                diverged[f"{lam:g}"] = str(e)
                say(f"{label}: diverged, left out of the choice of λ ({e})")
                continue
            score = record.get("selection_score", lambda: _selection_score(model(), data, st.select_white, seed),
                               st.select_white)
            say(f"{label}: test acc {run['summary']['test_acc']:.4f}, validation score {score:.4f}")
            candidates.append((score, lam, run_dir, record, run, model, label))
        if not candidates:
            raise TrainingDiverged(f"seed {seed}: the explicit model diverged for every λ of the grid "
                                   f"{list(st.lambdas)}: " + "; ".join(f"λ={k}: {v}" for k, v in diverged.items()))
        score, lam, run_dir, record, run, model, label = max(candidates, key=lambda c: c[0])
        runs["explicit"].append({"seed": seed, "run_dir": str(run_dir), **run, "lambda": lam,
                                 "lambda_scores": {f"{c[1]:g}": c[0] for c in candidates},
                                 **({"lambda_diverged": diverged} if diverged else {}),
                                 "analysis": measured(record, model, seed, label)})
    n_test, n_train = data.x_test.shape[0], data.x_train.shape[0]
    settings = {**dataclasses.asdict(cc), "preset": st.preset, "model": base.to_dict(),
                "cell_factory": None if cc.cell_factory is None else import_path(cc.cell_factory),
                "train": train_kw, "data_options": st.data_options, "input_scale": st.input_scale,
                "lambdas": list(st.lambdas), "selection_white": st.select_white,
                "selection_rule": "max mean(clean val acc, val acc under white noise of each selection strength)"}
    # the examples each measurement is made on (results.md says which column comes from which)
    examples = {"test": n_test, "curves": n_test if cc.curve_examples is None else min(cc.curve_examples, n_test),
                "hessian_train": min(cc.analysis_examples, n_train), "analysis_test": min(cc.analysis_examples, n_test)}
    summary = {"settings": settings, "examples": examples, "runs": runs, "aggregate": aggregate(runs),
               "time_s": time.perf_counter() - t0}
    if host.is_primary():
        write_json(out / "summary.json", summary)
        (out / "results.md").write_text(results_table(summary))
        plot_all(summary, out)
    host.barrier(f"nrnn_jax: compare written {out}")  # the others return once the files are there
    return summary


SCALARS = ("hessian_top", "hessian_trace", "output_margin_median", "deepfool_margin_median", "c1",
           "lyapunov_deterministic", "lyapunov_mult_noise", "reg_value", "reg_Q", "reg_R")


def aggregate(runs: dict[str, list[dict]]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for mode, rs in runs.items():
        if not rs:
            continue
        a: dict[str, Any] = {"test_acc": _mean_std([r["summary"]["test_acc"] for r in rs])}
        for key in SCALARS:
            vals = [r["analysis"][key] for r in rs if r["analysis"].get(key) is not None]
            if vals:
                a[key] = _mean_std(vals)
        a["curves"] = {}
        for kind, c in rs[0]["analysis"]["curves"].items():
            accs = np.asarray([r["analysis"]["curves"][kind]["acc"] for r in rs])
            a["curves"][kind] = {"strengths": c["strengths"], "mean": accs.mean(0).tolist(),
                                 "std": (accs.std(0, ddof=1) if len(rs) > 1 else np.zeros(accs.shape[1])).tolist()}
        if mode == "explicit":
            a["lambdas"] = [r["lambda"] for r in rs]
        agg[mode] = a
    return agg


def results_table(summary: dict) -> str:
    """results.md: one row per mode, the mean over seeds (± the sample standard deviation over two or more
    seeds), then a line with the settings and a line saying which examples each column is measured on."""
    agg, runs = summary["aggregate"], summary["runs"]
    seeds = {mode: len(runs.get(mode, ())) for mode in agg}
    fmt = lambda mean, std, n: f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"
    any_mode = next(iter(agg.values()))
    curve_cols = [(k, s) for k, c in any_mode["curves"].items() for s in c["strengths"][1:]][:6]
    scalar_cols = [("hessian_top", "Hessian top eig"), ("hessian_trace", "Hessian trace"),
                   ("output_margin_median", "median output margin"),
                   ("deepfool_margin_median", "median DeepFool margin"), ("c1", "c1"),
                   ("lyapunov_deterministic", "Lyapunov (det.)"), ("reg_value", "explicit reg")]
    ex = summary.get("examples")  # absent from summaries written before it was recorded
    # the robustness columns' clean accuracy on their own examples, where those are not the whole test split
    subset = ex is not None and ex["curves"] < ex["test"] and curve_cols
    clean_kind = next((k for k, c in any_mode["curves"].items() if c["strengths"][0] == 0), None) if subset else None
    columns = (["mode", "clean test acc"] + (["clean acc, curve examples"] if clean_kind else [])
               + [f"{k} {s:g}" for k, s in curve_cols] + [label for _, label in scalar_cols])
    rows = []
    for mode, a in agg.items():
        n = seeds[mode]
        row = {"mode": mode + (f" (λ = {', '.join(f'{l:g}' for l in a['lambdas'])})" if "lambdas" in a else ""),
               "clean test acc": fmt(a["test_acc"]["mean"], a["test_acc"]["std"], n)}
        if clean_kind:
            c = a["curves"][clean_kind]
            row["clean acc, curve examples"] = fmt(c["mean"][0], c["std"][0], n)
        for k, s in curve_cols:
            c = a["curves"][k]
            i = c["strengths"].index(s)
            row[f"{k} {s:g}"] = fmt(c["mean"][i], c["std"][i], n)
        row.update({label: fmt(a[key]["mean"], a[key]["std"], n) if a.get(key) else "" for key, label in scalar_cols})
        rows.append(row)
    s = summary["settings"]
    counts = sorted(set(seeds.values()))
    spread = ("mean ± sample standard deviation over the seeds" if min(counts) > 1 else
              "one seed: its values" if max(counts) == 1 else "mean (± sample standard deviation where a mode has "
                                                              "two or more seeds)")
    footer = (f"Data set {s['dataset']}, seeds {list(s['seeds'])} ({spread}), model {s['model']}, training "
              f"{s['train']}, explicit λ grid {s['lambdas']} (selection: {s['selection_rule']}, white strengths "
              f"{s['selection_white']}).")
    diverged = [f"λ = {lam} (seed {r['seed']})" for r in summary["runs"].get("explicit", [])
                for lam in r.get("lambda_diverged", {})]
    if diverged:
        footer += f" Diverged, so left out of the choice: {', '.join(diverged)}."
    if ex is not None:
        kinds = ", ".join(dict.fromkeys(k for k, _ in curve_cols))
        curves = ("the whole test split" if ex["curves"] == ex["test"] else f"the first {ex['curves']} test examples")
        footer += (f"\n\nExamples: clean test acc and median output margin: the whole test split ({ex['test']}); "
                   f"the robustness columns ({kinds})"
                   + (" and 'clean acc, curve examples'" if clean_kind else "") + f": {curves}; Hessian: "
                   f"{ex['hessian_train']} training examples; median DeepFool margin and explicit reg: "
                   f"{ex['analysis_test']} test examples (both drawn at random per seed); c1 and Lyapunov: the "
                   "parameters only.")
    return format_table(rows, columns) + "\n\n" + footer + "\n"


def plot_all(summary: dict, out: Path) -> None:
    """The four PNG plots. Drawn on `matplotlib.figure.Figure` objects (the object API, no pyplot state),
    so the user's backend (e.g. a notebook's inline backend) is left as it is."""
    from matplotlib.figure import Figure

    def subplots(*grid, **kw):
        fig = Figure(figsize=kw.pop("figsize"))
        return fig, fig.subplots(*grid, **kw)

    agg, runs = summary["aggregate"], summary["runs"]
    colors = {"deterministic": "tab:gray", "implicit": "tab:blue", "explicit": "tab:red"}
    kinds = list(next(iter(agg.values()))["curves"])
    fig, axes = subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for mode, a in agg.items():
            c = a["curves"][kind]
            m, s = np.asarray(c["mean"]), np.asarray(c["std"])
            ax.plot(c["strengths"], m, "o-", color=colors[mode], label=mode)
            ax.fill_between(c["strengths"], m - s, m + s, color=colors[mode], alpha=0.2)
        ax.set_xlabel(f"{kind} strength")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    n_seeds = max(len(rs) for rs in runs.values())
    fig.suptitle(f"{summary['settings']['dataset']}: accuracy under perturbation "
                 + ("(mean ± std over seeds)" if n_seeds > 1 else "(one seed)"))
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=110)

    fig, ax = subplots(figsize=(6, 3.4))
    for i, (mode, rs) in enumerate(runs.items()):
        for j, r in enumerate(rs):
            ritz = np.asarray(r["analysis"]["hessian_ritz"])
            ax.scatter(np.full(ritz.shape, i) + 0.08 * (j - 1), ritz, s=10, color=colors[mode])
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("Ritz values of the loss Hessian")
    ax.set_title("Hessian spectrum (Lanczos), each seed")
    fig.tight_layout()
    fig.savefig(out / "hessian.png", dpi=110)

    fig, axes = subplots(1, 2, figsize=(9, 3.4))
    for mode, rs in runs.items():
        om = np.concatenate([r["analysis"]["output_margins"] for r in rs])
        axes[0].hist(om, bins=40, histtype="step", color=colors[mode], label=mode, density=True)
        dm = np.concatenate([r["analysis"]["deepfool_margins"] for r in rs])
        axes[1].hist(dm, bins=30, histtype="step", color=colors[mode], label=mode, density=True)
    axes[0].set_xlabel("output margin (logit_y − max other)")
    axes[1].set_xlabel("DeepFool input-space margin (L2)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "margins.png", dpi=110)

    fig, ax = subplots(figsize=(6, 3.4))
    names = list(agg)
    for k, (key, label) in enumerate([("c1", "certificate c1 (bound, deterministic)"),
                                      ("lyapunov_deterministic", "Lyapunov exponent (deterministic)"),
                                      ("lyapunov_mult_noise", "Lyapunov exponent (with mult. noise)")]):
        vals = [agg[m][key]["mean"] if key in agg[m] else np.nan for m in names]
        errs = [agg[m][key]["std"] if key in agg[m] else 0 for m in names]
        ax.bar(np.arange(len(names)) + 0.27 * (k - 1), vals, 0.27, yerr=errs, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.legend(fontsize=7)
    ax.set_title("stability of h = 0 of the unforced dynamics")
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=110)
