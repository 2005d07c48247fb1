"""Evaluation on held-out prompts: reward (RM and gold), KL to the reference (k1 and k3) with
standard errors, response length, and head-to-head win rates with ties, by a score
(`win_rate`, `compare`) or by an external judge (`judge_win_rate`)."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

from p3o_jax import model as M
from p3o_jax import ops
from p3o_jax.distributed import to_host
from p3o_jax.rollout import score
from p3o_jax.sampler import SamplingConfig, sample_pairs


def mean_se(x) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); SE is 0 for n < 2."""
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


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


def _score(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
           prompts, prompt_mask, samples, scfg: SamplingConfig, rewards=None):
    """The first of each prompt's two responses with its RM score, KL estimates and length, as
    [B] arrays. The policy's log-probs are recomputed by the same forward as the reference's,
    so that the KL of a policy to itself is exactly 0, whatever the dtype."""
    buf = score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts, prompt_mask, samples,
                scfg.temperature, recompute_old=True, rewards=rewards)
    m = buf.resp_mask
    kl_k3 = ops.kl_per_sequence(buf.logp_old, buf.logp_ref, m, "k3")
    return {"rm": buf.rewards, "kl_k1": buf.seq_kl, "kl_k3": kl_k3, "length": m.sum(-1),
            "tokens": samples.tokens, "mask": samples.mask}


@functools.partial(jax.jit, static_argnames=("policy_cfg", "rm_cfg", "scfg"))
def _sample_and_score(policy, ref, reward_model, policy_cfg: M.ModelConfig,
                      rm_cfg: M.ModelConfig, prompts, prompt_mask, key, scfg: SamplingConfig):
    """`_score` of two responses per prompt (the draws of training's `sample_pairs`), one
    program."""
    samples = sample_pairs(policy, policy_cfg, scfg, prompts, prompt_mask, key, n=2)
    return _score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts, prompt_mask, samples,
                  scfg)


_score_given_rewards = jax.jit(_score, static_argnames=("policy_cfg", "rm_cfg", "scfg"))


def evaluate_policy(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
                    prompts, prompt_mask, key, scfg: SamplingConfig, gold_fn=None,
                    reward_fn=None) -> dict:
    """Sample one response per prompt and return per-prompt numpy arrays: rm, gold (if
    `gold_fn`), kl_k1, kl_k3, length, plus tokens/mask of the responses. `reward_fn(prompts,
    samples) -> [B, 2]` scores outside the program (a reward model with another tokenizer)."""
    if reward_fn is None:
        out = _sample_and_score(policy, ref, reward_model, policy_cfg, rm_cfg, prompts,
                                prompt_mask, key, scfg)
    else:
        samples = sample_pairs(policy, policy_cfg, scfg, prompts, prompt_mask, key, n=2)
        rewards = reward_fn({"ids": prompts, "mask": prompt_mask}, samples)
        out = _score_given_rewards(policy, ref, None, policy_cfg, rm_cfg, prompts, prompt_mask,
                                   samples, scfg, rewards)
    out = {k: to_host(v[:, 0]) for k, v in out.items()}
    if gold_fn is not None:
        out["gold"] = np.asarray(gold_fn(*to_host((prompts, prompt_mask)), out["tokens"],
                                         out["mask"]), np.float64)
    return out


def summarize(per_prompt: dict) -> dict:
    """Means and standard errors of the scalar columns of `evaluate_policy`."""
    row = {}
    for k in ("gold", "rm", "kl_k1", "kl_k3", "length"):
        if k in per_prompt:
            row[k], row[k + "_se"] = mean_se(per_prompt[k])
    return row


def compare(per_prompt: dict, baseline: dict) -> dict:
    """`summarize(per_prompt)` plus the win rates (with SE) of its responses over `baseline`'s on
    the same prompts, by gold reward (if known) and by the reward model."""
    row = summarize(per_prompt)
    if "gold" in per_prompt:
        row["win_gold"], row["win_gold_se"] = win_rate(per_prompt["gold"], baseline["gold"])
    row["win_rm"], row["win_rm_se"] = win_rate(per_prompt["rm"], baseline["rm"])
    return row
