"""Named presets: the public code's pixel-MNIST runs (docs/theory.md §7, Table 7.1 and (7.1)).

All presets: hidden 128, Adam, batch 128, 100 epochs with the learning rate × 0.1 at epoch 90, seed 1,
init_std 0.1, for ordered (`mnist_pixel`) and permuted (`mnist_permuted`) pixel MNIST.

| preset | convention | δ | lr | β | γ_A = γ_W | α | ε_add / ε_mult | additive noise per step |
|---|---|---|---|---|---|---|---|---|
| `lipschitz` | "sde", ε = 0 | 0.03 | 3e-3 (permuted 3.5e-3) | 0.75 | 1e-3 | 1 | 0 / 0 | 0 |
| `antisymmetric` | "sde", ε = 0 | 0.01 | 2e-3 | 1.0 | 1e-4 | 0 | 0 / 0 | 0 |
| `nrnn-small` | "reference" (2.9) | 0.01 | 1e-3 | 0.75 | 1e-3 | 1 | 0.02 / 0.02 | 0.02 |
| `nrnn-high` | "reference" (2.9) | 0.01 | 1e-3 | 0.75 | 1e-3 | 1 | 0.05 / 0.02 | 0.05 |
| `nrnn-small-sde` | "sde" (2.4) | 0.01 | 1e-3 | 0.75 | 1e-3 | 1 | 0.2 / 0.2 | 0.2 √0.01 = 0.02 |
| `nrnn-high-sde` | "sde" (2.4) | 0.01 | 1e-3 | 0.75 | 1e-3 | 1 | 0.5 / 0.2 | 0.5 √0.01 = 0.05 |

Mapping decisions:

- The public deterministic runs (solver "base") compute h + δ f with a FIXED scalar δ: that is convention
  "sde" with ε = 0. nrnn_jax's "reference" convention has a learnable per-unit step s (initialised to δ),
  which the public code has only in its "noisy" solver, so it is not used for them.
- The noisy runs (solver "noisy") are the "reference" convention with the public ε values unchanged.
- The "-sde" alternatives read "the paper's noise" as an Euler–Maruyama SDE with the same per-step additive
  standard deviation: ε_add^SDE = ε_add^ref / √δ (2.12). The multiplicative parts have no common measure
  (docs/theory.md §2: the public one randomly shortens the step, std s ε_mult |f|/√12 ≈ 6e-5 |f| at these
  values; the SDE's perturbs the state, std ε_mult √δ |h|). We map ε_mult by the same rule,
  ε_mult^SDE = ε_mult^ref / √δ = 0.2, so that the public number 0.02 is the per-step standard deviation of
  the relative state perturbation, ε_mult √δ = 0.02: one rule for both noise levels, and the public
  numbers keep their meaning "per-step standard deviation". This makes the SDE's multiplicative noise much
  stronger than the public one; set `eps_mult` yourself to compare other readings.
- Permuted MNIST: the public code's permutation (`torch.manual_seed(12008); torch.randperm(784)`) and raw
  0–255 pixels (`pixel_scale="raw"`), because the public permuted runs read raw bytes and their learning
  rates and noise levels were tuned on those inputs. Ordered MNIST: pixels in [0, 1], as the public code.
- The noisy presets train in mode "implicit" (noise injection, what the public runs do); the others in
  mode "deterministic".
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any, Mapping

from .config import NRNNConfig, TrainConfig
from .validation import check_choice

DATASETS = ("mnist_pixel", "mnist_permuted")

# Settings shared by every public pixel-MNIST run (docs/theory.md Table 7.1).
_COMMON_MODEL = dict(input_dim=1, num_classes=10, hidden=128, init_std=0.1)
_COMMON_TRAIN = dict(optimizer="adam", batch_size=128, epochs=100, lr_decay=0.1, lr_decay_epochs=(90,), seed=1)
# Data options per data set: the public permutation, and the public code's pixel scale.
_DATA_OPTIONS = {"mnist_pixel": dict(pixel_scale="unit"),
                 "mnist_permuted": dict(permutation="public", pixel_scale="raw")}


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named protocol.

    - `name`, `description` (one line: the public run it follows).
    - `datasets`: the data sets it is defined for.
    - `model`, `train`: `NRNNConfig` and `TrainConfig` fields (shared by its data sets);
      `dataset_train`: per data set, `TrainConfig` fields that differ (e.g. the permuted learning rate);
      `data_options`: per data set, the loader's options (`TrainConfig.data_options`).
    """

    name: str
    description: str
    datasets: tuple[str, ...]
    model: Mapping[str, Any]
    train: Mapping[str, Any]
    dataset_train: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: _frozen({}))
    data_options: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=lambda: _frozen(_DATA_OPTIONS))

    def configs(self, dataset: str) -> tuple[NRNNConfig, TrainConfig]:
        """(NRNNConfig, TrainConfig) of this preset for `dataset` (validated by their constructors)."""
        check_choice(f"Preset[{self.name!r}]", "dataset", dataset, self.datasets)
        mcfg = NRNNConfig(**self.model)
        train = {**self.train, **self.dataset_train.get(dataset, {})}
        tcfg = TrainConfig(dataset=dataset, data_options=dict(self.data_options.get(dataset, {})), **train)
        return mcfg, tcfg

    @property
    def per_step_additive_std(self) -> float:
        """Standard deviation of the additive noise added to each unit at each step: ε_add ("reference")
        or ε_add √δ ("sde", Euler–Maruyama)."""
        eps_add = self.model.get("eps_add", 0.0)
        if self.model.get("convention", "sde") == "reference":
            return float(eps_add)
        return float(eps_add) * math.sqrt(self.model["dt"])

    @property
    def is_noisy(self) -> bool:
        return self.model.get("eps_add", 0.0) > 0 or self.model.get("eps_mult", 0.0) > 0


def _preset(name, description, model, lr, mode, dataset_train=None) -> Preset:
    return Preset(name=name, description=description, datasets=DATASETS,
                  model=_frozen({**_COMMON_MODEL, **model}),
                  train=_frozen({**_COMMON_TRAIN, "lr": lr, "mode": mode}),
                  dataset_train=_frozen({k: _frozen(v) for k, v in (dataset_train or {}).items()}))


_NRNN = dict(dt=0.01, alpha=1.0, beta=0.75, gamma_a=1e-3, gamma_w=1e-3)

PRESETS: Mapping[str, Preset] = _frozen({p.name: p for p in (
    _preset("lipschitz", "Lipschitz RNN, public solver 'base' (fixed step δ = 0.03, no noise): convention 'sde', ε = 0",
            dict(dt=0.03, alpha=1.0, beta=0.75, gamma_a=1e-3, gamma_w=1e-3, convention="sde"), 3e-3,
            "deterministic", dataset_train={"mnist_permuted": dict(lr=3.5e-3)}),
    _preset("antisymmetric", "antisymmetric RNN, public solver 'base' (β = 1, α = 0, fixed step δ = 0.01): "
            "convention 'sde', ε = 0",
            dict(dt=0.01, alpha=0.0, beta=1.0, gamma_a=1e-4, gamma_w=1e-4, convention="sde"), 2e-3, "deterministic"),
    _preset("nrnn-small", "Noisy RNN small noise, public solver 'noisy' (ε_add = ε_mult = 0.02, δ = 0.01): "
            "convention 'reference'",
            dict(_NRNN, eps_add=0.02, eps_mult=0.02, convention="reference"), 1e-3, "implicit"),
    _preset("nrnn-high", "Noisy RNN high noise, public solver 'noisy' (ε_add = 0.05, ε_mult = 0.02, δ = 0.01): "
            "convention 'reference'",
            dict(_NRNN, eps_add=0.05, eps_mult=0.02, convention="reference"), 1e-3, "implicit"),
    _preset("nrnn-small-sde", "nrnn-small's per-step noise as an Euler–Maruyama SDE: ε_add = 0.02/√δ = 0.2, "
            "ε_mult = 0.02/√δ = 0.2 (per-step std 0.02 each)",
            dict(_NRNN, eps_add=0.2, eps_mult=0.2, convention="sde"), 1e-3, "implicit"),
    _preset("nrnn-high-sde", "nrnn-high's per-step noise as an Euler–Maruyama SDE: ε_add = 0.05/√δ = 0.5, "
            "ε_mult = 0.02/√δ = 0.2 (per-step std 0.05 / 0.02)",
            dict(_NRNN, eps_add=0.5, eps_mult=0.2, convention="sde"), 1e-3, "implicit"),
)})
# The public per-step additive standard deviation each preset follows (the tests check the step against it).
PUBLIC_ADDITIVE_STD = _frozen({"lipschitz": 0.0, "antisymmetric": 0.0, "nrnn-small": 0.02, "nrnn-high": 0.05,
                               "nrnn-small-sde": 0.02, "nrnn-high-sde": 0.05})


def get_preset(name: str, dataset: str) -> tuple[NRNNConfig, TrainConfig]:
    """(NRNNConfig, TrainConfig) of the preset `name` for `dataset` ("mnist_pixel" or "mnist_permuted").

    The NRNNConfig has input_dim 1 and 10 classes (pixel MNIST); change the backend, data_dir etc. with
    `.replace(...)`. Unknown names or data sets raise a ValueError listing the allowed values."""
    check_choice("", "preset", name, tuple(PRESETS))
    return PRESETS[name].configs(dataset)


def preset_table() -> str:
    """A Markdown table of the presets (name, convention, δ, lr, noise, per-step additive std, description)."""
    from .tables import format_table

    rows = []
    for p in PRESETS.values():
        lrs = {d: {**p.train, **p.dataset_train.get(d, {})}["lr"] for d in p.datasets}
        rows.append({"name": p.name, "convention": p.model.get("convention", "sde"), "δ": f"{p.model['dt']:g}",
                     "lr": " / ".join(sorted({f"{v:g}" for v in lrs.values()})),
                     "ε_add / ε_mult": f"{p.model.get('eps_add', 0.0):g} / {p.model.get('eps_mult', 0.0):g}",
                     "per-step additive std": f"{p.per_step_additive_std:.3g}", "follows": p.description})
    return format_table(rows, list(rows[0]))
