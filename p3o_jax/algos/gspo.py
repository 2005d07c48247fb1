"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, Qwen).

GRPO's group-relative advantages with a sequence-level importance ratio, length-normalised so
that its scale does not depend on the response length, clipped per sequence (RLOO's clipped
sequence loss, `rloo.clipped_sequence_loss`, on that ratio).

Per iteration (p3o_jax/rl.py), K >= 2 responses per prompt from pi_old, then

  prepare (once per buffer, no gradient), with the KL in the reward as in P3O:
      R_i = r_i - beta l_i,   A_i = `grpo.group_advantages`(R)_i                        [B, K]
      ((R_i - mean_j R_j) / (std_j R_j + std_eps); gspo.normalise_std=false: no division)

  loss (E epochs x M minibatches on that buffer), per response, with
      s_i = (pi(y_i) / pi_old(y_i)) ^ (1/|y_i|) = exp( 1/|y_i| sum_t (logp_it - logp_old_it) )
      L = mean over the B x K responses of max(-A_i s_i, -A_i clip(s_i, 1-eps_low, 1+eps_high))

  The published clip range is small (3e-4, 4e-4): s_i is a per-token geometric mean.
  At theta_old: grad L = -1/(B K) sum_i A_i grad log pi(y_i) / |y_i|, GRPO's with the
  "sequence" aggregation; they differ once the buffer is reused, in what is clipped (a whole
  response here, single tokens there).

Invariance: as GRPO's advantages, to r -> r + delta(x) (and with std normalisation and
std_eps = 0 to a per-prompt positive scale of R).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import importance, ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.algos.grpo import group_advantages
from p3o_jax.algos.rloo import clipped_sequence_loss
from p3o_jax.checks import NonNegative, Positive
from p3o_jax.rollout import Rollout, policy_logprobs


@dataclasses.dataclass(frozen=True)
class GSPOConfig:
    normalise_std: bool = True
    std_eps: Annotated[float, NonNegative] = 1e-4
    eps_low: Annotated[float, Positive] = 3e-4
    eps_high: Annotated[float, Positive] = 4e-4


def sequence_log_ratio(logp, logp_old, mask):
    """log s_i = mean over real tokens of (logp - logp_old), clamped: [..., T] -> [...]."""
    ops.require_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    return ops.clamped_log_ratio(ops.masked_mean(logp, mask, axis=-1),
                                 ops.masked_mean(logp_old, mask, axis=-1))


def prepare(buffer: Rollout, params, cfg, carry) -> Rollout:
    """Group advantages [B, K] of the KL-regularised rewards."""
    c = cfg.gspo
    return buffer.replace(advantages=group_advantages(
        buffer.rewards - cfg.rl.beta * buffer.seq_kl, c.normalise_std, c.std_eps))


def gspo_loss(logp, logp_old, mask, advantages, *, eps_low: float = 3e-4,
              eps_high: float = 4e-4):
    """The GSPO loss (module docstring): logp, logp_old, mask [B, K, T]; advantages [B, K], a
    constant. RLOO's sequence-level clipped loss on s instead of the sequence ratio. Metrics:
    those of `rloo.clipped_sequence_loss` (the ratio is s) and `approx_kl` (k3 of
    KL(pi_old || pi) per response)."""
    ops.require_responses(advantages, logp=logp, logp_old=logp_old, mask=mask)
    loss, metrics = clipped_sequence_loss(sequence_log_ratio(logp, logp_old, mask), advantages,
                                          ops.has_tokens(mask), eps_low, eps_high)
    return loss, {**metrics, "approx_kl": jax.lax.stop_gradient(
        jnp.mean(ops.kl_per_sequence(logp_old, logp, mask, "k3")))}


def loss(params, batch: Rollout, cfg):
    """The minibatch loss: the policy's log-probs of the buffer's responses, then `gspo_loss`."""
    c = cfg.gspo
    logp = policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature)
    loss, metrics = gspo_loss(importance.corrected_logprobs(logp, batch, cfg.rl),
                              batch.logp_old, batch.resp_mask, batch.advantages,
                              eps_low=c.eps_low, eps_high=c.eps_high)
    return loss, metrics | importance.gap_metrics(logp, batch)


ALGORITHM = Algorithm(name="gspo", loss=loss, prepare=prepare, settings="gspo",
                      config=GSPOConfig)
