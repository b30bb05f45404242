"""nrnn_jax: Noisy Recurrent Neural Networks (Lim, Erichson, Hodgkinson, Mahoney, NeurIPS 2021) in JAX.

The public API:

- `NRNNConfig`, `NoisyRNN`: the model (math.md §1).
- `solve`, `brownian_increments`, `GridBrownianPath`: the solvers (diffrax and scan backends).
- `TrainConfig`, `train_and_evaluate`, `make_train_step`, `eval_step`, `evaluate`, `load_run`: training.
- `load_dataset`, `Dataset`: data.
"""

from .config import NRNNConfig
from .data import Dataset, load_dataset
from .dynamics import RecurrentParams, diffusion, drift, lipschitz_matrix
from .model import NoisyRNN
from .solvers import GridBrownianPath, GridIncrementPath, brownian_increments, solve
from .train import (
    TrainConfig,
    TrainingDiverged,
    TrainState,
    eval_step,
    evaluate,
    load_run,
    make_optimizer,
    make_train_step,
    train_and_evaluate,
)

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "GridBrownianPath",
    "GridIncrementPath",
    "NRNNConfig",
    "NoisyRNN",
    "RecurrentParams",
    "TrainConfig",
    "TrainState",
    "TrainingDiverged",
    "brownian_increments",
    "diffusion",
    "drift",
    "eval_step",
    "evaluate",
    "lipschitz_matrix",
    "load_dataset",
    "load_run",
    "make_optimizer",
    "make_train_step",
    "solve",
    "train_and_evaluate",
]
