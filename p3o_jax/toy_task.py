"""The embedded offline task (``EXP=toy``): synthetic summarisation with a known gold reward.

Everything is generated from ``ToyTaskConfig.seed``; nothing is downloaded.

World
-----
Vocabulary (ids are fixed by the config, independent of the seed)::

    0 <pad>   1 <eos>   2 <bos> (also the unknown token)   3 tldr
    4 .. 4 + n_topics * keywords_per_topic - 1        keywords "t{topic}k{j}"
    ... then n_filler filler words                    "w{i}"

A *post* has ``post_len_min..post_len_max`` words: filler words with ``keywords_per_post_min..max``
distinct keywords of one random topic at random positions. Its *prompt* is
``<bos> post... tldr``. A perfect *summary* names the post's keywords in order of appearance and
ends with ``<eos>``, e.g. ``t3k1 t3k6 <eos>``.

Gold reward
-----------
For a prompt with K distinct keywords and a response, let the *content* be the response tokens
(where ``response_mask`` is 1) before the first ``<eos>``, or all of them when there is no
``<eos>``; tokens after the first ``<eos>`` are ignored. With ``L = len(content)``,
``hits`` = number of content tokens that are the first occurrence of a keyword of the post, and
``bad = L - hits`` (filler, keywords absent from the post, repeats, special tokens, ids outside
the vocabulary)::

    gold = kw_reward * hits - foreign_penalty * bad + eos_bonus * [has <eos>]
           - length_penalty * max(0, L - K)

Perfect summary: ``K * kw_reward + eos_bonus`` (3.0 or 4.0 with the defaults). Relative to it, with
the defaults: a missing keyword costs 1, an added filler / foreign keyword / repeated keyword costs
``foreign_penalty + length_penalty`` = 1.5 each, and a missing ``<eos>`` costs ``eos_bonus`` = 1.

SFT demonstrations are noisy: a fraction ``demo_noise`` of them carries 1..``max_mistakes``
distinct mistakes from ``MISTAKES``. Preference labels come from a simulated Bradley-Terry
annotator on the gold reward (``annotate_preferences``).

Batch layouts (all numpy, int32 unless stated)
----------------------------------------------
* prompts: ``ids [N, prompt_len]`` LEFT-padded with ``<pad>``, ``mask [N, prompt_len]``.
* responses: ``ids [N, response_len]`` RIGHT-padded, ``mask [N, response_len]`` (1 on the words
  and on the ``<eos>``).
* SFT: ``[prompt | response]`` of width ``prompt_len + response_len``; ``loss_mask`` is 1 at the
  positions holding response tokens (the ``<eos>`` included), i.e. on the *targets*; the trainer
  shifts by one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Annotated

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from p3o_jax.checks import NonNegative, Positive, Probability

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
SEP = "tldr"
SEP_ID = 3
SPECIAL_TOKENS = (PAD, EOS, BOS)

SPLITS = {"sft": 0, "rm": 1, "rl": 2, "eval": 3}
"""Independent seed streams: SFT demos, reward-model pairs, RL prompts, held-out eval prompts."""

MISTAKES = ("drop", "filler", "foreign", "repeat", "long", "no_eos")
"""Demo mistakes, applied in this order: drop one keyword; insert a filler word; insert a keyword
absent from the post; insert a repeat of a named keyword; append 2-4 filler words; drop the
``<eos>`` and ramble with filler words up to ``response_len``."""


@dataclasses.dataclass(frozen=True)
class ToyTaskConfig:
    """Every knob of the toy task. Defaults give a 132-word vocabulary."""

    seed: Annotated[int, NonNegative] = 0
    n_topics: Annotated[int, Positive] = 8
    keywords_per_topic: Annotated[int, Positive] = 8
    n_filler: Annotated[int, Positive] = 64
    post_len_min: Annotated[int, Positive] = 10
    post_len_max: Annotated[int, Positive] = 20
    keywords_per_post_min: Annotated[int, Positive] = 2
    keywords_per_post_max: Annotated[int, Positive] = 3
    demo_noise: Annotated[float, Probability] = 0.5   # fraction of SFT demos with mistakes
    max_mistakes: Annotated[int, Positive] = 2  # a noisy demo carries 1..max_mistakes mistakes
    prompt_len: Annotated[int, Positive] = 24   # >= post_len_max + 2 (<bos> and tldr)
    response_len: Annotated[int, Positive] = 10
    kw_reward: Annotated[float, NonNegative] = 1.0
    foreign_penalty: Annotated[float, NonNegative] = 1.0
    eos_bonus: Annotated[float, NonNegative] = 1.0
    length_penalty: Annotated[float, NonNegative] = 0.5

    def __post_init__(self):
        if not 1 <= self.keywords_per_post_min <= self.keywords_per_post_max:
            raise ValueError("need 1 <= keywords_per_post_min <= keywords_per_post_max")
        if self.keywords_per_post_max > min(self.keywords_per_topic, self.post_len_min):
            raise ValueError("keywords_per_post_max exceeds keywords_per_topic or post_len_min")
        if not 1 <= self.post_len_min <= self.post_len_max:
            raise ValueError("need 1 <= post_len_min <= post_len_max")
        if self.prompt_len < self.post_len_max + 2:
            raise ValueError("prompt_len must be >= post_len_max + 2")
        if self.response_len < self.keywords_per_post_max + 1:
            raise ValueError("response_len must fit a perfect summary and its <eos>")
        if self.n_topics < 2 or self.n_filler < 1:
            raise ValueError("need n_topics >= 2 and n_filler >= 1")
        if not 0.0 <= self.demo_noise <= 1.0:
            raise ValueError("demo_noise must be in [0, 1]")
        if not 1 <= self.max_mistakes <= len(MISTAKES):
            raise ValueError(f"max_mistakes must be in [1, {len(MISTAKES)}]")


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """SFT demonstrations, ``W = prompt_len + response_len``.

    input_ids, attention_mask, loss_mask: int32 [N, W]; gold: float32 [N] (the demo's gold
    reward); noisy: bool [N] (the demo carries at least one mistake).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    gold: np.ndarray
    noisy: np.ndarray


def annotate_preferences(gold_a, gold_b, rng: np.random.Generator, temperature: float = 1.0):
    """Simulated Bradley-Terry annotator.

    gold_a, gold_b: [N] gold rewards of the two responses of each pair.
    Returns int32 [N] labels, 1 where a is preferred, drawn with
    ``P(a > b) = sigmoid((gold_a - gold_b) / temperature)``. ``temperature = 0`` is a noiseless
    annotator (ties broken by a fair coin).
    """
    diff = np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0:
        p = 0.5 * (1.0 + np.sign(diff))
    else:
        p = 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))  # = sigmoid, without overflow
    return (rng.random(diff.shape) < p).astype(np.int32)


class ToyTask:
    """Data generation, tokenizer and gold reward of the toy task for one ``ToyTaskConfig``."""

    def __init__(self, config: ToyTaskConfig = ToyTaskConfig()):
        self.config = c = config
        keywords = [f"t{t}k{j}" for t in range(c.n_topics) for j in range(c.keywords_per_topic)]
        filler = [f"w{i}" for i in range(c.n_filler)]
        self.vocab: list[str] = [PAD, EOS, BOS, SEP] + keywords + filler
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.keyword_start = SEP_ID + 1
        self.filler_start = self.keyword_start + len(keywords)
        self.vocab_size = len(self.vocab)
        self.is_keyword = np.zeros(self.vocab_size, bool)
        self.is_keyword[self.keyword_start:self.filler_start] = True
        self.keyword_ids = np.flatnonzero(self.is_keyword)
        self._is_keyword_ext = np.append(self.is_keyword, False)  # indexed by _clip_ids

    # ------------------------------------------------------------------ tokenizer
    def tokenizer(self, save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
        """Word-level tokenizer with this task's fixed vocabulary (ids as in ``self.vocab``).

        Pads on the left; adds no special tokens by itself (prompts carry their own ``<bos>``).
        Saved with ``save_pretrained(save_dir)`` when ``save_dir`` is given.
        """
        tok = Tokenizer(models.WordLevel(vocab=dict(self.word_to_id), unk_token=BOS))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=BOS,
            padding_side="left")
        if save_dir is not None:
            fast.save_pretrained(save_dir)
        return fast

    # ------------------------------------------------------------------ generation
    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng((self.config.seed, SPLITS[split], index))

    def _post(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """One post: (word ids, its keyword ids in order of appearance)."""
        c = self.config
        length = int(rng.integers(c.post_len_min, c.post_len_max + 1))
        k = int(rng.integers(c.keywords_per_post_min, c.keywords_per_post_max + 1))
        topic = int(rng.integers(c.n_topics))
        kws = self.keyword_start + topic * c.keywords_per_topic + rng.choice(
            c.keywords_per_topic, k, replace=False)
        words = self.filler_start + rng.integers(c.n_filler, size=length)
        positions = np.sort(rng.choice(length, k, replace=False))
        words[positions] = kws
        return words.tolist(), words[positions].tolist()

    def _prompt_array(self, posts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(posts), self.config.prompt_len), PAD_ID, np.int32)
        for i, words in enumerate(posts):
            toks = [BOS_ID] + words + [SEP_ID]
            ids[i, len(ids[i]) - len(toks):] = toks
        return ids, (ids != PAD_ID).astype(np.int32)

    def _response_array(self, responses: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(responses), self.config.response_len), PAD_ID, np.int32)
        mask = np.zeros_like(ids)
        for i, toks in enumerate(responses):
            ids[i, :len(toks)] = toks
            mask[i, :len(toks)] = 1
        return ids, mask

    def prompts(self, n: int, split: str = "rl", start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Prompts ``start .. start + n - 1`` of a split's stream (post i depends only on
        (seed, split, i), so consecutive calls with growing ``start`` walk an endless stream).

        Returns ids int32 [n, prompt_len] (left-padded) and mask int32 [n, prompt_len].
        """
        return self._prompt_array([self._post(self._rng(split, i))[0]
                                   for i in range(start, start + n)])

    def eval_prompts(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Held-out prompts (the ``eval`` stream): ids, mask int32 [n, prompt_len]."""
        return self.prompts(n, "eval")

    def _noisy_summary(self, rng, post: list[int], kws: list[int]) -> tuple[list[int], bool]:
        c = self.config
        content, eos = list(kws), True
        if rng.random() >= c.demo_noise:
            return content + [EOS_ID], False
        n_mistakes = int(rng.integers(1, c.max_mistakes + 1))
        chosen = set(rng.choice(len(MISTAKES), n_mistakes, replace=False).tolist())

        def filler() -> int:
            return self.filler_start + int(rng.integers(c.n_filler))

        for m, kind in enumerate(MISTAKES):
            if m not in chosen:
                continue
            if kind == "drop" and content:
                content.pop(int(rng.integers(len(content))))
            elif kind == "filler":
                content.insert(int(rng.integers(len(content) + 1)), filler())
            elif kind == "foreign":
                foreign = self.keyword_ids[~np.isin(self.keyword_ids, post)]
                content.insert(int(rng.integers(len(content) + 1)), int(rng.choice(foreign)))
            elif kind == "repeat" and any(self.is_keyword[t] for t in content):
                j = int(rng.choice([i for i, t in enumerate(content) if self.is_keyword[t]]))
                content.insert(int(rng.integers(j + 1, len(content) + 1)), content[j])
            elif kind == "long":
                content += [filler() for _ in range(int(rng.integers(2, 5)))]
            elif kind == "no_eos":
                content += [filler() for _ in range(c.response_len - len(content))]
                eos = False
        if eos:
            return content[:c.response_len - 1] + [EOS_ID], True
        return content[:c.response_len], True

    def sft_batch(self, n: int, start: int = 0) -> SFTBatch:
        """Noisy SFT demos ``start .. start + n - 1`` (prompts as ``prompts(n, "sft", start)``)."""
        posts, responses, noisy = [], [], []
        for i in range(start, start + n):
            rng = self._rng("sft", i)
            post, kws = self._post(rng)
            response, is_noisy = self._noisy_summary(rng, post, kws)
            posts.append(post)
            responses.append(response)
            noisy.append(is_noisy)
        p_ids, p_mask = self._prompt_array(posts)
        r_ids, r_mask = self._response_array(responses)
        return SFTBatch(
            input_ids=np.concatenate([p_ids, r_ids], 1),
            attention_mask=np.concatenate([p_mask, r_mask], 1),
            loss_mask=np.concatenate([np.zeros_like(p_mask), r_mask], 1),
            gold=self.gold_reward(p_ids, p_mask, r_ids, r_mask),
            noisy=np.asarray(noisy, bool))

    def perfect_summaries(self, prompt_ids, prompt_mask) -> tuple[np.ndarray, np.ndarray]:
        """Oracle summaries of prompts [N, P]: ids, mask int32 [N, response_len]."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
        responses = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            kws = [int(t) for t in self._clip_ids(ids[mask]) if self._is_keyword_ext[t]]
            responses.append(list(dict.fromkeys(kws)) + [EOS_ID])
        return self._response_array(responses)

    # ------------------------------------------------------------------ gold reward
    def _clip_ids(self, ids: np.ndarray) -> np.ndarray:
        """Map ids outside [0, vocab_size) to vocab_size."""
        return np.where((ids >= 0) & (ids < self.vocab_size), ids, self.vocab_size)

    def gold_reward(self, prompt_ids, prompt_mask, response_ids, response_mask=None) -> np.ndarray:
        """Gold reward (formula in the module docstring), vectorised.

        prompt_ids, prompt_mask: [B, P]; response_ids: [B, T]; response_mask: [B, T] or None
        (all ones). Ids outside the vocabulary count as bad words. Returns float32 [B].
        """
        c = self.config
        prompt_ids = np.asarray(prompt_ids)
        response_ids = np.asarray(response_ids)
        b, t = response_ids.shape
        r_mask = (np.ones((b, t), bool) if response_mask is None
                  else np.asarray(response_mask).astype(bool))
        # post_kw[b, v]: v is a keyword of post b (column vocab_size: any out-of-vocabulary id).
        p_ids = self._clip_ids(prompt_ids)
        sel = np.asarray(prompt_mask).astype(bool) & self._is_keyword_ext[p_ids]
        post_kw = np.zeros((b, self.vocab_size + 1), bool)
        post_kw[np.nonzero(sel)[0], p_ids[sel]] = True
        n_kw = post_kw.sum(1)

        is_eos = r_mask & (response_ids == EOS_ID)
        has_eos = is_eos.any(1)
        first_eos = np.where(has_eos, is_eos.argmax(1), t)
        content = r_mask & (np.arange(t)[None, :] < first_eos[:, None])
        same = response_ids[:, :, None] == response_ids[:, None, :]  # [B, T(t), T(s)]
        earlier = np.tril(np.ones((t, t), bool), k=-1)  # s < t
        repeat = (same & earlier[None] & content[:, None, :]).any(2)
        hit = content & ~repeat & np.take_along_axis(post_kw, self._clip_ids(response_ids), 1)

        n_hit = hit.sum(1)
        n_content = content.sum(1)
        gold = (c.kw_reward * n_hit - c.foreign_penalty * (n_content - n_hit)
                + c.eos_bonus * has_eos - c.length_penalty * np.maximum(0, n_content - n_kw))
        return gold.astype(np.float32)

    def gold_reward_text(self, post: str, summary: str) -> float:
        """Gold reward of one whitespace-separated post and summary (e.g. ``"t0k1 <eos>"``);
        unknown words map to ``<bos>`` like the tokenizer's unknown token."""
        p = [[self.word_to_id.get(w, BOS_ID) for w in post.split()]]
        s = [[self.word_to_id.get(w, BOS_ID) for w in summary.split()]]
        return float(self.gold_reward(np.array(p), np.ones((1, len(p[0]))),
                                      np.array(s).reshape(1, -1))[0])

    # ------------------------------------------------------------------ display
    def decode(self, ids, mask=None) -> list[str]:
        """Decode ids [N, T] to one string per row, keeping positions where ``mask`` is 1
        (default: every non-pad token). Ids outside the vocabulary show as ``<id>``."""
        ids = np.asarray(ids)
        keep = ids != PAD_ID if mask is None else np.asarray(mask).astype(bool)
        return [" ".join(self.vocab[t] if 0 <= t < self.vocab_size else f"<{t}>"
                         for t in row[k]) for row, k in zip(ids, keep)]

    def format_samples(self, prompt_ids, prompt_mask, response_ids, response_mask=None,
                       n: int = 4) -> str:
        """Pretty-print the first ``n`` (prompt, response) pairs with their gold reward and the
        best achievable one."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids)[:n], np.asarray(prompt_mask)[:n]
        response_ids = np.asarray(response_ids)[:n]
        response_mask = None if response_mask is None else np.asarray(response_mask)[:n]
        gold = self.gold_reward(prompt_ids, prompt_mask, response_ids, response_mask)
        best = self.gold_reward(prompt_ids, prompt_mask,
                                *self.perfect_summaries(prompt_ids, prompt_mask))
        lines = []
        for post, summ, g, g_best in zip(self.decode(prompt_ids, prompt_mask),
                                         self.decode(response_ids, response_mask), gold, best):
            lines.append(f"post: {post}\n  summary: {summ}\n  gold: {g:+.2f} (best {g_best:+.2f})")
        return "\n".join(lines)
