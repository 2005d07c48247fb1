"""Failed writes (a full disk, a quota, a read-only or vanished filesystem) stop the run with one
line that says what happened, where, and what is kept, and nothing else on stderr.

Errors are classified where they happen: `writing(path, out_dir)` wraps each write site, and
only there does an error caused by the filesystem (`io_cause`: an `OSError` anywhere in the
exception's chain, or tensorstore's text of one) become `WriteFailed`, whose message names the
path, the free space on its filesystem and the run's last complete checkpoint (the one the same
command resumes from), after removing what the failed save left half-written. The CLI prints it
and exits with `EXIT_IO_ERROR` (74). The write sites: checkpoints and final params
(p3o_jax/checkpoint.py), the HF export (hf.py), metrics.jsonl and TensorBoard (logger.py), the
run lock (run_lock.py), config.json, preferences.npz, summary.json and the per-prompt eval
records (pipeline.py, through `write_atomically`), and the tokenised-data cache
(data/loader.py). An OSError anywhere else is not a write: a reward function's stays its
`RewardError` (exit 3), a data read's a data error (exit 2), whatever its errno.
`of_run(out_dir)` around the whole run only completes a `WriteFailed` whose save did not know
the run with the run's last checkpoint.

What a resume reads is never half-written: orbax saves a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete (a step folder is always whole),
the final params likewise; the HF export goes to a temporary folder whose files are renamed
into place at the end; `write_atomically` files are renamed into place whole; metrics.jsonl
loses at most a torn last line, which `MetricsLogger.rewind` drops.

A failed write is reported once: orbax's background writer threads and the asyncio loops they
run in print their own tracebacks when the disk fills (dozens of them, before the line);
`quiet_background_errors` keeps those of an error `io_cause` recognises off stderr (the main
thread's `WriteFailed` reports it), and lets any other through.

`warn_if_short(directory, nbytes, count)` is the early warning: a checkpoint's size is known
before it is written, so a save that will not fit is announced while the state is still in
memory.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from typing import IO, Callable

EXIT_IO_ERROR = 74   # sysexits EX_IOERR

# errno values that mean "the filesystem refuses the write", not "this path is wrong"
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ESTALE)
_IO_TEXTS = tuple(os.strerror(n) for n in _IO_ERRNOS)


class WriteFailed(RuntimeError):
    """A save failed on the filesystem; the message says where, why, the free space there and,
    once `out_dir` is known, the run's last complete checkpoint."""

    def __init__(self, path: str, cause: str, free: int | None, out_dir: str | None = None):
        super().__init__(path, cause, free, out_dir)
        self.path, self.cause, self.free, self.out_dir = path, cause, free, out_dir

    def __str__(self):
        free = "unknown" if self.free is None else _size(self.free)
        text = f"writing {self.path} failed: {self.cause} ({free} free there)"
        if self.out_dir is None:
            return text
        last = last_checkpoint(self.out_dir)
        if last is None:
            return text + "; no checkpoint is complete yet: free space and run the same command"
        return (text + f"; the last complete checkpoint is {last}: free space and run the same "
                       f"command again to continue from it")


def io_cause(error: BaseException) -> str | None:
    """The filesystem's reason (its strerror) if `error` or one it came from is such a
    failure, else None. tensorstore (orbax's array writer) reports one in its message only."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _IO_ERRNOS:
            return os.strerror(error.errno)
        text = str(error)
        if found := next((t for t in _IO_TEXTS if t in text), None):
            return found
        error = error.__cause__ or error.__context__
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_space(path: str) -> int | None:
    """Bytes free on the filesystem of `path` (its nearest existing folder); None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_usage(path: str) -> int:
    """Bytes the files under `path` take on disk (allocated blocks)."""
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(path) for f in files)


def last_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint of the run (`<out_dir>/ckpt/<stage>/<step>`), if any."""
    steps = [p for p in glob.glob(os.path.join(os.path.abspath(out_dir), "ckpt", "*", "*"))
             if os.path.basename(p).isdigit() and os.path.isdir(p)]
    return max(steps, key=os.path.getmtime) if steps else None


def remove_partial(path: str, settle: float = 0.0) -> None:
    """Delete the temporary folders an interrupted orbax save left: of `path` itself, or of a
    step in the stage folder `path`. `settle` > 0: again until none has come back for `settle`
    seconds (at most 20 tries), since a failed save's writer threads that orbax does not let
    us join (its pools' workers) may still be making files there."""
    patterns = (glob.escape(path) + ".orbax-checkpoint-tmp*",
                os.path.join(glob.escape(path), "*.orbax-checkpoint-tmp*"))
    for _ in range(20):
        for leftover in [p for pattern in patterns for p in glob.glob(pattern)]:
            shutil.rmtree(leftover, ignore_errors=True)
        if not settle or _quiet(patterns, settle):
            return


def _quiet(patterns, seconds: float) -> bool:
    """Whether no path matches `patterns` during the next `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(map(glob.glob, patterns)):
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def writing(path: str, out_dir: str | None = None):
    """Inside: a failed write becomes `WriteFailed` naming `path` and, given the run's
    `out_dir`, its last complete checkpoint (see the module docstring). Wrap write sites
    only: whatever raises inside with an `OSError` of a full disk in its chain is reported as
    a failed write of `path`."""
    try:
        with of_run(out_dir):
            yield
    except WriteFailed:
        raise
    except Exception as e:
        cause = io_cause(e)
        if cause is None:
            raise
        free = free_space(path)
        remove_partial(path, settle=0.5)
        raise WriteFailed(path, cause, free, out_dir) from e


@contextlib.contextmanager
def of_run(out_dir: str | None):
    """Inside: a `WriteFailed` of a save that does not know the run it belongs to (the HF
    export, metrics.jsonl) names `out_dir`'s last complete checkpoint. Nothing else changes."""
    try:
        yield
    except WriteFailed as e:
        if e.out_dir is None:
            e.out_dir = out_dir
        raise


def write_atomically(path: str, write: Callable[[IO], None], mode: str = "w") -> None:
    """`write(f)` into a temporary file beside `path`, renamed to `path` when complete: readers
    see the old file or the whole new one. A failed write raises `WriteFailed` naming `path`
    and leaves no temporary file. `mode`: "w" (text) or "wb"."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{os.path.abspath(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    with writing(path):
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)   # the umask's mode
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class _RefusedWriteFilter(logging.Filter):
    """Drops the log records of a write the filesystem refused (`io_cause` of the record's
    exception, or its text): orbax's error logs of its failed background saves and asyncio's
    "Task exception was never retrieved"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            return not _background_noise(record.exc_info[1])
        return not any(t in record.getMessage() for t in _IO_TEXTS)


# orbax logs through absl; concurrent.futures logs the callbacks that find orbax's event loop
# closed after a refused write ("exception calling callback for <Future ...>")
_BACKGROUND_LOGGERS = ("absl", "asyncio", "concurrent.futures")


def _background_noise(error: BaseException | None) -> bool:
    """A refused write, or what it leaves behind: tensorstore's callbacks of a failed orbax
    save that find orbax's event loop closed (printed through `sys.excepthook`, no header)."""
    return error is not None and (io_cause(error) is not None or (
        isinstance(error, RuntimeError) and str(error) == "Event loop is closed"))


class _WithoutClosedLoopTracebacks:
    """sys.stderr less the tracebacks that end in "RuntimeError: Event loop is closed" (what
    tensorstore prints from C when a failed orbax save's callbacks find its loop closed, some
    without passing `sys.excepthook`, from several threads at once): each thread's traceback
    lines are held until its last one."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()
        self.held: dict[int, str] = {}      # per thread: its traceback so far
        self.partial: dict[int, str] = {}   # per thread: its line so far

    def write(self, text: str) -> int:
        me = threading.get_ident()
        with self.lock:
            partial = self.partial.pop(me, "") + text
            if me not in self.held and not partial.startswith("T") and "Traceback" not in partial:
                self.stream.write(partial)          # progress bars and lines pass at once
                return len(text)
            *lines, rest = partial.split("\n")
            for line in lines:
                self._line(me, line + "\n")
            if rest and me not in self.held and not "Traceback".startswith(rest[:9]):
                self.stream.write(rest)
            elif rest:
                self.partial[me] = rest
        return len(text)

    def _line(self, me: int, line: str) -> None:
        if me not in self.held and line.startswith("Traceback (most recent call last):"):
            self.held[me] = ""
        if me not in self.held:
            self.stream.write(line)
            return
        self.held[me] += line
        if not line[:1].isspace() and not line.startswith("Traceback"):   # its last line
            held = self.held.pop(me)
            if line.strip() != "RuntimeError: Event loop is closed":
                self.stream.write(held)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_background_errors():
    """Inside: a thread that dies of a write the filesystem refused (`io_cause`), a log record
    of one (orbax's through absl, asyncio's), or a callback from C that finds orbax's event loop
    closed after one (`_background_noise`) prints nothing: the main thread reports
    the failed write once, as `WriteFailed`. Other thread errors and log records print as
    usual. Left by a `WriteFailed`, the filters stay for the rest of the process: the failed
    save's futures log their errors (a refused write, or orbax's event loop closed under them)
    when they are collected, after the run has returned (the CLI then prints its line and
    exits)."""
    previous, previous_sys = threading.excepthook, sys.excepthook
    refused = _RefusedWriteFilter()

    def hook(args):
        if not _background_noise(args.exc_value):
            previous(args)

    def sys_hook(kind, error, tb):
        if not _background_noise(error):
            previous_sys(kind, error, tb)
    threading.excepthook, sys.excepthook = hook, sys_hook
    stderr = sys.stderr
    sys.stderr = _WithoutClosedLoopTracebacks(stderr)
    loggers = [logging.getLogger(name) for name in _BACKGROUND_LOGGERS]
    for logger in loggers:
        logger.addFilter(refused)
    failed = False
    try:
        yield
    except WriteFailed:
        failed = True
        raise
    finally:
        if not failed:
            threading.excepthook, sys.excepthook = previous, previous_sys
            sys.stderr = stderr
            for logger in loggers:
                logger.removeFilter(refused)


_warned: set[str] = set()


def warn_if_short(directory: str, nbytes: int, count: int = 1) -> None:
    """Warn (once per folder) when `directory`'s filesystem has less than `count` checkpoints
    of `nbytes` free."""
    free = free_space(directory)
    if free is not None and free < count * nbytes and directory not in _warned:
        _warned.add(directory)
        warnings.warn(f"{directory}: {_size(free)} free, but {count} more checkpoint(s) of about "
                      f"{_size(nbytes)} are due before old ones are deleted: a save will likely "
                      f"fail", RuntimeWarning, stacklevel=3)
