"""Long runs never lose work: a run killed (SIGKILL) or stopped (SIGTERM) at a random step and
run again ends bit for bit where an uninterrupted run does; a corrupt newest checkpoint is
skipped for the one before; non-finite updates are skipped, then stop the run; a checkpoint
written with another model shape stops the resume naming the field.

The runs are `python -m p3o_jax.cli.train` subprocesses on a config smaller than test_pipeline's
`tiny`, sharing a persistent XLA compilation cache (in .pytest_cache) so that only the first
session pays the compiles.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from p3o_jax.algos import sft
from p3o_jax.checkpoint import EXIT_PREEMPTED, NonFiniteError, skip_nonfinite
from p3o_jax.config_args import from_args
from p3o_jax.tasks import ToyRLHF
from p3o_jax.cli.train import main
from p3o_jax.pipeline import run_experiment
from p3o_jax.train_state import MinibatchPlan, TrainState, gradient_step, make_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"sft": 8, "rm": 6, "rl": 4}
# metrics labels and checkpoint folders -> stage: the RL stage's are named after its algorithm
STAGE_OF = {"sft": "sft", "rm": "rm", "rl:p3o": "rl", "p3o": "rl"}
ARGS = ["exp=toy", "eval_prompts=32", "log_every=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
        "policy.d_model=32", "policy.n_layers=1", "policy.d_ff=64",
        f"sft.steps={STEPS['sft']}", "sft.batch_size=16",
        "rm.n_pairs=160", f"rm.steps={STEPS['rm']}", "rm.batch_size=16",
        f"rl.iterations={STEPS['rl']}", "rl.prompts_per_iter=16", "rl.epochs=1", "rl.minibatches=1",
        "rl.optim.lr=3e-3", "rl.optim.warmup_steps=0",
        "checkpoint.every_steps=2", "checkpoint.every_minutes=0"]
RUN_TIMEOUT = 300


def cli_args(out_dir, *extra) -> list[str]:
    return [*ARGS, f"out_dir={out_dir}", *extra]


@pytest.fixture(scope="module")
def env(pytestconfig):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(pytestconfig.cache.mkdir("xla-cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Training:
    """`python -m p3o_jax.cli.train` in the background (output in `<out_dir>.log`; with
    `stderr_apart`, stderr alone in `<out_dir>.err`); killed on exit from the `with` block if
    still running, so no test leaves a process behind."""

    def __init__(self, out_dir, env, *extra, stderr_apart: bool = False):
        self.out_dir, self.log = out_dir, open(f"{out_dir}.log", "w")
        self.err = open(f"{out_dir}.err", "w") if stderr_apart else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p3o_jax.cli.train", *cli_args(out_dir, *extra)], cwd=ROOT, env=env,
            stdout=self.log, stderr=self.err or subprocess.STDOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        if self.err is not None:
            self.err.close()

    def wait_until(self, target: tuple[str, int], timeout: float = RUN_TIMEOUT) -> None:
        """Until the run has logged step `target` = (stage, step) or later, and has saved a
        checkpoint."""
        deadline = time.monotonic() + timeout
        while not (progress(self.out_dir) >= position(*target) and checkpoints(self.out_dir)):
            assert self.proc.poll() is None, f"the run ended early: {self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress to {target}: {self.output()[-3000:]}"
            time.sleep(0.05)

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err.name) as f:
            return f.read()


def run_to_end(out_dir, env, *extra) -> str:
    with Training(out_dir, env, *extra) as t:
        rc = t.proc.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, t.output()[-3000:]
        return t.output()


def position(stage: str, step: int) -> int:
    return list(STEPS).index(STAGE_OF.get(stage, stage)) * 1000 + step


def progress(out_dir) -> int:
    rows = metrics(out_dir)
    return max((position(*k) for k in rows), default=-1)


def metric_rows(out_dir) -> list[dict]:
    """The complete lines of metrics.jsonl (a kill -9 may leave a torn last one)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def metrics(out_dir) -> dict:
    """(stage, step) -> metrics, without timings (the last line of a step counts)."""
    return {(r["stage"], r["step"]): {k: v for k, v in r.items()
                                      if k != "time" and not k.startswith("time_")}
            for r in metric_rows(out_dir)}


def checkpoints(out_dir) -> list[str]:
    root = os.path.join(out_dir, "ckpt")
    return [f"{stage}/{step}" for stage in (os.listdir(root) if os.path.isdir(root) else [])
            for step in os.listdir(os.path.join(root, stage)) if step.isdigit()]


def load(path):
    with ocp.StandardCheckpointer() as ckpt:
        return jax.device_get(ckpt.restore(os.path.abspath(path)))


def assert_same_run(expected, actual):
    """Final params of every stage bitwise equal, the same metrics at every step (NaN-free, so
    == is exact), the same final table."""
    for stage in ("sft", "rm", "p3o"):
        a, b = load(os.path.join(expected, stage)), load(os.path.join(actual, stage))
        assert jax.tree.structure(a) == jax.tree.structure(b), stage
        differ = [jax.tree_util.keystr(k) for (k, x), y in
                  zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
                  if not np.array_equal(x, y)]
        assert not differ, f"{stage} params differ: {differ}"
    assert metrics(expected) == metrics(actual)
    # a resumed stage drops the rows it is about to log again: every step once, in order
    order = lambda d: [(r["stage"], r["step"]) for r in metric_rows(d)]
    assert order(actual) == order(expected)
    with open(os.path.join(expected, "summary.json")) as f, \
            open(os.path.join(actual, "summary.json")) as g:
        assert json.load(f) == json.load(g)


def random_step(seed: int) -> tuple[str, int]:
    """A step of any stage but the RL stage's last two (so that the run is still going when
    the test acts on it)."""
    steps = [(s, i) for s, n in STEPS.items() for i in range(n)][:-2]
    return random.Random(seed).choice(steps)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("ckpt") / "reference"
    run_to_end(out, env)
    return out


def test_kill9_then_rerun_matches_uninterrupted(reference, env, tmp_path):
    seed = random.randrange(1 << 30)
    target = random_step(seed)
    out = tmp_path / "run"
    with Training(out, env) as t:
        t.wait_until(target)
        t.proc.send_signal(signal.SIGKILL)
        assert t.proc.wait(timeout=30) == -signal.SIGKILL
    print(f"killed at {target} (seed {seed}); checkpoints: {sorted(checkpoints(out))}")
    log = run_to_end(out, env)
    assert "resuming at step" in log or "finished in an earlier run" in log, log[-3000:]
    assert "taking over the lock of" in log and "gone" in log, log[-3000:]  # the killed run's
    assert_same_run(reference, out)


def test_sigterm_checkpoints_exits_and_resumes(reference, env, tmp_path):
    seed = random.randrange(1 << 30)
    target = random_step(seed)
    out = tmp_path / "run"
    with Training(out, env) as t:
        t.wait_until(target)
        sent = time.monotonic()
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(timeout=60) == EXIT_PREEMPTED, t.output()[-3000:]
        print(f"SIGTERM at {target} (seed {seed}): exited after {time.monotonic() - sent:.1f} s")
        assert "stopped by a signal" in t.output()
    stage, done = max(((STAGE_OF[c.split("/")[0]], int(c.split("/")[1]))
                       for c in checkpoints(out)), key=lambda c: position(*c))
    log = run_to_end(out, env)
    if done < STEPS[stage]:  # stopped inside a stage: it continues from the signal's checkpoint
        assert f"{stage}: resuming at step {done} of {STEPS[stage]}" in log, log[-3000:]
    assert_same_run(reference, out)


def test_second_signal_exits_at_once(env):
    script = textwrap.dedent("""
        import os, signal, time
        from p3o_jax.checkpoint import handle_preemption, preemption_requested
        with handle_preemption():
            os.kill(os.getpid(), signal.SIGTERM)
            while not preemption_requested():
                time.sleep(0.01)
            print("stopping", flush=True)
            time.sleep(60)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline() == "stopping\n"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
        proc.wait()


def test_corrupt_newest_checkpoint_falls_back_to_previous(reference, env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "p3o")  # the RL stage has to run again, from its checkpoints
    newest = out / "ckpt" / "p3o" / str(STEPS["rl"])
    for f in (newest / "state" / "d").iterdir():  # the array data, cut in half
        os.truncate(f, f.stat().st_size // 2)
    log = run_to_end(out, env)
    assert "does not read back" in log and "rl: resuming at step 2 of 4" in log, log[-3000:]
    assert any(p.name.startswith(f"corrupt-{STEPS['rl']}-") for p in newest.parent.iterdir())
    assert_same_run(reference, out)


def test_changed_model_shape_stops_resume_naming_the_field(reference, tmp_path, capsys):
    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    assert main(cli_args(tmp_path, "policy.d_model=64")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "ckpt/sft was written with policy.d_model=32" in err[0] \
        and "this run has policy.d_model=64" in err[0], err


def test_skip_nonfinite_keeps_the_state_exactly():
    tx = optax.adam(0.1)
    state = TrainState.create({"w": jnp.arange(3.0)}, tx)

    def step(state, batch):
        loss = jnp.sum(state.params["w"] * batch)
        grads = {"w": batch}
        return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    guarded = jax.jit(skip_nonfinite(step))
    new, m = guarded(state, jnp.ones(3))
    assert m["skipped_nonfinite"] == 0 and new.step == 1
    for bad in (jnp.array([1.0, jnp.nan, 1.0]), jnp.array([jnp.inf, 0.0, 0.0])):
        same, m = guarded(new, bad)
        assert m["skipped_nonfinite"] == 1
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                same, new)))


def test_rl_update_skips_only_the_nonfinite_minibatch():
    # RL's update (make_update over skip_nonfinite steps): a NaN minibatch is skipped alone,
    # the others apply; and the guard sits inside the scan, so the compiled update does not
    # keep the state it started from alive beside the one it updates. Adam with powers of two
    # on gradients of ones: every moment, correction and step is exact in float32, so the scan
    # and the steps run one by one agree bit for bit whatever each program fuses (an FMA or not)
    tx = optax.adam(0.125, b1=0.5, b2=0.75)
    loss = lambda params, batch: (jnp.sum(params["w"] * batch["x"]), {})
    update = jax.jit(make_update(skip_nonfinite(gradient_step(loss))), donate_argnums=0)
    rows = np.ones((3, 4), np.float32)
    rows[1, 2] = np.nan
    plan = MinibatchPlan(jnp.arange(3)[:, None])              # three steps, a row each
    state = lambda: TrainState.create({"w": jnp.arange(4.0)}, tx)
    new, m = update(state(), ({"x": jnp.asarray(rows)}, plan))
    assert m["skipped_nonfinite"] == pytest.approx(1 / 3) and int(new.step) == 2
    step = jax.jit(gradient_step(loss))
    want = state()
    for i in (0, 2):
        want, _ = step(want, {"x": jnp.asarray(rows[i:i + 1])})
    chex.assert_trees_all_equal(new, want)
    # memory: a 64 MiB parameter, its two moments; ten steps. Skipping around the whole scan
    # (the old RL update) holds a second copy of all three as temporaries
    big = TrainState.create({"w": jnp.zeros(1 << 24)}, tx)
    x = {"x": jnp.ones((10, 1))}
    plan = MinibatchPlan(jnp.arange(10)[:, None])
    temp = lambda fn: fn.lower(big, (x, plan)).compile().memory_analysis().temp_size_in_bytes
    state_bytes = 3 * (4 << 24)
    guarded_steps = temp(jax.jit(make_update(skip_nonfinite(gradient_step(loss))),
                                 donate_argnums=0))
    guarded_scan = temp(jax.jit(skip_nonfinite(make_update(gradient_step(loss))),
                                donate_argnums=0))
    assert guarded_scan - guarded_steps >= state_bytes, (guarded_scan, guarded_steps)


@pytest.fixture
def quick_compiles():
    """In-process runs that check the plumbing, not numerics: XLA's optimisations off."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch, quick_compiles):
    """NaN loss and gradients at SFT steps 3 and 5, 6, 7 (test hook: a `poison` column in the
    batch scales the loss by NaN): each update is skipped and logged, the third in a row stops
    the run; every checkpoint holds a finite state that has not seen them."""
    poisoned = {3, 5, 6, 7}
    sft_batch, sft_loss = ToyRLHF.sft_batch, sft.loss
    monkeypatch.setattr(ToyRLHF, "sft_batch", lambda self, n, step: dict(
        sft_batch(self, n, step), poison=np.full(n, step in poisoned, np.float32)))

    def poisoned_loss(params, batch, cfg):
        loss, m = sft_loss(params, batch, cfg)
        return loss * jnp.where(batch["poison"].any(), jnp.nan, 1.0), m
    monkeypatch.setattr(sft, "loss", poisoned_loss)
    cfg = from_args(cli_args(tmp_path, "stages=sft", "checkpoint.max_nonfinite=3"))
    with pytest.raises(NonFiniteError, match="3 non-finite updates in a row"), \
            pytest.warns(RuntimeWarning, match="update skipped"):
        run_experiment(cfg)
    rows = metrics(tmp_path)
    assert [rows["sft", i]["skipped_nonfinite"] for i in range(8)] == [0, 0, 0, 1, 0, 1, 1, 1]
    assert np.isnan(rows["sft", 3]["loss"]) and np.isfinite(rows["sft", 4]["loss"])
    assert not (tmp_path / "sft").exists()
    directory = tmp_path / "ckpt" / "sft"
    manager = ocp.CheckpointManager(directory)
    assert manager.all_steps() == [2, 4, 6]  # nothing saved at the failing step
    for saved, updates in ((2, 2), (4, 3), (6, 4)):  # skipped steps did not update
        r = manager.restore(saved, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
        assert int(r.state["step"]) == updates and r.meta["step"] == saved
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(r.state["params"]))
    manager.close()


@pytest.mark.parametrize("part", ["rl.lora.rank=2", "rl.train_top_layers=1",
                                  "rl.max_staleness=2"])
def test_kill9_in_partial_rl_resumes_exactly(reference, env, tmp_path, part):
    """LoRA adapters and top-N layers: the RL state (adapters or top blocks, their moments)
    resumes bit for bit, the frozen rest rebuilt from the SFT policy. Stale rollouts: the
    batches sampled ahead (with older weights) are in the checkpoint and resume bit for bit.
    Both runs start from the reference's SFT policy and reward model."""
    runs = [tmp_path / "uninterrupted", tmp_path / "killed"]
    for out in runs:
        out.mkdir()
        for shared in ("sft", "rm", "preferences.npz"):
            (shutil.copytree if os.path.isdir(reference / shared) else shutil.copy)(
                reference / shared, out / shared)
    run_to_end(runs[0], env, part)
    stale = "max_staleness" in part
    with Training(runs[1], env, part) as t:
        t.wait_until(("rl", 1))
        while stale and "p3o/2" not in checkpoints(runs[1]):  # in flight: batches 2 and 3
            assert t.proc.poll() is None, t.output()[-3000:]
            time.sleep(0.01)
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait(timeout=30)
    print(f"{part}: killed with checkpoints {sorted(checkpoints(runs[1]))}")
    log = run_to_end(runs[1], env, part)
    assert "rl: resuming at step" in log or "finished in an earlier run" in log, log[-3000:]
    if stale:
        assert "rl: resuming at step 2" in log, log[-3000:]
        assert [r["staleness"] for r in metric_rows(runs[1]) if r["stage"] == "rl:p3o"] == [
            0, 1, 2, 2]
    assert_same_run(*runs)


def test_a_second_run_in_the_same_out_dir_is_refused(reference, env, tmp_path):
    """The same command started twice: the second stops at once with one line naming the
    first (exit 2) and writes nothing; the first ends as a lone run does."""
    out = tmp_path / "run"
    with Training(out, env) as first:
        first.wait_until(("sft", 1))
        second = subprocess.run([sys.executable, "-m", "p3o_jax.cli.train", *cli_args(out)],
                                cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert f"{out} is in use by another run" in errors[0], errors
        assert f"pid {first.proc.pid} " in errors[0], errors
        assert first.proc.wait(timeout=RUN_TIMEOUT) == 0, first.output()[-3000:]
    assert_same_run(reference, out)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs (root only) of 64 MiB, room for the whole run; `fill` takes its space away."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); "
                    f"test_failed_write_is_one_line injects the failure instead")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk, leave: int) -> str:
    """Take all the free space of `disk` but `leave` bytes, in one allocated (not sparse)
    file; returns its path."""
    path = os.path.join(disk, "filler")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(disk).free - leave)
    finally:
        os.close(fd)
    return path


WARNING = re.compile(r"^\S+:\d+: \w+Warning: ")   # a warning's line; the next is its source
PROGRESS = re.compile(r"^[\w:]+: +\d+%\|")          # a frame of a stage's progress bar


def the_rest(stderr: str) -> list[str]:
    """stderr's lines less the warnings Python printed (each a line and its source line), the
    progress bars' frames and blank lines."""
    lines = stderr.splitlines()
    starts = {i for i, line in enumerate(lines) if WARNING.match(line)}
    return [line for i, line in enumerate(lines) if i not in starts and i - 1 not in starts
            and not PROGRESS.match(line) and line.strip()]


def test_disk_full_stops_with_one_line_and_resumes_from_the_last_checkpoint(
        reference, env, small_disk):
    """The disk fills while the run trains: after its first checkpoint, all of it but 64 KiB
    is taken, room for the metrics, not for the next checkpoint. The run stops with one line
    (exit 74): beside the progress bars and the warnings, stderr holds our line alone, none
    of the tracebacks of orbax's writer threads and their asyncio futures. Space freed, the
    same command continues from the checkpoint the line names and ends where an
    uninterrupted run does. (Whether the early warning comes first depends on when the disk
    fills: `test_a_short_disk_is_announced` in test_storage.py.)"""
    out = small_disk           # its logs, <out_dir>.log and .err, beside the small disk
    with Training(out, env, stderr_apart=True) as t:
        t.wait_until(("sft", 2))
        filler = fill(out, 64 * 1024)
        assert t.proc.wait(timeout=RUN_TIMEOUT) == 74, t.stderr()[-3000:]
        stderr = t.stderr()
    errors = the_rest(stderr)
    assert len(errors) == 1 and errors[0].startswith("error: writing"), stderr[-3000:]
    assert "No space left on device" in errors[0] and "free there" in errors[0], errors
    assert f"writing {out}/ckpt/" in errors[0], errors          # a checkpoint, not the metrics
    last = errors[0].partition("the last complete checkpoint is ")[2].partition(":")[0]
    assert last.startswith(f"{out}/ckpt/") and os.path.isdir(last), errors
    partial = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
               if ".orbax-checkpoint-tmp" in n or n.endswith(".partial")]
    assert not partial, partial
    os.remove(filler)
    log = run_to_end(out, env)
    assert "resuming at step" in log, log[-3000:]
    assert_same_run(reference, out)


def test_failed_write_is_one_line(tmp_path, monkeypatch, capsys, quick_compiles):
    """Without a small disk: tensorstore's error text for a full disk, injected at the second
    checkpoint, stops the run with the one line (exit 74), the first checkpoint kept."""
    save = ocp.CheckpointManager.save

    def failing(self, step, *args, **kwargs):
        if step == 4:
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "{self.directory}/4": Failed '
                             f"to write 44393 bytes to file 18: No space left on device "
                             f"[os_error_code='28']")
        return save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
    with pytest.warns(RuntimeWarning, match="the final table needs the rm stage"):
        assert main(cli_args(tmp_path, "stages=sft", "checkpoint.async_save=false")) == 74
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert (f"writing {tmp_path}/ckpt/sft failed: No space left on device" in errors[0]
            and f"last complete checkpoint is {tmp_path}/ckpt/sft/2:" in errors[0]), errors
