"""Several processes, one run: start-up, each process's share of a batch, host copies.

JAX runs one program per process (per host, or per GPU) and the processes together see one
set of global devices; `sharding.make_mesh` lays the (data, fsdp, tensor) mesh over all of
them, and every jitted step runs on all processes at once. Three things differ from a
single process:

- **Start-up.** `initialize(cfg.dist)` calls `jax.distributed.initialize` before anything
  touches a device. Under SLURM (`srun`), Open MPI and on Cloud TPU VMs jax finds the
  coordinator and the process ids itself; elsewhere they come from `dist.coordinator`,
  `dist.num_processes`, `dist.process_id` or the environment variables `ENV` names
  (`scripts/launch_local.py` sets those for N processes on one machine).
- **Input.** A global batch is never built whole: each process builds the rows its own
  devices hold (`process_rows`, `local_rows`) and `sharding.shard_batch` assembles the global
  array with `jax.make_array_from_process_local_data`. Tasks address rows by index, so a
  process reads exactly its rows, and a run on N processes sees the same global batches as a
  run on one.
- **Output.** Values every process needs on the host (sampled responses, evaluation
  results) are gathered with `to_host`; files are written by process 0 only (metrics,
  config, summary, preference data), except checkpoints, which every process saves together
  through orbax.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from p3o_jax.checks import ConfigError
from p3o_jax.sharding import batch_sharding

# The environment variables an explicit set-up may come from, by DistConfig field.
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips, as a Cloud TPU VM shows them: `/dev/accel*` (v2 to
    v5e) or numbered `/dev/vfio/*` groups (v5p, v6e and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def managed_cluster() -> str | None:
    """The cluster this process runs in, when `jax.distributed.initialize()` can find the
    coordinator and the process ids there by itself; None otherwise.

    SLURM and Open MPI count only with more than one task, and only inside a job step (what
    jax reads exists there). A Cloud TPU VM is recognised by its TPU chips
    (`tpu_chips_attached`) and libtpu (the `jax[tpu]` extra), without `JAX_PLATFORMS` ruling
    TPUs out; jax then asks the VM's metadata server, which also answers (one process) on a
    single-host VM. libtpu alone is no TPU VM: a CPU box may hold it to compile for TPUs.
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    platforms = env.get("JAX_PLATFORMS", "")
    if (tpu_chips_attached() and importlib.util.find_spec("libtpu") is not None
            and (not platforms or "tpu" in platforms)):
        return "Cloud TPU"
    return None


def initialize(cfg) -> None:
    """Join the other processes of the run (`jax.distributed.initialize`), if there are any;
    `cfg` is the run's `config.DistConfig`.

    Must run before anything touches a device; a no-op when already initialised. Each of
    `dist.coordinator`, `dist.num_processes`, `dist.process_id` left unset is read from its
    environment variable (`ENV`). `num_processes=1` means a single process. In a cluster that
    `managed_cluster()` recognises, jax fills in whatever is still unset; elsewhere a
    coordinator makes an explicit set-up, which needs all three, and no coordinator means a
    single process.
    """
    if jax.distributed.is_initialized():
        return

    def setting(field: str, unset):
        value = getattr(cfg, field)
        if value == unset and ENV[field] in os.environ:
            text = os.environ[ENV[field]]
            try:
                value = type(unset)(text)
            except ValueError:
                raise ConfigError(f"config key 'dist.{field}': environment variable "
                                  f"{ENV[field]}={text!r} is not a number") from None
        return value

    num_processes = setting("num_processes", 0)
    if num_processes == 1:
        return
    coordinator, process_id = setting("coordinator", ""), setting("process_id", -1)
    if not managed_cluster():
        if not coordinator:
            if num_processes > 1 or process_id >= 0:
                raise ConfigError(f"config key 'dist.coordinator': needed for several "
                                  f"processes outside SLURM, Open MPI and Cloud TPU; set it "
                                  f"or {ENV['coordinator']}")
            return
        if num_processes < 1:
            raise ConfigError(f"config key 'dist.num_processes': needed with a coordinator "
                              f"({coordinator}); set it or {ENV['num_processes']}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"config key 'dist.process_id': {process_id} is not in "
                              f"0..{num_processes - 1}; set it or {ENV['process_id']}")
    jax.distributed.initialize(coordinator or None, num_processes or None,
                               process_id if process_id >= 0 else None,
                               initialization_timeout=cfg.init_timeout_s)


def process_rows(mesh, n: int) -> list[tuple[int, int]]:
    """The rows of a global batch of `n` (laid out by `sharding.batch_sharding`) that this
    process's devices hold, as sorted `(start, stop)` runs: `[(0, n)]` in a single process,
    one run per process when the mesh keeps each process's devices together along the batch
    axes (CPU, GPU clusters), several when a topology-aware TPU mesh interleaves them. Rows
    replicated over processes (a `tensor` axis spanning hosts) are held by each of them."""
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
    runs: list[tuple[int, int]] = []
    for start, stop in sorted({s.indices(n)[:2] for (s,) in index.values()}):
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs


def concat_rows(parts: list):
    """Pytrees of numpy arrays, concatenated along their first axes (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def local_rows(mesh, n: int, read):
    """This process's rows of a global batch of `n`: `read(start, stop)` (a pytree of numpy
    arrays, rows `start .. stop - 1`) for each run of `process_rows`, concatenated. The
    result is what `sharding.shard_batch` expects."""
    return concat_rows([read(start, stop) for start, stop in process_rows(mesh, n)])


def to_host(tree):
    """Numpy copies of a pytree of arrays, whole on every process: an array split over other
    processes' devices is all-gathered (a collective: every process must call this at the
    same point), others are copied from the local devices."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def gather_texts(text: str) -> list[str]:
    """Every process's `text`, in process order: `[text]` in a single process, else an
    all-gather (a collective: every process must call this at the same point)."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))
    padded = np.zeros(max(int(lengths.max()), 1), np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0
