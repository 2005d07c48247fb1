"""The upstream-format fixtures of the data tests: the library's (`p3o_jax.data.fixtures`)."""
from p3o_jax.data.fixtures import (  # noqa: F401
    BOS, COMPARISONS, EOS, HH_DIALOGUES, TLDR_POSTS, tiny_tokenizer, write_hh, write_jsonl,
    write_tldr_comparisons, write_tldr_sft)
