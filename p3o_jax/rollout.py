"""Rollout buffers: sample K responses per prompt from the current policy, then score them.

Scoring uses the *training* forward (not the sampler's log-probs) at the sampling temperature,
so that `logp_old` is exactly what the update recomputes at theta = theta_old.

Buffer layout (B prompts, K responses each, P prompt length, N response length, L = P + N):

    tokens, mask        int32   [B, K, L]   left-padded prompt | right-padded response
    resp_mask           int32   [B, K, N]   1 on generated tokens (EOS included)
    logp_old, logp_ref  float32 [B, K, N]   per-token log-probs under pi_old / pi_ref (0 on pads)
    entropy             float32 [B, K, N]   policy entropy at each response position
    rewards             float32 [B, K]      reward-model score at the last real token
    seq_kl              float32 [B, K]      sum_t mask * (logp_old - logp_ref)   (k1)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from p3o_jax import losses
from p3o_jax import model as M
from p3o_jax.sampler import concat_prompt_response


def flat(x):
    """[B, K, ...] -> [B*K, ...]."""
    return x.reshape(-1, *x.shape[2:])


def response_hidden(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int):
    """Trunk states that predict each response token: [B, L] -> [B, N, D]."""
    hidden, _ = M.forward(params, cfg, tokens, mask)
    return hidden[:, prompt_len - 1:-1]


def response_logprobs(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int,
                      temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs of the response part of [B, L] sequences: [B, N] (and entropy [B, N]).

    The LM head runs on the N response positions only; log-probs are gathered logits minus
    logsumexp, never a full log-softmax.
    """
    logits = M.lm_logits(params, cfg, response_hidden(params, cfg, tokens, mask, prompt_len))
    logp = losses.token_logprobs(logits, tokens[:, prompt_len:], temperature)
    if with_entropy:
        return logp, losses.entropy_from_logits(logits, temperature)
    return logp


def score(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
          prompts, prompt_mask, samples, temperature: float) -> dict:
    """Build the buffer (see module docstring) from `sample_pairs` output [B, K, N]."""
    B, K, N = samples.tokens.shape
    P = prompts.shape[-1]
    tokens, mask = concat_prompt_response(prompts, prompt_mask, samples.tokens, samples.mask)
    ft, fm = flat(tokens), flat(mask)
    resp_mask = samples.mask.astype(jnp.int32)
    unflat = lambda x: x.reshape(B, K, *x.shape[1:])
    logp_old, entropy = response_logprobs(policy, policy_cfg, ft, fm, P, temperature, True)
    logp_ref = response_logprobs(ref, policy_cfg, ft, fm, P, temperature)
    logp_old, logp_ref, entropy = (unflat(x) * resp_mask for x in (logp_old, logp_ref, entropy))
    rewards = unflat(M.sequence_reward(reward_model, rm_cfg, ft, fm))
    return dict(tokens=tokens, mask=mask, resp_mask=resp_mask, logp_old=logp_old,
                logp_ref=logp_ref, entropy=entropy, rewards=rewards,
                seq_kl=losses.kl_per_sequence(logp_old, logp_ref, resp_mask, "k1"))


def rollout_metrics(buffer: dict) -> dict:
    """Scalars every RL algorithm logs per iteration."""
    m = buffer["resp_mask"]
    kl3 = losses.kl_per_sequence(buffer["logp_old"], buffer["logp_ref"], m, "k3")
    return {
        "rm_reward": jnp.mean(buffer["rewards"]),
        "kl_k1": jnp.mean(buffer["seq_kl"]),
        "kl_k3": jnp.mean(kl3),
        "entropy": losses.masked_mean(buffer["entropy"], m),
        "response_length": jnp.mean(jnp.sum(m, -1)),
    }
