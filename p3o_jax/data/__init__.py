"""Real data for RLHF: TL;DR and Anthropic HH as TFDS datasets (array_record), read with
``tfds.data_source`` and batched to fixed shapes by grain.

    from p3o_jax import data
    data.prepare("tldr_sft", data_dir, manual_dir=manual_dir)        # build once
    source = tfds.data_source("tldr_sft", split="train", data_dir=data_dir)
    batches = data.make_pipeline(source, tokenizer, dataset="tldr_sft", kind="sft",
                                 batch_size=8, prompt_len=512, response_len=64, seed=0)

See `builders` (datasets, manual_dir/download), `validate` (bad records), `prompts`
(formats, truncation), `loader` (batch layout, sharding, checkpointable iterators,
random access by index), `fixtures` (tiny files in the upstream formats, offline), `own` and
`render` (your own data, `task=dataset`) and `cache` (the tokenised data kept on disk).
"""
from p3o_jax.data.builders import (
    COMPARISON_FILES, HH_SUBSETS, HhRlhf, TldrComparisons, TldrSft, check_manual_dir, prepare,
    upstream_files)
from p3o_jax.data.loader import (
    Concatenated, Tokenize, make_examples, make_pipeline, pad_token_id, read_batch, shard)
from p3o_jax.data.prompts import (
    TLDR_PROMPT_TEMPLATE, fit_tldr_prompt, format_tldr_prompt, split_hh_pair, tldr_response)
from p3o_jax.data.validate import DataError, UpstreamError, read_jsonl
