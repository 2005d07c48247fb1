"""One writer per run directory: `<out_dir>/run.lock`.

Two runs in one out_dir write into each other's checkpoint folders (orbax then fails in the
other run's temporary folders, or worse, resumes from a mix), so `run_experiment` takes this
lock before it writes anything and gives it back when it returns or raises
(`one_writer`). A second run finds it held and stops with `RunLocked` (a `ConfigError`: one
line naming the holder, exit 2).

How: an exclusive, non-blocking `flock` on the file, held open for the whole run, and the
holder's host, pid and start time written into it (for the message, and for the next run to
say whose lock it took over). The kernel drops a flock when its process dies, so a run killed
with SIGKILL leaves only the text behind; the next run gets the lock, warns that it takes over
from that holder, and goes on. A clean exit empties the file; it is never deleted (deleting a
locked file lets a third run lock a new file of the same name beside a second run still holding
the old one).

Several processes (p3o_jax/distributed.py): process 0 alone takes the lock, and every process
waits at a broadcast of the outcome, so that all of them run, or all stop with the line.

What the lock promises, by filesystem (the file system of out_dir, read from /proc/self/mounts):

- local disks: exclusion between any two runs on the machine;
- NFS (v3 with lockd, v4): exclusion across hosts too (Linux maps flock to NFS byte-range
  locks); a crashed host's lock lasts until the server's lease expires (about 90 s);
- FUSE (GCS FUSE on TPU VMs, other object stores): locks are not shared between hosts, only
  within one. There a lock file naming another host is taken as held even when its flock is
  free (its run may be alive over there); if that run is gone, delete the file. Two hosts that
  start at the same instant can still both pass: give each run its own out_dir there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import time
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from p3o_jax import storage
from p3o_jax.checks import ConfigError

LOCK_FILE = "run.lock"


class RunLocked(ConfigError):
    """Another run holds the out_dir's lock."""


def _mount_type(path: str) -> str:
    """The filesystem type of the mount `path` is on ("" if /proc/self/mounts cannot say)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, point, fstype = line.split()[:3]
                point = point.replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return kind


def _describe(holder: dict) -> str:
    return f"{holder.get('host')} pid {holder.get('pid')} (started {holder.get('started')})"


def _alive_here(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def acquire(out_dir: str):
    """Lock `out_dir` for this process: the open lock file (hand it to `release`), or
    `RunLocked` naming the holder."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            f.close()
            raise
        locked = False
    try:
        holder = json.loads(f.read() or "{}")
    except json.JSONDecodeError:  # torn by a holder killed while writing it
        holder = {}
    host = socket.gethostname()
    if locked and holder and holder.get("host") != host and _mount_type(path).startswith("fuse"):
        locked = False  # its flock tells nothing about a run on another host (see above)
    if not locked:
        f.close()
        raise RunLocked(f"{out_dir} is in use by another run: {_describe(holder)}, lock "
                        f"{path}; wait for it to end or use another out_dir")
    if holder:
        gone = "gone" if holder.get("host") != host or not _alive_here(holder.get("pid")) \
            else "alive but no longer holding it"
        warnings.warn(f"{path}: taking over the lock of {_describe(holder)}, {gone} (it did "
                      f"not exit cleanly)", RuntimeWarning, stacklevel=3)
    try:
        f.seek(0)
        f.truncate()
        json.dump({"host": host, "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:   # a full disk: `hold` reports the write; the lock goes with the file
        f.close()
        raise
    return f


def release(f) -> None:
    """Empty the lock file (a clean exit leaves no holder) and drop the flock."""
    with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
        f.seek(0)
        f.truncate()
    f.close()


@contextlib.contextmanager
def hold(out_dir: str):
    """The run's lock on `out_dir` while inside (process 0 takes it; all processes stop if it
    cannot)."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            with storage.writing(os.path.join(os.path.abspath(out_dir), LOCK_FILE)):
                lock = acquire(out_dir)
        except RunLocked as e:
            error = e
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = RunLocked(f"{out_dir} is in use by another run (process 0 could not take "
                              f"its lock; its output names the holder)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            release(lock)


def one_writer(run):
    """Decorate `run(cfg, ...)` to hold `cfg.out_dir`'s lock while it runs; a
    `storage.WriteFailed` of a save that did not know the run names its last checkpoint
    (`storage.of_run`), and background threads' tracebacks of that failed write are kept off
    stderr (`storage.quiet_background_errors`). Other errors pass as they are: only the write
    sites report a failed write (p3o_jax/storage.py)."""
    @functools.wraps(run)
    def locked(cfg, *args, **kwargs):
        with storage.quiet_background_errors(), storage.of_run(cfg.out_dir), hold(cfg.out_dir):
            return run(cfg, *args, **kwargs)
    return locked
