"""Test settings in the style of diffrax: strict rank promotion, float64 on request (the `x64` fixture),
shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data when present (tests that need the real files skip otherwise)."""
    path = Path(os.environ.get("NRNN_SHARED_DATA", SHARED_DATA))
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (scoped: float32 tests keep float32 semantics)."""
    with jax.enable_x64(True):
        yield
