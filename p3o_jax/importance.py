"""Off-policy rollouts, corrected: truncated importance weights pi_prox / pi_behav.

A response was drawn by the behaviour policy pi_behav: the sampler's weights and numerics. The
update starts from the proximal policy pi_prox (theta_old, the weights the update starts from),
whose log-probs the scoring program recomputes (`logp_old`). The two differ when the rollout
was made with older weights (`rl.max_staleness` > 0) or by a sampler whose numbers round apart
from the trainer's (a bfloat16 cached decode). When the loop takes the sampler's log-probs as
pi_prox's (float32, staleness 0: `ExperimentConfig.recompute_old`), the two are one policy and
nothing here acts: the buffer's `logp_behav` is None.

AReaL's decoupled objective (Fu et al. 2025, "AReaL"): every algorithm clips against pi_prox,
as on-policy, and weighs each sample's part of the gradient by the constant

    rl.rollout_is = "token"      w_t = min(pi_prox(y_t | .) / pi_behav(y_t | .), C)   per token
                    "sequence"   w_i = min(pi_prox(y_i) / pi_behav(y_i), C)   per response, on
                                 every token of it; P3O per pair (algos/p3o.py): a pair is one
                                 draw from pi_behav x pi_behav, w_ij = min(w~_i w~_j, C) of the
                                 untruncated ratios
                    "none"       w = 1
    C = rl.rollout_is_cap (2.0, as TIS, verl's rollout_is_threshold and TRL's
        vllm_importance_sampling_cap)

A weight enters through the log-probs the loss differentiates (`weighted_logprobs`): their
value is unchanged, so every clip and metric reads the true ratio to pi_prox, and the gradient
of token t is w_t grad log pi(y_t). For a token-level loss (PPO, GRPO) that is the loss term
times w_t; for a sequence-level one (RLOO, GSPO, P3O's token mode) each token's share of
grad log pi(y_i). docs/P3O.md ("Off-policy rollouts") writes out P3O's estimator.

Uncapped, the sequence weight makes the update's expected gradient the on-policy one at pi_prox
(tests/test_importance.py enumerates a bandit exactly); the token weight and the cap trade that
for variance, as in the systems above.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from p3o_jax import ops

MODES = ("none", "token", "sequence")


def log_ratio(logp_prox, logp_behav, mask):
    """log pi_prox - log pi_behav of each real token: [..., T] (0 on pads), clamped."""
    ops.require_same_shape(logp_prox=logp_prox, logp_behav=logp_behav, mask=mask)
    return jnp.where(mask > 0, ops.clamped_log_ratio(logp_prox, logp_behav), 0.0)


def truncated(log_weight, cap: float):
    """min(exp(log_weight), cap), overflow-safe: the truncated importance weight."""
    return jnp.minimum(jnp.exp(jnp.minimum(log_weight, ops.LOG_RATIO_CLAMP)), cap)


def token_weights(logp_prox, logp_behav, mask, mode: str, cap: float):
    """The truncated weight of every token, [..., T] (module docstring; "sequence": the
    response's weight on each of its tokens), constant; 1 on pads and for mode "none"."""
    ops.require(mode in MODES, f"rollout_is must be one of {MODES}, got {mode!r}")
    lr = jax.lax.stop_gradient(log_ratio(logp_prox, logp_behav, mask))
    if mode == "none":
        return jnp.ones_like(lr)
    if mode == "sequence":
        lr = jnp.broadcast_to(jnp.sum(lr, -1, keepdims=True), lr.shape)
    return jnp.where(mask > 0, truncated(lr, cap), 1.0)


def weighted_logprobs(logp, weights):
    """`logp` [..., T] with its value unchanged and the gradient of each entry scaled by its
    constant weight [..., T]: logp + (w - 1) (logp - sg(logp))."""
    ops.require_same_shape(logp=logp, weights=weights)
    weights = jax.lax.stop_gradient(weights)
    return logp + (weights - 1) * (logp - jax.lax.stop_gradient(logp))


def corrected_logprobs(logp, batch, rl):
    """The policy's log-probs of `batch`'s responses [B, K, T] weighted for the update (module
    docstring), by `rl.rollout_is` and `rl.rollout_is_cap`; unchanged when the buffer's
    pi_prox is the sampler's own (`batch.logp_behav` None) or the correction is off."""
    if batch.logp_behav is None or rl.rollout_is == "none":
        return logp
    return weighted_logprobs(logp, token_weights(batch.logp_old, batch.logp_behav,
                                                 batch.resp_mask, rl.rollout_is,
                                                 rl.rollout_is_cap))


def weight_metrics(logp_prox, logp_behav, mask, mode: str, cap: float) -> dict:
    """The weights of a buffer [B, K, T] under `mode` ("none": those "token" would give):
    `is_weight_mean`, `is_weight_max` (over real tokens, or responses for "sequence") and
    `is_capped_frac` (the share truncated at `cap`)."""
    mode = "token" if mode == "none" else mode
    lr = log_ratio(logp_prox, logp_behav, mask)
    if mode == "sequence":
        lr, mask = jnp.sum(lr, -1), ops.has_tokens(mask)
    raw = jnp.exp(lr)
    return {"is_weight_mean": ops.masked_mean(jnp.minimum(raw, cap), mask),
            "is_weight_max": jnp.max(jnp.where(mask > 0, jnp.minimum(raw, cap), 0.0)),
            "is_capped_frac": ops.masked_mean(raw > cap, mask)}


def gap_metrics(logp, batch) -> dict:
    """|log pi_behav - log pi_trainer| over the real tokens of a minibatch, `logp` [B, K, T] the
    trainer's log-probs: `logp_gap_mean`, `logp_gap_max`. The update reports them from its
    first step, where the trainer is at pi_prox (`train_state.make_update`): at staleness 0
    this is the sampler–trainer gap, at staleness s the policy's drift over s updates too."""
    behav = batch.logp_old if batch.logp_behav is None else batch.logp_behav
    gap = jnp.abs(jax.lax.stop_gradient(logp) - behav)
    return {"logp_gap_mean": ops.masked_mean(gap, batch.resp_mask),
            "logp_gap_max": jnp.max(jnp.where(batch.resp_mask > 0, gap, 0.0))}


FIRST_STEP_METRICS = ("logp_gap_mean", "logp_gap_max")
