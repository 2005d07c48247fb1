"""One writer per out_dir (p3o_jax/run_lock.py): a held lock refuses a second run naming the
holder, a dead holder's lock is taken over with a warning, a clean exit leaves it free. The
race of two real training runs is in tests/test_checkpoint.py."""
import json
import socket
import subprocess
import sys

import pytest

from p3o_jax import run_lock
from p3o_jax.run_lock import LOCK_FILE, RunLocked, acquire, release


def holder(out) -> dict:
    return json.loads((out / LOCK_FILE).read_text() or "{}")


def test_a_held_lock_refuses_a_second_taker(tmp_path):
    lock = acquire(str(tmp_path))
    try:
        me = holder(tmp_path)
        assert me["host"] == socket.gethostname() and me["pid"] > 0
        with pytest.raises(RunLocked, match=rf"in use by another run: .* pid {me['pid']} "):
            acquire(str(tmp_path))   # flock: a second open file, even in this process
    finally:
        release(lock)
    assert holder(tmp_path) == {}                # a clean exit leaves no holder
    release(acquire(str(tmp_path)))


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": "earlier"}))
    with pytest.warns(RuntimeWarning, match=rf"taking over the lock of .* pid {pid} .*gone"):
        lock = acquire(str(tmp_path))
    assert holder(tmp_path)["pid"] != pid
    release(lock)


def test_on_fuse_another_hosts_lock_counts_as_held(tmp_path, monkeypatch):
    """GCS FUSE shares no locks between hosts: a free flock says nothing about a run there."""
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": "tpu-vm-7", "pid": 1, "started": "earlier"}))
    monkeypatch.setattr(run_lock, "_mount_type", lambda path: "fuse.gcsfuse")
    with pytest.raises(RunLocked, match="tpu-vm-7 pid 1"):
        acquire(str(tmp_path))
    monkeypatch.setattr(run_lock, "_mount_type", lambda path: "nfs4")   # NFS shares them
    with pytest.warns(RuntimeWarning, match="taking over the lock of tpu-vm-7"):
        release(acquire(str(tmp_path)))
