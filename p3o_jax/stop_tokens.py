"""Which token ids end a response: a chat model stops at its end of turn, not only at EOS.

A chat model's turn ends with a token of its chat template (Qwen's `<|im_end|>`, Llama-3's
`<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`) that is often not the tokenizer's
EOS; its `generation_config.json` lists the ids that transformers' `generate` stops at. The
stop set (`eos_ids`) is the union of the three; its first id, the primary EOS, is the
tokenizer's: what plain-text targets end with and what a cut stop sequence becomes.
"""
from __future__ import annotations

import os

import jinja2
import transformers

# The assistant content rendered to find what the template writes right after it.
MARKER = "p3o stop marker"


def end_of_turn_id(tokenizer) -> int | None:
    """The added (special) token the chat template writes right after an assistant's content
    (whitespace between them allowed), or None: no template, or plain text follows."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER}],
            tokenize=False)
    except (jinja2.TemplateError, ValueError):   # a template that wants other conversations
        return None
    if not isinstance(text, str) or MARKER not in text:
        return None
    after = text[text.rindex(MARKER) + len(MARKER):].lstrip()
    added = [(s, i) for s, i in tokenizer.get_added_vocab().items() if s and after.startswith(s)]
    return max(added, key=lambda a: len(a[0]))[1] if added else None


def generation_eos_ids(model: str | None) -> tuple[int, ...]:
    """`eos_token_id` (an int or a list) of the `generation_config.json` of `model` (a local
    folder or hub name); () without a model or that file."""
    if not model:
        return ()
    try:
        ids = transformers.GenerationConfig.from_pretrained(os.path.expanduser(model)).eos_token_id
    except OSError:     # no generation_config.json
        return ()
    if ids is None:
        return ()
    return tuple(int(i) for i in ([ids] if isinstance(ids, int) else ids))


def read_eos_ids(tokenizer, model: str | None) -> tuple[int, ...]:
    """The stop set, in order and without repeats: the tokenizer's EOS (the primary), the chat
    template's end of turn, `model`'s generation config EOS ids. Empty if none exists."""
    ids = (tokenizer.eos_token_id, end_of_turn_id(tokenizer), *generation_eos_ids(model))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
