"""Reward modelling: Bradley-Terry on (chosen, rejected) pairs, the score read at the last
real token of each [prompt | response] sequence."""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import model as M
from p3o_jax import ops
from p3o_jax.checks import Positive
from p3o_jax.rollout import response_reward
from p3o_jax.train_state import OptimConfig


@dataclasses.dataclass(frozen=True)
class RMConfig:
    n_pairs: Annotated[int, Positive] = 4096    # preference pairs (toy: SFT samples labelled
                                                # by the simulated annotator)
    steps: Annotated[int, Positive] = 300
    batch_size: Annotated[int, Positive] = 64
    annotator_temperature: Annotated[float, Positive] = 1.0
    optim: OptimConfig = OptimConfig(lr=5e-4, warmup_steps=20, decay="cosine")


def bradley_terry_loss(r_chosen, r_rejected):
    """`mean(-log sigmoid(r_chosen - r_rejected))`; inputs [B]. Metrics: `accuracy` (ties
    0.5), `margin`, `chosen_reward`, `rejected_reward`."""
    ops.require_ndim("r_chosen", r_chosen, 1, "[B]")
    ops.require_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    loss = jnp.mean(-jax.nn.log_sigmoid(r_chosen - r_rejected))
    r_chosen, r_rejected = jax.lax.stop_gradient((r_chosen, r_rejected))
    return loss, {"loss": jax.lax.stop_gradient(loss),
                  "accuracy": ops.pairwise_accuracy(r_chosen, r_rejected),
                  "margin": jnp.mean(r_chosen - r_rejected),
                  "chosen_reward": jnp.mean(r_chosen), "rejected_reward": jnp.mean(r_rejected)}


def loss(params, batch: dict, cfg: M.ModelConfig):
    """batch: tokens, mask [B, 2, L], resp_mask [B, 2, N]; index 0 chosen, 1 rejected."""
    prompt_len = batch["tokens"].shape[-1] - batch["resp_mask"].shape[-1]
    r = response_reward(params, cfg, batch["tokens"], batch["mask"], prompt_len)
    return bradley_terry_loss(r[:, 0], r[:, 1])
