"""Token-level PPO with a separate critic (Ouyang et al. 2022; Ziegler et al. 2019): the
baseline P3O is compared with.

Per iteration (p3o_jax/rl.py), on the sampled responses:

  token rewards   r_t = -kl_coef (logp_old_t - logp_ref_t), plus the reward model's score at
                  the response's last real token
  prepare         the critic's values V_t, then GAE over the real tokens of each response
                  (gamma, lambda), returns = A + V, advantages whitened over the batch
  loss            clipped surrogate  max(-A ratio, -A clip(ratio, 1-eps, 1+eps)), masked mean
                  over tokens, plus vf_coef x the clipped value loss
                  0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

The critic is a second transformer initialised from the reward model (value head <- reward
head). `kl_coef` starts at `rl.beta`; with `ppo.target_kl > 0` the adaptive controller moves
it towards the target after every iteration. PPO optimises absolute rewards, so unlike P3O it
is not invariant to a per-prompt reward shift delta(x).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import importance, ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.checks import NonNegative, Positive, Probability
from p3o_jax.rollout import Rollout, flat, policy_logprobs, response_values


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    eps: Annotated[float, Positive] = 0.2
    gamma: Annotated[float, Probability] = 1.0
    lam: Annotated[float, Probability] = 0.95
    value_clip: Annotated[float, Positive] = 0.2
    vf_coef: Annotated[float, NonNegative] = 0.5
    target_kl: Annotated[float, NonNegative] = 0.0     # > 0: adaptive KL controller
    kl_horizon: Annotated[float, Positive] = 10000.0


def token_rewards(logp_old, logp_ref, mask, scores, beta):
    """Per-token rewards `-beta (logp_old - logp_ref)` plus the score at the last real token.

    logp_old, logp_ref, mask: [B, T]; scores: [B]. Returns [B, T], 0 at padding.
    """
    ops.require_ndim("logp_old", logp_old, 2, "[B, T]")
    ops.require_same_shape(logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    ops.require(jnp.shape(scores) == jnp.shape(mask)[:1],
                f"scores must have shape [B]={jnp.shape(mask)[:1]}, got {tuple(jnp.shape(scores))}")
    kl_penalty = -beta * ops.kl_per_token(logp_old, logp_ref, "k1")
    at_last = jax.nn.one_hot(ops.last_token_index(mask), jnp.shape(mask)[-1],
                             dtype=kl_penalty.dtype)
    return jnp.where(mask > 0, kl_penalty, 0) + at_last * scores[:, None]


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the real tokens of each row.

    rewards, values, mask: [B, T] -> (advantages, returns), [B, T], 0 at padding. The "next"
    token of a real token is the next real one; the value after the last real token is 0.
        delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next,   R = A + V
    """
    ops.require_ndim("rewards", rewards, 2, "[B, T]")
    ops.require_same_shape(rewards=rewards, values=values, mask=mask)
    real = mask > 0

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_real = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(is_real, value, next_value),
                 jnp.where(is_real, advantage, next_advantage))
        return carry, jnp.where(is_real, advantage, 0)

    zeros = jnp.zeros(jnp.shape(rewards)[:1], jnp.result_type(rewards, values))
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, real.T),
                                 reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(real, advantages + values, 0)


def policy_loss(logp, logp_old, advantages, mask, eps: float = 0.2):
    """Clipped surrogate, masked mean over real tokens; all [B, T], advantages constant.
    Metrics: `clip_frac` (tokens with |ratio - 1| > eps), `approx_kl` (k3 of KL(pi_old || pi))."""
    ops.require_ndim("logp", logp, 2, "[B, T]")
    ops.require_same_shape(logp=logp, logp_old=logp_old, advantages=advantages, mask=mask)
    advantages = jax.lax.stop_gradient(advantages)
    ratio = jnp.exp(ops.clamped_log_ratio(logp, logp_old))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - eps, 1 + eps)
    loss = ops.masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": ops.masked_mean(jnp.abs(ratio - 1) > eps, mask),
        "approx_kl": jax.lax.stop_gradient(
            ops.masked_mean(ops.kl_per_token(logp_old, logp, "k3"), mask)),
    }


def value_loss(values, values_old, returns, mask, value_clip: float | None = 0.2):
    """`0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`, masked mean; all [B, T].
    `value_clip=None`: plain squared error. Metric `value_clip_frac`: tokens where the clipped
    error is the larger one."""
    ops.require_ndim("values", values, 2, "[B, T]")
    ops.require_same_shape(values=values, values_old=values_old, returns=returns, mask=mask)
    returns = jax.lax.stop_gradient(returns)
    error = jnp.square(values - returns)
    if value_clip is None:
        clipped_error = error
    else:
        values_clipped = values_old + jnp.clip(values - values_old, -value_clip, value_clip)
        clipped_error = jnp.square(values_clipped - returns)
    loss = 0.5 * ops.masked_mean(jnp.maximum(error, clipped_error), mask)
    return loss, {"loss": jax.lax.stop_gradient(loss),
                  "value_clip_frac": ops.masked_mean(clipped_error > error, mask)}


def adaptive_kl_coef(kl_coef, observed_kl, target: float, horizon: float, n_samples):
    """Ziegler et al. (2019): `kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) n / horizon)`,
    steering the observed KL per sample towards `target` (n samples since the last update).
    Python floats or arrays."""
    error = np.clip(observed_kl / target - 1, -0.2, 0.2)
    return kl_coef * (1 + error * n_samples / horizon)


def prepare(buffer: Rollout, params, cfg, carry) -> Rollout:
    """The critic's values before each response token, token rewards, GAE and returns."""
    c = cfg.ppo
    values = response_values(params["critic"], cfg.rm_model, buffer.tokens, buffer.mask,
                             buffer.prompt_len)
    m = buffer.resp_mask
    per_response = lambda f: jax.vmap(f, in_axes=1, out_axes=1)    # over the K responses
    rewards = per_response(functools.partial(token_rewards, beta=carry["kl_coef"]))(
        buffer.logp_old, buffer.logp_ref, m, buffer.rewards)
    adv, ret = per_response(functools.partial(gae, gamma=c.gamma, lam=c.lam))(rewards, values, m)
    return buffer.replace(values_old=values, advantages=ops.whiten(adv, m), returns=ret)


def loss(params, batch: Rollout, cfg):
    """Policy surrogate + vf_coef x value loss, over the flattened [B * K, N] tokens."""
    c = cfg.ppo
    m = flat(batch.resp_mask)
    logp = policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature)
    gap = importance.gap_metrics(logp, batch)
    logp = flat(importance.corrected_logprobs(logp, batch, cfg.rl))
    pl, pm = policy_loss(logp, flat(batch.logp_old), flat(batch.advantages), m, c.eps)
    values = flat(response_values(params["critic"], cfg.rm_model, batch.tokens, batch.mask,
                                  batch.prompt_len))
    vl, vm = value_loss(values, flat(batch.values_old), flat(batch.returns), m, c.value_clip)
    metrics = {**{f"policy_{k}": v for k, v in pm.items()},
               **{f"value_{k}": v for k, v in vm.items()}, **gap}
    return pl + c.vf_coef * vl, metrics


def next_carry(carry, metrics, cfg):
    """After an iteration: the adaptive KL coefficient (fixed while `ppo.target_kl` is 0)."""
    c = cfg.ppo
    if c.target_kl <= 0:
        return carry
    n = cfg.rl.prompts_per_iter * cfg.rl.n_samples
    return {"kl_coef": float(adaptive_kl_coef(carry["kl_coef"], metrics["kl_k1"], c.target_kl,
                                              c.kl_horizon, n))}


ALGORITHM = Algorithm(name="ppo", loss=loss, prepare=prepare, settings="ppo", config=PPOConfig,
                      critic=True, init_carry=lambda cfg: {"kl_coef": cfg.rl.beta},
                      next_carry=next_carry)
