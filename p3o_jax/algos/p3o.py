"""P3O: Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv 2310.00212).

The whole algorithm, top to bottom; docs/P3O.md gives the derivation and the published settings.

RLHF as a contextual bandit: a prompt x, a whole response y is one action, the reward model
scores it. The reward model is trained on differences, so r(x, y) + delta(x) is as good a reward
as r(x, y); P3O only ever looks at reward differences between responses to the same prompt,
so it is invariant to delta(x) (PPO is not).

Per iteration (p3o_jax/rl.py): sample K >= 2 responses per prompt from pi_old, score them, then

  prepare (once per buffer, no gradient): for every unordered pair (i, j) of a prompt's responses
      Delta_ij = (r_i - r_j) - beta (l_i - l_j),   l_i = sum_t (logp_old - logp_ref)   (k1 KL)
  optionally divided by its batch root-mean-square (`delta_norm="batch_std"`; a common positive
  scale keeps the invariance). The KL term is computed here, at rollout time, once.

  loss (E epochs x M minibatches on that buffer), per pair, with sequence ratios
  rho_i = pi(y_i) / pi_old(y_i) from clamped log ratios and c(z) = clip(z, 1/R, R) on detached
  weights:

    V1, clip="separate" (PPO-clip on each response, weighted by the other's ratio):
      L1 = max(-Delta sg(c(rho_j)) rho_i, -Delta sg(c(rho_j)) clip(rho_i, 1-eps, 1+eps))
      L2 = max(+Delta sg(c(rho_i)) rho_j, +Delta sg(c(rho_i)) clip(rho_j, 1-eps, 1+eps))
      L  = (L1 + L2) / 2
    V2, clip="joint" (clip the log ratio-of-ratios u around its rollout value):
      u  = log pi(y_i) - log pi(y_j),  w = sg(c(rho_i rho_j))
      L  = max(-Delta w u, -Delta w clip(u, u_old - eps, u_old + eps)) / 2

  averaged over all pairs of the minibatch (but a pair with a response masked out whole:
  `rl.mask_truncated`). At theta = theta_old both have the gradient
  -Delta grad(log pi(y_i) - log pi(y_j)) / 2: the pairwise policy gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import importance, ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.checks import OneOf, Positive, Range
from p3o_jax.rollout import Rollout, policy_logprobs

CLIP_MODES = ("separate", "joint")


@dataclasses.dataclass(frozen=True)
class P3OConfig:
    clip: Annotated[str, OneOf(*CLIP_MODES)] = "joint"     # separate (V1) | joint (V2)
    eps: Annotated[float, Positive] = 0.2
    ratio_bound: Annotated[float, Range(1, lo_open=True)] = 10.0   # R of c(z)
    delta_norm: Annotated[str, OneOf("none", "batch_std")] = "none"


# ----------------------------------------------------------------------------- Delta

def pair_indices(k: int) -> np.ndarray:
    """Static [K*(K-1)/2, 2] array of the unordered pairs (i, j), i < j, of K responses."""
    ops.require(k >= 2, f"need at least 2 responses per prompt, got K={k}")
    return np.asarray(list(itertools.combinations(range(k), 2)))


def p3o_delta(rewards, seq_kl, beta: float):
    """KL-regularised reward difference of each pair, `(r1 - r2) - beta (l1 - l2)`.

    rewards, seq_kl: [B, 2] scores and sequence KL estimates l_i. Returns Delta [B].
    """
    ops.require(jnp.ndim(rewards) == 2 and jnp.shape(rewards)[1] == 2,
                f"rewards must have shape [B, 2], got {tuple(jnp.shape(rewards))}")
    ops.require_same_shape(rewards=rewards, seq_kl=seq_kl)
    return (rewards[:, 0] - rewards[:, 1]) - beta * (seq_kl[:, 0] - seq_kl[:, 1])


def to_pairs(x, k: int):
    """[B, K, ...] -> [B * pairs, 2, ...]: the two members of every unordered pair."""
    return x[:, pair_indices(k)].reshape(-1, 2, *x.shape[2:])


def pairwise_delta(rewards, seq_kl, beta: float):
    """Delta of every unordered pair of each prompt's K responses: [B, K] -> [B, pairs]."""
    ops.require_same_shape(rewards=rewards, seq_kl=seq_kl)
    B, K = jnp.shape(rewards)
    return p3o_delta(to_pairs(rewards, K), to_pairs(seq_kl, K), beta).reshape(B, -1)


def prepare(buffer: Rollout, params, cfg, carry) -> Rollout:
    """Delta of every pair into `buffer.advantages` [B, pairs], optionally divided by its
    batch root-mean-square (Delta's sign depends on the pair's order, so its mean says
    nothing; its RMS is the std of the antisymmetric matrix of differences)."""
    delta = pairwise_delta(buffer.rewards, buffer.seq_kl, cfg.rl.beta)
    if cfg.p3o.delta_norm == "batch_std":
        delta = delta / (jnp.sqrt(jnp.mean(delta ** 2)) + 1e-6)
    return buffer.replace(advantages=delta)


# ----------------------------------------------------------------------------- the loss

def _bounded_weight(log_weight, ratio_bound: float):
    """sg(c(w)) with c(z) = clip(z, 1/R, R), computed in log space."""
    log_bound = math.log(ratio_bound)
    return jax.lax.stop_gradient(jnp.exp(jnp.clip(log_weight, -log_bound, log_bound)))


def pair_loss(logp, logp_old, mask, delta, is_weight, clip: str, eps: float,
              ratio_bound: float):
    """P3O loss of ONE pair: logp, logp_old, mask [2, T], delta and the pair's importance
    weight (`pair_is_weights`; 1 on-policy) scalars -> (loss, stats)."""
    seq_logp = ops.sequence_logprob(logp, mask)                     # [2]
    seq_logp_old = ops.sequence_logprob(logp_old, mask)             # [2]
    log_rho = ops.clamped_log_ratio(seq_logp, seq_logp_old)         # [2]
    log_bound = math.log(ratio_bound)
    if clip == "separate":
        rho = jnp.exp(log_rho)
        advantage = jnp.stack([delta, -delta])
        other_weight = _bounded_weight(log_rho[::-1], ratio_bound)
        unclipped = -advantage * other_weight * rho
        clipped = -advantage * other_weight * jnp.clip(rho, 1 - eps, 1 + eps)
        loss = jnp.mean(jnp.maximum(unclipped, clipped))            # (L1 + L2) / 2
        clip_frac = jnp.mean(jnp.abs(rho - 1) > eps)
        weight_clip_frac = jnp.mean(jnp.abs(log_rho) > log_bound)
    else:
        u = seq_logp[0] - seq_logp[1]
        u_old = seq_logp_old[0] - seq_logp_old[1]
        weight = _bounded_weight(log_rho[0] + log_rho[1], ratio_bound)
        u_clipped = u_old + jnp.clip(u - u_old, -eps, eps)
        loss = jnp.maximum(-delta * weight * u, -delta * weight * u_clipped) / 2
        clip_frac = (jnp.abs(u - u_old) > eps).astype(loss.dtype)
        weight_clip_frac = (jnp.abs(log_rho[0] + log_rho[1]) > log_bound).astype(loss.dtype)
    loss = is_weight * loss
    stats = {"log_rho": jax.lax.stop_gradient(log_rho), "clip_frac": clip_frac,
             "weight_clip_frac": weight_clip_frac,
             "approx_kl": jax.lax.stop_gradient(ops.kl_per_sequence(logp_old, logp, mask, "k3"))}
    return loss, stats


def p3o_loss(logp, logp_old, mask, delta, *, clip: str, eps: float = 0.2,
             ratio_bound: float = 10.0, is_weights=None):
    """The P3O loss (module docstring) of B pairs, vmapped over pairs and averaged.

    logp, logp_old, mask: [B, 2, T] per-token log-probs of the two responses under the current
    policy and pi_old, and their mask; delta: [B], a constant; is_weights: [B], each pair's
    constant importance weight (`pair_is_weights`; None: 1). `clip`: "separate" (V1) or
    "joint" (V2), always said (`P3OConfig.clip`, "joint" by default, is the run's). Returns
    (loss, metrics):
    `clip_frac` (V1: responses with |rho - 1| > eps; V2: pairs with |u - u_old| > eps),
    `weight_clip_frac` (weights at the bound R), `delta_abs_mean`, `rho_mean`/`rho_max`,
    `log_rho_mean`/`log_rho_abs_max`, `approx_kl` (k3 of KL(pi_old || pi) per response).
    """
    ops.require(jnp.ndim(logp) == 3 and jnp.shape(logp)[1] == 2,
                f"logp must have shape [B, 2, T], got {tuple(jnp.shape(logp))}")
    ops.require_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    ops.require(jnp.shape(delta) == jnp.shape(logp)[:1],
                f"delta must have shape [B]={jnp.shape(logp)[:1]}, got {tuple(jnp.shape(delta))}")
    ops.require(clip in CLIP_MODES, f"clip must be one of {CLIP_MODES}, got {clip!r}")
    ops.require(eps > 0, f"eps must be > 0, got {eps}")
    ops.require(ratio_bound > 1, f"ratio_bound must be > 1, got {ratio_bound}")
    delta = jax.lax.stop_gradient(delta)
    is_weights = (jnp.ones_like(delta) if is_weights is None
                  else jax.lax.stop_gradient(is_weights))
    ops.require_same_shape(delta=delta, is_weights=is_weights)
    one_pair = functools.partial(pair_loss, clip=clip, eps=eps, ratio_bound=ratio_bound)
    pair_losses, stats = jax.vmap(one_pair)(logp, logp_old, mask, delta, is_weights)
    loss = ops.masked_mean(pair_losses, jnp.all(ops.has_tokens(mask), -1))  # both have tokens
    log_rho = stats["log_rho"]
    rho = jnp.exp(log_rho)
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": jnp.mean(stats["clip_frac"]),
        "weight_clip_frac": jnp.mean(stats["weight_clip_frac"]),
        "delta_abs_mean": jnp.mean(jnp.abs(delta)),
        "rho_mean": jnp.mean(rho),
        "rho_max": jnp.max(rho),
        "log_rho_mean": jnp.mean(log_rho),
        "log_rho_abs_max": jnp.max(jnp.abs(log_rho)),
        "approx_kl": jnp.mean(stats["approx_kl"]),
    }


def p3o_loss_k(logp, logp_old, mask, delta, is_weights=None, **settings):
    """P3O over all unordered pairs of K >= 2 responses: logp, logp_old, mask [B, K, T],
    delta and is_weights [B, pairs] (`pairwise_delta`, `pair_is_weights`; None: 1). At K = 2
    this is `p3o_loss`."""
    ops.require(jnp.ndim(logp) == 3 and jnp.shape(logp)[1] >= 2,
                f"logp must have shape [B, K, T] with K >= 2, got {tuple(jnp.shape(logp))}")
    ops.require_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    K = jnp.shape(logp)[1]
    n_pairs = K * (K - 1) // 2
    ops.require(jnp.shape(delta) == (jnp.shape(logp)[0], n_pairs),
                f"delta must have shape [B, pairs]={(jnp.shape(logp)[0], n_pairs)}, "
                f"got {tuple(jnp.shape(delta))}")
    if is_weights is not None:
        ops.require_same_shape(delta=delta, is_weights=is_weights)
        is_weights = is_weights.reshape(-1)
    return p3o_loss(to_pairs(logp, K), to_pairs(logp_old, K), to_pairs(mask, K),
                    delta.reshape(-1), is_weights=is_weights, **settings)


def pair_is_weights(logp_prox, logp_behav, mask, cap: float):
    """The sequence-mode importance weight of every pair (docs/P3O.md, "Off-policy rollouts"):
    min(w_i w_j, cap) with w_i = pi_prox(y_i) / pi_behav(y_i), the pair being one draw from
    pi_behav x pi_behav. logp_prox, logp_behav, mask [B, K, T] -> [B, pairs], constant."""
    K = jnp.shape(mask)[1]
    seq = jnp.sum(importance.log_ratio(logp_prox, logp_behav, mask), -1)          # [B, K]
    pair = to_pairs(seq, K).sum(-1).reshape(seq.shape[0], -1)                      # [B, pairs]
    return jax.lax.stop_gradient(importance.truncated(pair, cap))


def corrected(logp, batch: Rollout, rl):
    """The importance correction of an off-policy buffer (p3o_jax/importance.py), P3O's way:
    (logp, pair weights) for `p3o_loss_k(logp, ..., is_weights=...)`. "sequence": the pairs'
    weights (`pair_is_weights`); "token": each token's weight on its log-prob's gradient and
    no pair weight; none needed (`batch.logp_behav` None) or "none": (logp, None)."""
    if rl.rollout_is == "sequence" and batch.logp_behav is not None:
        return logp, pair_is_weights(batch.logp_old, batch.logp_behav, batch.resp_mask,
                                     rl.rollout_is_cap)
    return importance.corrected_logprobs(logp, batch, rl), None


def loss(params, batch: Rollout, cfg):
    """The minibatch loss: the policy's log-probs of the buffer's responses, then `p3o_loss_k`,
    importance-weighted per token or per pair when the rollout is off-policy
    (p3o_jax/importance.py)."""
    c = cfg.p3o
    logp = policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature)
    weighted, is_weights = corrected(logp, batch, cfg.rl)
    loss, metrics = p3o_loss_k(weighted, batch.logp_old, batch.resp_mask, batch.advantages,
                               is_weights, clip=c.clip, eps=c.eps, ratio_bound=c.ratio_bound)
    return loss, metrics | importance.gap_metrics(logp, batch)


ALGORITHM = Algorithm(name="p3o", loss=loss, prepare=prepare, settings="p3o",
                      config=P3OConfig)
