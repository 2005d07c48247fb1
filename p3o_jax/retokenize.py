"""Scoring a policy's samples with a reward model that has another tokenizer.

Prompts and responses are decoded with the policy's tokenizer and encoded again with the reward
model's, one batched call per side, into the layout the reward model reads: left-padded prompts
and right-padded responses (`rollout.response_reward`'s inputs). Prompt and response are encoded
separately, so no token straddles the boundary. Host-side numpy, outside the compiled step.

Shapes: B rows; P, N the policy's prompt and response lengths; P2, N2 the reward model's.
`RetokenizedReward` is the RL loop's and the evaluation's `rm_fn`: retokenise on the host,
then score with the reward model in one compiled program.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from p3o_jax import model as M
from p3o_jax.distributed import to_host
from p3o_jax.rollout import response_reward


@dataclasses.dataclass(frozen=True)
class Retokenized:
    prompts: np.ndarray         # int32 [B, P2], left-padded with the reward model's pad id
    prompt_mask: np.ndarray     # int32 [B, P2], 1 on real tokens
    responses: np.ndarray       # int32 [B, N2], right-padded
    response_mask: np.ndarray   # int32 [B, N2]


def decode_rows(tokenizer, tokens, mask) -> list[str]:
    """The text of each row's real tokens, special tokens (pad, EOS) left out. tokens, mask: [B, T]."""
    rows = [row[m.astype(bool)].tolist() for row, m in zip(np.asarray(tokens), np.asarray(mask))]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def encode_rows(tokenizer, texts: list[str], length: int, left: bool,
                append: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode `texts` into int32 ([B, length] tokens, mask), padded with the tokenizer's pad id
    on the left (`left`: a prompt, which keeps its last tokens) or the right (a response, which
    keeps its first). `append[b]` (bool [B]) ends row b with the tokenizer's EOS, kept even when
    the text is cut."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append is not None else []
    tokens = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for b, row in enumerate(ids):
        tail = eos if append is not None and append[b] else []
        row = (row[-length:] if left else row[:length - len(tail)]) + tail
        span = slice(length - len(row), length) if left else slice(0, len(row))
        tokens[b, span], mask[b, span] = row, 1
    return tokens, mask


def retokenize(policy_tokenizer, reward_tokenizer, prompts, prompt_mask, responses,
               response_mask, prompt_len: int, response_len: int,
               eos_ids: tuple[int, ...]) -> Retokenized:
    """Policy tokens -> reward-model tokens. prompts, prompt_mask: [B, P] (left-padded);
    responses, response_mask: [B, N] (right-padded). A response that ended with one of the
    policy's stop ids `eos_ids` (its EOS, its end of turn) ends with the reward model's EOS."""
    responses, response_mask = np.asarray(responses), np.asarray(response_mask)
    last = np.maximum(response_mask.sum(-1) - 1, 0)
    finished = (response_mask.sum(-1) > 0) & np.isin(
        responses[np.arange(len(responses)), last], eos_ids)
    p, pm = encode_rows(reward_tokenizer, decode_rows(policy_tokenizer, prompts, prompt_mask),
                        prompt_len, left=True)
    r, rm = encode_rows(reward_tokenizer, decode_rows(policy_tokenizer, responses, response_mask),
                        response_len, left=False, append=finished)
    return Retokenized(p, pm, r, rm)


class RetokenizedReward:
    """`rm_fn(prompts, samples) -> rewards [B, K]` for a reward model whose tokenizer is not
    the policy's: prompts {"ids", "mask"} [B, P] and `SampleOutput` [B, K, N] are decoded,
    encoded with the reward model's tokenizer into [P2 | N2] rows and scored at the last real
    token. `place(rows, tokens, mask)` puts host arrays on the mesh (batch-sharded);
    `eos_ids`: the policy's stop ids (`Task.eos_ids`)."""

    def __init__(self, policy_tokenizer, reward_tokenizer, reward_model, rm_cfg: M.ModelConfig,
                 prompt_len: int, response_len: int, place, eos_ids: tuple[int, ...]):
        self.policy_tokenizer, self.reward_tokenizer = policy_tokenizer, reward_tokenizer
        self.eos_ids = eos_ids
        self.reward_model, self.place = reward_model, place
        self.prompt_len, self.response_len = prompt_len, response_len
        self._score = jax.jit(lambda p, t, m: response_reward(p, rm_cfg, t, m, prompt_len))

    def __call__(self, prompts: dict, samples):
        ids, mask, tokens, resp_mask = to_host((prompts["ids"], prompts["mask"], samples.tokens,
                                                samples.mask))
        B, K, N = tokens.shape
        r = retokenize(self.policy_tokenizer, self.reward_tokenizer, np.repeat(ids, K, 0),
                       np.repeat(mask, K, 0), tokens.reshape(B * K, N),
                       resp_mask.reshape(B * K, N), self.prompt_len, self.response_len,
                       self.eos_ids)
        rows = np.concatenate([r.prompts, r.responses], -1)[:, None]          # [B K, 1, L2]
        rows_mask = np.concatenate([r.prompt_mask, r.response_mask], -1)[:, None]
        scores = self._score(self.reward_model, *self.place(B * K, rows, rows_mask))
        return scores.reshape(B, K)


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (then no retokenising)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
