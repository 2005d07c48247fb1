"""Tiny files in the exact upstream formats of TL;DR, TL;DR comparisons and HH-RLHF, and a
tiny local tokenizer trained on them: real-format data with nothing downloaded. Used by the
tests and by the offline smoke run (``smoke=true``, see `smoke_data`).

Each ``write_*`` writes into ``manual_dir`` under the upstream names that
`p3o_jax.data.builders` looks for, and returns the raw upstream records it wrote.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
from collections.abc import Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from p3o_jax.data import builders

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TOKENIZER_VOCAB = 320     # `tiny_tokenizer`'s default size: at most this many ids

TLDR_POSTS = {
    "train": [
        dict(id="t3_a1", subreddit="relationships", title="My (25F) boyfriend forgets dates",
             post="We have been together 3 years.\n\nHe forgot our anniversary again and I "
                  "don't know how to bring it up without sounding petty.",
             summary=" Boyfriend keeps forgetting our anniversary; how do I raise it?"),
        dict(id="t3_a2", subreddit="AskReddit", title="Café owners: what surprised you? ☕",
             post="Opened a small café in Zürich last year. Coffee prices doubled — naïve "
                  "planning on my side. ¿Qué hago? 日本語のお客さんも多い。",
             summary="Café in Zürich, costs doubled, what now? 🙂"),
        dict(id="t3_a3", subreddit="personalfinance", title="Paid off my loan",
             post="Finally paid off the last 5,000 of my student loan after six years of "
                  "extra payments every month.",
             summary="Student loan gone after six years."),
        dict(id="t3_a4", subreddit="running", title="First marathon",
             post="Ran my first marathon in 4h12m. My knees hurt but it was worth it. "
                  "Training plan was 16 weeks.",
             summary="Finished a marathon in 4:12 with a 16 week plan."),
    ],
    "valid": [
        dict(id="t3_b1", subreddit="cooking", title="Bread keeps collapsing",
             post="Every loaf rises nicely and then collapses in the oven. I use 70% hydration.",
             summary="Loaves collapse in the oven at 70% hydration."),
        dict(id="t3_b2", subreddit="dogs", title="Puppy won't sleep 🐶",
             post="Our 10 week old puppy cries all night in the crate.",
             summary="Puppy cries all night in crate."),
    ],
    "test": [
        dict(id="t3_c1", subreddit="travel", title="Lost passport in Kraków",
             post="Lost my passport on the tram in Kraków, embassy is closed until Monday.",
             summary="Passport lost abroad, embassy closed."),
        dict(id="t3_c2", subreddit="gardening", title="Tomatoes split",
             post="My tomatoes split after heavy rain. Should I pick them earlier?",
             summary="Rain splits tomatoes; pick early?"),
    ],
}


def _comparison(post: dict, choice: int, split: str, batch: str, **extra_fields) -> dict:
    info = {key: post[key] for key in ("id", "post", "title", "subreddit")}
    return {
        "info": info,
        "summaries": [
            {"text": " " + post["summary"], "policy": "ref", "note": None},
            {"text": " A worse summary of: " + post["title"], "policy": "sup2_t0.7",
             "note": "misses the point ✗"},
        ],
        "choice": choice, "worker": "w" + post["id"][-2:], "batch": batch, "split": split,
        "extra": {"confidence": 7}, **extra_fields,
    }


def _cnndm_comparison(batch: str = "batch0_cnndm") -> dict:
    return {
        "info": {"id": "cnn-1", "article": "LONDON (CNN) -- A news article.", "site": "cnn",
                 "title": "News"},
        "summaries": [{"text": " News.", "policy": "ref", "note": None},
                      {"text": " Other news.", "policy": "sup", "note": None}],
        "choice": 0, "worker": "w9", "batch": batch, "split": "valid2", "extra": {},
    }


COMPARISONS = {
    "batch3.json": [
        _comparison(TLDR_POSTS["train"][0], 0, "train", "batch3"),
        _comparison(TLDR_POSTS["train"][1], 1, "train", "batch3"),
        _comparison(TLDR_POSTS["train"][2], 0, "train", "batch3"),
    ],
    "batch10.json": [
        _comparison(TLDR_POSTS["train"][3], 1, "train", "batch10"),
        _comparison(TLDR_POSTS["valid"][0], 0, "valid1", "batch10"),
    ],
    "batch0_cnndm.json": [_cnndm_comparison()],
    "edit_b2_eval_test.json": [
        _comparison(TLDR_POSTS["test"][0], 1, "valid2", "edit_b2_eval_test"),
        _comparison(TLDR_POSTS["valid"][1], 0, "valid1", "edit_b2_eval_test"),
    ],
}

HH_DIALOGUES = {
    "train": [
        ("\n\nHuman: What's a good name for a café?\n\nAssistant: How about “Bean There”? ☕",
         "\n\nHuman: What's a good name for a café?\n\nAssistant: No."),
        ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\nHuman: "
         "For how long?\n\nAssistant: About 9 minutes for hard boiled.",
         "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\nHuman: "
         "For how long?\n\nAssistant: Forever."),
        ("\n\nHuman: Translate 'thank you' to Japanese.\n\nAssistant: ありがとう (arigatō).",
         "\n\nHuman: Translate 'thank you' to Japanese.\n\nAssistant: Danke."),
        ("\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
         "\n\nHuman: Tell me a joke.\n\nAssistant: I can't help with that."),
    ],
    "test": [
        ("\n\nHuman: Is the sun a star?\n\nAssistant: Yes, a G-type main-sequence star.",
         "\n\nHuman: Is the sun a star?\n\nAssistant: It's a planet."),
        ("\n\nHuman: 2+2?\n\nAssistant: 4",
         "\n\nHuman: 2+2?\n\nAssistant: 5"),
    ],
}


def write_jsonl(path: pathlib.Path, records: list, *, gz: bool = False) -> pathlib.Path:
    """Writes records (dicts, or raw ``bytes`` lines written as-is) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode("utf-8")) + b"\n"
        for r in records)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_tldr_sft(manual_dir: pathlib.Path) -> dict[str, list[dict]]:
    """``{train,valid,test}.jsonl``; returns split -> records."""
    for split, records in TLDR_POSTS.items():
        write_jsonl(manual_dir / f"{split}.jsonl", records)
    return TLDR_POSTS


def write_tldr_comparisons(manual_dir: pathlib.Path) -> dict[str, list[dict]]:
    """Every file of `builders.COMPARISON_FILES`: those of `COMPARISONS`, the others one CNN/DM
    comparison each (dropped by the builder); returns file name -> records."""
    written = {name: COMPARISONS.get(name) or [_cnndm_comparison(name.removesuffix(".json"))]
               for name in builders.COMPARISON_FILES}
    for name, records in written.items():
        write_jsonl(manual_dir / name, records)
    return written


def write_hh(manual_dir: pathlib.Path, subset: str = "helpful-base") -> dict[str, list[dict]]:
    """``<subset>/{train,test}.jsonl.gz``; returns split -> records {chosen, rejected}."""
    out = {}
    for split, pairs in HH_DIALOGUES.items():
        out[split] = [{"chosen": c, "rejected": r} for c, r in pairs]
        write_jsonl(manual_dir / subset / f"{split}.jsonl.gz", out[split], gz=True)
    return out


def tiny_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the fixture texts, with <pad>, <bos>, <eos>
    (ids 0, 1, 2). Any unicode text round-trips."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [r["post"] + " " + r["title"] + " " + r["summary"]
             for records in TLDR_POSTS.values() for r in records]
    texts += [text for pairs in HH_DIALOGUES.values() for pair in pairs for text in pair]
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2 / Qwen write it: each turn "<|im_start|>role\ncontent<|im_end|>\n"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> transformers.PreTrainedTokenizerFast:
    """`tiny_tokenizer` with ChatML's special tokens (ids `vocab_size` .., after the trained
    ones), its EOS `<|im_end|>` (what ends an assistant turn) and the ChatML template."""
    tok = tiny_tokenizer(vocab_size)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.chat_template = CHATML
    return tok


UNK, SP_BOS, SP_EOS = "<unk>", "<s>", "</s>"


def sentencepiece_tokenizer(vocab_size: int = TOKENIZER_VOCAB
                            ) -> transformers.PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer, as Llama 2, Mistral and Gemma have: BPE over words
    marked with "▁" (`Metaspace`: a space becomes "▁", and the start of a whole text gets one),
    trained on the fixture texts, with <unk>, <s> (BOS), </s> (EOS), ChatML's tokens and
    template. So a text encodes differently alone and after another: "#### 7" alone starts
    with "▁####", after "<|im_start|>assistant\n" with "##"."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=True)
    texts = [r["post"] + " " + r["title"] + " " + r["summary"]
             for records in TLDR_POSTS.values() for r in records]
    texts += [text for pairs in HH_DIALOGUES.values() for pair in pairs for text in pair]
    texts += [f"What is {a} + {b}? #### {a + b}" for a in range(10) for b in range(10)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, SP_BOS, SP_EOS, IM_START, IM_END],
        show_progress=False))
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK,
                                               bos_token=SP_BOS, eos_token=SP_EOS)
    out.chat_template = CHATML
    return out


def write_upstream(manual_dir: pathlib.Path, task: str, hh_subsets: Sequence[str]) -> None:
    """Every upstream file that `task` reads: TL;DR posts and comparisons ("tldr"), or the
    fixture dialogues under each of ``hh_subsets`` ("hh")."""
    if task == "tldr":
        write_tldr_sft(manual_dir)
        write_tldr_comparisons(manual_dir)
    else:
        for subset in hh_subsets:
            write_hh(manual_dir, subset)


def smoke_data(data_cfg, task: str, root: str | os.PathLike):
    """``data_cfg`` (a `p3o_jax.config.DataConfig`) for an offline run of ``task``: each path
    left empty is filled with files generated under ``root``. manual_dir: `write_upstream`'s
    files in ``root/upstream``; tokenizer: `tiny_tokenizer` in ``root/tokenizer``;
    data_dir: ``root/tfds``."""
    root = pathlib.Path(root)
    fill = {"data_dir": data_cfg.data_dir or str(root / "tfds")}
    if not data_cfg.manual_dir:
        fill["manual_dir"] = str(root / "upstream")
        write_upstream(root / "upstream", task, data_cfg.hh_subset_list)
    if not data_cfg.tokenizer:
        fill["tokenizer"] = str(root / "tokenizer")
        tiny_tokenizer().save_pretrained(fill["tokenizer"])
    return dataclasses.replace(data_cfg, **fill)
