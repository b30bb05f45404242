"""The one place where the strings of the serialisable `NRNNConfig` become objects, and objects become strings.

The Python API takes objects (a cell, a diffusion, a scheme), as diffrax takes `solver=EulerHeun()`;
`NRNNConfig` is their description for JSON, the command line and run directories. This module maps one to
the other in both directions, so that a configuration names everything needed to rebuild a model:

| field(s) | objects |
|---|---|
| `cell` | the built-in cells of `nrnn_jax.cells`; a user cell is recorded by its import path |
| `noise_kind`, `eps_add`, `eps_mult`, `diffusion` | `DiagonalNoise`, `ScalarNoise`, `CustomNoise` (`nrnn_jax.noise`) |
| `convention`, `solver` | `EulerMaruyama`, `EulerHeun`, `Milstein`, `PublicCodeRule` (`nrnn_jax.schemes`) |
| `backend`, `diffrax_loop` | `ScanLoop`, `DiffraxLoop` (`nrnn_jax._loops`) |
| `gradient` | `DiscreteAdjoint`, `Autodiff` (`nrnn_jax._gradients`) |

Nothing else in the package tests these strings.
"""

from __future__ import annotations

from typing import Any, Callable

from . import cells as cells_lib
from . import noise as noise_lib
from . import schemes as schemes_lib
from ._gradients import Autodiff, DiscreteAdjoint, Gradient
from ._loops import DiffraxLoop, Loop, ScanLoop
from .config import BUILT_IN_CELLS, NRNNConfig, import_path

CELLS: dict[str, type] = {"lipschitz": cells_lib.LipschitzCell, "antisymmetric": cells_lib.AntisymmetricCell,
                          "gru": cells_lib.GRUCell, "tanh": cells_lib.TanhCell, "lstm": cells_lib.LSTMCell}
assert tuple(CELLS) == BUILT_IN_CELLS
SCHEMES: dict[str, type] = {"euler": schemes_lib.EulerMaruyama, "euler_heun": schemes_lib.EulerHeun,
                            "milstein": schemes_lib.Milstein}
DIFFUSIONS: dict[str, type] = {"diagonal": noise_lib.DiagonalNoise, "scalar": noise_lib.ScalarNoise}
# "diffeqsolve" names the loop of run directories that chose diffrax.diffeqsolve, which stepped the same grid
# with the same solver step and gave the same numbers as the stepped loop it now maps to.
LOOPS: dict[tuple[str, str], Loop] = {("scan", "steps"): ScanLoop(), ("scan", "diffeqsolve"): ScanLoop(),
                                      ("diffrax", "steps"): DiffraxLoop(), ("diffrax", "diffeqsolve"): DiffraxLoop()}
GRADIENTS: dict[str, Gradient] = {"adjoint": DiscreteAdjoint(), "autodiff": Autodiff()}


# -- cells -------------------------------------------------------------------------------------------------
def is_built_in_cell(name: str) -> bool:
    """Whether `NRNNConfig.cell` names a built-in cell (else it records a user cell)."""
    return name in CELLS


def cell(cfg: NRNNConfig, rngs) -> cells_lib.Cell:
    """The built-in cell named by `cfg.cell`; ValueError for a recorded user cell, which must be passed."""
    if cfg.cell not in CELLS:
        raise ValueError(f"NRNNConfig.cell={cfg.cell!r} records a user cell: pass it as NoisyRNN(cfg, rngs=rngs, "
                         f"cell=my_cell), or name a built-in cell ({', '.join(CELLS)}).")
    return CELLS[cfg.cell](cfg, rngs=rngs)


def cell_field(cfg: NRNNConfig, cell_obj: Any) -> str:
    """What `NRNNConfig.cell` records for a cell passed as an object: the configuration's own name when the
    cell is that built-in class, else the import path of the cell's class (a record; never imported here)."""
    if cfg.cell in CELLS and type(cell_obj) is CELLS[cfg.cell]:
        return cfg.cell
    if cfg.cell not in CELLS and cfg.cell != "custom":
        return cfg.cell  # already the record of a user cell (e.g. its factory's path, set by training)
    return import_path(type(cell_obj))


def factory_field(factory: Callable) -> str:
    """What `NRNNConfig.cell` records for a user cell given by a factory `factory(cfg, rngs=rngs)`."""
    return import_path(factory)


# -- schemes -----------------------------------------------------------------------------------------------
def scheme(cfg: NRNNConfig) -> schemes_lib.Scheme:
    """The scheme of a configuration: the public code's rule under `convention="reference"`, else `cfg.solver`."""
    return schemes_lib.PublicCodeRule() if cfg.convention == "reference" else SCHEMES[cfg.solver]()


def scheme_fields(obj: schemes_lib.Scheme) -> dict[str, str]:
    """The `NRNNConfig` fields that describe a scheme object."""
    if isinstance(obj, schemes_lib.PublicCodeRule):
        return {"convention": "reference", "solver": "euler"}
    for name, cls in SCHEMES.items():
        if type(obj) is cls:
            return {"convention": "sde", "solver": name}
    raise TypeError(f"NoisyRNN(scheme=...): expected one of {', '.join(c.__name__ for c in SCHEMES.values())} or "
                    f"PublicCodeRule (nrnn_jax.schemes), got {obj!r}")


# -- diffusions --------------------------------------------------------------------------------------------
def diffusion(cfg: NRNNConfig, layout: cells_lib.StateLayout | None = None) -> noise_lib.Noise:
    """The diffusion of a configuration (`noise_kind`, the levels, and `diffusion` for a user one), on the
    flat state of a cell's `layout` (None: the state is one array (hidden,)): on the whole state, or on the
    coordinates `layout.noise` (`noise.OnParts`)."""
    if cfg.noise_kind == "custom":
        cfg.check_runnable()  # a recorded import path that was not imported has no function to run
        base = noise_lib.CustomNoise(cfg.diffusion)
    else:
        base = DIFFUSIONS[cfg.noise_kind](cfg.eps_add, cfg.eps_mult)
    if layout is None or layout.noise is None:
        return base
    return noise_lib.OnParts(base, layout.noise, layout.size)


def diffusion_fields(obj: Any) -> dict[str, Any]:
    """The `NRNNConfig` fields that describe a diffusion: a `DiagonalNoise` / `ScalarNoise` (its kind and
    levels), a `CustomNoise`, or a plain function σ(h, z) (a user diffusion, recorded by import path)."""
    for name, cls in DIFFUSIONS.items():
        if type(obj) is cls:
            return {"noise_kind": name, "eps_add": obj.eps_add, "eps_mult": obj.eps_mult, "diffusion": None}
    if isinstance(obj, noise_lib.CustomNoise):
        obj = obj.fn
    if isinstance(obj, noise_lib.Noise) or not callable(obj):
        raise TypeError(f"NoisyRNN(diffusion=...): expected DiagonalNoise(eps_add, eps_mult), ScalarNoise(eps_add, "
                        f"eps_mult), CustomNoise(sigma) or a function sigma(h, z) of one example, got {obj!r}")
    return {"noise_kind": "custom", "diffusion": obj}  # the configuration refuses noise levels beside it


def noise_width(cfg: NRNNConfig, layout: cells_lib.StateLayout | None = None) -> int:
    """The width m of one step's standard normals ξ_k (m,) of the configured scheme and diffusion, for a cell's
    `layout` (None: the state is one array (hidden,))."""
    size = cfg.hidden if layout is None else layout.noise_size
    return scheme(cfg).noise_dim(cfg, diffusion(cfg, layout), size)


# -- loops and gradients -----------------------------------------------------------------------------------
def loop(cfg: NRNNConfig) -> Loop:
    """The loop of `cfg.backend` (and `cfg.diffrax_loop`)."""
    return LOOPS[cfg.backend, cfg.diffrax_loop]


def gradient(cfg: NRNNConfig) -> Gradient:
    """How the solve is differentiated: `cfg.gradient`."""
    return GRADIENTS[cfg.gradient]
