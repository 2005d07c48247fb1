"""grain input pipelines over the TFDS sources: fixed-shape batches of token ids.

``make_pipeline`` chains, on a random-access source (``tfds.data_source(...)[split]`` or
any sequence of records)::

    tokenise every record (batched; cached on disk, `encode_source`)
    ->  shard (this process's records)  ->  shuffle(seed; reshuffled every epoch)
    ->  pad  ->  batch(drop_remainder)  ->  repeat(num_epochs)
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

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Literal

import grain
import numpy as np
from absl import flags
from etils import epath
from transformers import PreTrainedTokenizerBase

from p3o_jax.data import prompts
from p3o_jax.data.cache import cached, sha256, tokenizer_fingerprint

DatasetName = Literal["tldr_sft", "tldr_comparisons", "hh_rlhf", "own"]
Kind = Literal["sft", "preference", "prompt"]
DATASETS = ("tldr_sft", "tldr_comparisons", "hh_rlhf", "own")  # own: your data, its ids from
                                        # `own.encode` (p3o_jax/data/own.py); here its layout
KINDS = ("sft", "preference", "prompt")
ENCODE_CHUNK = 4096     # records per batch encoding call


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

    @property
    def fields(self) -> tuple[str, ...]:
        """The texts of a record: "prompt", then those of `responses` (keys of `encode`)."""
        if self.dataset == "own":
            return {"sft": ("prompt", "response"), "prompt": ("prompt",),
                    "preference": ("prompt", "chosen", "rejected")}[self.kind]
        return ("prompt", "response") if self.dataset == "tldr_sft" else (
            "prompt", "chosen", "rejected")

    def responses(self, record: dict) -> dict[str, str]:
        """{response} (tldr_sft) or {chosen, rejected} texts of a (decoded) source record."""
        if self.dataset == "own":
            return {key: record[key] for key in self.fields[1:]}
        if self.dataset == "hh_rlhf":
            return {"chosen": record["chosen"], "rejected": record["rejected"]}
        if self.dataset == "tldr_sft":
            return {"response": prompts.tldr_response(record["summary"])}
        choice = int(record["choice"])
        return {"chosen": prompts.tldr_response(record[f"summary_{choice}"]),
                "rejected": prompts.tldr_response(record[f"summary_{1 - choice}"])}

    def map(self, record: dict) -> dict[str, np.ndarray]:
        return self.layout({key: rows[0] for key, rows in self.encode([record]).items()})

    def encode(self, records: Sequence[dict]) -> dict[str, list[list[int]]]:
        """Token ids of each record's texts, already cut to size: "prompt" (at most P, with
        BOS if ``add_bos``), "response" or "chosen" and "rejected" (at most R, EOS appended
        if ``append_eos``). Texts are encoded in batches (in parallel with a fast tokenizer);
        only the TL;DR prompts over budget are fitted one by one."""
        records = [_text_fields(r) for r in records]
        out = {"prompt": [prompts.cut_prompt(self.tokenizer, ids, self.prompt_len,
                                             add_bos=self.add_bos)
                          for ids in self._prompt_ids(records)]}
        responses = [self.responses(r) for r in records]
        for key in self.fields[1:]:
            out[key] = [prompts.cut_response(self.tokenizer, ids, self.response_len,
                                             append_eos=self.append_eos)
                        for ids in prompts.encode_batch(self.tokenizer, [t[key] for t in responses])]
        return out

    def layout(self, ids: dict[str, Sequence[int]]) -> dict[str, np.ndarray]:
        """One example of the batch layout of ``kind`` from the ids of `encode`."""
        prompt_ids, prompt_mask = self._pad(ids["prompt"], self.prompt_len, left=True)
        if self.kind == "prompt":
            return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
        if self.kind == "sft":
            response_ids, response_mask = self._pad(
                ids["response"] if "response" in ids else ids["chosen"], self.response_len,
                left=False)
            return {"input_ids": np.concatenate([prompt_ids, response_ids]),
                    "attention_mask": np.concatenate([prompt_mask, response_mask]),
                    "loss_mask": np.concatenate([np.zeros_like(prompt_mask), response_mask])}
        chosen_ids, chosen_mask = self._pad(ids["chosen"], self.response_len, left=False)
        rejected_ids, rejected_mask = self._pad(ids["rejected"], self.response_len, left=False)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                "rejected_ids": rejected_ids, "rejected_mask": rejected_mask}

    def fingerprint(self) -> str:
        """What `encode`'s output depends on besides the records and the code: the tokenizer
        (`cache.tokenizer_fingerprint`), the dataset and the lengths."""
        return sha256(json.dumps([
            tokenizer_fingerprint(self.tokenizer), self.dataset, self.prompt_len,
            self.response_len, self.add_bos, self.append_eos]))

    def _prompt_ids(self, records: Sequence[dict]) -> list[list[int]]:
        """Each (decoded) record's prompt, encoded. TL;DR: the full prompts are encoded in
        one batch, and only those over ``prompt_len`` are fitted (`prompts.fit_tldr_prompt`)
        and encoded again; HH prompts are cut later, from the left (`prompts.cut_prompt`)."""
        if self.dataset in ("hh_rlhf", "own"):
            return prompts.encode_batch(self.tokenizer, [r["prompt"] for r in records])
        full = [prompts.format_tldr_prompt(r["subreddit"], r["title"], r["post"]) for r in records]
        ids = prompts.encode_batch(self.tokenizer, full)
        for i, r in enumerate(records):
            if len(ids[i]) + self.add_bos > self.prompt_len:
                ids[i] = prompts.encode(self.tokenizer, prompts.fit_tldr_prompt(
                    self.tokenizer, r["subreddit"], r["title"], r["post"], self.prompt_len,
                    add_bos=self.add_bos))
        return ids

    def _pad(self, ids: Sequence[int], length: int, *, left: bool
             ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both int32 [length], padded on the left or the right."""
        n = len(ids)
        out = np.full(length, self.pad_id, np.int32)
        mask = np.zeros(length, np.int32)
        span = slice(length - n, length) if left else slice(0, n)
        out[span], mask[span] = ids, 1
        return out, mask


def _text_fields(record: dict) -> dict:
    """A source record with its bytes fields (TFDS text features) decoded as UTF-8."""
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


class Encoded(Sequence):
    """A source's examples from `Tokenize.encode`'s ids of all its records, stored ragged:
    ``columns[f"{field}.ids"]`` int32 [total tokens] and ``columns[f"{field}.offsets"]``
    int64 [n + 1] for each of ``transform.fields``; item ``i`` is ``transform.layout``'s."""

    def __init__(self, columns: dict[str, np.ndarray], transform: Tokenize):
        self.columns, self.transform = columns, transform

    def __len__(self) -> int:
        return len(self.columns["prompt.offsets"]) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self.transform.layout({
            f: self.columns[f"{f}.ids"][self.columns[f"{f}.offsets"][index]:
                                        self.columns[f"{f}.offsets"][index + 1]]
            for f in self.transform.fields})


def encode_source(source: Sequence[dict], transform: Tokenize, *,
                  cache_dir: str | os.PathLike | None = None) -> Encoded:
    """Every record of ``source`` encoded by ``transform`` (`ENCODE_CHUNK` records per batch
    encoding call). With ``cache_dir``, and a source read from files (`source_fingerprint`),
    the ids are cached in ``cache_dir/<dataset>-<key>.npz`` (`cache.cached`), the key
    hashing the files' contents, ``transform.fingerprint()`` and this module's and `prompts`'
    code: a later run with the same data, tokenizer, lengths and code loads them instead."""
    data_key = source_fingerprint(source) if cache_dir else None

    def compute() -> dict[str, np.ndarray]:
        chunks = (transform.encode([source[i] for i in range(start, min(start + ENCODE_CHUNK,
                                                                          len(source)))])
                  for start in range(0, len(source), ENCODE_CHUNK))
        return ragged_columns(chunks, transform.fields)
    columns = cached(cache_dir if data_key else None, transform.dataset,
                     (data_key or "") + transform.fingerprint(),
                     (sys.modules[__name__], prompts), compute)
    return Encoded(columns, transform)


def source_fingerprint(source: Sequence[dict]) -> str | None:
    """A hash of the files a source reads (a ``tfds.data_source`` split: its array_record
    files; `Concatenated`: its sources'), or None for a source not read from files."""
    if isinstance(source, Concatenated):
        parts = [source_fingerprint(s) for s in source.sources]
        return None if None in parts else sha256(json.dumps(parts))
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    if info is None or not isinstance(split, str):
        return None
    files = sorted(epath.Path(info.data_dir).glob(f"*-{split}.*"))
    digest = hashlib.sha256(f"{info.full_name}/{split}".encode())
    for path in files:
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest() if files else None


def ragged_columns(chunks: Iterable[dict[str, list[list[int]]]], fields: Sequence[str]
            ) -> dict[str, np.ndarray]:
    """`Encoded` columns from chunks of `Tokenize.encode` output (each chunk converted to
    arrays at once: Python lists of all ids would take gigabytes)."""
    ids, lengths = {f: [] for f in fields}, {f: [] for f in fields}
    for chunk in chunks:
        for f in fields:
            lengths[f].append(np.fromiter(map(len, chunk[f]), np.int64, len(chunk[f])))
            ids[f].append(np.fromiter(itertools.chain.from_iterable(chunk[f]), np.int32))
    columns = {}
    for f in fields:
        n = np.concatenate(lengths[f]) if lengths[f] else np.zeros(0, np.int64)
        columns[f"{f}.offsets"] = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        columns[f"{f}.ids"] = np.concatenate(ids[f]) if ids[f] else np.zeros(0, np.int32)
    return columns


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
    cache_dir: str | os.PathLike | None = None,
) -> grain.MapDataset:
    """This shard's records of ``source``, shuffled and tokenised: a random-access
    ``grain.MapDataset`` of unbatched examples (the batch layout above without B).

    ``ds[i]`` for any ``i >= 0``: index ``i`` is example ``i % len(ds)`` of epoch
    ``i // len(ds)``, and every epoch is shuffled anew. ``shard_options`` defaults to
    ``ShardByJaxProcess(drop_remainder=True)``. All of ``source`` is tokenised up front,
    in batches, and cached in ``cache_dir`` if given (`encode_source`).
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    transform = Tokenize(tokenizer, dataset, kind, prompt_len, response_len,
                         add_bos=add_bos, append_eos=append_eos)
    encoded = encode_source(source, transform, cache_dir=cache_dir)
    ds = shard(grain.MapDataset.source(encoded), shard_options)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds


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
