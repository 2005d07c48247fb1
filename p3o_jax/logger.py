"""Metrics as JSONL and TensorBoard event files, and the summary table printed at the end."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from p3o_jax import storage


class MetricsLogger:
    """Appends `{"stage", "step", "time", **metrics}` lines to `<dir>/metrics.jsonl` and writes
    the same scalars as TensorBoard events under `<dir>/tb`. Only process 0 writes."""

    def __init__(self, directory: str, enabled: bool = True):
        self.enabled = enabled
        self.directory = directory
        self._writer = None
        if enabled:
            os.makedirs(directory, exist_ok=True)
            self._file = open(os.path.join(directory, "metrics.jsonl"), "a")

    def rewind(self, stage: str, step: int, eval_stage: str | None = None) -> None:
        """A stage resumed at `step`: drop its rows from `step` on (steps a killed run logged
        after its last checkpoint, about to be run again), the `eval_stage` rows it logged
        after `step` (all of them when it restarts from 0) and a torn last line, so that every
        step appears once. The file is replaced atomically."""
        if not self.enabled:
            return
        path = os.path.join(self.directory, "metrics.jsonl")
        self._file.close()
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n")]

        def keep(line):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:   # a torn line that a later run appended to
                return False
            return not ((r["stage"] == stage and r["step"] >= step)
                        or (r["stage"] == eval_stage and (r["step"] > step or step == 0)))
        keep = [line for line in lines if keep(line)]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        self._file = open(path, "a")

    def log(self, stage: str, step: int, metrics: dict) -> dict:
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if not self.enabled:
            return scalars
        with storage.writing(self._file.name):   # a full disk: one line (p3o_jax/storage.py)
            self._file.write(json.dumps({"stage": stage, "step": step, "time": time.time(),
                                         **scalars}) + "\n")
            self._file.flush()
        if self._writer is None:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(os.path.join(self.directory, "tb"))
        for k, v in scalars.items():
            self._check_tensorboard()
            self._writer.add_scalar(f"{stage}/{k}", v, step)
        return scalars

    def _tensorboard_alive(self) -> bool:
        """tensorboardX writes from a thread, which a failed write (a full disk) ends with a
        traceback; events queued after that block forever once its queue of 10 is full."""
        return self._writer.file_writer.event_writer._worker.is_alive()

    def _check_tensorboard(self) -> None:
        if not self._tensorboard_alive():
            raise storage.WriteFailed(os.path.join(self.directory, "tb"), "its writer thread "
                                      "stopped on an error (printed above)",
                                      storage.free_space(self.directory))

    def close(self):
        if self.enabled:
            self._file.close()
            if self._writer is not None and self._tensorboard_alive():  # else close() blocks
                self._writer.close()


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; floats with 3 decimals."""
    cell = lambda v: f"{round(v, 3) + 0.0:.3f}" if isinstance(v, float) else str(v)  # no -0.000
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
