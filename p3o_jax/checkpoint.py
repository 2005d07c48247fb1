"""Long runs never lose work: checkpoints, exact resume, preemption, non-finite updates.

Each stage's loop checkpoints into its own orbax `CheckpointManager` under
`<out_dir>/ckpt/<stage>/<step>/` (`step` = steps done); RL checkpoints belong to their algorithm
(`ckpt/p3o`, `ckpt/ppo`, ...), so baselines run beside each other on the same SFT and RM:

- `state`:  the TrainState (params, optimizer state, optimizer step);
- `meta`:   JSON: `step` (the loop position, which is also the data position: batches and prompts
  are addressed by step), `total`, the streak of non-finite updates, and the loop's carry
  (PPO's adaptive `kl_coef`). No RNG state is saved: every key is derived from the seed and the
  step (the RL loop's from seed + iteration, update shuffles from seed + optimizer step), so the
  step is enough;
- `config`: the run's config, compared with the current one on resume.

Saves happen every `checkpoint.every_steps` steps and/or every `checkpoint.every_minutes`
minutes, on preemption and at the end of the stage; the last `checkpoint.keep` are kept.
Writes are asynchronous when `checkpoint.async_save` and atomic (orbax writes a temporary folder
and renames it when complete), so a half-written step is never picked up; leftovers are removed.

Re-running the same command resumes: a stage whose final checkpoint exists is skipped (its
params are loaded from `<out_dir>/<stage>`), an unfinished one continues from its newest
checkpoint that reads back (one that does not is moved aside to `corrupt-<step>-<time>` with a
warning). A checkpoint written with a config that differs in a field the stage depends on stops
the run (`CheckpointMismatch`, naming the field); `resume=false` starts the stages over.

Preemption: the first SIGTERM or SIGINT lets the current step finish, saves a checkpoint and
raises `Preempted` (the CLI exits with `EXIT_PREEMPTED` = 75, "temporary failure: run again"); a
second one exits at once with 128 + the signal number. With several processes JAX's preemption
service owns SIGTERM and orbax's `reached_preemption` picks the step all processes stop at.

Non-finite updates: `skip_nonfinite` wraps a jitted step so that a non-finite loss or gradient
norm keeps the old state (selected inside the jit: the donated input is gone after the call) and
reports `skipped_nonfinite`; `checkpoint.max_nonfinite` of them in a row raise
`NonFiniteError`. Checkpoints therefore only ever hold finite states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from p3o_jax import model as M
from p3o_jax import storage
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import ConfigError
from p3o_jax.train_state import param_shardings

EXIT_PREEMPTED = 75   # sysexits EX_TEMPFAIL: stopped on a signal, a checkpoint is saved; run again


class Preempted(Exception):
    """A signal stopped the run after a checkpoint; the same command continues it."""


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row; the checkpoints hold the last finite state."""


class CheckpointMismatch(ConfigError):
    """A checkpoint was written with a config this run cannot continue from."""


# ---------------------------------------------------------------------------------------------
# a finished stage's params

@contextlib.contextmanager
def writing(path: str, out_dir: str):
    """`storage.writing` for orbax saves. A save's items commit in threads of their own, and
    the first to fail raises while the others still write: they are waited for (up to a
    minute each) before `storage.writing` removes the temporary folders, which a live one
    would make again."""
    with storage.writing(path, out_dir):
        try:
            yield
        except BaseException:
            for thread in threading.enumerate():   # commit futures, and the async save's
                if (type(thread).__module__.startswith("orbax.") or thread.name == "async_save"
                        ) and thread is not threading.current_thread():
                    thread.join(timeout=60)
            raise


def save_params(path: str, params) -> None:
    """`params` to the folder `path` (`<out_dir>/<stage>`), atomically (orbax renames a
    complete temporary folder); a failed write raises `storage.WriteFailed`."""
    path = os.path.abspath(path)
    with writing(path, os.path.dirname(path)), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params, force=True)


def load_params(path: str, model_cfg: M.ModelConfig, mesh):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no saved stage here; run the stage that writes it "
                                f"(stages=...) first")
    shapes = jax.eval_shape(lambda: M.init_params(model_cfg, jax.random.key(0)))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, param_shardings(model_cfg, mesh))
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.abspath(path), target)


# ---------------------------------------------------------------------------------------------
# preemption

_preempted = threading.Event()
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def preemption_requested() -> bool:
    return _preempted.is_set()


def stop_if_preempted(where: str) -> None:
    if _preempted.is_set():
        raise Preempted(f"stopped by a signal {where}; run the same command again to continue")


@contextlib.contextmanager
def handle_preemption():
    """While inside: the first SIGTERM/SIGINT sets `preemption_requested()`, a second one exits
    the process at once (code 128 + signum). Python runs signal handlers only between bytecodes,
    i.e. not during a long compile or step, so a thread reads the signals from a wakeup fd as
    they arrive. A no-op with several processes (JAX's preemption service) or off the main
    thread (signals cannot be caught there)."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = {s: signal.signal(s, lambda *_: None) for s in _STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch():
        while byte := reader.recv(1):
            signum = byte[0]
            if signum not in _STOP_SIGNALS:
                continue
            if _preempted.is_set():
                os._exit(128 + signum)
            _preempted.set()
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a "
                        f"checkpoint (send it again to exit at once)\n".encode())

    watcher = threading.Thread(target=watch, name="preemption-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        writer.close()
        watcher.join()
        reader.close()
        _preempted.clear()


# ---------------------------------------------------------------------------------------------
# non-finite updates

def skip_nonfinite(step_fn):
    """Wrap `step(state, batch, *frozen) -> (state, metrics)` (metrics with `loss` and `grad_norm`): a
    non-finite loss or gradient norm returns the input state unchanged, optimizer step and
    moments included, and `skipped_nonfinite` = 1."""
    def step(state, batch, *frozen):
        new_state, metrics = step_fn(state, batch, *frozen)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return state, dict(metrics, skipped_nonfinite=(~ok).astype(jnp.float32))
    return step


# ---------------------------------------------------------------------------------------------
# config compatibility

# Fields that do not change what a stage computes: where, how often and to what it writes, the
# final evaluation, how the work is split over devices and processes (a checkpoint restores
# onto any mesh), and what a bad data record does (with "raise" the run stopped before its
# first checkpoint).
_NEUTRAL = ("name", "out_dir", "stages", "resume", "checkpoint", "mesh", "dist", "log_every",
            "log", "eval_prompts", "data.on_bad_record", "export_hf", "reward_workers")
# Fields a stage does not read (those of later stages, and the other algorithms' settings)...
_ALGO_SETTINGS = tuple({a.settings for a in ALGORITHMS.values() if a.settings})
_REWARDS = ("reward_fns", "reward_weights", "data.answer_key", "data.reward_columns")
_UNREAD = {"sft": ("algo", "reward_model", "rm", "rl") + _REWARDS + _ALGO_SETTINGS,
           "rm": ("algo", "rl") + _REWARDS + _ALGO_SETTINGS, "rl": ()}
# ...except the sampling settings the rm stage draws its preference pairs with.
_READ_ANYWAY = {"rm": ("rl.temperature", "rl.top_k", "rl.top_p", "rl.prompts_per_iter")}


def _unread(stage: str, algo: str) -> tuple[str, ...]:
    own = ALGORITHMS[algo].settings
    return _UNREAD[stage] + (tuple(s for s in _ALGO_SETTINGS if s != own) if stage == "rl" else ())


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for name, sub in tree.items()
                for k, v in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_differences(stage: str, saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field `stage` depends on that differs."""
    unread = _unread(stage, current["algo"])
    saved, current = _flatten(saved), _flatten(current)
    absent = "<absent>"
    return [(k, saved.get(k, absent), current.get(k, absent))
            for k in sorted(saved.keys() | current.keys())
            if not _under(k, _NEUTRAL)
            and (not _under(k, unread) or k in _READ_ANYWAY.get(stage, ()))
            and saved.get(k, absent) != current.get(k, absent)]


# ---------------------------------------------------------------------------------------------
# one stage's checkpoints

def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def stage_directory(cfg, stage: str) -> str:
    """`<out_dir>/ckpt/<stage>`; the rl stage's is named after its algorithm."""
    return os.path.abspath(os.path.join(cfg.out_dir, "ckpt", cfg.algo if stage == "rl" else stage))


def discard(cfg, stage: str) -> None:
    """Delete a stage's checkpoints (`resume=false`)."""
    if jax.process_index() == 0:
        shutil.rmtree(stage_directory(cfg, stage), ignore_errors=True)
    _sync(f"discard {stage}")


def finished(cfg, stage: str) -> bool:
    """Whether `stage` ran to its end under a compatible config (else CheckpointMismatch)."""
    with StageCheckpoints(cfg, stage) as ckpt:
        found = ckpt.newest(meta=ocp.args.JsonRestore())
        return found is not None and found.meta["step"] == found.meta["total"]


class StageCheckpoints:
    """The checkpoints of one stage's loop (`cfg`: the run's ExperimentConfig). Use as a context
    manager (waits for a background save and closes the manager), `restore` before the loop,
    `end_step` after each step, `finish` after the last (p3o_jax/stage.py's `stage_loop`):

        with StageCheckpoints(cfg, "sft", steps) as ckpt:
            state, meta = ckpt.restore(state)
            for i in range(meta["step"], steps):
                state, metrics = step(state, batch(i))
                ckpt.end_step(i + 1, state, metrics)
            ckpt.finish(state)
    """

    def __init__(self, cfg, stage: str, total_steps: int | None = None):
        c = cfg.checkpoint
        self.stage, self.total = stage, total_steps
        self.config = json.loads(json.dumps(dataclasses.asdict(cfg)))
        self.directory, self.out_dir = stage_directory(cfg, stage), cfg.out_dir
        self.max_nonfinite, self.nonfinite_streak, self.keep = c.max_nonfinite, 0, c.keep
        policies = ocp.checkpoint_managers
        when = [policies.PreemptionCheckpointingPolicy()]
        if c.every_steps > 0:
            when.append(policies.FixedIntervalPolicy(c.every_steps))
        if c.every_minutes > 0:
            when.append(policies.ContinuousCheckpointingPolicy(
                minimum_interval_secs=c.every_minutes * 60))
        with self._writing():   # it makes the folder
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=c.keep, enable_async_checkpointing=c.async_save,
                    cleanup_tmp_directories=True,
                    save_decision_policy=policies.AnySavePolicy(when)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with self._writing():
            self.manager.wait_until_finished()
            self.manager.close()

    def _writing(self):
        """Saves (and background saves finishing) that fail on the filesystem: WriteFailed."""
        return writing(self.directory, self.out_dir)

    def _save(self, step: int, state, extra: dict) -> None:
        """Save `step`, warning first if the disk will not hold the `keep` + 1 checkpoints the
        stage reaches (a new one is written before the oldest is deleted), each the size of
        the state or, once there is one, of the newest on disk (small arrays take whole
        blocks, and orbax adds metadata). The previous save is finished first (orbax's next
        save would wait for it anyway), so that it counts, and its failure is reported as its
        own."""
        with self._writing():
            self.manager.wait_until_finished()
        steps, size = self.manager.all_steps(), sum(x.nbytes for x in jax.tree.leaves(state))
        if steps:
            size = max(size, storage.disk_usage(os.path.join(self.directory, str(steps[-1]))))
        storage.warn_if_short(self.directory, size, self.keep + 1 - len(steps))
        with self._writing():
            self.manager.save(step, args=self._args(step, state, extra), force=True)

    def newest(self, **items):
        """`items` (orbax restore args) of the newest checkpoint whose config matches this run's
        and that reads back; None if there is none. Unreadable ones are moved aside."""
        for step in reversed(self.manager.all_steps()):
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore())).config
            except Exception as e:  # whatever the damage: try the one before
                self._move_aside(step, e)
                continue
            if diff := config_differences(self.stage, saved, self.config):
                was = ", ".join(f"{k}={a}" for k, a, _ in diff)
                now = ", ".join(f"{k}={b}" for k, _, b in diff)
                raise CheckpointMismatch(
                    f"checkpoint {self.directory} was written with {was}; this run has {now} "
                    f"(use the same settings, another out_dir, or resume=false to start over)")
            try:
                return self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:
                self._move_aside(step, e)
        return None

    def _move_aside(self, step: int, error: Exception) -> None:
        aside = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        warnings.warn(f"checkpoint {self.directory}/{step} does not read back "
                      f"({type(error).__name__}: {str(error)[:200]}); moved to {aside}, "
                      f"using the one before", RuntimeWarning, stacklevel=3)
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), aside)
        _sync(f"move aside {self.stage} {step}")
        self.manager.reload()

    def restore(self, state, **defaults):
        """(state, meta) from the newest usable checkpoint, restored onto `state`'s shapes and
        shardings; (state, {"step": 0, **defaults}) when there is none."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        found = self.newest(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        if found is None:
            return state, {"step": 0, **defaults}
        meta = found.meta
        self.nonfinite_streak = meta["nonfinite_streak"]
        print(f"{self.stage}: resuming at step {meta['step']} of {meta['total']} from "
              f"{self.directory}", file=sys.stderr)
        return found.state, {**defaults, **meta}

    def end_step(self, step: int, state, metrics: dict, **extra) -> None:
        """After `step` steps: count a skipped update (raise NonFiniteError after
        `max_nonfinite` in a row), save if due, and on a signal save and raise Preempted."""
        if float(metrics["skipped_nonfinite"]):
            self.nonfinite_streak += 1
            warnings.warn(f"{self.stage} step {step - 1}: non-finite loss or gradient, update "
                          f"skipped ({self.nonfinite_streak} in a row)", RuntimeWarning,
                          stacklevel=2)
            if self.nonfinite_streak >= self.max_nonfinite:
                raise NonFiniteError(
                    f"{self.stage}: {self.nonfinite_streak} non-finite updates in a row (up to "
                    f"step {step - 1}, checkpoint.max_nonfinite={self.max_nonfinite}); the last "
                    f"checkpoint in {self.directory} holds the state before them")
        else:
            self.nonfinite_streak = 0
        preempted = preemption_requested() or self.manager.reached_preemption(step)
        if preempted or self.manager.should_save(step):
            self._save(step, state, extra)
        if preempted:
            with self._writing():
                self.manager.wait_until_finished()
            raise Preempted(f"stopped by a signal after {self.stage} step {step - 1}, checkpoint "
                            f"saved; run the same command again to continue")

    def finish(self, state, **extra) -> None:
        """Save the stage's final checkpoint (which marks it finished) and wait for it."""
        if self.manager.latest_step() != self.total:
            self._save(self.total, state, extra)
        with self._writing():
            self.manager.wait_until_finished()

    def _args(self, step: int, state, extra: dict):
        meta = {"step": step, "total": self.total, "nonfinite_streak": self.nonfinite_streak,
                **extra}
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  config=ocp.args.JsonSave(self.config))
