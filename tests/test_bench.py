"""The benchmark's FLOP formula against XLA's own count, and the iteration section end to end on
a tiny workload (the JSON it prints)."""
import contextlib
import io
import json

import jax
import pytest

from p3o_jax import bench, rollout
from p3o_jax import sampler as S

TINY = bench.Workload(prompts=8, prompt_len=16, new_tokens=8, layers=2, d_model=64, heads=2,
                      vocab=512)


def xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_executed_flops_formula_matches_xla_cost_analysis():
    """`model_flops(...)["executed"]` counts the matmuls the log-prob and score programs run
    (prompt once per pair); XLA's count adds the elementwise work on top, a few percent here.
    A program that ran every [P + N] row in full would count ~25% more."""
    w = TINY
    policy, ref, rm, (prompts, mask) = bench.build_models(w)
    samples = S.sample_pairs(policy, w.model, w.sampling, prompts, mask, jax.random.key(0))
    tokens, full_mask = S.concat_prompt_response(prompts, mask, samples.tokens, samples.mask)
    executed = bench.model_flops(w)["executed"]
    logprobs = xla_flops(lambda p: rollout.response_logprobs(p, w.model, tokens, full_mask,
                                                             w.prompt_len), ref)
    score = xla_flops(lambda p: rollout.response_reward(p, w.model, tokens, full_mask,
                                                        w.prompt_len), rm)
    assert 1.0 <= logprobs / executed["logprobs"] < 1.1
    assert 1.0 <= score / executed["score"] < 1.1
    model = bench.model_flops(w)["model"]
    assert model["iteration"] == sum(model[k] for k in bench.STAGES)
    assert model["update"] == 3 * model["logprobs"]


def test_iteration_section_prints_split_and_mfu():
    out = io.StringIO()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(TINY).items()]
    with contextlib.redirect_stdout(out):
        bench.main([*args, "--only", "iteration", "--repeats", "2"])
    machine, iteration = (json.loads(line) for line in out.getvalue().splitlines())
    assert machine["section"] == "machine" and machine["machine.matmul_gflops_f32"] > 0
    p = iteration
    assert iteration["section"] == "iteration"
    stages = [p[f"custom.{k}_s"] for k in bench.STAGES]
    assert all(s > 0 for s in stages)
    assert sum(stages) == pytest.approx(p["custom.iteration_s"], rel=0.3)
    assert 0 < p["custom.iteration_mfu"] <= p["custom.iteration_hfu"] < 1.5
    assert p["custom.generate_tokens_per_s"] > 0
