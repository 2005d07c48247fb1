"""Test-wide setup: 8 fake CPU devices and XLA flags (set before jax is imported), the order in
which the test files run, verl on the import path for the tests that call it, and what a worker
releases between tests (the persistent compilation cache, compiled programs near the map limit)."""
import faulthandler
import gc
import glob
import io
import os
import sys
import tempfile
import uuid

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
    run folder (`frontier.keep_compiled`). Left open, every later compile on that worker writes
    its executable into a test's folder."""
    import jax
    from jax._src import compilation_cache as jax_cache
    saved = {k: getattr(jax.config, k) for k in CACHE_KEYS}
    yield
    if jax_cache._cache is not None or any(getattr(jax.config, k) != v for k, v in saved.items()):
        close_compilation_cache(saved)


def memory_map_count() -> int:
    """How many memory maps this process holds (the lines of /proc/self/maps)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def max_map_count() -> int:
    """The most memory maps a process may hold (vm.max_map_count, 65530 by default)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:
        return 65530


def free_compiled_programs_above(maps: int, held: int | None = None) -> bool:
    """Drop every compiled program (`jax.clear_caches`) once this process holds more than `maps`
    memory maps (`held`, if already counted): whether it did."""
    if (memory_map_count() if held is None else held) <= maps:
        return False
    import jax
    jax.clear_caches()
    gc.collect()
    return True


HAS_PROC_MAPS = os.path.exists("/proc/self/maps")


RUN = "P3O_JAX_TEST_RUN"


def worker_state_file(worker: str) -> str:
    """Where a pytest-xdist worker notes its state after each test, for the report of a crash."""
    return os.path.join(tempfile.gettempdir(), f"p3o-jax-tests-{os.environ[RUN]}-{worker}.txt")


def worker_state(maps: int) -> str:
    """This process's `maps` memory maps (of vm.max_map_count), resident memory and threads."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return (f"{maps} memory maps of {max_map_count()}, "
            f"resident {status['VmRSS'].strip()}, {status['Threads'].strip()} threads")


@pytest.fixture(autouse=True)
def compiled_programs_freed_before_the_map_limit(request):
    """Each compiled XLA:CPU program keeps its JIT code in memory maps while jax caches it, and
    a process may hold vm.max_map_count (65,530) maps: past that a compile's mmap fails and the
    process dies. The suite's workers peak near 33,000 (test_engine.py alone adds ~25,000); past
    half the limit a worker drops its compiled programs (later tests compile theirs again), as
    the sweeps do between runs (`frontier.rl_run`). Each worker notes its state after each test
    (`worker_state_file`), which `pytest_terminal_summary` prints if a worker crashed."""
    yield
    if HAS_PROC_MAPS:
        held = memory_map_count()
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:
            with open(worker_state_file(worker), "w") as f:
                f.write(f"{worker} after {request.node.nodeid}: {worker_state(held)}\n")
        free_compiled_programs_above(max_map_count() // 2, held)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """In a worker, a fatal signal prints the Python stack of the thread it hit alone (pytest's
    faulthandler prints every thread's, and the crashing thread's frames fell outside the end
    of the output CI shows); no Python frames there means a thread of XLA's own. Written where
    pytest's own faulthandler writes (a copy of stderr's descriptor), not to captured output."""
    os.environ.setdefault(RUN, uuid.uuid4().hex)   # the controller's, which its workers inherit
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            stderr = sys.stderr.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            stderr = -1
        stderr = stderr if stderr != -1 else sys.__stderr__.fileno()   # xdist's patched stderr
        faulthandler.enable(file=os.dup(stderr), all_threads=False)


def pytest_terminal_summary(terminalreporter):
    """After a worker crash, each worker's state after its last finished test."""
    crashed = [r for r in terminalreporter.stats.get("failed", [])
               if "crashed while running" in str(r.longrepr)]
    if crashed and HAS_PROC_MAPS:
        terminalreporter.section("workers' state after their last finished test")
        for path in sorted(glob.glob(worker_state_file("*"))):
            terminalreporter.write_line(open(path).read().strip())


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        for path in glob.glob(worker_state_file("*")):
            os.remove(path)
