"""Prompt/response formatting and tokenisation with any HF `PreTrainedTokenizerBase`.

TL;DR prompt, exactly ``TLDR_PROMPT_TEMPLATE``::

    SUBREDDIT: r/{subreddit}
    TITLE: {title}
    POST: {post}

    TL;DR:

`fit_tldr_prompt` makes it fit a token budget by shortening the POST only (the header
stays intact): the post is cut right after its k-th whitespace-delimited word (keeping
the original spacing before it), with k the largest count, found by bisection, for which
the re-formatted prompt encodes to at most ``max_tokens`` tokens (counting a BOS when
``add_bos``). A prompt that already fits is returned unchanged. The TL;DR response is
``" " + summary.strip()`` (the EOS is appended at encoding time).

HH prompt: the longest dialogue prefix chosen and rejected share that ends with
``"\\n\\nAssistant:"`` (`split_hh_pair`); each response is the rest of its dialogue, so
``prompt + response`` is the upstream dialogue. An HH prompt over budget is
cut from the LEFT at token level (`cut_prompt`), keeping the latest turns and the
trailing ``"Assistant:"``.

All text is encoded with ``add_special_tokens=False``; BOS/EOS are added explicitly.
"""
from __future__ import annotations

import os
import re

from transformers import PreTrainedTokenizerBase

TLDR_PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\n\nTL;DR:"
HH_HUMAN_TAG = "\n\nHuman:"
HH_ASSISTANT_TAG = "\n\nAssistant:"

_WORD = re.compile(r"\S+")


def format_tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return TLDR_PROMPT_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


def tldr_response(summary: str) -> str:
    """The SFT / preference target for a TL;DR summary: one space, then the summary."""
    return " " + summary.strip()


def fit_tldr_prompt(
    tokenizer: PreTrainedTokenizerBase,
    subreddit: str,
    title: str,
    post: str,
    max_tokens: int,
    *,
    add_bos: bool = False,
) -> str:
    """The TL;DR prompt with the post truncated (at a word end) to fit ``max_tokens``.

    Raises ValueError if even the header with an empty post does not fit.
    """
    def n_tokens(truncated_post: str) -> int:
        prompt = format_tldr_prompt(subreddit, title, truncated_post)
        return len(encode(tokenizer, prompt)) + add_bos

    if n_tokens(post) <= max_tokens:
        return format_tldr_prompt(subreddit, title, post)
    header_tokens = n_tokens("")
    if header_tokens > max_tokens:
        raise ValueError(
            f"TL;DR header alone takes {header_tokens} > {max_tokens} tokens (title {title!r})")
    word_ends = [0] + [m.end() for m in _WORD.finditer(post)]
    words = largest_fitting(lambda k: n_tokens(post[:word_ends[k]]) <= max_tokens,
                            len(word_ends) - 1)
    return format_tldr_prompt(subreddit, title, post[:word_ends[words]])


def largest_fitting(fits, n: int) -> int:
    """The largest k in 0 .. n with ``fits(k)``, by bisection: for a ``fits`` true up to some
    k and false after (``fits(0)`` is taken as true, not called)."""
    lo, hi = 0, n + 1   # invariant: fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of an HH pair of dialogues.

    The prompt is the longest prefix the two dialogues share that ends with
    ``"\\n\\nAssistant:"``; each response is the rest of its dialogue. Usually the dialogues
    differ only in their last Assistant turn, and each response is that reply (possibly
    empty); where they differ earlier, the responses hold every turn after the divergence.
    Raises ValueError if they share no such prefix (they differ in the first Human turn).
    """
    cut = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT_TAG)
    if cut < 0:
        raise ValueError(f"'chosen' and 'rejected' share no prompt ending in {HH_ASSISTANT_TAG!r}")
    cut += len(HH_ASSISTANT_TAG)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_continuation(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids ``text`` gets in the middle of a text, after a sentence's ".": a SentencePiece
    tokenizer (Llama) marks the start of a whole text with a space, so `encode` alone would
    give a first token the sampled continuation never has. Falls back to `encode` if the "."
    merges with ``text``."""
    before = encode(tokenizer, ".")
    ids = encode(tokenizer, "." + text)
    return ids[len(before):] if ids[:len(before)] == before else encode(tokenizer, text)


def encode_responses(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     prompt_ids: list[list[int]], responses: list[str]) -> list[list[int]]:
    """The ids of each response as it follows its prompt: prompt + response encoded as one
    text, less the prompt's own ids (``prompt_ids[i]``: `encode` of ``prompts[i]``). So the
    prompt's ids and these are the encoding of the whole text: what a sampler given the
    prompt's ids emits to write the response (encoding the response alone can differ in its
    first token: a SentencePiece tokenizer marks the start of a text with "▁"). Where a token
    spans the boundary (the whole text's ids do not begin with the prompt's), the response is
    encoded as a continuation (`encode_continuation`)."""
    whole = encode_batch(tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)])
    return [ids[len(before):] if ids[:len(before)] == before
            else encode_continuation(tokenizer, response)
            for ids, before, response in zip(whole, prompt_ids, responses, strict=True)]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode` of many texts in one call: a fast (Rust) tokenizer encodes them in parallel.
    Its backend is called directly: the HF wrapper's per-text conversions double the time."""
    if not texts:
        return []
    if tokenizer.is_fast:
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(
            list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def cut_prompt(tokenizer: PreTrainedTokenizerBase, ids: list[int], max_len: int, *,
               add_bos: bool = False) -> list[int]:
    """Prompt token ids, at most ``max_len`` of them: [BOS] + the LAST of ``ids``."""
    budget = max_len - add_bos
    ids = list(ids[-budget:]) if budget > 0 else []
    return [tokenizer.bos_token_id] + ids if add_bos else ids


def cut_response(tokenizer: PreTrainedTokenizerBase, ids: list[int], max_len: int, *,
                 append_eos: bool = True) -> list[int]:
    """Response token ids ``ids`` + [EOS], cut to the FIRST ``max_len`` (the EOS is lost if
    the response is too long)."""
    ids = list(ids) + [tokenizer.eos_token_id] if append_eos else list(ids)
    return ids[:max_len]
