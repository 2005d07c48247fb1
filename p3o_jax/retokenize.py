"""Scoring a policy's samples with a reward model that has another tokenizer.

Prompts and responses are decoded with the policy's tokenizer and encoded again with the reward
model's, one batched call per side, into the layout the reward model reads: left-padded prompts
and right-padded responses (`rollout.response_reward`'s inputs). Prompt and response are encoded
separately, so no token straddles the boundary. Host-side numpy, outside the compiled step.

Shapes: B rows; P, N the policy's prompt and response lengths; P2, N2 the reward model's.
"""
from __future__ import annotations

import dataclasses

import numpy as np


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
               response_mask, prompt_len: int, response_len: int) -> Retokenized:
    """Policy tokens -> reward-model tokens. prompts, prompt_mask: [B, P] (left-padded);
    responses, response_mask: [B, N] (right-padded). A response that ended with the policy's
    EOS ends with the reward model's EOS."""
    responses, response_mask = np.asarray(responses), np.asarray(response_mask)
    last = np.maximum(response_mask.sum(-1) - 1, 0)
    finished = (response_mask.sum(-1) > 0) & (
        responses[np.arange(len(responses)), last] == policy_tokenizer.eos_token_id)
    p, pm = encode_rows(reward_tokenizer, decode_rows(policy_tokenizer, prompts, prompt_mask),
                        prompt_len, left=True)
    r, rm = encode_rows(reward_tokenizer, decode_rows(policy_tokenizer, responses, response_mask),
                        response_len, left=False, append=finished)
    return Retokenized(p, pm, r, rm)
