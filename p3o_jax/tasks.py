"""Tasks: where the pipeline's prompts, demonstrations and preference pairs come from.

A task is any object with the attributes and methods of `Task`: `ToyRLHF` (the embedded
synthetic task, with a gold reward) or `TextRLHF` (TL;DR and Anthropic HH, human labels).
Batches are addressed by step (`sft_batch(batch_size, step)`, `prompts(n, split, start)`), so
a resumed run asks for exactly the batches it would have seen. All arrays are numpy int32 with
static shapes: prompts [n, P] left-padded, responses [n, N] right-padded, sequences [.., P + N].
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Protocol

import grain
import numpy as np
import tensorflow_datasets as tfds
import transformers
from tensorflow_datasets.core import constants as tfds_constants

from p3o_jax import data
from p3o_jax.checks import ConfigError
from p3o_jax.config import DataConfig
from p3o_jax.data import own
from p3o_jax.data.loader import Encoded
from p3o_jax.data.render import Render
from p3o_jax.data import prompts as text_formats
from p3o_jax.stop_tokens import read_eos_ids
from p3o_jax.toy_task import EOS_ID, PAD_ID, ToyTask, ToyTaskConfig, annotate_preferences

# sample(prompt_ids [n, P], prompt_mask [n, P]) -> (responses [n, 2, N], response_mask [n, 2, N])
SampleFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Task(Protocol):
    tokenizer: object              # an HF tokenizer (exported with every stage)
    vocab_size: int
    eos_ids: tuple[int, ...]       # token ids that end a response (`stop_tokens.read_eos_ids`)
    eos_id: int                    # the primary one, eos_ids[0]: what targets end with
    pad_id: int
    prompt_len: int
    response_len: int
    stop_sequences: tuple[tuple[int, ...], ...]  # token ids ending a response (sampler's)
    gold_reward: Callable | None   # (prompt_ids, prompt_mask, resp, resp_mask) -> [n], if known

    def sft_batch(self, batch_size: int, step: int) -> dict:
        """input_ids, attention_mask, loss_mask: [batch_size, P + N] (loss_mask on targets):
        rows `step * batch_size ..` of one stream, so that a process can read its share of a
        global batch as smaller batches (`train.sft_rows`)."""

    def prompts(self, n: int, split: str, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Prompts `start .. start + n - 1` of split "rm", "rl" or "eval"."""

    def preference_data(self, n_pairs: int, sample: SampleFn, seed: int) -> dict:
        """tokens, mask [n, 2, P + N] and resp_mask [n, 2, N], index 0 the chosen response,
        plus `gold` [n, 2] when the task has a gold reward."""

    def format_samples(self, prompt_ids, prompt_mask, response_ids, response_mask, n: int) -> str:
        """A few (prompt, response) pairs as text, for the end-of-run printout."""

    def decode(self, ids, mask) -> list[str]:
        """Rows of ids [n, L] with mask [n, L] -> the text of their real tokens."""

    # tasks whose prompts reward functions can score (p3o_jax/reward_calls.py) also have:
    # prompt_rows(n, split, start) -> int [n], each prompt's row in `prompt_records(split)`
    # prompt_records(split, rows) -> data.own.Records of those rows (prompt values, columns)
    # prompt_columns: set[str], the columns of every prompt record


def pair_sequences(prompt_ids, prompt_mask, responses, response_mask) -> dict:
    """[n, P] prompts with [n, 2, N] responses -> tokens, mask [n, 2, P + N], resp_mask."""
    rep = lambda x: np.repeat(np.asarray(x)[:, None], 2, 1)
    return {"tokens": np.concatenate([rep(prompt_ids), responses], -1).astype(np.int32),
            "mask": np.concatenate([rep(prompt_mask), response_mask], -1).astype(np.int32),
            "resp_mask": np.asarray(response_mask, np.int32)}


class ToyRLHF:
    """The embedded task (toy_task.py) as a `Task`; preference pairs are the SFT policy's own
    samples labelled by a simulated Bradley-Terry annotator on the gold reward."""

    eos_ids, eos_id, pad_id = (EOS_ID,), EOS_ID, PAD_ID
    stop_sequences = ()

    def __init__(self, config: ToyTaskConfig, annotator_temperature: float = 1.0):
        self.toy = ToyTask(config)
        self.vocab_size = self.toy.vocab_size
        self.prompt_len, self.response_len = config.prompt_len, config.response_len
        self.gold_reward = self.toy.gold_reward
        self.annotator_temperature = annotator_temperature
        self.tokenizer = self.toy.tokenizer()

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

    def decode(self, ids, mask) -> list[str]:
        return self.toy.decode(ids, mask)

    prompt_columns = {"prompt_ids"}

    def prompt_rows(self, n: int, split: str, start: int = 0) -> np.ndarray:
        """Prompts are addressed by index: the rows are `start .. start + n - 1`."""
        return np.arange(start, start + n)

    def prompt_records(self, split: str, rows) -> own.Records:
        """The prompts of `rows` (a run `start .. start + n - 1`, as `prompt_rows` gives) as
        text, with their token ids as the column `prompt_ids`."""
        rows = np.asarray(rows)
        ids, mask = self.prompts(len(rows), split, int(rows[0]))   # one call for the run
        ids = [i[m.astype(bool)].tolist() for i, m in zip(ids, mask)]
        return own.Records("prompt", self.tokenizer.batch_decode(ids), {}, {"prompt_ids": ids},
                           [f"toy {split} prompt {r}" for r in rows], "")


class UnusableData(ConfigError):
    """Upstream data that cannot be used (`data.UpstreamError`); a `ConfigError`, so that
    `train.main` prints its one line and exits 2."""


def build(names: tuple[str, ...], data_cfg: DataConfig) -> None:
    """Builds datasets ``names`` into ``data_cfg.data_dir`` (those not built yet); with a
    ``manual_dir``, every upstream file they lack is listed in one error first."""
    data_dir = os.path.expanduser(data_cfg.data_dir) or None
    manual_dir = os.path.expanduser(data_cfg.manual_dir) or None
    unbuilt = [n for n in names if not tfds.builder(n, data_dir=data_dir).is_prepared()]
    if manual_dir and unbuilt:
        data.check_manual_dir(manual_dir, unbuilt)
    for name in unbuilt:
        data.prepare(name, data_dir, manual_dir=manual_dir, on_bad_record=data_cfg.on_bad_record)


class TextRLHF:
    """TL;DR summarisation (`task="tldr"`) or Anthropic HH dialogue (`task="hh"`): the TFDS
    datasets of `p3o_jax.data`, tokenised with an HF tokenizer (`data.loader` layout).

    =================  ==========================================  ==========================
    use                tldr                                        hh (`data.hh_subsets`)
    =================  ==========================================  ==========================
    sft_batch          tldr_sft train: post -> reference summary   train: dialogue -> chosen
    prompts "rm"       tldr_comparisons train posts                train dialogues
    prompts "rl"       tldr_sft train posts                        train dialogues
    prompts "eval"     tldr_sft test posts                         test dialogues
    preference_data    tldr_comparisons train: summaries[choice]   train: chosen, rejected
                       first, then the other
    =================  ==========================================  ==========================

    Every stream is a seeded shuffle read by index (`data.make_examples`, `data.read_batch`):
    step ``i`` always gets the same batch, and reading past the end continues into the next
    epoch, reshuffled. The "rm" prompts are those of `preference_data`, in the same order.
    Every process reads the whole (global) batch, as `sharding.shard_batch` expects; each
    device keeps only its rows. The datasets are built into ``data_cfg.data_dir`` on
    construction (no-op once built), so unusable upstream data (a corrupt record, with its
    file and line; upstream files missing from ``manual_dir``, empty, Git LFS pointers, not
    downloadable) stops the run here with `UnusableData`, before anything compiles. Each
    dataset split is tokenised once, in batches, and cached under
    ``<data_dir>/p3o_tokenized`` (`data.loader.encode_source`). ``stop_sequences``: the
    token ids of ``data_cfg.stop_sequences`` as they occur mid-text (for the sampler). Shapes: prompts [n, P]
    left-padded, responses [n, N] right-padded, P = ``prompt_len``, N = ``response_len``.
    """

    gold_reward = None

    def __init__(self, task: str, data_cfg: DataConfig, tokenizer: str, seed: int,
                 model: str = ""):
        """``tokenizer``: an HF name or local folder (AutoTokenizer); ``model``: the one the
        policy starts from (its generation config's EOS ids end responses too), if any."""
        self.read_tokenizer(tokenizer, data_cfg, model)
        data_dir = os.path.expanduser(data_cfg.data_dir) or None
        if task == "tldr":
            builds = ("tldr_sft", "tldr_comparisons")
            demos, pairs, held_out = (("tldr_sft", "train"), ("tldr_comparisons", "train"),
                                      ("tldr_sft", "test"))
        else:
            builds = tuple(f"hh_rlhf/{subset}" for subset in data_cfg.hh_subset_list)
            demos = pairs = ("hh_rlhf", "train")
            held_out = ("hh_rlhf", "test")
        try:
            build(builds, data_cfg)
        except data.UpstreamError as e:
            raise UnusableData(str(e)) from e
        cache_dir = os.path.join(data_dir or tfds_constants.DATA_DIR, "p3o_tokenized")

        def stream(use: int, dataset: str, split: str, kind: str) -> grain.MapDataset:
            if dataset == "hh_rlhf":  # the subsets, one after another
                source = data.Concatenated([tfds.data_source(name, split=split, data_dir=data_dir)
                                            for name in builds])
            else:
                source = tfds.data_source(dataset, split=split, data_dir=data_dir)
            return data.make_examples(
                source, self.tokenizer, dataset=dataset, kind=kind, prompt_len=self.prompt_len,
                response_len=self.response_len, shard_options=grain.sharding.NoSharding(),
                seed=int(np.random.SeedSequence([seed, use]).generate_state(1)[0]),
                cache_dir=cache_dir)

        self._sft = stream(0, *demos, "sft")
        self._preferences = stream(1, *pairs, "preference")
        self._prompts = {"rm": stream(1, *pairs, "prompt"), "rl": stream(2, *demos, "prompt"),
                         "eval": stream(3, *held_out, "prompt")}

    def read_tokenizer(self, tokenizer: str, data_cfg: DataConfig, model: str) -> None:
        """The tokenizer (an HF name or local folder, `~` expanded) and what the task takes
        from it: the ids that end a response (with those of ``model``'s generation config), of
        padding, `data_cfg.stop_sequences` as token ids, the vocabulary size."""
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer))
        self.vocab_size = len(self.tokenizer)
        self.eos_ids = read_eos_ids(self.tokenizer, model)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.pad_id = data.pad_token_id(self.tokenizer)
        self.prompt_len, self.response_len = data_cfg.prompt_len, data_cfg.response_len
        self.stop_sequences = tuple(tuple(text_formats.encode_continuation(self.tokenizer, text))
                                    for text in data_cfg.stop_sequence_list)

    def sft_batch(self, batch_size: int, step: int) -> dict:
        return data.read_batch(self._sft, step * batch_size, batch_size)

    def prompts(self, n: int, split: str, start: int = 0):
        b = data.read_batch(self._prompts[split], start, n)
        return b["prompt_ids"], b["prompt_mask"]

    def preference_data(self, n_pairs: int, sample: SampleFn, seed: int) -> dict:
        """The first ``n_pairs`` human comparisons of the shuffled train split (past its end:
        the next, reshuffled epoch). ``sample`` and ``seed`` are not used: the responses and
        labels are the human ones."""
        b = data.read_batch(self._preferences, 0, n_pairs)
        return pair_sequences(b["prompt_ids"], b["prompt_mask"],
                              np.stack([b["chosen_ids"], b["rejected_ids"]], 1),
                              np.stack([b["chosen_mask"], b["rejected_mask"]], 1))

    def decode(self, ids, mask) -> list[str]:
        """Rows of ids [n, L] with mask [n, L] -> the text of their real tokens."""
        return [self.tokenizer.decode(row[m == 1], skip_special_tokens=True)
                for row, m in zip(np.asarray(ids), np.asarray(mask))]

    def format_samples(self, prompt_ids, prompt_mask, response_ids, response_mask, n: int = 3):
        """The first ``n`` pairs; each prompt shown by its last 300 characters."""
        rows = zip(self.decode(prompt_ids[:n], prompt_mask[:n]),
                   self.decode(response_ids[:n], response_mask[:n]))
        return "\n".join(f"prompt: {'...' if len(p) > 300 else ''}{p[-300:]}\n  response: {r}"
                         for p, r in rows)


class DatasetRLHF(TextRLHF):
    """Your own data (`task="dataset"`, p3o_jax/data/own.py): the sources of `data.sft`,
    `data.preferences`, `data.prompts` and `data.eval`, rendered with the tokenizer's chat
    template and tokenised once (cached under `<data_dir or out_dir>/p3o_tokenized`).

    =================  ========================================================
    use                source
    =================  ========================================================
    sft_batch          data.sft (prompt + completion, messages), else the chosen
                       responses of data.preferences
    preference_data    data.preferences
    prompts "rl"       data.prompts, else the prompts of data.sft / preferences,
                       less the held-out ones
    prompts "eval"     data.eval, else `eval_prompts` of those prompts (at most a
                       tenth) held out by a seeded shuffle
    =================  ========================================================

    Streams are read by index as in `TextRLHF` (its batch methods); each prompt example also
    carries its row in `prompt_records(split)`, which the reward functions get with the
    completions. Bad data raises `UnusableData` (a ConfigError) naming the source and row."""

    def __init__(self, data_cfg: DataConfig, tokenizer: str, seed: int, eval_prompts: int,
                 cache_dir: str, model: str = ""):
        self.read_tokenizer(tokenizer, data_cfg, model)
        d = data_cfg
        keys = own.Keys(d.prompt_key, d.completion_key, d.messages_key, d.chosen_key,
                        d.rejected_key)
        render = Render(self.tokenizer, d.wrap_prompts, d.chat_template_kwargs_dict)
        try:
            load = lambda key, kind: own.load_records(getattr(d, key), f"data.{key}", kind, keys,
                                                      seed, d.wrap_prompts)
            sft = load("sft", "sft") if d.sft else None
            preferences = load("preferences", "preference") if d.preferences else None
            if sft is None and preferences is not None:   # SFT on the chosen responses
                sft = dataclasses.replace(preferences, kind="sft",
                                          responses={"response": preferences.responses["chosen"]})
            prompt_key = next(k for k in ("prompts", "sft", "preferences") if getattr(d, k))
            prompts = load(prompt_key, "prompt")
            if d.eval:
                rl, held_out = prompts, load("eval", "prompt")
            else:
                order = np.random.default_rng(seed).permutation(len(prompts))
                n = min(eval_prompts, max(len(prompts) // 10, 1))
                rl, held_out = prompts.take(order[n:]), prompts.take(order[:n])
            self.records = {"rl": rl, "eval": held_out}

            def stream(use: int, records: own.Records) -> grain.MapDataset:
                columns = own.encode(records, render, self.prompt_len, self.response_len,
                                     d.long_prompts, cache_dir)
                layout = data.Tokenize(self.tokenizer, "own", records.kind, self.prompt_len,
                                       self.response_len)
                examples = own.Examples(Encoded(columns, layout), columns["row"])
                return grain.MapDataset.source(examples).shuffle(
                    seed=int(np.random.SeedSequence([seed, use]).generate_state(1)[0]))

            self._sft = stream(0, sft) if sft is not None else None
            self._preferences = stream(1, preferences) if preferences is not None else None
            self._prompts = {split: stream(2 + i, r) for i, (split, r) in
                             enumerate(self.records.items())}
        except data.UpstreamError as e:
            raise UnusableData(str(e)) from e

    @property
    def prompt_columns(self) -> set[str]:
        """The columns every prompt record of RL and evaluation has (for reward functions)."""
        return set(self.records["rl"].columns) & set(self.records["eval"].columns)

    def prompt_count(self, split: str) -> int:
        """The prompts of `split` ("rl" or "eval")."""
        return len(self._prompts[split])

    def prompt_rows(self, n: int, split: str, start: int = 0) -> np.ndarray:
        return data.read_batch(self._prompts[split], start, n)["row"]

    def prompt_records(self, split: str, rows) -> own.Records:
        return self.records[split].take(rows)
