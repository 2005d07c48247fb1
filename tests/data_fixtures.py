"""The upstream-format fixtures of the data tests: the library's (`p3o_jax.data.fixtures`)."""
from p3o_jax.data.fixtures import (  # noqa: F401
    BOS, COMPARISONS, EOS, HH_DIALOGUES, TLDR_POSTS, tiny_tokenizer, write_hh, write_jsonl,
    write_tldr_comparisons, write_tldr_sft)


def verl_rows(problems):
    """Rows of verl's parquet layout (its examples/data_preprocess/gsm8k.py) for (question,
    answer) pairs: the ground truth in `reward_model`, the source in `data_source`."""
    return [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": q}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": a},
             "extra_info": {"split": "train", "index": i, "answer": f"... #### {a}",
                            "question": q}}
            for i, (q, a) in enumerate(problems)]
