"""Several processes, one run: the same results as one process, checkpoints that move between
process counts, shardings that follow the rule table, and memory plans that match the arrays.

The multi-process runs are `scripts/launch_local.py` launches of `python -m p3o_jax.cli.train`:
two processes of two fake CPU devices each on 127.0.0.1 (gloo collectives), on a (data 1,
fsdp 2, tensor 2) mesh, so each process builds half of every batch. The one-process runs use
the same mesh over four devices. Three runs, in order:

1. two processes: SFT -> RM -> P3O from scratch (checkpoints every 2 steps);
2. one process, on a copy of run 1 with its SFT stage cut back to the step-2 checkpoint and
   RM, RL removed: resumes SFT from a two-process checkpoint, then RM and RL from scratch;
3. two processes, on a copy of run 2 with RL cut back to its step-2 checkpoint: resumes RL
   from a one-process checkpoint.

All three must agree (params of every stage, every logged metric, the final table). Every
subprocess runs under a timeout in its own process group, killed on the way out, and they
share a persistent compilation cache (in .pytest_cache) with XLA's optimisations off, so only
the first session pays full compiles.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from p3o_jax import config as C
from p3o_jax import config_args
from p3o_jax import hf, memory_plan
from p3o_jax import sampler as S
from p3o_jax import model as M
from p3o_jax.checkpoint import load_params
from p3o_jax.checks import ConfigError
from p3o_jax.config import DistConfig
from p3o_jax.distributed import initialize, local_rows, process_rows
from p3o_jax.sharding import LOGICAL_RULES, logical_shardings, make_mesh
from p3o_jax.tasks import ToyRLHF
from p3o_jax.toy_task import ToyTaskConfig
from p3o_jax.cli.train import main
from p3o_jax.pipeline import init_sharded, sft_rows
from p3o_jax.train_state import create_state, make_optimizer, state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "scripts", "launch_local.py")
ARGS = ["exp=toy", "eval_prompts=8", "log_every=1", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
        "policy.d_model=32", "policy.head_dim=8", "policy.n_layers=1", "policy.d_ff=64",
        "sft.steps=4", "sft.batch_size=8", "rm.n_pairs=32", "rm.steps=3", "rm.batch_size=8",
        "rl.iterations=4", "rl.prompts_per_iter=8", "rl.epochs=1", "rl.minibatches=1",
        "checkpoint.every_steps=2", "checkpoint.every_minutes=0"]
RUN_TIMEOUT = 300
OUTPUTS = ("sft", "rm", "p3o")


@pytest.fixture(scope="module")
def env(pytestconfig):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(pytestconfig.cache.mkdir("xla-cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def run(command: list[str], env: dict, log: str) -> str:
    """Run `command` in its own process group with output to `log`; the group is killed on
    timeout or failure (no orphans). Returns the output; asserts exit code 0."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log) as f:
        text = f.read()
    assert rc == 0, text[-3000:]
    return text


def train(out_dir, env, processes: int, extra=()) -> str:
    """`python -m p3o_jax.cli.train` on the mesh (1, 2, 2): one process of 4 devices, or two of
    2; returns process 0's output."""
    command = [sys.executable, "-m", "p3o_jax.cli.train", *ARGS, f"out_dir={out_dir}", *extra]
    if processes == 1:
        return run(command, dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                   f"{out_dir}.log")
    logs = f"{out_dir}-logs"
    run([sys.executable, LAUNCH, "-n", str(processes), "--devices-per-process", "2",
         "--timeout", str(RUN_TIMEOUT - 10), "--log-dir", logs, "--", *command], env,
        f"{out_dir}.log")
    with open(os.path.join(logs, "process_0.log")) as f:
        return f.read()


def cut_back(out_dir, stage: str, output: str, to_step: int) -> None:
    """Make `stage` unfinished at `to_step`: remove its output and later checkpoints."""
    shutil.rmtree(os.path.join(out_dir, output))
    directory = os.path.join(out_dir, "ckpt", stage)
    for step in os.listdir(directory):
        if step.isdigit() and int(step) > to_step:
            shutil.rmtree(os.path.join(directory, step))


def metrics(out_dir) -> dict:
    """(stage, step) -> metrics without timings; a step logged again, the last line counts."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k not in ("stage", "step", "time")
                                      and not k.startswith("time_")} for r in rows}


def policy_cfg(out_dir) -> M.ModelConfig:
    with open(os.path.join(out_dir, "config.json")) as f:
        return M.ModelConfig(**json.load(f)["policy"])


def load(out_dir, output: str):
    """Host copy of a saved stage's params (restored onto this process's devices)."""
    return jax.device_get(load_params(os.path.join(out_dir, output), policy_cfg(out_dir),
                                      make_mesh(1, 2, 2, devices=jax.devices()[:4])))


def assert_same_run(expected, actual, outputs=OUTPUTS):
    for output in outputs:
        a, b = load(expected, output), load(actual, output)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{output}{jax.tree_util.keystr(path)}")
    m, n = metrics(expected), metrics(actual)
    assert m.keys() == n.keys()
    for key in m:
        np.testing.assert_allclose([n[key][k] for k in m[key]], list(m[key].values()),
                                   rtol=1e-5, atol=1e-6, err_msg=str(key))
    with open(os.path.join(expected, "summary.json")) as f, \
            open(os.path.join(actual, "summary.json")) as g:
        rows = [{k: v for k, v in r.items() if k != "policy"} for r in json.load(f)["rows"]]
        got = [{k: v for k, v in r.items() if k != "policy"} for r in json.load(g)["rows"]]
    for r, s in zip(rows, got):
        np.testing.assert_allclose(list(s.values()), list(r.values()), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("multihost") / "two"
    train(out, env, processes=2)
    return out


@pytest.fixture(scope="module")
def one_process(two_processes, env):
    out = two_processes.parent / "one"
    shutil.copytree(two_processes, out, ignore=shutil.ignore_patterns("tb"))
    os.remove(out / "preferences.npz")
    cut_back(out, "sft", "sft", 2)
    for output in ("rm", "p3o"):
        shutil.rmtree(out / output)
    for stage in ("rm", "p3o"):
        shutil.rmtree(out / "ckpt" / stage)
    log = train(out, env, processes=1)
    assert "sft: resuming at step 2 of 4" in log, log[-3000:]
    return out


def test_two_processes_match_one_and_checkpoints_move_over(two_processes, one_process):
    """Run 1 (two processes) == run 2 (one process, from run 1's SFT checkpoint)."""
    assert_same_run(two_processes, one_process)
    for name in ("metrics.jsonl", "summary.json", "config.json", "preferences.npz"):
        assert (two_processes / name).exists(), name  # written once, by process 0


def test_one_process_checkpoint_resumes_in_two(two_processes, one_process, env):
    out = one_process.parent / "again"
    shutil.copytree(one_process, out, ignore=shutil.ignore_patterns("tb"))
    cut_back(out, "p3o", "p3o", 2)
    log = train(out, env, processes=2)
    assert "rl: resuming at step 2 of 4" in log, log[-3000:]
    assert_same_run(two_processes, out)


@pytest.fixture(scope="module")
def reward_function_runs(tmp_path_factory, env):
    """SFT -> P3O scored by a reward function alone (the toy's gold reward as a program: no
    reward model), in two processes and in one. Each process scores the rows its devices hold."""
    root = tmp_path_factory.mktemp("multihost_rewards")
    extra = ["stages=sft,rl", f"reward_fns={os.path.join(ROOT, 'tests', 'reward_functions.py')}"
                              f":toy_gold"]
    train(root / "two", env, 2, extra)
    train(root / "one", env, 1, extra)
    return root


def test_reward_functions_in_two_processes_match_one(reward_function_runs):
    one, two = reward_function_runs / "one", reward_function_runs / "two"
    assert_same_run(one, two, outputs=("sft", "p3o"))
    rl = [m for (stage, _), m in metrics(two).items() if stage == "rl:p3o"]
    assert rl and all(m["reward"] == pytest.approx(m["reward/toy_gold"]) for m in rl)
    assert not os.path.exists(two / "rm")


def test_save_pretrained_gathers_across_processes(two_processes, env, tmp_path):
    """Params split over both processes: process 0 writes the whole tensors, the same file
    a single process writes."""
    script = tmp_path / "export.py"
    script.write_text(
        "import sys\n"
        "from p3o_jax import hf\n"
        "from p3o_jax.checkpoint import load_params\n"
        "from p3o_jax.config import DistConfig\n"
        "from p3o_jax.distributed import initialize\n"
        "from p3o_jax.model import ModelConfig\n"
        "from p3o_jax.sharding import make_mesh\n"
        "initialize(DistConfig())\n"
        f"cfg = ModelConfig(**{dataclasses.asdict(policy_cfg(two_processes))!r})\n"
        "params = load_params(sys.argv[1], cfg, make_mesh(1, 2, 2))\n"
        "assert not params['embed'].is_fully_addressable\n"
        "hf.save_pretrained(params, cfg, sys.argv[2])\n")
    run([sys.executable, LAUNCH, "-n", "2", "--devices-per-process", "2", "--timeout", "120",
         "--", sys.executable, str(script), str(two_processes / "p3o"), str(tmp_path / "multi")],
        env, str(tmp_path / "export.log"))
    cfg = policy_cfg(two_processes)
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    hf.save_pretrained(load_params(str(two_processes / "p3o"), cfg, mesh), cfg,
                       str(tmp_path / "single"))
    multi, single = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("multi", "single"))
    assert multi.keys() == single.keys()
    for k in single:
        np.testing.assert_array_equal(multi[k], single[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# in-process: start-up, rows, shardings, memory plans

def test_initialize_explicit_setup_needs_all_three(monkeypatch):
    """Outside a managed cluster: a clear error naming the missing setting (flag or env),
    checked before jax is asked; a single process needs nothing."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    coordinator = DistConfig(coordinator="127.0.0.1:1234")
    with pytest.raises(ConfigError, match="dist.num_processes"):
        initialize(coordinator)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="dist.process_id"):
        initialize(coordinator)
    with pytest.raises(ConfigError, match="dist.coordinator"):
        initialize(DistConfig())
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='two'"):
        initialize(coordinator)
    initialize(dataclasses.replace(coordinator, num_processes=1))  # one process: no set-up
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    initialize(DistConfig())  # nothing set, no cluster: one process
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_one_process_holds_every_row():
    mesh = make_mesh(2, 2, 2)
    assert process_rows(mesh, 16) == [(0, 16)]
    rows = local_rows(mesh, 16, lambda a, b: {"x": np.arange(a, b)})
    np.testing.assert_array_equal(rows["x"], np.arange(16))


@pytest.mark.parametrize("start, stop", [(0, 8), (2, 4), (4, 8), (3, 6), (1, 4)])
def test_sft_rows_are_the_rows_of_the_global_batch(start, stop):
    """A process's share of a step (any run of rows, as interleaved meshes give) is read as
    smaller `sft_batch` calls and equals those rows of the whole batch."""
    task = ToyRLHF(ToyTaskConfig())
    whole = task.sft_batch(8, 3)
    share = sft_rows(task, 8, 3, start, stop)
    for k in whole:
        np.testing.assert_array_equal(share[k], whole[k][start:stop], err_msg=k)


def _expected_spec(axes, shape, mesh) -> P:
    """The rule table applied by hand: each logical axis -> its mesh axes, unsharded where
    they do not divide the dimension."""
    rules = dict(LOGICAL_RULES)
    dims = []
    for size, name in zip(shape, axes):
        mesh_axes = rules.get(name) if name else None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        dims.append(mesh_axes if size % int(np.prod([mesh.shape[a] for a in names])) == 0
                    else None)
    return P(*dims)


def test_state_shardings_follow_the_rule_table():
    """fsdp=2 x tensor=2: every param and both Adam moments sharded as the rule table says
    (spot checks: wq P('fsdp', 'tensor', None), the vocab-by-embed table P('tensor', 'fsdp')),
    optimizer counts and the step replicated; the arrays `create_state` builds carry them."""
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    cfg = M.ModelConfig(family="llama", vocab_size=130, d_model=32, n_layers=1, n_heads=4,
                        n_kv_heads=2, d_ff=64)
    axes = M.param_axes(cfg)
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    tx = make_optimizer(C.OptimConfig(), 10)
    shardings = state_shardings(cfg, tx, mesh)
    params = jax.jit(lambda k: M.init_params(cfg, k),
                     out_shardings=shardings.params)(jax.random.key(0))
    state = create_state(params, tx, shardings)
    expected = {jax.tree_util.keystr(path): _expected_spec(spec, s.shape, mesh)
                for (path, spec), s in zip(
                    jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, P)),
                    jax.tree.leaves(shapes))}
    seen = {"params": 0, "mu": 0, "nu": 0, "count": 0}
    for (path, sharding), array in zip(jax.tree_util.tree_leaves_with_path(shardings),
                                       jax.tree.leaves(state)):
        key = jax.tree_util.keystr(path)
        assert array.sharding.is_equivalent_to(sharding, array.ndim), key
        if key == ".step" or key.endswith(".count"):
            want = P()
            seen["count"] += key != ".step"
        else:
            kind = next(k for k in ("params", "mu", "nu") if f".{k}[" in key)
            want = expected[key[key.index(f".{kind}[") + len(kind) + 1:]]
            seen[kind] += 1
        assert sharding.spec == want, (key, sharding.spec, want)
    assert seen["params"] == seen["mu"] == seen["nu"] == len(expected) and seen["count"] == 2
    attn = shardings.opt_state[1][0].mu["layer_0"]["attn"]
    assert attn["wq"].spec == P("fsdp", "tensor", None)
    assert attn["wk"].spec == P("fsdp", "tensor", None)
    assert shardings.params["embed"].spec == P("tensor", "fsdp")
    assert shardings.opt_state[1][0].count.spec == P()


def _device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


def _plan_cfg(**over) -> C.ExperimentConfig:
    cfg = config_args.load_experiment("toy")
    cfg = dataclasses.replace(
        cfg, mesh=C.MeshConfig(data=2, fsdp=2, tensor=2),
        policy=dataclasses.replace(cfg.policy, vocab_size=133, d_model=64, n_layers=2, d_ff=128),
        rl=dataclasses.replace(cfg.rl, prompts_per_iter=16, minibatches=2))
    for k, v in over.items():
        cfg = config_args.override(cfg, k, str(v))
    return cfg


def test_memory_plan_matches_the_sharded_arrays():
    """Plan numbers of a tiny config == per-device bytes of the real arrays on a (2, 2, 2)
    mesh, on every device; a vocabulary of 133 is not split over `tensor`."""
    cfg = _plan_cfg()
    plan = {s.stage: s for s in memory_plan.make_plan(cfg, 8).stages}
    mesh = make_mesh(2, 2, 2)
    pol, rl = cfg.policy, cfg.rl
    params = init_sharded(pol, jax.random.key(0), mesh)
    tx = make_optimizer(rl.optim, 10)
    state = create_state(params, tx, state_shardings(pol, tx, mesh))
    L = cfg.toy.prompt_len + cfg.toy.response_len
    rows = rl.prompts_per_iter * rl.n_samples
    cache_shape = jax.eval_shape(lambda: M.init_cache(pol, rows, L)[0]["k"])
    cache = jax.jit(lambda: M.init_cache(pol, rows, L), out_shardings=logical_shardings(
        P(*M.KV_CACHE_AXES), mesh, cache_shape))()
    assert params["embed"].sharding.spec == P(None, "fsdp")
    for device in jax.devices():
        p = _device_bytes(params, device)
        assert plan["rl"].params == plan["rl"].grads == _device_bytes(state.params, device) == p
        assert plan["rl"].opt_state == _device_bytes(state.opt_state, device)
        assert plan["rl"].frozen == 2 * p  # reference + reward model (same architecture)
        assert plan["eval"].frozen == 3 * p
        assert memory_plan.kv_cache_bytes(pol, rows, L, mesh) == _device_bytes(cache, device)
    assert plan["rl"].kv_cache == (memory_plan.kv_cache_bytes(pol, rows, L, mesh)
                                   + memory_plan.kv_cache_bytes(pol, rl.prompts_per_iter, L, mesh))
    assert plan["rl"].activations > plan["rl"].activations_remat > 0
    # FSDP's gathered blocks: two blocks' weights in the compute dtype, gathered over fsdp,
    # still split over tensor: the arrays themselves on the mesh without fsdp sharding
    whole = make_mesh(4, 1, 2)
    block = jax.tree.map(lambda x: x.astype(M.weight_compute_dtype(pol, x)), params["layer_0"])
    block = jax.device_put(block, logical_shardings(M.param_axes(pol)["layer_0"], whole, block))
    assert plan["rl"].gathered == plan["sft"].gathered == 2 * _device_bytes(
        block, whole.devices.flat[0]) > 0
    # the sampler's copy of the whole policy (`rl.sampler_gather_once`): what
    # `sampler.weights_for_decode` hands the decode loop, on every device
    with jax.set_mesh(mesh):
        decode = jax.jit(lambda p: S.weights_for_decode(p, pol, S.SamplingConfig(1)))(params)
    assert decode["embed"].sharding.is_fully_replicated     # 133 rows: not split over tensor
    assert decode["layer_0"]["attn"]["wq"].sharding.spec == P(None, "tensor")   # was fsdp, tensor
    for device in jax.devices():
        assert plan["rl"].decode_weights == plan["eval"].decode_weights == _device_bytes(
            decode, device) > 0
    streamed = memory_plan.make_plan(_plan_cfg(**{"rl.sampler_gather_once": "false"}), 8)
    assert all(s.decode_weights == 0 for s in streamed.stages)


def test_memory_plan_stops_a_run_that_cannot_fit(tmp_path, capsys):
    plan = memory_plan.make_plan(_plan_cfg(), 8)
    with pytest.raises(memory_plan.MemoryPlanError) as e:
        plan.check(plan.peak() - 1)
    for word in ("per device", "fsdp=2", *memory_plan.COMPONENTS):
        assert word in str(e.value), word
    plan.check(plan.peak())
    assert main(["exp=toy", f"out_dir={tmp_path}", "dist.check_memory=true",
                 "dist.hbm_gib=0.0001"]) == 2
    err = capsys.readouterr().err     # the run's programs, compiled for its 8 devices
    assert err.startswith("error: sft_step, rm_step, rl_generate, rl_score, rl_update does not "
                          "fit 0.0001 GiB per device") and "temp_gib" in err, err
    assert not (tmp_path / "config.json").exists()  # stopped before anything was written


def test_run_lock_is_taken_once_for_all_processes(env, tmp_path):
    """Process 0 alone takes the out_dir's lock, the others wait for the outcome: inside it
    names process 0; when another run holds it, every process stops with RunLocked."""
    from p3o_jax import run_lock
    script = tmp_path / "lock.py"
    script.write_text(
        "import os, sys\n"
        "import jax\n"
        "from jax.experimental import multihost_utils\n"
        "from p3o_jax import run_lock\n"
        "from p3o_jax.config import DistConfig\n"
        "from p3o_jax.distributed import initialize\n"
        "initialize(DistConfig())\n"
        "try:\n"
        "    with run_lock.hold(sys.argv[1]):\n"
        "        with open(os.path.join(sys.argv[1], run_lock.LOCK_FILE)) as f:\n"
        "            print('held', jax.process_index(), f.read(), flush=True)\n"
        "        multihost_utils.sync_global_devices('read the lock')\n"
        "except run_lock.RunLocked as e:\n"
        "    print('refused', jax.process_index(), e, flush=True)\n")
    out = tmp_path / "run"

    def launch(name):
        logs = tmp_path / name
        run([sys.executable, LAUNCH, "-n", "2", "--devices-per-process", "1", "--timeout", "120",
             "--log-dir", str(logs), "--", sys.executable, str(script), str(out)],
            dict(env, PYTHONPATH=ROOT), f"{logs}.log")   # this checkout's p3o_jax
        return [(logs / f"process_{i}.log").read_text() for i in range(2)]

    held = launch("free")
    pid = json.loads(held[0].split("held 0 ", 1)[1].splitlines()[0])["pid"]
    assert "held 1 {" in held[1] and f'"pid": {pid}' in held[1], held   # process 0's lock
    lock = run_lock.acquire(str(out))                                   # another run's
    try:
        refused = launch("held")
    finally:
        run_lock.release(lock)
    assert f"refused 0 {out} is in use by another run: " in refused[0], refused
    assert f"pid {os.getpid()} " in refused[0], refused
    assert "refused 1 " in refused[1] and "process 0 could not take" in refused[1], refused
