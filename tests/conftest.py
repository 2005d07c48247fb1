"""Test-wide setup: 8 fake CPU devices and XLA flags (set before jax is imported), and the order
in which the test files run, and verl on the import path for the tests that call it."""
import os
import sys

import pytest

# XLA:CPU's LLVM at -O0: the suite's programs are tiny and compile far more often than they run
# (a quarter off the time of the end-to-end files); every comparison runs under the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet XLA's SPMD remat warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The slowest test files first (measured with `pytest --durations`), so that both workers of
# `make test` (`--dist loadfile --no-loadscope-reorder`) end on short files together.
# test_engine.py goes first, on a fresh worker: its continuous-engine compiles crashed XLA
# (a segmentation fault inside `backend_compile_and_load` or the executable's serialisation)
# in three full-suite runs, each time late in a worker that had loaded torch, verl and ray,
# never when run alone or first (over a hundred of its compiles in a loop); not understood.
SLOWEST_FIRST = ("test_engine.py", "test_compile_check.py", "test_checkpoint.py",
                 "test_multihost.py", "test_frontier.py", "test_packing.py", "test_bench.py",
                 "test_own_data.py", "test_rollout.py", "test_pipeline.py",
                 "test_real_data_smoke.py", "test_reward_calls.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept


@pytest.fixture
def verl_path(monkeypatch):
    """verl importable: `make test` installs it into <venv>/verl, outside site-packages
    (requirements-verl.txt, Makefile)."""
    monkeypatch.syspath_prepend(os.path.join(sys.prefix, "verl"))


CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def close_compilation_cache(saved: dict) -> None:
    """Restore jax's persistent-cache settings and close the cache a test opened: jax decides
    once per process whether to use it, so restoring the config alone leaves it open."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def no_compilation_cache_after_a_test():
    """`frontier`, `compare` and `offpolicy` point JAX's persistent compilation cache at their
    run folder (`frontier.keep_compiled`). Left open, every later compile on that worker wrote
    its executable into a test's folder, and one such write crashed a worker with a segmentation
    fault in three full-suite runs (two in test_engine.py, after test_frontier.py and after
    test_compare.py)."""
    import jax
    from jax._src import compilation_cache as jax_cache
    saved = {k: getattr(jax.config, k) for k in CACHE_KEYS}
    yield
    if jax_cache._cache is not None or any(getattr(jax.config, k) != v for k, v in saved.items()):
        close_compilation_cache(saved)
