"""Before/after of each optimisation in bench/NOTES.md, on workload W1, as JSON lines.

Each comparison builds both variants in one process and times them in alternation (the
machine is a shared VM whose speed drifts by 20% between minutes; alternating keeps that drift
out of the ratio), reporting medians and minima over `repeats` rounds.

    .venv/bin/python bench/ab.py [only=prompt_once,logp_old,stored_cotangent,eval] [repeats=9]

- prompt_once:      the update (one P3O step) with each prompt run once for its responses
                    (`rollout.prompt_once_hidden`) vs the full [P + N] forward of every row.
- logp_old:         the scoring program with pi_old's log-probs taken from the sampler vs
                    recomputed by a training forward (`rollout.score(recompute_old)`).
- stored_cotangent: the update with `model.stored_cotangent` vs without it (identity).
- eval:             one evaluation of 256 prompts (`evaluate.evaluate_policy`) compiled as one
                    program vs dispatched op by op (as it was before it was jitted).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import evaluate, ops, rollout
from p3o_jax import model as M
from p3o_jax.checks import Positive, SubsetOf
from p3o_jax.cli import bench
from p3o_jax.config_args import tool_args
from p3o_jax.sharding import make_mesh

COMPARISONS = ("prompt_once", "logp_old", "stored_cotangent", "eval")


def alternate(variants: dict, repeats: int) -> dict:
    """Median and min seconds of each zero-argument callable, timed in alternation."""
    for fn in variants.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4)}
            for k, v in times.items()}


def emit(name: str, before: str, after: str, result: dict):
    speedup = result[before]["median_s"] / result[after]["median_s"]
    print(json.dumps({"comparison": name, **result, "speedup": round(speedup, 2),
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def full_row_logprobs(params, cfg, tokens, mask, prompt_len, temperature=1.0):
    """The 'before' of prompt_once: every [P + N] row through the trunk on its own."""
    B, K, L = tokens.shape
    hidden, _ = M.forward(params, cfg, rollout.flat(tokens), rollout.flat(mask))
    logits = M.lm_logits(params, cfg, hidden[:, prompt_len - 1:-1])
    logp = ops.token_logprobs(logits, rollout.flat(tokens)[:, prompt_len:], temperature)
    return logp.reshape(B, K, L - prompt_len)


def update_runner(w: bench.Workload):
    """A fresh `bench.Iteration` whose update is compiled with the model code as it is when
    this is called; returns a callable running one update on a fixed buffer."""
    run = bench.Iteration(w)
    run.step(0)
    buffer = run.buffer()

    def update():
        run.state, metrics = run.rl.update(run.state, buffer)
        return run.state
    return update


def prompt_once(w, repeats):
    real = rollout.response_logprobs
    variants = {}
    for name, fn in (("full_rows", full_row_logprobs), ("prompt_once", real)):
        rollout.response_logprobs = fn
        variants[name] = update_runner(w)
    rollout.response_logprobs = real
    emit("prompt_once", "full_rows", "prompt_once", alternate(variants, repeats))


def logp_old(w, repeats):
    policy, ref, rm, (prompts, mask) = bench.build_models(w)
    samples = bench.S.sample_responses(policy, w.model, w.sampling, prompts, mask,
                                       jax.random.key(0), n=w.responses)
    program = jax.jit(rollout.score, static_argnums=(3, 4, 8, 9))
    variants = {name: functools.partial(program, policy, ref, rm, w.model, w.model, prompts,
                                        mask, samples, w.temperature, recompute)
                for name, recompute in (("recomputed", True), ("from_sampler", False))}
    emit("logp_old", "recomputed", "from_sampler", alternate(variants, repeats))


def stored_cotangent(w, repeats):
    real = M.stored_cotangent
    variants = {}
    for name, fn in (("off", lambda x: x), ("on", real)):
        M.stored_cotangent = fn
        variants[name] = update_runner(w)
    M.stored_cotangent = real
    emit("stored_cotangent", "off", "on", alternate(variants, repeats))


def eval_program(w, repeats):
    policy, ref, rm, _ = bench.build_models(w)
    prompts = jax.random.randint(jax.random.key(1), (256, w.prompt_len), 1, w.vocab)
    mask = jnp.ones_like(prompts)
    args = (policy, ref, rm, w.model, w.model, prompts, mask, jax.random.key(2), w.sampling)
    eager = evaluate._sample_and_score.__wrapped__
    variants = {"op_by_op": lambda: eager(*args),
                "one_program": lambda: evaluate._sample_and_score(*args)}
    emit("eval", "op_by_op", "one_program", alternate(variants, max(repeats // 3, 2)))


@dataclasses.dataclass(frozen=True)
class ABArgs:
    only: Annotated[str, SubsetOf(*COMPARISONS)] = ",".join(COMPARISONS)
    repeats: Annotated[int, Positive] = 9


def main():
    args, rest = tool_args(sys.argv[1:], ABArgs())
    if rest:
        raise SystemExit(f"unknown keys {rest}; expected only=..., repeats=...")
    w = bench.Workload()
    runs = {"prompt_once": prompt_once, "logp_old": logp_old,
            "stored_cotangent": stored_cotangent, "eval": eval_program}
    with jax.set_mesh(make_mesh()):
        for name in args.only.split(","):
            runs[name](w, args.repeats)


if __name__ == "__main__":
    main()
