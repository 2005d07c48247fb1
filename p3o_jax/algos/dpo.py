"""DPO: Direct Preference Optimisation (Rafailov et al. 2023), online and offline.

With sequence log-probs of a (chosen, rejected) pair under the policy and the frozen
reference, h = (pi_c - pi_r) - (ref_c - ref_r) and

    loss = mean(-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h))

(conservative DPO for label smoothing ls > 0). beta is the KL coefficient of the objective
DPO solves in closed form (its optimum is pi_ref exp(r / beta)), the counterpart of `rl.beta`.

- online (`algo=dpo`): every iteration samples two responses per prompt from the current
  policy (p3o_jax/rl.py) and the reward model picks the chosen one;
- offline (`algo=dpo_offline`): passes over the reward model's preference data
  (`preferences.npz`, chosen first), with the reference's log-probs computed once
  (`preference_rollout`).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import ops
from p3o_jax.algos.base import Algorithm
from p3o_jax.checks import Positive, Range
from p3o_jax.rollout import Rollout, policy_logprobs


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: Annotated[float, Positive] = 0.1
    label_smoothing: Annotated[float, Range(0, 0.5, hi_open=True)] = 0.0
    epochs: Annotated[int, Positive] = 1        # offline: passes over the preference data


def order_pair_by_score(scores, x):
    """Split pairs into (chosen, rejected) by score: scores [B, 2], x [B, 2, ...] ->
    (x_chosen, x_rejected), each [B, ...]. On a tie the first is chosen."""
    ops.require(jnp.ndim(scores) == 2 and jnp.shape(scores)[1] == 2,
                f"scores must have shape [B, 2], got {tuple(jnp.shape(scores))}")
    ops.require(jnp.shape(x)[:2] == jnp.shape(scores),
                f"x must have shape [B, 2, ...] matching scores{tuple(jnp.shape(scores))}, "
                f"got {tuple(jnp.shape(x))}")
    first_wins = (scores[:, 0] >= scores[:, 1]).reshape(-1, *([1] * (jnp.ndim(x) - 2)))
    return jnp.where(first_wins, x[:, 0], x[:, 1]), jnp.where(first_wins, x[:, 1], x[:, 0])


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0):
    """The DPO loss (module docstring) from sequence log-probs, all [B]. Metrics use the
    implicit rewards beta (pi - ref): `reward_accuracy` (ties 0.5), `reward_margin`,
    `chosen_reward`, `rejected_reward`."""
    ops.require_ndim("policy_chosen_logps", policy_chosen_logps, 1, "[B]")
    ops.require_same_shape(policy_chosen_logps=policy_chosen_logps,
                           policy_rejected_logps=policy_rejected_logps,
                           ref_chosen_logps=ref_chosen_logps,
                           ref_rejected_logps=ref_rejected_logps)
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    loss = jnp.mean(-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    chosen = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
    rejected = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
    return loss, {"loss": jax.lax.stop_gradient(loss),
                  "reward_accuracy": ops.pairwise_accuracy(chosen, rejected),
                  "reward_margin": jnp.mean(chosen - rejected),
                  "chosen_reward": jnp.mean(chosen), "rejected_reward": jnp.mean(rejected)}


def loss(params, batch: Rollout, cfg):
    """Pairs [B, 2] ordered by `batch.rewards` (RM scores online, 1/0 labels offline)."""
    seq = lambda x: ops.sequence_logprob(x, batch.resp_mask)
    logp = seq(policy_logprobs(params["policy"], cfg.policy, batch, cfg.rl.temperature))
    pol_c, pol_r = order_pair_by_score(batch.rewards, logp)
    ref_c, ref_r = order_pair_by_score(batch.rewards, seq(batch.logp_ref))
    return dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=cfg.dpo.beta,
                    label_smoothing=cfg.dpo.label_smoothing)


def preference_rollout(data: dict, logp_ref: np.ndarray) -> Rollout:
    """The preference data (tokens, mask [n, 2, L], resp_mask [n, 2, N], chosen first) with
    the reference's log-probs [n, 2, N] as a buffer whose rewards say chosen = 1, rejected = 0."""
    n = len(data["tokens"])
    return Rollout(tokens=data["tokens"], mask=data["mask"], resp_mask=data["resp_mask"],
                   logp_ref=logp_ref * data["resp_mask"],
                   rewards=np.tile(np.array([[1.0, 0.0]], np.float32), (n, 1)))


ONLINE = Algorithm(name="dpo", loss=loss, settings="dpo", config=DPOConfig)
OFFLINE = Algorithm(name="dpo_offline", loss=loss, settings="dpo", config=DPOConfig,
                    offline=True)
