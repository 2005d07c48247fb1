"""Start-up as a user sees it: a tool prints nothing but its own output on a CPU box (the
compile-only compilers stay off its import path), and a Cloud TPU VM is recognised by its TPU
chips, not by libtpu being installed."""
import fnmatch
import importlib.util
import os
import subprocess
import sys

from p3o_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_ONLY = ("libtpu", "jax_cuda12_plugin", "jax_plugins.xla_cuda12")


def user_run(*args):
    """`python -m <args>` in the repository, in the environment a user has (none of the test
    suite's JAX_PLATFORMS, XLA_FLAGS or TF_CPP_MIN_LOG_LEVEL)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def test_compile_only_compilers_are_not_importable_by_a_run():
    found = [m for m in COMPILE_ONLY if importlib.util.find_spec(m.split(".")[0]) and
             importlib.util.find_spec(m)]
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
