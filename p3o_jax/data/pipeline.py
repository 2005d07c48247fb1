"""grain input pipelines over the TFDS sources: fixed-shape batches of token ids.

``make_pipeline`` chains, on a random-access source (``tfds.data_source(...)[split]`` or
any sequence of records)::

    shard (this process's records)  ->  shuffle(seed; reshuffled every epoch)
    ->  tokenise + pad  ->  batch(drop_remainder)  ->  repeat(num_epochs)
    ->  to_iter_dataset  [->  mp_prefetch(worker_count processes)]

Sharding is strided: shard ``i`` of ``n`` keeps records ``i, i + n, ...`` (after dropping
the ``len % n`` last records when ``shard_options.drop_remainder``, so that every process
gets the same number of batches). The default is ``grain.sharding.ShardByJaxProcess``.
Iterating gives a ``grain.DatasetIterator`` whose ``get_state()`` (a small JSON-able dict)
and ``set_state()`` checkpoint and resume the stream exactly, with or without worker
processes (a state is only valid for the same pipeline arguments).

Random access instead of a stream: `make_examples` is the same chain up to tokenisation as
a ``grain.MapDataset`` of unbatched examples, and `read_batch` stacks examples
``start .. start + B - 1`` of it, so a training step can address its batch by index (and a
resumed run reads the same one). Indices past the end continue into the next epochs, each
reshuffled. `Concatenated` reads several sources as one (e.g. HH subsets).

Batches (B = batch_size, P = prompt_len, R = response_len; every array int32 with exactly
this shape, so jitted steps never recompile). Prompts are LEFT-padded, responses
RIGHT-padded; masks are 1 on real tokens (so position ids are ``cumsum(mask) - 1``):

``kind="sft"``: one sequence [prompt | response]
    input_ids [B, P+R], attention_mask [B, P+R], and loss_mask [B, P+R], 1 where
    input_ids is a response token (incl. EOS): the targets, to be shifted by the consumer.
``kind="preference"``
    prompt_ids [B, P], prompt_mask [B, P], chosen_ids [B, R], chosen_mask [B, R],
    rejected_ids [B, R], rejected_mask [B, R].
``kind="prompt"`` (for sampling)
    prompt_ids [B, P], prompt_mask [B, P].

Texts come from `prompts`: TL;DR prompts are fitted to P tokens by truncating the post;
HH prompts keep their last P tokens; responses keep their first R tokens. SFT on a
preference dataset trains on the chosen response. Padding uses the tokenizer's pad token
(its EOS if it has none).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np
from absl import flags
from transformers import PreTrainedTokenizerBase

from p3o_jax.data import prompts

DatasetName = Literal["tldr_sft", "tldr_comparisons", "hh_rlhf"]
Kind = Literal["sft", "preference", "prompt"]
DATASETS = ("tldr_sft", "tldr_comparisons", "hh_rlhf")
KINDS = ("sft", "preference", "prompt")


class Tokenize(grain.transforms.Map):
    """One source record -> one unbatched example of `make_pipeline`'s batch layout."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dataset: DatasetName, kind: Kind,
                 prompt_len: int, response_len: int, *, add_bos: bool = False,
                 append_eos: bool = True):
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "preference" and dataset == "tldr_sft":
            raise ValueError("tldr_sft has no preference pairs")
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        self.pad_id = pad_token_id(tokenizer)
        self.tokenizer, self.dataset, self.kind = tokenizer, dataset, kind
        self.prompt_len, self.response_len = prompt_len, response_len
        self.add_bos, self.append_eos = add_bos, append_eos

    def texts(self, record: dict) -> dict[str, str]:
        """{prompt, response} (tldr_sft) or {prompt, chosen, rejected} of a source record."""
        r = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}
        if self.dataset == "hh_rlhf":
            return {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        prompt = prompts.fit_tldr_prompt(self.tokenizer, r["subreddit"], r["title"], r["post"],
                                         self.prompt_len, add_bos=self.add_bos)
        if self.dataset == "tldr_sft":
            return {"prompt": prompt, "response": prompts.tldr_response(r["summary"])}
        choice = int(r["choice"])
        return {"prompt": prompt,
                "chosen": prompts.tldr_response(r[f"summary_{choice}"]),
                "rejected": prompts.tldr_response(r[f"summary_{1 - choice}"])}

    def map(self, record: dict) -> dict[str, np.ndarray]:
        texts = self.texts(record)
        prompt = prompts.encode_prompt(self.tokenizer, texts["prompt"], self.prompt_len,
                                       add_bos=self.add_bos)
        prompt_ids, prompt_mask = self._pad(prompt, self.prompt_len, left=True)
        if self.kind == "prompt":
            return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
        if self.kind == "sft":
            response = texts["response"] if "response" in texts else texts["chosen"]
            response_ids, response_mask = self._response(response)
            return {"input_ids": np.concatenate([prompt_ids, response_ids]),
                    "attention_mask": np.concatenate([prompt_mask, response_mask]),
                    "loss_mask": np.concatenate([np.zeros_like(prompt_mask), response_mask])}
        chosen_ids, chosen_mask = self._response(texts["chosen"])
        rejected_ids, rejected_mask = self._response(texts["rejected"])
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                "rejected_ids": rejected_ids, "rejected_mask": rejected_mask}

    def _response(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = prompts.encode_response(self.tokenizer, text, self.response_len,
                                      append_eos=self.append_eos)
        return self._pad(ids, self.response_len, left=False)

    def _pad(self, ids: list[int], length: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both int32 [length], padded on the left or the right."""
        n = len(ids)
        out = np.full(length, self.pad_id, np.int32)
        mask = np.zeros(length, np.int32)
        span = slice(length - n, length) if left else slice(0, n)
        out[span], mask[span] = ids, 1
        return out, mask


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding uses: the tokenizer's pad token, or its EOS if it has none."""
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad_id


class Concatenated(Sequence):
    """Several random-access sources read as one, in order: record ``i`` of the whole."""

    def __init__(self, sources: Sequence[Sequence[dict]]):
        self.sources = list(sources)
        self.ends = np.cumsum([len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        k = int(np.searchsorted(self.ends, index, side="right"))
        return self.sources[k][index - (int(self.ends[k - 1]) if k else 0)]


def shard(ds: grain.MapDataset, options: grain.sharding.ShardOptions) -> grain.MapDataset:
    """This shard's records: strided, after an even cut when ``options.drop_remainder``."""
    if options.drop_remainder:
        ds = ds[: len(ds) - len(ds) % options.shard_count]
    return ds[options.shard_index :: options.shard_count]


def make_examples(
    source: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset: DatasetName,
    kind: Kind,
    prompt_len: int,
    response_len: int,
    seed: int = 0,
    shuffle: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    add_bos: bool = False,
    append_eos: bool = True,
) -> grain.MapDataset:
    """This shard's records of ``source``, shuffled and tokenised: a random-access
    ``grain.MapDataset`` of unbatched examples (the batch layout above without B).

    ``ds[i]`` for any ``i >= 0``: index ``i`` is example ``i % len(ds)`` of epoch
    ``i // len(ds)``, and every epoch is shuffled anew. ``shard_options`` defaults to
    ``ShardByJaxProcess(drop_remainder=True)``.
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    transform = Tokenize(tokenizer, dataset, kind, prompt_len, response_len,
                         add_bos=add_bos, append_eos=append_eos)
    ds = shard(grain.MapDataset.source(source), shard_options)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.map(transform)


def read_batch(examples: grain.MapDataset, start: int, size: int) -> dict[str, np.ndarray]:
    """Examples ``start .. start + size - 1`` of `make_examples`'s dataset stacked into one
    batch: every key [size, ...] (past the end: the next, reshuffled epochs)."""
    rows = [examples[i] for i in range(start, start + size)]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def make_pipeline(
    source: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset: DatasetName,
    kind: Kind,
    batch_size: int,
    prompt_len: int,
    response_len: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_options: grain.sharding.ShardOptions | None = None,
    add_bos: bool = False,
    append_eos: bool = True,
    worker_count: int = 0,
) -> grain.IterDataset:
    """The batch stream of ``source`` (records of builder ``dataset``) as a grain IterDataset.

    ``num_epochs=None`` repeats forever. ``shard_options`` defaults to
    ``ShardByJaxProcess(drop_remainder=True)``. ``worker_count > 0`` tokenises in that many
    processes (same batches, same order); absl flags are then marked parsed if they are
    not, as grain's workers read their flags.
    """
    ds = make_examples(source, tokenizer, dataset=dataset, kind=kind, prompt_len=prompt_len,
                       response_len=response_len, seed=seed, shuffle=shuffle,
                       shard_options=shard_options, add_bos=add_bos, append_eos=append_eos)
    if len(ds) < batch_size:
        raise ValueError(f"this process's shard has {len(ds)} records, "
                         f"fewer than one batch of {batch_size}")
    ds = ds.batch(batch_size, drop_remainder=True)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    iter_ds = ds.to_iter_dataset()
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter_ds
