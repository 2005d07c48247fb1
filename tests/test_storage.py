"""Failed writes (p3o_jax/storage.py) outside the checkpoints (whose disk-full runs are in
tests/test_checkpoint.py): the HF export, metrics.jsonl and the run's JSON files stop with one
line naming the file and leave nothing half-written; only writes are classified so; the
background threads' tracebacks of a refused write print nothing."""
import errno
import logging
import os
import threading
import warnings

import jax
import pytest

from p3o_jax import hf, storage
from p3o_jax import model as M
from p3o_jax.logger import MetricsLogger
from p3o_jax.storage import WriteFailed


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_hf_export_on_a_full_disk_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    cfg = M.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=16)
    params = M.init_params(cfg, jax.random.key(0))
    out = tmp_path / "hf" / "sft"
    hf.save_pretrained(params, cfg, str(out))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(WriteFailed, match=rf"writing {out} failed: No space left on device \("):
        hf.save_pretrained(params, cfg, str(out))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path / "hf") == ["sft"]    # no .partial folder left


def test_metrics_on_a_full_disk_name_the_file_and_the_last_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "ckpt" / "sft" / "6").mkdir(parents=True)
    logger = MetricsLogger(str(tmp_path))
    monkeypatch.setattr(logger._file, "flush", full_disk)
    with pytest.raises(WriteFailed) as e, storage.writing(str(tmp_path), str(tmp_path)):
        logger.log("sft", 7, {"loss": 1.0})
    assert str(e.value).startswith(f"writing {tmp_path}/metrics.jsonl failed: No space left")
    assert f"last complete checkpoint is {tmp_path}/ckpt/sft/6:" in str(e.value)


def test_io_cause_reads_chains_and_tensorstore_text():
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as e:
        assert storage.io_cause(e) == os.strerror(errno.EDQUOT)
    assert storage.io_cause(ValueError("Failed to write: No space left on device [28]")) \
        == os.strerror(errno.ENOSPC)
    assert storage.io_cause(FileNotFoundError(errno.ENOENT, "gone")) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_on_a_full_disk_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """tensorboardX's writer thread dies on a failed write; logging on would block forever
    (so the logging runs in a thread here, and a hang fails the test after 30 s)."""
    logger = MetricsLogger(str(tmp_path))
    logger.log("sft", 0, {"loss": 1.0})
    writer = logger._writer.file_writer.event_writer
    monkeypatch.setattr(writer._ev_writer, "write_event", full_disk)
    raised = []

    def log_on():   # the writer may die on step 0's event still queued, so step 1 may raise
        try:
            for step in range(1, 40):   # more than its queue holds
                logger.log("sft", step, {"loss": 1.0})
        except WriteFailed as e:
            raised.append(str(e))
    t = threading.Thread(target=log_on, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "logging blocked on the dead TensorBoard writer"
    assert raised and raised[0].startswith(f"writing {tmp_path}/tb failed: its writer thread")
    assert not writer._worker.is_alive()
    logger.close()                  # returns (tensorboardX's own close would block)


def test_write_atomically_keeps_the_old_file_on_a_full_disk(tmp_path):
    path = tmp_path / "summary.json"
    storage.write_atomically(str(path), lambda f: f.write("old"))

    def fill(f):
        f.write("half")
        full_disk()
    with pytest.raises(WriteFailed, match=rf"writing {path} failed: No space left on device"):
        storage.write_atomically(str(path), fill)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]
    umask = os.umask(0o22)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask       # as open() would make it


def test_only_writes_become_write_failed():
    """`writing` classifies what fails inside it as a write; outside, an OSError of a full disk
    is whatever raised it, and `of_run` only names the run of a WriteFailed."""
    with pytest.raises(OSError) as e, storage.of_run("/runs/x"):
        full_disk()
    assert type(e.value) is OSError
    with pytest.raises(WriteFailed) as e, storage.of_run("/runs/x"), storage.writing("/runs/x/a"):
        full_disk()
    assert e.value.out_dir == "/runs/x" and e.value.path == "/runs/x/a"


def test_background_errors_of_a_refused_write_print_nothing(monkeypatch, caplog):
    """orbax's writer threads and their log records (through absl) of a full disk stay off
    stderr; any other thread error or log record does not."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def thread(error):
        def run():
            raise error
        t = threading.Thread(target=run)
        t.start()
        t.join()
    other = ValueError("a bug")
    tensorstore = ValueError('Error writing "x": Failed to write 10 bytes to file 3: No space '
                             "left on device [os_error_code='28']")
    absl = logging.getLogger("absl")
    with storage.quiet_background_errors():
        thread(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        thread(tensorstore)
        thread(other)
        absl.error("save failed", exc_info=tensorstore)
        absl.error("Failed to run 5 Handler Commit operations: %s", tensorstore)
        absl.error("save failed", exc_info=other)
    assert seen == [other]
    assert [r.exc_info[1] for r in caplog.records if r.name == "absl"] == [other]
    thread(tensorstore)                 # outside: printed as usual
    assert seen == [other, tensorstore]
    before = (threading.excepthook, [list(logging.getLogger(n).filters) for n in ("absl", "asyncio")])
    with pytest.raises(WriteFailed), storage.quiet_background_errors():
        raise WriteFailed("/runs/x/ckpt", os.strerror(errno.ENOSPC), 0)
    # left by a failed write, still quiet: asyncio logs a failed save's futures when they
    # are collected, after the run returned
    logging.getLogger("asyncio").error("Future exception was never retrieved",
                                       exc_info=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    thread(tensorstore)
    assert seen == [other, tensorstore]
    assert not [r for r in caplog.records if r.name == "asyncio"]
    threading.excepthook = before[0]          # this test's own state back
    for name, filters in zip(("absl", "asyncio"), before[1]):
        logging.getLogger(name).filters[:] = filters


def test_a_short_disk_is_announced(tmp_path):
    """A checkpoint's size is known before it is written: too little free space for the ones
    due is a warning, once per folder."""
    storage.warn_if_short(str(tmp_path), 1, count=2)         # 2 bytes fit: nothing
    with pytest.warns(RuntimeWarning, match=rf"{tmp_path}: .* free, but 3 more checkpoint\(s\) "
                                            r"of about 1048576.0 GiB are due .*will likely fail"):
        storage.warn_if_short(str(tmp_path), 1 << 50, count=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        storage.warn_if_short(str(tmp_path), 1 << 50, count=3)   # said once


def test_closed_loop_tracebacks_are_dropped_from_stderr_and_the_rest_kept():
    """What tensorstore prints from C after a failed save (a traceback ending "RuntimeError:
    Event loop is closed", written in pieces, from two threads at once) is dropped; other
    tracebacks, progress bars and lines pass whole."""
    import io
    import threading

    out = io.StringIO()
    w = storage._WithoutClosedLoopTracebacks(out)
    closed = ["Traceback (most recent call last):\n", '  File "base_events.py", line 806\n',
              "    self._check_closed()\n", "RuntimeError", ": ", "Event loop is closed", "\n"]
    threads = [threading.Thread(target=lambda: [w.write(c) for c in closed]) for _ in range(2)]
    w.write("sft:  50%\r")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for chunk in ["Traceback (most recent call last):\n", "  File y\n", "ValueError: real\n",
                  "error: writing x failed\n"]:
        w.write(chunk)
    assert out.getvalue() == ("sft:  50%\rTraceback (most recent call last):\n  File y\n"
                              "ValueError: real\nerror: writing x failed\n")
