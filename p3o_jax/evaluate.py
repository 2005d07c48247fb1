"""Evaluation on held-out prompts: one sampled response per prompt, its reward (RM, reward
functions, gold), KL to the reference (k1 and k3) and length, their means with standard errors,
and head-to-head win rates with ties, by a score (`win_rate`, `compare`) or by an external
judge (`judge_win_rate`). Only the response kept is scored: a slow reward function or verifier
runs once per prompt."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

from p3o_jax import model as M
from p3o_jax import ops
from p3o_jax.distributed import to_host
from p3o_jax.rollout import score, weighed
from p3o_jax.engine import generate
from p3o_jax.sampler import SampleOutput, SamplingConfig, pair_keys


def mean_se(x) -> tuple[float, float]:
    """Mean of `x` [n] and its standard error (sample std / sqrt(n)); SE is 0 for n < 2. The one
    standard error of the project: over prompts here, over seeds in `mean_se_over_runs`."""
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


def mean_se_over_runs(means, ses) -> tuple[float, float]:
    """The mean of runs' (seeds') `means` [S] with its `mean_se` across them; with one run,
    that run's own SE `ses[0]` (over prompts) instead of 0."""
    if len(means) == 1:
        return float(means[0]), float(ses[0])
    return mean_se(means)


def win_rate(a, b) -> tuple[float, float]:
    """P(a beats b) on paired samples, ties counting one half; with its standard error."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return mean_se(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)))


def judge_win_rate(judge: Callable[[str, str], float], texts_a: Sequence[str],
                   texts_b: Sequence[str], both_orders: bool = True) -> tuple[float, float]:
    """Win rate of `texts_a` over `texts_b` (paired: same prompt at the same index) by
    `judge(a, b)`, the probability in [0, 1] that `a` is preferred (0.5: a tie); with its
    standard error over pairs. `both_orders` also asks `judge(b, a)` and averages
    `judge(a, b)` with `1 - judge(b, a)`, cancelling a judge's bias for the first position.
    Nothing remote is called here: an LLM judge is whatever callable is passed in."""
    if len(texts_a) != len(texts_b):
        raise ValueError(f"{len(texts_a)} texts against {len(texts_b)}: they must be paired")
    def ask(first, second):
        p = np.array([judge(x, y) for x, y in zip(first, second)], np.float64)
        if np.any(~((p >= 0) & (p <= 1))):
            raise ValueError("judge(a, b) must return a probability in [0, 1]")
        return p
    p = ask(texts_a, texts_b)
    return mean_se((p + 1.0 - ask(texts_b, texts_a)) / 2 if both_orders else p)


def _sample_one(policy, policy_cfg: M.ModelConfig, scfg: SamplingConfig, prompts, prompt_mask,
                key) -> SampleOutput:
    """One response per prompt, laid out [B, 1, N] as `rollout.score` takes them. Its key is
    the first of the prompt's pair in `pair_keys(key, B, 2)`: the response is
    `sample_responses(..., key, n=2)`'s first, the one earlier versions evaluated (they sampled
    and scored both and kept that one). Sampled by `scfg.engine` (`engine.generate`)."""
    keys = pair_keys(key, prompts.shape[0], 2)[::2]
    out = generate(policy, policy_cfg, scfg, prompts, prompt_mask, keys)
    return out._replace(**{f: getattr(out, f)[:, None] for f in out._fields if f != "num_steps"})


sample_one = jax.jit(_sample_one, static_argnames=("policy_cfg", "scfg"))


def _score(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
           prompts, prompt_mask, samples, scfg: SamplingConfig, rm_scores=None,
           fn_rewards=None, weights: tuple = (), rm_weight: float = 1.0):
    """Each prompt's response (`samples` [B, 1, N]) with its reward (and the reward model's
    score "rm", each reward function's "reward/<name>"), KL estimates and length, as [B, 1]
    arrays. The policy's log-probs are recomputed by the same forward as the reference's, so
    that the KL of a policy to itself is exactly 0, whatever the dtype. `weights`: the reward
    functions' (name, weight) pairs."""
    host = weighed(fn_rewards, dict(weights)) if fn_rewards else None
    buf = score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts, prompt_mask, samples,
                scfg.temperature, recompute_old=True, rm_scores=rm_scores, rewards=host,
                rm_weight=rm_weight)
    m = buf.resp_mask
    kl_k3 = ops.kl_per_sequence(buf.logp_old, buf.logp_ref, m, "k3")
    out = {"reward": buf.rewards, "kl_k1": buf.seq_kl, "kl_k3": kl_k3, "length": m.sum(-1),
           "tokens": samples.tokens, "mask": samples.mask}
    if buf.rm_scores is not None:
        out["rm"] = buf.rm_scores
    return out | {f"reward/{k}": v for k, v in (fn_rewards or {}).items()}


STATIC = ("policy_cfg", "rm_cfg", "scfg", "weights", "rm_weight")


@functools.partial(jax.jit, static_argnames=STATIC)
def _sample_and_score(policy, ref, reward_model, policy_cfg: M.ModelConfig,
                      rm_cfg: M.ModelConfig, prompts, prompt_mask, key, scfg: SamplingConfig,
                      weights: tuple = (), rm_weight: float = 1.0):
    """`_score` of `_sample_one`'s responses, one program."""
    samples = _sample_one(policy, policy_cfg, scfg, prompts, prompt_mask, key)
    return _score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts, prompt_mask, samples,
                  scfg, rm_weight=rm_weight)


_score_given_rewards = jax.jit(_score, static_argnames=STATIC)


def evaluate_policy(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
                    prompts, prompt_mask, key, scfg: SamplingConfig, gold_fn=None,
                    rm_fn=None, fn_scorer=None, rows=None, rm_weight: float = 1.0) -> dict:
    """Sample one response per prompt (`sample_one`) and return per-prompt numpy arrays [B]:
    reward, rm (with a reward model), reward/<name> (each reward function; NaN: no opinion),
    gold (if `gold_fn`), kl_k1, kl_k3, length, plus tokens/mask [B, N] of the responses.
    Scored outside the program, on those responses alone: `rm_fn(prompts, samples) -> [B, 1]`
    (a reward model with another tokenizer) and `fn_scorer` (a `reward_calls.FunctionRewards`;
    `rows` [B]: the prompts' rows in its records)."""
    if rm_fn is None and fn_scorer is None:
        out = _sample_and_score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts,
                                prompt_mask, key, scfg, rm_weight=rm_weight)
    else:
        samples = sample_one(policy, policy_cfg, scfg, prompts, prompt_mask, key)
        p = {"ids": prompts, "mask": prompt_mask, "row": rows}
        rm_scores = rm_fn(p, samples) if rm_fn else None
        fn_rewards = fn_scorer(p, samples) if fn_scorer else None
        weights = tuple(fn_scorer.weights.items()) if fn_scorer else ()
        out = _score_given_rewards(policy, ref, None if rm_fn else reward_model, policy_cfg,
                                   rm_cfg, prompts, prompt_mask, samples, scfg, rm_scores,
                                   fn_rewards, weights, rm_weight)
    out = {k: to_host(v[:, 0]) for k, v in out.items()}
    if gold_fn is not None:
        out["gold"] = np.asarray(gold_fn(*to_host((prompts, prompt_mask)), out["tokens"],
                                         out["mask"]), np.float64)
    return out


def summarize(per_prompt: dict) -> dict:
    """Means and standard errors of the scalar columns of `evaluate_policy`; a reward
    function's over the prompts it had an opinion on, and for 0/1 rewards also its accuracy
    (`<name>_acc`: the fraction of those with reward 1)."""
    row = {}
    for k in ("gold", "reward", "rm", "kl_k1", "kl_k3", "length"):
        if k in per_prompt:
            row[k], row[k + "_se"] = mean_se(per_prompt[k])
    for k in sorted(k for k in per_prompt if k.startswith("reward/")):
        x = np.asarray(per_prompt[k], np.float64)
        x = x[~np.isnan(x)]
        name = k.partition("/")[2]
        row[name], row[name + "_se"] = mean_se(x) if len(x) else (float("nan"), 0.0)
        if len(x) and np.all((x == 0) | (x == 1)):
            row[name + "_acc"] = float(np.mean(x == 1))
    return row


def compare(per_prompt: dict, baseline: dict) -> dict:
    """`summarize(per_prompt)` plus the win rates (with SE) of its responses over `baseline`'s on
    the same prompts, by gold reward (if known), by the reward and by the reward model."""
    row = summarize(per_prompt)
    if "gold" in per_prompt:
        row["win_gold"], row["win_gold_se"] = win_rate(per_prompt["gold"], baseline["gold"])
    if "rm" in per_prompt:
        row["win_rm"], row["win_rm_se"] = win_rate(per_prompt["rm"], baseline["rm"])
    if "reward" in per_prompt:
        row["win_reward"], row["win_reward_se"] = win_rate(per_prompt["reward"],
                                                           baseline["reward"])
    return row
