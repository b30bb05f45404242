"""Test settings in the style of diffrax: strict rank and dtype promotion, the jaxtyping shape annotations
of the numerical core checked at run time (beartype), float64 on request (the `x64` fixture), shared
fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
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
# One persistent compilation cache for the whole test run, in a temporary directory made by the first pytest
# process (xdist's workers and every subprocess a test starts inherit it through the environment, and the
# directory goes with that process). Most of the suite's time is XLA compiling the same programs again: each
# training builds its step afresh, so each run, worker and subprocess would compile it anew. A cached
# executable is the one XLA compiled for the same program, so every number is the same. Only pytest's own
# processes write entries, each atomically (a whole file renamed into place), so a reader never sees half an
# entry; the subprocesses only read (their minimum compile time to write is never reached).
_CACHE_ENV = "NRNN_TEST_JAX_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="nrnn-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1e9"


def _atomic_writes() -> bool:
    """LRUCache.put (jax's file cache, without eviction) writes the file in place; here to a temporary name,
    then renamed. False where jax's cache is not the class this expects (then each process keeps its own)."""
    try:
        from jax._src import lru_cache
    except ImportError:
        return False
    cls, suffix = getattr(lru_cache, "LRUCache", None), getattr(lru_cache, "_CACHE_SUFFIX", None)
    if cls is None or suffix is None or not callable(getattr(cls, "put", None)):
        return False
    in_place = cls.put

    def put(self, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True):
            return in_place(self, key, value)
        path = Path(str(self.path)) / f"{key}{suffix}"
        if not key or path.exists():
            return in_place(self, key, value)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(value)
        os.replace(tmp, path)

    cls.put = put
    return True


jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV] if _atomic_writes()
                  else tempfile.mkdtemp(prefix="process-", dir=os.environ[_CACHE_ENV]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


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
