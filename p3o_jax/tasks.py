"""Tasks: where the pipeline's prompts, demonstrations and preference pairs come from.

A task is any object with the attributes and methods of `Task`. Batches are addressed by step
(`sft_batch(batch_size, step)`, `prompts(n, split, start)`), so a resumed run asks for exactly
the batches it would have seen. All arrays are numpy int32 with static shapes: prompts [n, P]
left-padded, responses [n, N] right-padded, sequences [.., P + N].
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from p3o_jax.toy_task import EOS_ID, PAD_ID, ToyTask, ToyTaskConfig, annotate_preferences

# sample(prompt_ids [n, P], prompt_mask [n, P]) -> (responses [n, 2, N], response_mask [n, 2, N])
SampleFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Task(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    prompt_len: int
    response_len: int
    gold_reward: Callable | None   # (prompt_ids, prompt_mask, resp, resp_mask) -> [n], if known

    def sft_batch(self, batch_size: int, step: int) -> dict:
        """input_ids, attention_mask, loss_mask: [batch_size, P + N] (loss_mask on targets)."""

    def prompts(self, n: int, split: str, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Prompts `start .. start + n - 1` of split "rm", "rl" or "eval"."""

    def preference_data(self, n_pairs: int, sample: SampleFn, seed: int) -> dict:
        """tokens, mask [n, 2, P + N] and resp_mask [n, 2, N], index 0 the chosen response,
        plus `gold` [n, 2] when the task has a gold reward."""

    def format_samples(self, prompt_ids, prompt_mask, response_ids, response_mask, n: int) -> str:
        """A few (prompt, response) pairs as text, for the end-of-run printout."""


def pair_sequences(prompt_ids, prompt_mask, responses, response_mask) -> dict:
    """[n, P] prompts with [n, 2, N] responses -> tokens, mask [n, 2, P + N], resp_mask."""
    rep = lambda x: np.repeat(np.asarray(x)[:, None], 2, 1)
    return {"tokens": np.concatenate([rep(prompt_ids), responses], -1).astype(np.int32),
            "mask": np.concatenate([rep(prompt_mask), response_mask], -1).astype(np.int32),
            "resp_mask": np.asarray(response_mask, np.int32)}


class ToyRLHF:
    """The embedded task (toy_task.py) as a `Task`; preference pairs are the SFT policy's own
    samples labelled by a simulated Bradley-Terry annotator on the gold reward."""

    eos_id, pad_id = EOS_ID, PAD_ID

    def __init__(self, config: ToyTaskConfig, annotator_temperature: float = 1.0):
        self.toy = ToyTask(config)
        self.vocab_size = self.toy.vocab_size
        self.prompt_len, self.response_len = config.prompt_len, config.response_len
        self.gold_reward = self.toy.gold_reward
        self.annotator_temperature = annotator_temperature

    def sft_batch(self, batch_size: int, step: int) -> dict:
        b = self.toy.sft_batch(batch_size, start=step * batch_size)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                "loss_mask": b.loss_mask}

    def prompts(self, n: int, split: str, start: int = 0):
        return self.toy.prompts(n, split, start)

    def preference_data(self, n_pairs: int, sample: SampleFn, seed: int) -> dict:
        prompts, pmask = self.prompts(n_pairs, "rm")
        resp, rmask = sample(prompts, pmask)
        gold = np.stack([self.gold_reward(prompts, pmask, resp[:, j], rmask[:, j])
                         for j in range(2)], 1)
        first = annotate_preferences(gold[:, 0], gold[:, 1], np.random.default_rng(seed),
                                     self.annotator_temperature).astype(bool)
        order = np.where(first[:, None], [0, 1], [1, 0])
        take = lambda x: np.take_along_axis(x, order.reshape(n_pairs, 2, *([1] * (x.ndim - 2))), 1)
        return dict(pair_sequences(prompts, pmask, take(resp), take(rmask)),
                    gold=take(gold).astype(np.float32))

    def format_samples(self, prompt_ids, prompt_mask, response_ids, response_mask, n: int = 3):
        return self.toy.format_samples(prompt_ids, prompt_mask, response_ids, response_mask, n=n)
