"""The frontier and invariance commands end to end on a tiny toy config, and the sweep's table
maths (means over seeds with their SE, the SFT row) on hand-made records."""
import json
import os

import jax
import jax.numpy as jnp
from jax._src import compilation_cache as jax_cache     # its _cache: where writes go
import numpy as np
import pytest

from p3o_jax.cli import frontier as F
from p3o_jax.cli import offpolicy as O
from p3o_jax.checks import ConfigError
from conftest import (CACHE_KEYS, HAS_PROC_MAPS, close_compilation_cache, free_compiled_programs_above,
                      memory_map_count)

TINY = ["exp=toy", "eval_prompts=64", "policy.d_model=32", "policy.n_layers=1", "policy.d_ff=64",
        "sft.steps=60", "sft.batch_size=32", "sft.optim.lr=1e-2", "rm.n_pairs=256",
        "rm.steps=40", "rm.batch_size=32", "rm.optim.lr=3e-3", "rl.prompts_per_iter=32",
        "rl.epochs=2", "rl.optim.lr=3e-3", "rl.optim.warmup_steps=0"]


def test_the_suite_closes_the_compilation_cache_a_test_opens(tmp_path):
    """What conftest's `no_compilation_cache_after_a_test` relies on: `keep_compiled` makes
    later compiles write to disk, and `close_compilation_cache` stops that."""
    saved = {k: getattr(jax.config, k) for k in CACHE_KEYS}
    F.keep_compiled(str(tmp_path / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)   # this tiny one too
    try:
        jax.jit(lambda x: x * 3 + 1).lower(1.0).compile()
        assert jax_cache._cache is not None and os.listdir(tmp_path / "jax_cache")
    finally:
        close_compilation_cache(saved)
    jax.jit(lambda x: x * 5 + 2).lower(1.0).compile()
    assert jax_cache._cache is None              # no folder: later compiles write nowhere
    assert all(getattr(jax.config, k) == v for k, v in saved.items())


@pytest.mark.skipif(not HAS_PROC_MAPS, reason="counts /proc/self/maps (Linux)")
def test_the_suite_frees_compiled_programs_that_hold_memory_maps():
    """What conftest's `compiled_programs_freed_before_the_map_limit` relies on: compiled
    programs hold memory maps while jax caches them, and dropping them gives the maps back."""
    programs = [jax.jit(lambda x, i=i: jnp.tanh(x * i).sum()) for i in range(40)]
    for f in programs:
        f(jnp.ones(8)).block_until_ready()
    held = memory_map_count()
    assert not free_compiled_programs_above(held + 1000)   # under the bound: nothing dropped
    assert memory_map_count() > held - 40
    assert free_compiled_programs_above(held - 40)
    assert memory_map_count() < held - 40                  # over it: the programs' maps freed


def record(method, beta, seed, step, steps, **metrics):
    row = {"method": method, "beta": beta, "seed": seed, "step": step, "steps": steps,
           "final": step == steps}
    for k in ("kl_k1", "kl_k3", "gold", "rm", "win_gold", "win_rm", "length"):
        row[k], row[k + "_se"] = metrics.get(k, 0.0), 0.1
    return row


def test_final_rows_average_seeds_with_their_se():
    records = [record("P3O-V2", 0.1, s, 0, 4, gold=1.0) for s in (0, 1, 2)]
    records += [record("P3O-V2", 0.1, s, 2, 4, gold=9.0) for s in (0, 1, 2)]   # not final
    records += [record("P3O-V2", 0.1, s, 4, 4, gold=g, kl_k1=k)
                for s, g, k in ((0, 2.0, 0.5), (1, 3.0, 0.7), (2, 4.0, 0.9))]
    records += [record("PPO", 0.1, 0, 4, 4, gold=5.0)]
    rows = {r["policy"]: r for r in F.final_rows(records)}
    assert set(rows) == {"SFT", "P3O-V2", "PPO"}
    assert rows["SFT"]["seeds"] == 3 and rows["SFT"]["gold"] == 1.0
    p3o = rows["P3O-V2"]
    assert p3o["seeds"] == 3 and p3o["gold"] == pytest.approx(3.0)
    assert p3o["gold_se"] == pytest.approx(1.0 / np.sqrt(3))          # std 1 over 3 seeds
    assert p3o["kl_k1"] == pytest.approx(0.7) and p3o["kl_k1_se"] == pytest.approx(0.2 / np.sqrt(3))
    # one seed: its own SE over prompts
    assert rows["PPO"]["gold"] == 5.0 and rows["PPO"]["gold_se"] == 0.1


def test_parse_sweeps_and_errors():
    sweep, results, inv, cfg = F.parse(["quick=true", "betas=0.1,1", "rl.epochs=3"])
    assert sweep.betas == (0.1, 1.0) and sweep.seeds == F.QUICK.seeds and not inv
    assert cfg.rl.epochs == 3 and cfg.rl.iterations == 12      # the sweep's own setting
    sweep, _, inv, cfg = F.parse(["invariance=true", "rl.iterations=5"])
    assert inv and sweep.methods == ("P3O-V2", "PPO") and cfg.rl.iterations == 5
    with pytest.raises(ConfigError, match="methods"):
        F.parse(["methods=P3O-V2,TRPO"])


def test_k4_methods_keep_the_samples_per_iteration():
    """The k = 4 entries sample 4 responses to half as many prompts: as many responses per
    iteration as their k = 2 counterparts, with the same algorithm settings."""
    _, _, _, cfg = F.parse(["quick=true"])
    for name in ("P3O-V2", "GRPO", "RLOO"):
        k2, k4 = F.METHODS[name](0.3, cfg), F.METHODS[f"{name}-k4"](0.3, cfg)
        assert k4 == {**k2, "rl.n_samples": 4, "rl.prompts_per_iter": cfg.rl.prompts_per_iter // 2}
        run = F.overridden(cfg, k4)
        assert run.rl.n_samples * run.rl.prompts_per_iter == 2 * cfg.rl.prompts_per_iter
    assert F.METHODS["Dr.GRPO"](0.1, cfg)["grpo.aggregation"] == "constant"
    table = F.timing_table([{"method": "SFT+RM", "beta": None, "seed": 0, "seconds": 9.0},
                            {"method": "RLOO", "beta": 0.1, "seed": 0, "seconds": 20.4},
                            {"method": "RLOO", "beta": 0.1, "seed": 1, "seconds": 10.0}])
    assert "| RLOO | 30 |" in table and "SFT+RM" not in table


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """One out_dir for the frontier and invariance runs: the second trains no SFT and reward
    model of its own (both start from `<out_dir>-frontier/seed0`)."""
    return tmp_path_factory.mktemp("sweep") / "run"


def test_frontier_end_to_end(sweep_dir, tmp_path):
    results = tmp_path / "results"
    args = [*TINY, f"out_dir={sweep_dir}", f"results={results}", "seeds=0", "betas=0.1",
            "methods=P3O-V2,DPO-offline", "rl.iterations=4", "dpo.epochs=1"]
    assert F.main(args) == 0
    assert (results / "frontier.png").stat().st_size > 10_000
    table = (results / "frontier.md").read_text()
    assert "| P3O-V2 | 0.1 |" in table and "| DPO-offline | 0.1 |" in table
    assert "| P3O-V2 |" in (results / "timings.md").read_text()
    rows = [json.loads(line) for line in (results / "frontier.jsonl").read_text().splitlines()]
    p3o = [r for r in rows if r["method"] == "P3O-V2"]
    assert [r["step"] for r in p3o] == [0, 1, 2, 3, 4] and p3o[-1]["final"]
    assert all(np.isfinite(r["gold"]) and 0 <= r["win_gold"] <= 1 for r in rows)
    # A second call reuses every finished stage and run, and reproduces the table.
    assert F.main(args) == 0
    assert (results / "frontier.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]


def test_invariance_end_to_end(sweep_dir, tmp_path):
    """With a per-prompt offset on the reward, P3O's curves are unchanged up to rounding and
    PPO's are not."""
    results = tmp_path / "results"
    assert F.main([*TINY, f"out_dir={sweep_dir}", f"results={results}", "invariance=true",
                   "rl.iterations=4"]) == 0
    rows = [json.loads(line) for line in (results / "invariance.jsonl").read_text().splitlines()]
    curve = lambda m, off: np.array([[r["gold_reward"], r["kl_k1"], r["rm_reward_minus_offset"]]
                                     for r in rows if r["method"] == m and r["offset"] == off])
    p3o = np.abs(curve("P3O-V2", 0.0) - curve("P3O-V2", 5.0)).max()
    ppo = np.abs(curve("PPO", 0.0) - curve("PPO", 5.0)).max()
    assert curve("P3O-V2", 0.0).shape == (4, 3)
    assert p3o < 1e-3 < ppo, (p3o, ppo)
    assert os.path.getsize(results / "invariance.png") > 10_000


def test_offpolicy_end_to_end(sweep_dir, tmp_path):
    """The off-policy comparison on the frontier's SFT and reward model: each method in each
    regime, evaluations placed by generated tokens and wall seconds, the runs' statistics,
    the table and the verdict."""
    results = tmp_path / "results"
    assert O.main([*TINY, f"out_dir={sweep_dir}", f"results={results}", "seeds=0",
                   "methods=P3O-V2,RLOO", "regimes=fresh,stale2", "rl.iterations=4",
                   "evals=2"]) == 0
    rows = [json.loads(line) for line in (results / "offpolicy.jsonl").read_text().splitlines()]
    runs = {(r["regime"], r["method"]): r for r in rows if r.get("run")}
    assert set(runs) == {(g, m) for g in ("fresh", "stale2") for m in ("P3O-V2", "RLOO")}
    assert runs["stale2", "RLOO"]["staleness_max"] == 2 == runs["stale2", "P3O-V2"]["staleness_max"]
    assert runs["fresh", "RLOO"]["staleness_max"] == 0
    assert runs["fresh", "RLOO"]["is_weight_mean"] == 1.0 != runs["stale2", "RLOO"]["is_weight_mean"]
    evals = [r for r in rows if not r.get("run") and r["regime"] == "stale2"
             and r["method"] == "P3O-V2"]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[-1]["final"]
    assert evals[0]["tokens"] == 0 < evals[1]["tokens"] < evals[2]["tokens"]
    assert evals[0]["seconds"] == 0 < evals[1]["seconds"] < evals[2]["seconds"]
    report = (results / "offpolicy.md").read_text()
    assert "| stale2 | P3O-V2 | 1 |" in report and "- **fresh**: P3O-V2 " in report
    assert (results / "offpolicy.png").stat().st_size > 10_000


def test_offpolicy_walls_and_verdicts():
    rows = [{"stage": "rl:p3o", "step": i, "time": t} for i, t in enumerate((10.0, 11.0, 13.0))]
    rows += [{"stage": "eval:p3o", "step": 2, "time": 12.5}]     # an evaluation before step 2
    assert O.iteration_walls(rows) == [0.75, 1.0, 0.5]            # the first: the median
    table = [{"regime": "reuse", "method": m, "gold": g, "gold_se": 0.1, "kl_k1": 1.0}
             for m, g in (("P3O-V2", 3.5), ("P3O-V1", 3.2), ("RLOO", 3.1), ("PPO", 3.3))]
    lines = O.verdicts(table)
    assert lines[0].startswith("- **reuse**: P3O-V2 ties against PPO") and "+1.4 SE" in lines[0]
    assert lines[1].startswith("- **reuse**: P3O-V1 ties against PPO")
    table[3]["gold"] = 3.0                                           # RLOO is then the best other
    assert O.verdicts(table)[0].startswith("- **reuse**: P3O-V2 wins against RLOO")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory maps")
def test_runs_release_their_compiled_programs(tmp_path):
    """Each run's compiled programs hold memory maps of JIT code (~1000 a toy run); a process
    may hold 65530, so a sweep of 126 runs in one process must release them after each run."""
    cfg = F.parse([*TINY, f"out_dir={tmp_path}/run", "sft.steps=4", "rm.steps=4",
                   "rl.iterations=1", "eval_prompts=16"])[3]
    base = F.train_sft_rm(cfg, 0, "maps")
    over = dict(F.METHODS["P3O-V2"](0.1, cfg), **{"rl.eval_every": 1})
    maps = []
    for i in range(3):          # each run compiles its own programs (new closures)
        F.rl_run(cfg, base, f"run{i}", over)
        with open("/proc/self/maps") as f:
            maps.append(sum(1 for _ in f))
    assert maps[2] - maps[1] < 100, maps
