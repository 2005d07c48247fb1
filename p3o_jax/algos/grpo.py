"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with the loss
aggregations of Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025).

No critic: the baseline of a response is its group's (the K responses to the same prompt).

Per iteration (p3o_jax/rl.py), K >= 2 responses per prompt from pi_old, then

  prepare (once per buffer, no gradient): group-relative advantages of R_i, the reward model's
  score r_i (grpo.kl="loss") or the KL-regularised r_i - beta l_i as in P3O (grpo.kl="reward"):
      A_i = R_i - mean_j R_j                                  (grpo.normalise_std=false)
      A_i = (R_i - mean_j R_j) / (std_j R_j + std_eps)        (grpo.normalise_std=true;
                                                               unbiased std over the K, as TRL)
  broadcast to every token of response i.

  loss (E epochs x M minibatches on that buffer), per token t of response i, with the token
  ratio rho_it = pi(y_it | ...) / pi_old(y_it | ...) and an asymmetric clip range:
      l_it = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high))
             + beta k3_it,   k3_it = exp(logp_ref - logp) - 1 - (logp_ref - logp)   (kl="loss")
  aggregated over the minibatch's B x K responses of |y_i| real tokens (N = response length):
      "sequence" (GRPO)     mean_i  1/|y_i| sum_t l_it
      "constant" (Dr. GRPO) 1/(B K N) sum_i sum_t l_it
      "token"    (DAPO)     1/(sum_i |y_i|) sum_i sum_t l_it
  DAPO's other parts (dynamic sampling, an overlong penalty) are not here; eps_high > eps_low
  is its "clip-higher".

At theta_old: grad L = -sum_i w_i A_i grad log pi(y_i) with w_i = 1/(B K |y_i|), 1/(B K N) and
1/sum|y| for the three aggregations. With K = 2, kl="reward" and no std normalisation,
A_1 = Delta / 2 = -A_2, so "constant" gives exactly P3O's gradient times 1/(2N); "sequence" and
"token" weight each response by its length, which no constant absorbs.

Invariance: A_i is unchanged by r_i -> r_i + delta(x); with std normalisation (std_eps = 0)
also by r_i -> c(x) r_i, c(x) > 0 (kl="loss", so that the scaled quantity is r itself).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import importance, ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.checks import NonNegative, OneOf, Positive
from p3o_jax.rollout import Rollout, policy_logprobs

AGGREGATIONS = ("sequence", "constant", "token")
KL_PLACES = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    normalise_std: bool = True                                 # false: Dr. GRPO's advantages
    std_eps: Annotated[float, NonNegative] = 1e-4              # A = (R - mean) / (std + this)
    aggregation: Annotated[str, OneOf(*AGGREGATIONS)] = "sequence"  # GRPO | Dr. GRPO | DAPO
    eps_low: Annotated[float, Positive] = 0.2                  # clip(rho, 1 - eps_low,
    eps_high: Annotated[float, Positive] = 0.2                 #           1 + eps_high)
    kl: Annotated[str, OneOf(*KL_PLACES)] = "loss"             # beta k3 in the loss, or
                                                               # r - beta l in the reward


def group_advantages(rewards, normalise_std: bool = True, std_eps: float = 1e-4):
    """Group-relative advantages (module docstring): rewards [B, K] -> [B, K]."""
    ops.require_ndim("rewards", rewards, 2, "[B, K]")
    ops.require(jnp.shape(rewards)[1] >= 2,
                f"need at least 2 responses per prompt, got K={jnp.shape(rewards)[1]}")
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not normalise_std:
        return centred
    return centred / (jnp.std(rewards, axis=1, keepdims=True, ddof=1) + std_eps)


def aggregate(token_losses, mask, aggregation: str):
    """Reduce per-token losses [B, K, T] to a scalar the way `aggregation` says (docstring)."""
    ops.require_same_shape(token_losses=token_losses, mask=mask)
    ops.require(aggregation in AGGREGATIONS,
                f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "sequence":
        return ops.masked_mean(ops.masked_mean(token_losses, mask, axis=-1),
                               ops.has_tokens(mask))
    if aggregation == "constant":
        return ops.masked_sum(token_losses, mask, axis=None) / token_losses.size
    return ops.masked_mean(token_losses, mask)


def prepare(buffer: Rollout, params, cfg, carry) -> Rollout:
    """Group advantages [B, K] of the scores (kl="loss") or the KL-regularised rewards."""
    c = cfg.grpo
    rewards = buffer.rewards
    if c.kl == "reward":
        rewards = rewards - cfg.rl.beta * buffer.seq_kl
    return buffer.replace(advantages=group_advantages(rewards, c.normalise_std, c.std_eps))


def grpo_loss(logp, logp_old, logp_ref, mask, advantages, *, aggregation: str = "sequence",
              eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0):
    """The GRPO loss (module docstring): logp, logp_old, logp_ref, mask [B, K, T]; advantages
    [B, K], a constant; `kl_coef` the beta of the k3 term (0: KL in the reward, or none).
    Metrics: `clip_frac` (real tokens with rho outside the range), `rho_mean`,
    `log_rho_abs_max`, `kl_k3_loss` (the k3 term's token mean), `approx_kl` (k3 of
    KL(pi_old || pi) per response)."""
    ops.require_responses(advantages, logp=logp, logp_old=logp_old, logp_ref=logp_ref,
                          mask=mask)
    log_rho = ops.clamped_log_ratio(logp, logp_old)                                # [B, K, T]
    rho = jnp.exp(log_rho)
    token_losses = ops.clipped_surrogate(
        rho, jnp.broadcast_to(advantages[..., None], rho.shape), eps_low, eps_high)
    kl = ops.kl_per_token(logp, logp_ref, "k3")
    if kl_coef:
        token_losses = token_losses + kl_coef * kl
    loss = aggregate(token_losses, mask, aggregation)
    log_rho = jax.lax.stop_gradient(log_rho)
    outside = (log_rho < jnp.log1p(-eps_low)) | (log_rho > jnp.log1p(eps_high))
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": ops.masked_mean(outside, mask),
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        "rho_mean": ops.masked_mean(jnp.exp(log_rho), mask),
        "log_rho_abs_max": jnp.max(jnp.where(mask > 0, jnp.abs(log_rho), 0)),
        "kl_k3_loss": jax.lax.stop_gradient(ops.masked_mean(kl, mask)),
        "approx_kl": jax.lax.stop_gradient(
            jnp.mean(ops.kl_per_sequence(logp_old, logp, mask, "k3"))),
    }


def loss(params, batch: Rollout, cfg):
    """The minibatch loss: the policy's log-probs of the buffer's responses, then `grpo_loss`."""
    c = cfg.grpo
    logp = policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature)
    loss, metrics = grpo_loss(importance.corrected_logprobs(logp, batch, cfg.rl),
                              batch.logp_old, batch.logp_ref, batch.resp_mask, batch.advantages,
                              aggregation=c.aggregation, eps_low=c.eps_low, eps_high=c.eps_high,
                              kl_coef=cfg.rl.beta if c.kl == "loss" else 0.0)
    return loss, metrics | importance.gap_metrics(logp, batch)


ALGORITHM = Algorithm(name="grpo", loss=loss, prepare=prepare, settings="grpo",
                      config=GRPOConfig)
