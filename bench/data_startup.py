"""Real-data start-up at real scale, on synthetic upstream files: how long building the TFDS
datasets and tokenising every record take, cold and from the token cache. Prints JSON.

    PYTHONPATH=. python bench/data_startup.py --root /tmp/bench_data [--scale 1.0]

TL;DR: 92,858 human comparisons (the upstream train split), posts of 40-400 words; HH:
160,800 train pairs over the four subsets, dialogues of 1-4 exchanges. Texts are random
words of a Zipf-distributed vocabulary, tokenised by a byte-level BPE (8k) trained on them;
lengths as `experiments/tldr.py` (P=512, R=53) and `experiments/hh.py` (P=512, R=128).
``per_record_s`` extrapolates the cost of reading and encoding records one at a time (no
batching), measured on the first `PER_RECORD_SAMPLE` records. ``tokenize_cold_s`` reads and
encodes every record (and hashes the data files, writes the cache); ``tokenize_cached_s``
loads the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np
import tensorflow_datasets as tfds
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from p3o_jax import data
from p3o_jax.data import builders, fixtures

TLDR_PAIRS, HH_PAIRS, HH_TEST = 92_858, 160_800, 8_552
PER_RECORD_SAMPLE = 1000


def vocabulary(rng, n=6000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvk"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(n)])


def sentence(rng, words, n) -> str:
    ranks = np.minimum(rng.zipf(1.3, n), len(words)) - 1
    return " ".join(words[ranks]) + "."


def write_tldr(root: pathlib.Path, rng, words, n: int) -> None:
    """The fixtures' comparison files, with the batch files replaced by ``n`` records."""
    fixtures.write_tldr_comparisons(root)
    files = [f for f in builders.COMPARISON_FILES if f.startswith("batch") and "cnndm" not in f]
    per_file = np.array_split(np.arange(n), len(files))
    for name, ids in zip(files, per_file):
        records = []
        for i in ids:
            info = {"id": f"t3_{i}", "subreddit": "AskReddit", "title": sentence(rng, words, 8),
                    "post": sentence(rng, words, int(rng.integers(40, 400)))}
            records.append({"info": info, "summaries": [
                {"text": " " + sentence(rng, words, 25), "policy": "ref", "note": None},
                {"text": " " + sentence(rng, words, 20), "policy": "sup", "note": None}],
                "choice": int(i % 2), "worker": "w", "batch": name[:-5], "split": "train",
                "extra": {}})
        fixtures.write_jsonl(root / name, records)


def dialogue_prompt(rng, words, turns: int) -> str:
    """``turns`` Human turns, all but the last answered; ends with "\\n\\nAssistant:"."""
    text = ""
    for _ in range(turns - 1):
        text += (f"\n\nHuman: {sentence(rng, words, int(rng.integers(5, 30)))}"
                 f"\n\nAssistant: {sentence(rng, words, int(rng.integers(10, 80)))}")
    return text + f"\n\nHuman: {sentence(rng, words, 15)}\n\nAssistant:"


def write_hh(root: pathlib.Path, rng, words, n_train: int, n_test: int) -> None:
    for subset in builders.HH_SUBSETS:
        for split, n in (("train", n_train), ("test", n_test)):
            records = []
            for _ in range(n // len(builders.HH_SUBSETS)):
                prompt = dialogue_prompt(rng, words, int(rng.integers(1, 5)))
                records.append({"chosen": f"{prompt} {sentence(rng, words, 50)}",
                                "rejected": f"{prompt} {sentence(rng, words, 30)}"})
            fixtures.write_jsonl(root / subset / f"{split}.jsonl.gz", records, gz=True)


def bpe_tokenizer(rng, words) -> transformers.PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((sentence(rng, words, 200) for _ in range(3000)), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def measure(source, tokenizer, cache_dir, **kw) -> dict:
    kw = dict(kw, kind="preference", shard_options=data.loader.grain.sharding.NoSharding(),
              cache_dir=cache_dir)
    examples, cold = timed(lambda: data.make_examples(source, tokenizer, **kw))
    _, cached = timed(lambda: data.make_examples(source, tokenizer, **kw))
    transform = data.Tokenize(tokenizer, kw["dataset"], "preference", kw["prompt_len"],
                              kw["response_len"])
    _, sample = timed(lambda: [transform.map(source[i]) for i in range(PER_RECORD_SAMPLE)])
    size = sum(p.stat().st_size for p in pathlib.Path(cache_dir).glob(f"{kw['dataset']}-*.npz"))
    return {"records": len(examples), "tokenize_cold_s": cold, "tokenize_cached_s": cached,
            "per_record_s": round(sample * len(examples) / PER_RECORD_SAMPLE, 1),
            "cache_mb": round(size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/bench_data_startup")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    root = pathlib.Path(args.root)
    rng = np.random.default_rng(0)
    words = vocabulary(rng)
    tokenizer = bpe_tokenizer(rng, words)
    tfds.disable_progress_bar()
    manual, data_dir, cache = root / "upstream", root / "tfds", root / "tokenized"
    n_tldr, n_hh = int(TLDR_PAIRS * args.scale), int(HH_PAIRS * args.scale)
    if not (manual / "batch3.json").exists():
        write_tldr(manual, rng, words, n_tldr)
        write_hh(manual, rng, words, n_hh, max(int(HH_TEST * args.scale), 8))
    _, tldr_build = timed(lambda: data.prepare("tldr_comparisons", data_dir, manual_dir=manual))
    hh_names = [f"hh_rlhf/{s}" for s in builders.HH_SUBSETS]
    _, hh_build = timed(lambda: [data.prepare(n, data_dir, manual_dir=manual) for n in hh_names])
    tldr = tfds.data_source("tldr_comparisons", split="train", data_dir=data_dir)
    hh = data.Concatenated([tfds.data_source(n, split="train", data_dir=data_dir)
                            for n in hh_names])
    report = {
        "cpus": os.cpu_count(),
        "tldr_comparisons": {"build_s": tldr_build, **measure(
            tldr, tokenizer, cache, dataset="tldr_comparisons", prompt_len=512, response_len=53)},
        "hh_rlhf": {"build_s": hh_build, **measure(
            hh, tokenizer, cache, dataset="hh_rlhf", prompt_len=512, response_len=128)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
