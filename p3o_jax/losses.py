"""Objectives for RLHF: P3O (pairwise PPO), token-level PPO, DPO, reward modelling and SFT.

Every function here is a small pure function over arrays: per-token log-probs, masks,
rewards. No model code. Shapes are checked at trace time (``.shape`` is static under ``jit``)
and a wrong shape raises ``ValueError`` naming the offending argument.

Conventions (see /work/shared/P3O.md for the algorithm):
  B   batch of prompts            K   responses per prompt (a pair: K = 2)
  T   response length (tokens)    V   vocabulary size
  ``mask`` is 1 on real response tokens and 0 on padding (left, right or both).
  Losses are to be minimised and return ``(loss, metrics)`` where ``metrics`` is a flat dict
  of scalars that carry no gradient.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Log ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before ``exp``.
LOG_RATIO_CLAMP = 20.0

KL_KINDS = ("k1", "k2", "k3")
P3O_CLIP_MODES = ("separate", "joint")


# ----------------------------------------------------------------------------- shape checks


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_same_shape(**arrays: Array) -> None:
    shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
    _require(
        len(set(shapes.values())) == 1,
        "expected equal shapes, got " + ", ".join(f"{n}{s}" for n, s in shapes.items()),
    )


def _require_ndim(name: str, x: Array, ndim: int, dims: str) -> None:
    _require(jnp.ndim(x) == ndim, f"{name} must have shape {dims}, got {tuple(jnp.shape(x))}")


# ----------------------------------------------------------------------------- masked reductions


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = -1) -> Array:
    """Sum of ``x`` over positions where ``mask`` is nonzero (NaN/inf at padding are ignored)."""
    return jnp.sum(jnp.where(mask > 0, x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of ``x`` over real positions; 0 where there are none. Default: over all axes."""
    count = jnp.sum(mask > 0, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening of e.g. advantages: zero mean, unit variance over the real positions.

    ``x``, ``mask``: same shape. The statistics are taken over all real positions of the batch;
    padding positions are returned as 0. With ``shift_mean=False`` the mean is added back.
    """
    _require_same_shape(x=x, mask=mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask > 0, white, 0)


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """Log-prob of each target token: ``logits[target] / temperature - logsumexp(logits / temperature)``.

    logits: [..., T, V]; targets: [..., T] integer ids. Returns [..., T] in at least float32
    (bf16 logits are upcast). The full log-softmax is never materialised.
    """
    _require(
        jnp.ndim(logits) >= 2 and jnp.shape(logits)[:-1] == jnp.shape(targets),
        f"logits must have shape [..., T, V] and targets [..., T], "
        f"got logits{tuple(jnp.shape(logits))} and targets{tuple(jnp.shape(targets))}",
    )
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy of ``softmax(logits / temperature)`` over the last axis: [..., V] -> [...]."""
    _require(jnp.ndim(logits) >= 1, "logits must have shape [..., V]")
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - log_z[..., None])
    return log_z - jnp.sum(probs * logits, axis=-1)


def sequence_logprob(token_logps: Array, mask: Array) -> Array:
    """Log-prob of whole responses: masked sum over the last axis. [..., T] -> [...]."""
    _require_same_shape(token_logps=token_logps, mask=mask)
    return masked_sum(token_logps, mask)


# ----------------------------------------------------------------------------- KL estimators


def kl_per_token(logp: Array, logp_ref: Array, kind: str = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    logp, logp_ref: [..., T] log-probs of the sampled tokens under pi and pi_ref.
      k1 = logp - logp_ref                                 (unbiased, can be negative)
      k2 = (logp - logp_ref)^2 / 2                         (biased, low variance)
      k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp)    (unbiased, >= 0)
    For k3 the log ratio is clamped to [-20, 20] before ``exp``.
    """
    _require_same_shape(logp=logp, logp_ref=logp_ref)
    _require(kind in KL_KINDS, f"kind must be one of {KL_KINDS}, got {kind!r}")
    log_ratio = logp - logp_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    ref_log_ratio = jnp.clip(-log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.expm1(ref_log_ratio) - ref_log_ratio


def kl_per_sequence(logp: Array, logp_ref: Array, mask: Array, kind: str = "k1") -> Array:
    """Per-response KL estimate: masked sum over tokens of ``kl_per_token``. [..., T] -> [...]."""
    _require_same_shape(logp=logp, logp_ref=logp_ref, mask=mask)
    return masked_sum(kl_per_token(logp, logp_ref, kind), mask)


# ----------------------------------------------------------------------------- P3O


def p3o_delta(rewards: Array, seq_kl: Array, beta: float, scale: float | Array | None = None) -> Array:
    """KL-regularised reward difference of each pair: ``(r1 - r2) - beta * (l1 - l2)``.

    rewards: [B, 2] reward-model scores; seq_kl: [B, 2] sequence KL estimates ``l_i`` (e.g.
    ``kl_per_sequence(logp_old, logp_ref, mask)``). Returns Delta: [B].
    ``scale`` (optional) divides Delta, e.g. the batch std of Delta or a running std of rewards.
    Adding a per-prompt ``delta(x)`` to both rewards leaves Delta unchanged, and a positive
    common scale does not change which response is favoured, so the invariance is preserved.
    """
    _require(
        jnp.ndim(rewards) == 2 and jnp.shape(rewards)[1] == 2,
        f"rewards must have shape [B, 2], got {tuple(jnp.shape(rewards))}",
    )
    _require_same_shape(rewards=rewards, seq_kl=seq_kl)
    delta = (rewards[:, 0] - rewards[:, 1]) - beta * (seq_kl[:, 0] - seq_kl[:, 1])
    return delta if scale is None else delta / scale


def _bounded_weight(log_weight: Array, ratio_bound: float) -> Array:
    """``sg(c(w))`` with ``c(z) = clip(z, 1/R, R)``, computed in log space."""
    log_bound = math.log(ratio_bound)
    return jax.lax.stop_gradient(jnp.exp(jnp.clip(log_weight, -log_bound, log_bound)))


def _p3o_pair_loss(
    logp: Array, logp_old: Array, mask: Array, delta: Array, clip: str, eps: float, ratio_bound: float
) -> tuple[Array, dict[str, Array]]:
    """P3O loss of ONE pair. logp, logp_old, mask: [2, T]; delta: scalar.

    Returns the pair loss and per-pair statistics (aggregated by ``_p3o_mean_over_pairs``).
    """
    seq_logp = sequence_logprob(logp, mask)  # [2]
    seq_logp_old = sequence_logprob(logp_old, mask)  # [2]
    log_rho = jnp.clip(seq_logp - seq_logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [2]
    log_bound = math.log(ratio_bound)

    if clip == "separate":
        # PPO-clip on each response: advantage +Delta for y1, -Delta for y2, each weighted by
        # the other response's detached, bounded ratio.
        rho = jnp.exp(log_rho)
        advantage = jnp.stack([delta, -delta])
        other_weight = _bounded_weight(log_rho[::-1], ratio_bound)
        unclipped = -advantage * other_weight * rho
        clipped = -advantage * other_weight * jnp.clip(rho, 1 - eps, 1 + eps)
        loss = jnp.mean(jnp.maximum(unclipped, clipped))  # (L1 + L2) / 2
        clip_frac = jnp.mean(jnp.abs(rho - 1) > eps)
        weight_clip_frac = jnp.mean(jnp.abs(log_rho) > log_bound)
    else:
        # Joint clipping of u = log pi(y1) - log pi(y2) around its rollout value u_old.
        u = seq_logp[0] - seq_logp[1]
        u_old = seq_logp_old[0] - seq_logp_old[1]
        weight = _bounded_weight(log_rho[0] + log_rho[1], ratio_bound)
        u_clipped = u_old + jnp.clip(u - u_old, -eps, eps)
        loss = jnp.maximum(-delta * weight * u, -delta * weight * u_clipped) / 2
        clip_frac = (jnp.abs(u - u_old) > eps).astype(loss.dtype)
        weight_clip_frac = (jnp.abs(log_rho[0] + log_rho[1]) > log_bound).astype(loss.dtype)

    stats = {
        "log_rho": jax.lax.stop_gradient(log_rho),
        "clip_frac": clip_frac,
        "weight_clip_frac": weight_clip_frac,
        "approx_kl": jax.lax.stop_gradient(kl_per_sequence(logp_old, logp, mask, "k3")),
    }
    return loss, stats


def _p3o_mean_over_pairs(
    logp: Array, logp_old: Array, mask: Array, delta: Array, clip: str, eps: float, ratio_bound: float
) -> tuple[Array, dict[str, Array]]:
    """vmap the pair loss over pairs ([P, 2, T], delta [P]) and average."""
    _require(clip in P3O_CLIP_MODES, f"clip must be one of {P3O_CLIP_MODES}, got {clip!r}")
    _require(eps > 0, f"eps must be > 0, got {eps}")
    _require(ratio_bound > 1, f"ratio_bound must be > 1, got {ratio_bound}")
    delta = jax.lax.stop_gradient(delta)
    pair_loss = functools.partial(_p3o_pair_loss, clip=clip, eps=eps, ratio_bound=ratio_bound)
    pair_losses, stats = jax.vmap(pair_loss)(logp, logp_old, mask, delta)
    loss = jnp.mean(pair_losses)
    log_rho = stats["log_rho"]
    rho = jnp.exp(log_rho)
    metrics = {
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
    return loss, metrics


def p3o_loss(
    logp: Array,
    logp_old: Array,
    mask: Array,
    delta: Array,
    *,
    clip: str = "separate",
    eps: float = 0.2,
    ratio_bound: float = 10.0,
) -> tuple[Array, dict[str, Array]]:
    """Pairwise Proximal Policy Optimization loss (to minimise).

    logp:     [B, 2, T] per-token log-probs of the two responses under the current policy.
    logp_old: [B, 2, T] the same under the rollout policy pi_old.
    mask:     [B, 2, T] 1 on response tokens.
    delta:    [B] KL-regularised reward difference (``p3o_delta``); treated as a constant.
    clip, eps, ratio_bound: static Python values.

    With ``rho_i = pi(y_i)/pi_old(y_i)`` (sequence ratios, from clamped log ratios) and
    ``c(z) = clip(z, 1/R, R)`` on detached weights (``R = ratio_bound``):

    ``clip="separate"`` (V1)::

        L1 = max(-Delta sg(c(rho2)) rho1, -Delta sg(c(rho2)) clip(rho1, 1-eps, 1+eps))
        L2 = max(+Delta sg(c(rho1)) rho2, +Delta sg(c(rho1)) clip(rho2, 1-eps, 1+eps))
        loss = mean over pairs of (L1 + L2) / 2

    ``clip="joint"`` (V2), ``u = log pi(y1) - log pi(y2)``, ``w = sg(c(rho1 rho2))``::

        loss = mean over pairs of max(-Delta w u, -Delta w clip(u, u_old-eps, u_old+eps)) / 2

    At ``logp == logp_old`` both have gradient ``-Delta grad(log pi(y1) - log pi(y2)) / 2`` per pair.

    Metrics: ``clip_frac`` (V1: fraction of responses with ``|rho-1| > eps``; V2: fraction of
    pairs with ``|u-u_old| > eps``), ``weight_clip_frac`` (fraction of importance weights
    hitting the bound R), ``delta_abs_mean``, ``rho_mean``/``rho_max``, ``log_rho_mean``/
    ``log_rho_abs_max`` over all responses, and ``approx_kl``: the k3 estimate of
    KL(pi_old || pi) per response (summed over tokens), averaged.
    """
    _require(
        jnp.ndim(logp) == 3 and jnp.shape(logp)[1] == 2,
        f"logp must have shape [B, 2, T], got {tuple(jnp.shape(logp))}",
    )
    _require_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    _require(
        jnp.shape(delta) == jnp.shape(logp)[:1],
        f"delta must have shape [B]={jnp.shape(logp)[:1]}, got {tuple(jnp.shape(delta))}",
    )
    return _p3o_mean_over_pairs(logp, logp_old, mask, delta, clip, eps, ratio_bound)


def pair_indices(k: int) -> np.ndarray:
    """Static [K*(K-1)/2, 2] array of the unordered pairs ``(i, j)``, ``i < j``, of K responses."""
    _require(k >= 2, f"need at least 2 responses per prompt, got K={k}")
    return np.asarray(list(itertools.combinations(range(k), 2)))


def p3o_loss_k(
    logp: Array,
    logp_old: Array,
    mask: Array,
    rewards: Array,
    seq_kl: Array,
    beta: float,
    *,
    clip: str = "separate",
    eps: float = 0.2,
    ratio_bound: float = 10.0,
    delta_scale: float | Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """P3O with K >= 2 responses per prompt: the pair loss averaged over all unordered pairs.

    logp, logp_old, mask: [B, K, T]; rewards, seq_kl: [B, K]. Every pair (i < j) gets
    ``Delta = p3o_delta(rewards[:, (i, j)], seq_kl[:, (i, j)], beta, delta_scale)``. At K = 2
    this is exactly ``p3o_loss``. Same metrics as ``p3o_loss``, over all pairs.
    """
    _require(
        jnp.ndim(logp) == 3 and jnp.shape(logp)[1] >= 2,
        f"logp must have shape [B, K, T] with K >= 2, got {tuple(jnp.shape(logp))}",
    )
    _require_same_shape(logp=logp, logp_old=logp_old, mask=mask)
    _require_same_shape(rewards=rewards, seq_kl=seq_kl)
    _require(
        jnp.shape(rewards) == jnp.shape(logp)[:2],
        f"rewards must have shape [B, K]={jnp.shape(logp)[:2]}, got {tuple(jnp.shape(rewards))}",
    )
    pairs = pair_indices(jnp.shape(logp)[1])  # [P, 2]

    def to_pairs(x: Array) -> Array:  # [B, K, ...] -> [B * P, 2, ...]
        return x[:, pairs].reshape(-1, 2, *x.shape[2:])

    delta = p3o_delta(to_pairs(rewards), to_pairs(seq_kl), beta, delta_scale)
    return _p3o_mean_over_pairs(
        to_pairs(logp), to_pairs(logp_old), to_pairs(mask), delta, clip, eps, ratio_bound
    )


# ----------------------------------------------------------------------------- token-level PPO


def last_token_index(mask: Array) -> Array:
    """Index of the last nonzero entry of each row: [..., T] -> [...] int32.

    Works with left padding, right padding or both. Rows without a real token give -1.
    """
    positions = jnp.arange(jnp.shape(mask)[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, positions, -1), axis=-1)


def ppo_token_rewards(logp_old: Array, logp_ref: Array, mask: Array, scores: Array, beta: float) -> Array:
    """Per-token PPO rewards: ``-beta * (logp_old - logp_ref)`` plus the RM score at the last real token.

    logp_old, logp_ref, mask: [B, T]; scores: [B]. Returns [B, T], 0 at padding.
    """
    _require_ndim("logp_old", logp_old, 2, "[B, T]")
    _require_same_shape(logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    _require(
        jnp.shape(scores) == jnp.shape(mask)[:1],
        f"scores must have shape [B]={jnp.shape(mask)[:1]}, got {tuple(jnp.shape(scores))}",
    )
    kl_penalty = -beta * kl_per_token(logp_old, logp_ref, "k1")
    at_last = jax.nn.one_hot(last_token_index(mask), jnp.shape(mask)[-1], dtype=kl_penalty.dtype)
    return jnp.where(mask > 0, kl_penalty, 0) + at_last * scores[:, None]


def gae(
    rewards: Array, values: Array, mask: Array, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Array, Array]:
    """Generalised advantage estimation over the real tokens of each row.

    rewards, values, mask: [B, T]. Returns ``(advantages, returns)``, both [B, T] and 0 at
    padding. Padding positions are skipped: the "next" token of a real token is the next real
    one, and the value after the last real token is 0.
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next
        returns = A + V
    """
    _require_ndim("rewards", rewards, 2, "[B, T]")
    _require_same_shape(rewards=rewards, values=values, mask=mask)
    real = mask > 0

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_real = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(is_real, value, next_value), jnp.where(is_real, advantage, next_advantage))
        return carry, jnp.where(is_real, advantage, 0)

    zeros = jnp.zeros(jnp.shape(rewards)[:1], jnp.result_type(rewards, values))
    time_major = (rewards.T, values.T, real.T)
    _, advantages = jax.lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = advantages.T
    returns = jnp.where(real, advantages + values, 0)
    return advantages, returns


def ppo_policy_loss(
    logp: Array, logp_old: Array, advantages: Array, mask: Array, eps: float = 0.2
) -> tuple[Array, dict[str, Array]]:
    """Token-level PPO clipped surrogate, masked mean over real tokens.

    logp, logp_old, advantages, mask: [B, T]. Advantages are treated as constants.
    Metrics: ``clip_frac`` (fraction of real tokens with ``|ratio - 1| > eps``) and
    ``approx_kl`` (k3 estimate of KL(pi_old || pi) per token).
    """
    _require_ndim("logp", logp, 2, "[B, T]")
    _require_same_shape(logp=logp, logp_old=logp_old, advantages=advantages, mask=mask)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = jnp.clip(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - eps, 1 + eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": masked_mean(jnp.abs(ratio - 1) > eps, mask),
        "approx_kl": jax.lax.stop_gradient(masked_mean(kl_per_token(logp_old, logp, "k3"), mask)),
    }
    return loss, metrics


def ppo_value_loss(
    values: Array, values_old: Array, returns: Array, mask: Array, value_clip: float | None = 0.2
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.

    values, values_old, returns, mask: [B, T]; masked mean over real tokens.
    ``value_clip=None`` gives the plain squared error. Metric ``value_clip_frac``: fraction of
    real tokens where the clipped error is the larger one.
    """
    _require_ndim("values", values, 2, "[B, T]")
    _require_same_shape(values=values, values_old=values_old, returns=returns, mask=mask)
    returns = jax.lax.stop_gradient(returns)
    error = jnp.square(values - returns)
    if value_clip is None:
        clipped_error = error
    else:
        values_clipped = values_old + jnp.clip(values - values_old, -value_clip, value_clip)
        clipped_error = jnp.square(values_clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(error, clipped_error), mask)
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "value_clip_frac": masked_mean(clipped_error > error, mask),
    }
    return loss, metrics


class KLController(NamedTuple):
    """KL coefficient and its control settings; a pytree, so it can live in a train state.

    ``target is None`` means a fixed coefficient.
    """

    kl_coef: Array
    target: Array | None = None
    horizon: Array | None = None


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A controller whose coefficient never changes."""
    return KLController(jnp.asarray(kl_coef, jnp.float32))


def adaptive_kl_controller(init_kl_coef: float, target: float, horizon: float) -> KLController:
    """Ziegler et al. (2019) adaptive controller steering the observed KL towards ``target``."""
    _require(target > 0 and horizon > 0, f"target and horizon must be > 0, got {target}, {horizon}")
    return KLController(*(jnp.asarray(x, jnp.float32) for x in (init_kl_coef, target, horizon)))


def update_kl_controller(controller: KLController, current_kl: Array, n_steps: int | Array) -> KLController:
    """``kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon`` (adaptive only).

    ``current_kl``: observed KL(pi || pi_ref) per sample; ``n_steps``: samples since last update.
    """
    if controller.target is None:
        return controller
    proportional_error = jnp.clip(current_kl / controller.target - 1, -0.2, 0.2)
    multiplier = 1 + proportional_error * n_steps / controller.horizon
    return controller._replace(kl_coef=controller.kl_coef * multiplier)


# ----------------------------------------------------------------------------- DPO, reward model, SFT


def _pairwise_accuracy(chosen: Array, rejected: Array) -> Array:
    """Fraction of pairs with chosen > rejected; ties count 0.5."""
    return jnp.mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


def order_pair_by_score(scores: Array, x: Array) -> tuple[Array, Array]:
    """Split sampled pairs into (chosen, rejected) by reward-model score, for online DPO.

    scores: [B, 2]; x: [B, 2, ...] (e.g. sequence log-probs [B, 2]). Returns
    ``(x_chosen, x_rejected)``, each [B, ...]. On a tie, y1 is taken as chosen.
    """
    _require(
        jnp.ndim(scores) == 2 and jnp.shape(scores)[1] == 2,
        f"scores must have shape [B, 2], got {tuple(jnp.shape(scores))}",
    )
    _require(
        jnp.shape(x)[:2] == jnp.shape(scores),
        f"x must have shape [B, 2, ...] matching scores{tuple(jnp.shape(scores))}, got {tuple(jnp.shape(x))}",
    )
    first_wins = (scores[:, 0] >= scores[:, 1]).reshape(-1, *([1] * (jnp.ndim(x) - 2)))
    return jnp.where(first_wins, x[:, 0], x[:, 1]), jnp.where(first_wins, x[:, 1], x[:, 0])


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Direct Preference Optimisation loss from sequence log-probs, all [B].

    ``h = (pi_c - pi_r) - (ref_c - ref_r)``;
    ``loss = mean(-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h))`` (conservative DPO
    for ``label_smoothing = ls > 0``). Offline pairs come from the preference data; for online
    DPO sample a pair from the policy and split it with ``order_pair_by_score``.
    Metrics use the implicit rewards ``beta * (pi - ref)``: ``reward_accuracy`` (ties 0.5),
    ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (batch means).
    """
    _require_ndim("policy_chosen_logps", policy_chosen_logps, 1, "[B]")
    _require_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    loss = jnp.mean(
        -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
        - label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    )
    chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
    rejected_rewards = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "reward_accuracy": _pairwise_accuracy(chosen_rewards, rejected_rewards),
        "reward_margin": jnp.mean(chosen_rewards - rejected_rewards),
        "chosen_reward": jnp.mean(chosen_rewards),
        "rejected_reward": jnp.mean(rejected_rewards),
    }
    return loss, metrics


def bradley_terry_loss(r_chosen: Array, r_rejected: Array) -> tuple[Array, dict[str, Array]]:
    """Reward-model loss ``mean(-log sigmoid(r_chosen - r_rejected))``; inputs [B].

    Metrics: ``accuracy`` (ties count 0.5), ``margin``, ``chosen_reward``, ``rejected_reward``.
    """
    _require_ndim("r_chosen", r_chosen, 1, "[B]")
    _require_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    loss = jnp.mean(-jax.nn.log_sigmoid(r_chosen - r_rejected))
    r_chosen, r_rejected = jax.lax.stop_gradient((r_chosen, r_rejected))
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "accuracy": _pairwise_accuracy(r_chosen, r_rejected),
        "margin": jnp.mean(r_chosen - r_rejected),
        "chosen_reward": jnp.mean(r_chosen),
        "rejected_reward": jnp.mean(r_rejected),
    }
    return loss, metrics


def sft_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy averaged over all real tokens of the batch (not per row).

    logits: [..., T, V]; targets, mask: [..., T]. Given token log-probs instead of logits the
    same loss is ``masked_mean(-token_logps, mask)``.
    Metrics: ``num_tokens`` and ``accuracy`` (argmax == target over real tokens).
    """
    _require_same_shape(targets=targets, mask=mask)
    loss = masked_mean(-token_logprobs(logits, targets), mask)
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "num_tokens": jnp.sum(mask > 0),
        "accuracy": masked_mean(jnp.argmax(logits, axis=-1) == targets, mask),
    }
    return loss, metrics
