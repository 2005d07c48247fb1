"""One writer per out_dir (p3o_jax/run_lock.py): a held lock refuses a second run naming the
holder, a dead holder's lock is taken over with a warning, a clean exit leaves it free; only
the run's writes are reported as failed writes. The race of two real training runs is in
tests/test_checkpoint.py."""
import errno
import json
import os
import socket
import subprocess
import sys
import types

import pytest

from p3o_jax import run_lock
from p3o_jax.run_lock import LOCK_FILE, RunLocked, acquire, release
from p3o_jax.storage import WriteFailed


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


def test_one_writer_reports_only_writes_as_failed_writes(tmp_path):
    """An OSError the run raises outside its writes (a reward function's, a data read's)
    passes as it is, whatever its errno; a `WriteFailed` of a save that did not know the run
    names the run's last checkpoint. The lock is given back either way."""
    cfg = types.SimpleNamespace(out_dir=str(tmp_path))

    @run_lock.one_writer
    def run(cfg, error):
        raise error
    with pytest.raises(OSError) as e:
        run(cfg, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert type(e.value) is OSError
    (tmp_path / "ckpt" / "sft" / "3").mkdir(parents=True)
    with pytest.raises(WriteFailed) as e:
        run(cfg, WriteFailed(str(tmp_path / "hf"), os.strerror(errno.ENOSPC), 0))
    assert f"the last complete checkpoint is {tmp_path}/ckpt/sft/3:" in str(e.value)
    assert holder(tmp_path) == {}
