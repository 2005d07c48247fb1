"""Start-up as a user sees it: a tool prints nothing but its own output on a CPU box (the
compile-only compilers stay off its import path), and a Cloud TPU VM is recognised by its TPU
chips, not by libtpu being installed."""
import fnmatch
import importlib.util
import os
import site
import subprocess
import sys

from p3o_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_ONLY = ("libtpu", "jax_cuda12_plugin", os.path.join("jax_plugins", "xla_cuda12"))
# what a test process may have picked up that a user's shell has not: the suite's settings, and
# what jax's TPU start-up writes into os.environ once a test has compiled for TPU in this worker
NOT_A_USERS = ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "ALLOW_MULTIPLE_LIBTPU_LOAD")


def user_run(*args):
    """`python -m <args>` in the repository, in the environment a user has (none of the test
    suite's settings, `NOT_A_USERS` and TPU_*)."""
    env = {k: v for k, v in os.environ.items()
           if k not in NOT_A_USERS and not k.startswith("TPU_")}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def test_compile_only_compilers_are_not_importable_by_a_run():
    """Not in site-packages (compile_check appends .venv/compile-targets to this process's path
    when a test compiled for TPU or GPU before this one, so the folders are looked at)."""
    found = [m for d in site.getsitepackages() for m in COMPILE_ONLY
             if os.path.exists(os.path.join(d, m))]
    assert not found, (f"{found} are in site-packages: this venv predates "
                       f"requirements-compile.txt; `make test` moves them to .venv/compile-targets")


def test_train_prints_only_its_own_output():
    """The run goes as far as starting jax's backends and `distributed.initialize` (the config
    check that stops it needs the device count), with no environment set."""
    result = user_run("p3o_jax.cli.train", "exp=toy", "rl.minibatches=3")
    assert result.returncode == 2, result.stdout
    assert result.stdout == "error: config key 'rl.minibatches': must divide " \
                            "rl.prompts_per_iter=64\n"
    result = user_run("p3o_jax.cli.train", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Train: SFT -> reward model -> RL"), result.stdout[:2000]


def test_cloud_tpu_needs_tpu_chips_not_just_libtpu(monkeypatch):
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_PLATFORMS"):
        monkeypatch.delenv(k, raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else find_spec(name, *a))
    chips = []
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: fnmatch.filter(chips, pattern))
    for chips[:] in ([], ["/dev/vfio/vfio"]):               # libtpu on a CPU box
        assert distributed.managed_cluster() is None
    for chips[:] in (["/dev/accel0"], ["/dev/vfio/0"]):   # v4/v5e; v5p/v6e
        assert distributed.managed_cluster() == "Cloud TPU"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert distributed.managed_cluster() is None
