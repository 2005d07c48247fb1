"""Supervised fine-tuning: next-token cross-entropy on the demonstrations' response tokens."""
from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax import model as M
from p3o_jax import ops
from p3o_jax.checks import Positive
from p3o_jax.train_state import OptimConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: Annotated[int, Positive] = 400
    batch_size: Annotated[int, Positive] = 64
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=20, decay="cosine")


def sft_loss(logits, targets, mask):
    """Cross-entropy averaged over all real tokens of the batch (not per row).

    logits: [..., T, V]; targets, mask: [..., T]. Metrics: `num_tokens`, `accuracy`
    (argmax == target over real tokens).
    """
    ops.require_same_shape(targets=targets, mask=mask)
    loss = ops.masked_mean(-ops.token_logprobs(logits, targets), mask)
    return loss, {"loss": jax.lax.stop_gradient(loss), "num_tokens": jnp.sum(mask > 0),
                  "accuracy": ops.masked_mean(jnp.argmax(logits, axis=-1) == targets, mask)}


def loss(params, batch: dict, cfg: M.ModelConfig):
    """batch: input_ids, attention_mask, loss_mask [B, L] (loss_mask marks target tokens)."""
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    hidden, _ = M.forward(params, cfg, tokens[:, :-1], mask[:, :-1])
    return sft_loss(M.lm_logits(params, cfg, hidden), tokens[:, 1:], batch["loss_mask"][:, 1:])
