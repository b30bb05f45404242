"""Test settings in the style of diffrax: strict rank and dtype promotion, the jaxtyping shape annotations
of the numerical core checked at run time (beartype), float64 on request (the `x64` fixture), shared
fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest
from jaxtyping import install_import_hook

# Installed before anything imports nrnn_jax: every annotated function of these modules checks its
# arguments' and results' shapes (`Float[Array, "B T d"]` …) on each call, so a wrong shape fails a test.
# The configuration modules and the model's constructor are left out: they validate their own arguments
# with messages the tests check.
install_import_hook(["nrnn_jax.cells", "nrnn_jax._brownian", "nrnn_jax._drive", "nrnn_jax._loops", "nrnn_jax._gradients",
                     "nrnn_jax.recurrence", "nrnn_jax.solvers", "nrnn_jax.regularizer",
                     "nrnn_jax.losses"], "beartype.beartype")

jax.config.update("jax_numpy_rank_promotion", "raise")
# No implicit promotion between array dtypes (float32 + float64, int + float arrays); Python scalars stay
# weakly typed, which is what the library relies on.
jax.config.update("jax_numpy_dtype_promotion", "strict")
# JAX's backends start now: a command-line main called in-process by a test then leaves the host as it is
# (nrnn_jax.cli configures only a process whose JAX has not started), so no test changes the devices of the
# tests after it. The host set-up itself is tested in fresh processes (tests/test_host.py).
jax.devices()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """$NRNN_DATA (the library's data directory variable), else ../shared/data, when present (tests that need
    the real files skip otherwise)."""
    path = Path(os.environ.get("NRNN_DATA", SHARED_DATA))
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (scoped: float32 tests keep float32 semantics)."""
    with jax.enable_x64(True):
        yield
