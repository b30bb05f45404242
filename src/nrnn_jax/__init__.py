"""nrnn_jax: Noisy Recurrent Neural Networks (Lim, Erichson, Hodgkinson, Mahoney, NeurIPS 2021) in JAX.

The public API:

- `NRNNConfig`, `NoisyRNN`: the model (math.md §1).
- `solve`, `solve_batch`, `brownian_increments`, `GridBrownianPath`: the solvers (diffrax and scan backends).
- `explicit_regularizer` (and the general `exact_terms`, `probe_terms`, `continuous_terms`): the
  small-noise explicit regularizer (math.md §2).
- `TrainConfig`, `train_and_evaluate`, `make_train_step`, `eval_step`, `evaluate`, `load_run`: training;
  `Sweep` (several seeds / noise levels in one vmapped step) and `data_parallel_sharding` (several devices).
- `load_dataset`, `Dataset`: data.
"""

from .config import NRNNConfig
from .data import Dataset, load_dataset
from .dynamics import RecurrentParams, diffusion, drift, lipschitz_matrix
from .model import NoisyRNN, with_noise
from .regularizer import (
    Regularizer,
    antithetic_monte_carlo,
    continuous_terms,
    exact_terms,
    explicit_regularizer,
    probe_terms,
)
from .solvers import GridBrownianPath, GridIncrementPath, brownian_increments, solve, solve_batch
from .train import (
    Sweep,
    TrainConfig,
    TrainingDiverged,
    TrainState,
    eval_step,
    evaluate,
    data_parallel_sharding,
    init_sweep_states,
    init_train_state,
    load_run,
    load_run_dataset,
    make_optimizer,
    make_train_step,
    predict_logits,
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
    "Regularizer",
    "TrainConfig",
    "TrainState",
    "TrainingDiverged",
    "antithetic_monte_carlo",
    "brownian_increments",
    "continuous_terms",
    "diffusion",
    "drift",
    "eval_step",
    "evaluate",
    "exact_terms",
    "explicit_regularizer",
    "init_train_state",
    "init_sweep_states",
    "data_parallel_sharding",
    "Sweep",
    "lipschitz_matrix",
    "load_dataset",
    "load_run",
    "load_run_dataset",
    "make_optimizer",
    "make_train_step",
    "predict_logits",
    "probe_terms",
    "solve",
    "solve_batch",
    "train_and_evaluate",
    "with_noise",
]
