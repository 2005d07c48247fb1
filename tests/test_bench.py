"""The benchmark's FLOP formula against XLA's own count, and the iteration section end to end on
a tiny workload (the JSON it prints)."""
import contextlib
import dataclasses
import io
import json
import signal
import subprocess

import jax
import numpy as np
import pytest

from p3o_jax import rollout
from p3o_jax import sampler as S
from p3o_jax.cli import bench
from p3o_jax.rl import RLIteration
from p3o_jax.sharding import make_mesh

TINY = bench.Workload(prompts=8, prompt_len=16, new_tokens=8, layers=2, d_model=64, heads=2,
                      vocab=512)


def xla_flops(compiled) -> float:
    return compiled.cost_analysis()["flops"]


def test_executed_flops_formula_matches_xla_cost_analysis():
    """`model_flops(...)["executed"]` counts the matmuls the training loop's scoring program
    runs (the reference's log-probs and the reward model, prompt once per pair); XLA's count
    adds the elementwise work on top, a few percent here. A program that ran every [P + N] row
    in full would count ~25% more."""
    w = TINY
    with jax.set_mesh(make_mesh()):
        run = bench.Iteration(w)
        samples = run.rl.sample(run.state.params, run.prompts, jax.random.key(0))
        score = RLIteration.score.lower(run.rl, run.state.params, run.ref, run.rm, run.prompts,
                                        samples, run.carry).compile()
    executed = bench.model_flops(w)["executed"]
    devices = run.rl.mesh.size     # the compiled program's count is per device (batch split)
    assert 1.0 <= xla_flops(score) * devices / executed["score"] < 1.1
    # the reference's log-probs alone, against their share of the formula
    tokens, mask = S.concat_prompt_response(run.prompts["ids"], run.prompts["mask"],
                                            samples.tokens, samples.mask)
    logprobs = jax.jit(lambda p: rollout.response_logprobs(p, w.model, tokens, mask,
                                                           w.prompt_len)).lower(run.ref).compile()
    assert 1.0 <= xla_flops(logprobs) / (executed["update"] / 3) < 1.1
    model = bench.model_flops(w)["model"]
    assert model["iteration"] == sum(model[k] for k in bench.STAGES)
    assert model["update"] == 3 * model["generate"]


def test_packed_executed_flops_match_xla_and_useful_flops_count_real_tokens():
    """Variable prompt and response lengths (W2's shape in small): the packed programs run
    R < B prompt rows and XLA counts what the formula says; the useful count is the model
    count at the real lengths, below the padded one; at full lengths the two agree."""
    w = dataclasses.replace(TINY, prompt_len_min=3, new_tokens_min=2)
    prompt_lengths, response_lengths = w.lengths()
    assert prompt_lengths.min() < w.prompt_len and response_lengths.min() < w.new_tokens
    mesh = make_mesh(devices=jax.devices()[:1])    # R is not rounded up for a batch split
    with jax.set_mesh(mesh):
        run = bench.Iteration(w, mesh=mesh)
        samples = run.rl.sample(run.state.params, run.prompts, jax.random.key(0), run.packing,
                                run.limits)
        score = RLIteration.score.lower(run.rl, run.state.params, run.ref, run.rm, run.prompts,
                                        samples, run.carry, None, run.packing).compile()
    R = run.packed_rows
    assert R < w.prompts
    flops = bench.model_flops(w, R)
    assert 1.0 <= xla_flops(score) * run.rl.mesh.size / flops["executed"]["score"] < 1.1
    assert flops["useful"]["iteration"] < flops["model"]["iteration"]
    assert flops["useful"] == bench.stage_flops(w.model, prompt_lengths, response_lengths) | {
        "iteration": flops["useful"]["iteration"]}
    full = bench.model_flops(TINY)
    assert full["useful"] == full["model"]


def test_tree_executed_flops_match_xla():
    """With the responses packed as trees (`pack_responses`), scoring runs R' rows of P + N
    and the LM head on Hc positions of each, and XLA counts what the formula says."""
    w = dataclasses.replace(TINY, prompt_len_min=3, new_tokens_min=2, pack_responses=True)
    mesh = make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = bench.Iteration(w, mesh=mesh)
        samples = run.rl.sample(run.state.params, run.prompts, jax.random.key(0), run.packing,
                                run.limits)
        trees = run.rl.score_packing(run.prompts["ids"], run.prompts["mask"], samples.mask)
        score = RLIteration.score.lower(run.rl, run.state.params, run.ref, run.rm, run.prompts,
                                        samples, run.carry, None, trees).compile()
    assert trees.heads.shape == run.trees and w.name == "custom_trees"
    flops = bench.model_flops(w, run.packed_rows, run.trees)
    assert 1.0 <= xla_flops(score) / flops["executed"]["score"] < 1.1


def test_workload_presets_and_names():
    assert bench.WORKLOADS["w1"].name == "w1" and bench.WORKLOADS["w2_var"].name == "w2_var"
    assert dataclasses.replace(bench.W2, dtype="bfloat16").name == "w2_bfloat16"
    assert dataclasses.replace(bench.W2, pack_prompts=False).name == "w2_padded"
    assert TINY.name == "custom"
    w2 = bench.W2.model
    assert (w2.n_layers, w2.d_model, w2.vocab_size, w2.rotary_dim, w2.parallel_residual) == (
        12, 768, 50304, 16, True)
    lengths, responses = bench.WORKLOADS["w2_var"].lengths()
    assert 128 <= lengths.min() and lengths.max() <= 512 and len(set(lengths)) > 4
    assert 8 <= responses.min() and responses.max() <= 53 and responses.shape == (8, 2)
    _, workloads = bench.parse_args(["workloads=w1,w2", "layers=3"])
    assert [w.layers for w in workloads] == [3, 3] and workloads[1].family == "gpt_neox"


def test_w3_is_smollm2_shaped_with_log_normal_lengths():
    w3 = bench.W3.model
    assert (w3.n_layers, w3.d_model, w3.n_heads, w3.n_kv_heads, w3.d_ff, w3.vocab_size,
            w3.tie_embeddings, w3.gated_mlp) == (30, 576, 9, 3, 1536, 49152, True, True)
    assert 130e6 < w3.num_params() < 140e6                    # SmolLM2-135M
    prompts, responses = bench.W3.lengths()
    assert responses.shape == (32, 4) and 64 <= prompts.min() and prompts.max() <= 256
    assert 8 <= responses.min() and responses.max() <= 512
    assert 80 <= np.median(responses) <= 115 and responses.max() > 5 * np.median(responses)
    assert bench.W3.name == "w3" and bench.BenchArgs().workloads == "w1,w2,w2_var"


def test_engine_section_compares_the_engines():
    """On a small log-normal workload: the same masks, fewer slot-steps per real token than
    the static sampler's, a smaller KV cache, and both times; a line per slot count, each
    against the same static times."""
    w = dataclasses.replace(TINY, prompts=4, responses=4, new_tokens=48, new_tokens_min=2,
                            new_tokens_median=8, slots=4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.engine_section(w, repeats=1, slot_counts=(4, 8))
    line, wider = (json.loads(text) for text in out.getvalue().splitlines())
    assert [line["slots"], wider["slots"]] == [4, 8]
    assert line["custom.static_generation_times_s"] == wider["custom.static_generation_times_s"]
    assert line["custom.continuous_kv_cache_bytes"] < wider["custom.continuous_kv_cache_bytes"]
    assert line["custom.continuous_iterations"] > wider["custom.continuous_iterations"]
    p = {k.partition(".")[2]: v for k, v in line.items() if k.startswith("custom.")}
    assert line["section"] == "engine" and p["same_masks"]
    assert p["real_response_tokens"] == int(w.lengths()[1].sum())
    assert 1 <= p["slot_steps_per_real_token"] < p["static_slot_steps_per_real_token"]
    assert p["continuous_kv_cache_bytes"] < p["static_kv_cache_bytes"]
    assert p["static_generation_s"] > 0 and p["continuous_generation_s"] > 0
    assert p["engine_speedup"] == pytest.approx(
        p["static_generation_s"] / p["continuous_generation_s"], rel=1e-2)


def test_iteration_and_loop_sections_print_split_and_mfu():
    out = io.StringIO()
    args = [f"{k}={v}" for k, v in vars(TINY).items()]
    with contextlib.redirect_stdout(out):
        assert bench.main([*args, "workloads=custom", "only=iteration,loop", "repeats=2"]) == 0
    machine, iteration, loop = (json.loads(line) for line in out.getvalue().splitlines())
    assert loop["section"] == "loop" and loop["custom.loop_iteration_s"] > 0
    assert loop["custom.loop_programs_s"] < loop["custom.loop_iteration_s"]
    assert machine["section"] == "machine" and machine["machine.matmul_gflops_f32"] > 0
    p = iteration
    assert iteration["section"] == "iteration"
    stages = [p[f"custom.{k}_s"] for k in bench.STAGES]
    assert all(s > 0 for s in stages)
    assert sum(stages) == pytest.approx(p["custom.iteration_s"], rel=0.3)
    assert 0 < p["custom.iteration_mfu"] <= p["custom.iteration_hfu"] < 1.5
    assert p["custom.generate_tokens_per_s"] > 0


def test_memory_child_measures_p3o_and_ppo(capsys):
    # what each fresh process of the memory section prints: XLA's figures, then the peak
    rows = {}
    for algo in ("p3o", "ppo"):
        bench.memory_child(TINY, algo)
        lines = capsys.readouterr().out.strip().splitlines()
        rows[algo] = {k: v for line in lines[-2:] for k, v in json.loads(line).items()}
    assert all(r["peak_mib"] >= 0 and r["update_temp_mib"] > 0 for r in rows.values())
    # PPO's state adds a critic the size of the policy, with its AdamW moments
    assert rows["ppo"]["state_mib"] == pytest.approx(2 * rows["p3o"]["state_mib"], rel=0.05)


def test_memory_section_reports_a_child_killed_for_memory(monkeypatch, capsys):
    # PPO at W2 outgrows this VM: the kernel kills the child after its first line
    def run(cmd, **kw):
        algo = cmd[-1].split("=")[1]
        if algo == "ppo":
            return subprocess.CompletedProcess(cmd, -signal.SIGKILL, json.dumps(
                {"state_mib": 200.0, "update_temp_mib": 900.0}) + "\n", "")
        return subprocess.CompletedProcess(cmd, 0, json.dumps(
            {"state_mib": 100.0, "update_temp_mib": 300.0}) + "\n" + json.dumps(
            {"peak_mib": 700.0}) + "\n", "")
    monkeypatch.setattr(bench.subprocess, "run", run)
    bench.memory_section(TINY)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    p = TINY.name
    assert row[f"{p}.p3o_peak_mib"] == 700.0 and row[f"{p}.ppo_peak_mib"] is None
    assert "out of memory" in row[f"{p}.ppo_killed"] and f"{p}.p3o_killed" not in row
    assert f"{p}.p3o_saves_mib" not in row
    assert row[f"{p}.p3o_saves_xla_mib"] == 700.0


def test_bench_takes_the_key_value_grammar(capsys):
    assert bench.main(["layers=two"]) == 2
    assert bench.main(["only=iteration,gpu"]) == 2
    assert bench.main(["rl.beta=0.1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "'layers'" in err[0] and "'only'" in err[1] and "'rl.beta'" in err[2], err
