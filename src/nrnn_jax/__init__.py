"""nrnn_jax: Noisy Recurrent Neural Networks (Lim, Erichson, Hodgkinson, Mahoney, NeurIPS 2021) in JAX.

The public API (the theory is in the repository's docs/theory.md):

- The model: `NRNNConfig`, `NoisyRNN`, `with_noise`, `RecurrentParams`, assembled from objects (the
  extension points): the cells `Cell`, `ProductCell`, `LipschitzCell`, `AntisymmetricCell`, `GRUCell`,
  `TanhCell`, `LSTMCell`, `FlaxCell` (`nrnn_jax.cells`); the diffusions `Noise`, `DiagonalNoise`,
  `ScalarNoise`, `CustomNoise` (`nrnn_jax.noise`); the schemes `Scheme`, `EulerMaruyama`, `EulerHeun`,
  `Milstein`, `PublicCodeRule` (`nrnn_jax.schemes`). The solvers `solve`, `solve_batch`,
  `brownian_increments`, `GridBrownianPath`, `GridIncrementPath`.
- The explicit regularizer: `explicit_regularizer` → `Regularizer`; `antithetic_monte_carlo` to check it.
  The general pure functions (`exact_terms`, `probe_terms`, `continuous_terms`) are in `nrnn_jax.regularizer`.
- Training: `TrainConfig`, `Sweep`, `train_and_evaluate` → `RunResult`, `TrainingDiverged`; the pieces of a
  hand-written loop: `make_optimizer`, `init_train_state`, `init_sweep_states`, `make_train_step`,
  `TrainState`, `data_parallel_sharding`.
- Evaluation and run directories: `evaluate`, `predict_logits`, `load_run`, `read_run_config`,
  `load_run_dataset`; their errors `RunBusyError` (another process writes the run), `RunWriteError` (a write
  failed: no space, permission, read-only filesystem) and `CheckpointError` (a checkpoint that cannot be
  read, naming the file).
- The public PyTorch code's models (`nrnn_jax.interchange`): `from_public`, `to_public`, `public_args`.
- Data: `load_dataset`, `Dataset`.
- Analyses: the `nrnn_jax.analysis` package.

Everything else stays importable from its module (`nrnn_jax.recurrence`, `nrnn_jax.prng`, …); modules
whose names start with an underscore are internal.

Importing the package changes nothing outside it. For fast CPU training, a program calls
`nrnn_jax.host.configure()` before its first JAX computation (one CPU device per host core, and a host
allocator that keeps XLA's buffers; the command-line programs do this).
"""

from . import host as host
from .config import NRNNConfig as NRNNConfig
from .config import Sweep as Sweep
from .config import TrainConfig as TrainConfig
from .data import Dataset as Dataset
from .data import load_dataset as load_dataset
from .errors import CheckpointError as CheckpointError
from .errors import RunBusyError as RunBusyError
from .errors import RunWriteError as RunWriteError
from .cells import (AntisymmetricCell as AntisymmetricCell, Cell as Cell, FlaxCell as FlaxCell, GRUCell as GRUCell,
                    LipschitzCell as LipschitzCell, LSTMCell as LSTMCell, ProductCell as ProductCell,
                    TanhCell as TanhCell)
from .evaluate import evaluate as evaluate
from .evaluate import predict_logits as predict_logits
from .model import NoisyRNN as NoisyRNN
from .noise import CustomNoise as CustomNoise
from .noise import DiagonalNoise as DiagonalNoise
from .noise import Noise as Noise
from .noise import ScalarNoise as ScalarNoise
from .model import with_noise as with_noise
from .interchange import from_public as from_public
from .interchange import public_args as public_args
from .interchange import to_public as to_public
from .regularizer import Regularizer as Regularizer
from .regularizer import antithetic_monte_carlo as antithetic_monte_carlo
from .regularizer import explicit_regularizer as explicit_regularizer
from .runs import load_run as load_run
from .runs import load_run_dataset as load_run_dataset
from .runs import read_run_config as read_run_config
from .schemes import EulerHeun as EulerHeun
from .schemes import EulerMaruyama as EulerMaruyama
from .schemes import Milstein as Milstein
from .schemes import PublicCodeRule as PublicCodeRule
from .schemes import RecurrentParams as RecurrentParams
from .schemes import Scheme as Scheme
from .solvers import GridBrownianPath as GridBrownianPath
from .solvers import GridIncrementPath as GridIncrementPath
from .solvers import brownian_increments as brownian_increments
from .solvers import solve as solve
from .solvers import solve_batch as solve_batch
from .state import TrainState as TrainState
from .state import init_sweep_states as init_sweep_states
from .state import init_train_state as init_train_state
from .state import make_optimizer as make_optimizer
from .train import RunResult as RunResult
from .train import TrainingDiverged as TrainingDiverged
from .step import data_parallel_sharding as data_parallel_sharding
from .step import make_train_step as make_train_step
from .train import train_and_evaluate as train_and_evaluate

__version__ = "0.1.0"

__all__ = sorted([
    "AntisymmetricCell", "Cell", "FlaxCell", "GRUCell", "LipschitzCell", "LSTMCell", "ProductCell", "TanhCell",
    "CustomNoise", "DiagonalNoise", "EulerHeun", "EulerMaruyama", "Milstein", "Noise", "PublicCodeRule",
    "ScalarNoise", "Scheme",
    "CheckpointError", "RunBusyError", "RunWriteError", "Dataset", "GridBrownianPath", "GridIncrementPath",
    "NRNNConfig", "NoisyRNN", "RecurrentParams", "Regularizer",
    "RunResult", "Sweep", "TrainConfig", "TrainState", "TrainingDiverged", "antithetic_monte_carlo",
    "brownian_increments", "data_parallel_sharding", "evaluate", "explicit_regularizer", "from_public",
    "init_sweep_states",
    "init_train_state", "load_dataset", "load_run", "load_run_dataset", "make_optimizer", "make_train_step",
    "predict_logits", "public_args", "read_run_config", "solve", "solve_batch", "to_public", "train_and_evaluate",
    "with_noise",
])
