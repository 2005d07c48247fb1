"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

A response is one action (a contextual bandit, as in P3O); its baseline is the mean reward of
the other K - 1 responses to the same prompt, so no critic is needed.

Per iteration (p3o_jax/rl.py), K >= 2 responses per prompt from pi_old, then

  prepare (once per buffer, no gradient), with the KL in the reward as in P3O:
      R_i = r_i - beta l_i,   l_i = sum_t (logp_old - logp_ref)                  (k1 KL)
      A_i = R_i - 1/(K-1) sum_{j != i} R_j  =  K/(K-1) (R_i - mean_j R_j)       [B, K]

  loss (E epochs x M minibatches on that buffer), per response, with the sequence ratio
  rho_i = pi(y_i) / pi_old(y_i) from its clamped log ratio:
      L = mean over the B x K responses of max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps))
  The clip only acts once the buffer is reused (epochs > 1 or minibatches > 1); at
  theta = theta_old it is REINFORCE with the leave-one-out baseline:
      grad L = -1/(B K) sum_{b,i} A_i grad log pi(y_i).

Relation to P3O: with K = 2, A_1 = R_1 - R_2 = Delta and A_2 = -Delta, so
      grad L = -1/(2B) sum_b Delta_b grad(log pi(y_1) - log pi(y_2)),
which is P3O's gradient at theta_old (-1/B sum_b Delta_b grad(...) / 2) exactly: the constant
between the two is 1 (tests/test_baselines.py). What P3O adds is only in how it clips
(pairwise, on the ratio of ratios) when the buffer is reused.

Invariance: A_i is unchanged by r_i -> r_i + delta(x) (a baseline from the same prompt).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import importance, ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.checks import Positive
from p3o_jax.rollout import Rollout, policy_logprobs


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
    eps: Annotated[float, Positive] = 0.2       # sequence-ratio clip range on a reused buffer


def leave_one_out_advantages(rewards):
    """A_i = R_i - mean of the other responses' R_j: [B, K] -> [B, K] (K >= 2)."""
    ops.require_ndim("rewards", rewards, 2, "[B, K]")
    K = jnp.shape(rewards)[1]
    ops.require(K >= 2, f"need at least 2 responses per prompt, got K={K}")
    others = (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (K - 1)
    return rewards - others


def prepare(buffer: Rollout, params, cfg, carry) -> Rollout:
    """The leave-one-out advantage of every response of the KL-regularised reward: [B, K]."""
    return buffer.replace(advantages=leave_one_out_advantages(
        buffer.rewards - cfg.rl.beta * buffer.seq_kl))


def clipped_sequence_loss(log_ratio, advantages, responses, eps_low: float, eps_high: float):
    """Mean over `responses` (bool, those with tokens: `ops.has_tokens`) of max(-A rho,
    -A clip(rho, 1 - eps_low, 1 + eps_high)), rho = exp(log_ratio): log_ratio (with gradient),
    advantages (constant) and responses [B, K]. Metrics:
    `clip_frac` (responses with rho outside the range), `advantage_abs_mean`, `ratio_mean`,
    `log_ratio_abs_max`."""
    ops.require_same_shape(log_ratio=log_ratio, advantages=advantages)
    loss = ops.masked_mean(ops.clipped_surrogate(jnp.exp(log_ratio), advantages, eps_low,
                                                 eps_high), responses)
    log_ratio = jax.lax.stop_gradient(log_ratio)
    outside = (log_ratio < jnp.log1p(-eps_low)) | (log_ratio > jnp.log1p(eps_high))
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": jnp.mean(outside),
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        "ratio_mean": jnp.mean(jnp.exp(log_ratio)),
        "log_ratio_abs_max": jnp.max(jnp.abs(log_ratio)),
    }


def rloo_loss(logp, logp_old, mask, advantages, eps: float = 0.2):
    """The RLOO loss (module docstring): logp, logp_old, mask [B, K, T]; advantages [B, K],
    a constant. Metrics: those of `clipped_sequence_loss` and `approx_kl` (k3 of
    KL(pi_old || pi) per response)."""
    ops.require_responses(advantages, logp=logp, logp_old=logp_old, mask=mask)
    log_rho = ops.clamped_log_ratio(ops.sequence_logprob(logp, mask),
                                    ops.sequence_logprob(logp_old, mask))          # [B, K]
    loss, metrics = clipped_sequence_loss(log_rho, advantages, ops.has_tokens(mask), eps, eps)
    return loss, {**metrics, "approx_kl": jax.lax.stop_gradient(
        jnp.mean(ops.kl_per_sequence(logp_old, logp, mask, "k3")))}


def loss(params, batch: Rollout, cfg):
    """The minibatch loss: the policy's log-probs of the buffer's responses, then `rloo_loss`."""
    logp = policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature)
    loss, metrics = rloo_loss(importance.corrected_logprobs(logp, batch, cfg.rl),
                              batch.logp_old, batch.resp_mask, batch.advantages, cfg.rloo.eps)
    return loss, metrics | importance.gap_metrics(logp, batch)


ALGORITHM = Algorithm(name="rloo", loss=loss, prepare=prepare, settings="rloo",
                      config=RLOOConfig)
