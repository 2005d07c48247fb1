"""Primitives every objective shares: shape checks, masked reductions, log-probs, KL estimators.

Small pure functions over arrays; no model code. Shapes are checked at trace time (`.shape` is
static under `jit`) and a wrong shape raises `ValueError` naming the argument.

Conventions: B prompts, K responses per prompt, T response tokens, V vocabulary. `mask` is 1
on real response tokens and 0 on padding (left, right or both).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Log ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before `exp`.
LOG_RATIO_CLAMP = 20.0
KL_KINDS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- shape checks

def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def require_same_shape(**arrays: Array) -> None:
    shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
    require(len(set(shapes.values())) == 1,
            "expected equal shapes, got " + ", ".join(f"{n}{s}" for n, s in shapes.items()))


def require_ndim(name: str, x: Array, ndim: int, dims: str) -> None:
    require(jnp.ndim(x) == ndim, f"{name} must have shape {dims}, got {tuple(jnp.shape(x))}")


def require_responses(advantages: Array, **token_arrays: Array) -> None:
    """Per-token arrays of K responses to B prompts, [B, K, T] and equal, and one advantage
    per response, [B, K]."""
    name, first = next(iter(token_arrays.items()))
    require_ndim(name, first, 3, "[B, K, T]")
    require_same_shape(**token_arrays)
    require(jnp.shape(advantages) == jnp.shape(first)[:2],
            f"advantages must have shape [B, K]={jnp.shape(first)[:2]}, "
            f"got {tuple(jnp.shape(advantages))}")


# ----------------------------------------------------------------------------- masked reductions

def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = -1) -> Array:
    """Sum of `x` over positions where `mask` is nonzero (NaN/inf at padding are ignored)."""
    return jnp.sum(jnp.where(mask > 0, x, 0), axis=axis)


def has_tokens(mask: Array) -> Array:
    """Whether each response of a mask [..., T] has a real token: [...]. A response masked out
    whole (`rl.mask_truncated`) does not count in a loss's mean over responses."""
    return jnp.any(mask > 0, axis=-1)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of `x` over real positions; 0 where there are none. Default: over all axes."""
    count = jnp.sum(mask > 0, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening (e.g. advantages): zero mean, unit variance over the real positions of
    the whole batch; padding positions are 0. With `shift_mean=False` the mean is added back."""
    require_same_shape(x=x, mask=mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask > 0, white, 0)


def last_token_index(mask: Array) -> Array:
    """Index of the last nonzero entry of each row: [..., T] -> [...] int32 (-1 if none)."""
    positions = jnp.arange(jnp.shape(mask)[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, positions, -1), axis=-1)


def pairwise_accuracy(chosen: Array, rejected: Array) -> Array:
    """Fraction of pairs with chosen > rejected; ties count 0.5."""
    return jnp.mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


# ----------------------------------------------------------------------------- log-probs

def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """Log-prob of each target token, `logits[target] / t - logsumexp(logits / t)`.

    logits: [..., T, V]; targets: [..., T] ids. Returns [..., T] in at least float32 (bf16
    logits are upcast). The full log-softmax is never materialised.
    """
    require(jnp.ndim(logits) >= 2 and jnp.shape(logits)[:-1] == jnp.shape(targets),
            f"logits must have shape [..., T, V] and targets [..., T], "
            f"got logits{tuple(jnp.shape(logits))} and targets{tuple(jnp.shape(targets))}")
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy of `softmax(logits / temperature)` over the last axis: [..., V] -> [...]."""
    require(jnp.ndim(logits) >= 1, "logits must have shape [..., V]")
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - log_z[..., None])
    return log_z - jnp.sum(probs * logits, axis=-1)


def sequence_logprob(token_logps: Array, mask: Array) -> Array:
    """Log-prob of whole responses: masked sum over the last axis. [..., T] -> [...]."""
    require_same_shape(token_logps=token_logps, mask=mask)
    return masked_sum(token_logps, mask)


def clamped_log_ratio(logp: Array, logp_old: Array) -> Array:
    """`logp - logp_old` clamped to +-LOG_RATIO_CLAMP, safe to exponentiate."""
    return jnp.clip(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clipped_surrogate(ratio: Array, advantages: Array, eps_low: float, eps_high: float) -> Array:
    """PPO's pessimistic surrogate, elementwise (a loss to minimise):
    `max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))`. Its gradient is zero where the
    ratio has already moved past the clip range in the direction A favours."""
    require_same_shape(ratio=ratio, advantages=advantages)
    advantages = jax.lax.stop_gradient(advantages)
    return jnp.maximum(-advantages * ratio,
                       -advantages * jnp.clip(ratio, 1 - eps_low, 1 + eps_high))


# ----------------------------------------------------------------------------- KL estimators

def kl_per_token(logp: Array, logp_ref: Array, kind: str = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    logp, logp_ref: [..., T] log-probs of the sampled tokens under pi and pi_ref.
      k1 = logp - logp_ref                                 (unbiased, can be negative)
      k2 = (logp - logp_ref)^2 / 2                         (biased, low variance)
      k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp)    (unbiased, >= 0)
    For k3 the log ratio is clamped to [-20, 20] before `exp`.
    """
    require_same_shape(logp=logp, logp_ref=logp_ref)
    require(kind in KL_KINDS, f"kind must be one of {KL_KINDS}, got {kind!r}")
    log_ratio = logp - logp_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    ref_log_ratio = jnp.clip(-log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.expm1(ref_log_ratio) - ref_log_ratio


def kl_per_sequence(logp: Array, logp_ref: Array, mask: Array, kind: str = "k1") -> Array:
    """Per-response KL estimate: masked sum over tokens of `kl_per_token`. [..., T] -> [...]."""
    require_same_shape(logp=logp, logp_ref=logp_ref, mask=mask)
    return masked_sum(kl_per_token(logp, logp_ref, kind), mask)
