"""Metrics to JSONL, TensorBoard and W&B (`log.backends`), and the summary table printed at
the end."""
from __future__ import annotations

import dataclasses
import json
import netrc
import os
import socket
import sys
import time
import uuid
from typing import Annotated

import numpy as np

from p3o_jax import storage
from p3o_jax.checks import OneOf, Pattern, SubsetOf

BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where the metrics go: `<out_dir>/metrics.jsonl` (what resume and the frontier read),
    TensorBoard events under `<out_dir>/tb`, W&B (`pip install wandb`) under `<out_dir>/wandb`."""
    backends: Annotated[str, SubsetOf(*BACKENDS)] = "jsonl,tensorboard"
    wandb_project: Annotated[str, Pattern(r"[\w.-]+", "a W&B project name")] = "p3o_jax"
    wandb_entity: Annotated[str, Pattern(r"|[\w.-]+", "a W&B entity")] = ""  # "": the API
                                    # key's default entity
    wandb_mode: Annotated[str, OneOf("auto", "online", "offline")] = "auto"  # auto: online
                                    # when W&B is reachable and an API key is set, else offline
                                    # (`wandb sync <out_dir>/wandb/offline-run-*` uploads later)

    @property
    def backend_list(self) -> tuple[str, ...]:
        return tuple(b for b in self.backends.split(",") if b)


def wandb_reachable(host: str = "api.wandb.ai", timeout_s: float = 3.0) -> bool:
    """Whether W&B's server answers a TCP connection within `timeout_s`."""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wandb_api_key() -> bool:
    """Whether a W&B API key is set: WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str) -> str:
    """`log.wandb_mode` resolved: WANDB_MODE if set, else auto -> online or offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if wandb_api_key() and wandb_reachable() else "offline"


class WandbRun:
    """One W&B run per `out_dir`: its id is kept in `<out_dir>/wandb/run_id`, so that a
    resumed run continues the same W&B run. Each stage's metrics are `<stage>/<name>`, plotted
    against their own `<stage>/step`."""

    def __init__(self, directory: str, log: LogConfig, config: dict | None, name: str):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.backends has wandb: pip install wandb") from None
        folder = os.path.join(directory, "wandb")
        id_file = os.path.join(folder, "run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            storage.write_atomically(id_file, lambda f: f.write(run_id))
        mode = wandb_mode(log.wandb_mode)
        if mode == "offline":
            print(f"wandb: offline; upload later with `wandb sync {folder}/offline-run-*`",
                  file=sys.stderr)
        self.run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None,
                              name=name, id=run_id, resume="allow", dir=directory,
                              config=config, mode=mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.stages: set[str] = set()

    def log(self, stage: str, step: int, scalars: dict) -> None:
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in scalars.items()}})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Appends `{"stage", "step", "time", **metrics}` lines to `<dir>/metrics.jsonl` and sends
    the same scalars to the other backends of `log` (TensorBoard events under `<dir>/tb`, a W&B
    run given `config`, the run's config as a dict, and `name`). Only process 0 writes."""

    def __init__(self, directory: str, enabled: bool = True, log: LogConfig = LogConfig(),
                 config: dict | None = None, name: str | None = None):
        self.enabled = enabled
        self.directory = directory
        self.backends = log.backend_list
        self._writer = None
        self._file = None
        self._wandb = None
        if enabled:
            if "jsonl" in self.backends:
                path = os.path.join(directory, "metrics.jsonl")
                with storage.writing(path):
                    os.makedirs(directory, exist_ok=True)
                    self._file = open(path, "a")
            if "wandb" in self.backends:
                self._wandb = WandbRun(directory, log, config, name or os.path.basename(
                    os.path.abspath(directory)))

    def rewind(self, stage: str, step: int, eval_stage: str | None = None) -> None:
        """A stage resumed at `step`: drop its rows from `step` on (steps a killed run logged
        after its last checkpoint, about to be run again), the `eval_stage` rows it logged
        after `step` (all of them when it restarts from 0) and a torn last line, so that every
        step appears once. The file is replaced atomically."""
        if self._file is None:
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
        storage.write_atomically(path, lambda f: f.writelines(keep))
        with storage.writing(path):
            self._file = open(path, "a")

    def log(self, stage: str, step: int, metrics: dict) -> dict:
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if not self.enabled:
            return scalars
        if self._file is not None:
            with storage.writing(self._file.name):   # a full disk: one line (p3o_jax/storage.py)
                self._file.write(json.dumps({"stage": stage, "step": step, "time": time.time(),
                                             **scalars}) + "\n")
                self._file.flush()
        if "tensorboard" in self.backends:
            if self._writer is None:
                from tensorboardX import SummaryWriter
                tb = os.path.join(self.directory, "tb")
                with storage.writing(tb):
                    self._writer = SummaryWriter(tb)
            for k, v in scalars.items():
                self._check_tensorboard()
                self._writer.add_scalar(f"{stage}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(stage, step, scalars)
        return scalars

    def _tensorboard_alive(self) -> bool:
        """tensorboardX writes from a thread, which a failed write (a full disk) ends with a
        traceback; events queued after that block forever once its queue of 10 is full."""
        return self._writer.file_writer.event_writer._worker.is_alive()

    def _check_tensorboard(self) -> None:
        """Before each event: its put blocks while the queue is full, forever once the thread
        is dead, so wait for room here, where the thread's death can still be seen."""
        events = self._writer.file_writer.event_writer._event_queue
        while self._tensorboard_alive() and events.full():
            time.sleep(0.01)
        if not self._tensorboard_alive():
            raise storage.WriteFailed(os.path.join(self.directory, "tb"), "its writer thread "
                                      "stopped on an error (a refused write, or the error "
                                      "printed above)", storage.free_space(self.directory))

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._writer is not None and self._tensorboard_alive():  # else close() blocks
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; floats with 3 decimals."""
    cell = lambda v: f"{round(v, 3) + 0.0:.3f}" if isinstance(v, float) else str(v)  # no -0.000
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
