"""Array annotations shared by the modules (jaxtyping; checked at run time in the tests)."""

import numpy as np
from jaxtyping import Array

# What public functions accept: JAX or NumPy arrays.
ArrayLike = Array | np.ndarray
