"""How your own data's records become text (`task=dataset`, p3o_jax/data/own.py): a prompt as
the sampler sees it, a response as the model writes it after that prompt, and an over-long
prompt shortened with its chat template kept.

A conversation (or, with `wrap`, a plain-string prompt as one user turn) is rendered by the
tokenizer's chat template, `template_kwargs` (`data.chat_template_kwargs`, e.g.
`{"enable_thinking": false}`) handed to every `apply_chat_template` call; a plain-string prompt
is its own text.

prompt      `apply_chat_template(messages, add_generation_prompt=True)`: what the sampler sees.
response    what the model writes after that prompt:
            1. when the prompt's text begins the template's rendering of prompt + response
               (`add_generation_prompt=False`), the rest of that rendering (ChatML, Llama 3,
               Gemma, Llama 2 / Mistral, Qwen3 with or without thinking);
            2. otherwise the generation prompt adds text that the rendered turn lacks
               (DeepSeek-R1-distill's adds `<think>\\n`, and its rendering of an assistant turn
               drops the reasoning before `</think>`): the assistant message's content as
               written, less that added text where the content begins with it (whitespace
               aside), followed by what the template renders after the content (its end of
               turn). The turn is rendered once with a placeholder for its content to find both;
               what it renders before the content must be the start of the prompt's text.
            Either way the response ends with exactly one stop token: the template's own end of
            turn when it renders one (the text ends, trailing whitespace dropped, with one of
            the tokenizer's added tokens: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`),
            else the tokenizer's EOS, appended. A plain completion gets the EOS appended unless
            it ends with it.
fit         a prompt over the token budget keeps the last characters of the content of its
            last user message (a plain prompt: of its text), as many as fit once rendered; the
            template's head (system turn, BOS, role markers) stays whole.

The token ids of a prompt and its response are those of the two texts encoded as one, split at
the prompt's own ids (`prompts.encode_responses`).
"""
from __future__ import annotations

import dataclasses
import functools
import json

from p3o_jax.data import prompts as P
from p3o_jax.data.cache import sha256, tokenizer_fingerprint
from p3o_jax.data.validate import UpstreamError

PLACEHOLDER = "[[p3o: the content]]"   # stands for an assistant message's content (case 2)


@dataclasses.dataclass(frozen=True)
class Render:
    """How records become text for `tokenizer` (module docstring)."""
    tokenizer: object
    wrap: bool = False                  # plain-string prompts as one user turn
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # to apply_chat_template

    def conversation(self, prompt) -> list | None:
        """The prompt as the messages the template renders (None: a plain string)."""
        if isinstance(prompt, str) and not self.wrap:
            return None
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def template(self, msgs: list, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UpstreamError("the data has conversations but the tokenizer has no chat template "
                                "(data.tokenizer: use one that has, or plain-string prompts)")
        return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  **self.template_kwargs)

    def prompt(self, prompt) -> str:
        """The text the sampler sees for `prompt` (a string or a conversation)."""
        msgs = self.conversation(prompt)
        return prompt if msgs is None else self.template(msgs, True)

    def response(self, prompt, response) -> str:
        """The text the model writes after `self.prompt(prompt)` to give `response` (a string,
        or a conversation of the turns after the prompt), ending in one stop token (module
        docstring). ValueError if the template cannot render it after the prompt."""
        msgs = self.conversation(prompt)
        if msgs is None:
            return response if response.endswith(self._eos()) else response + self._eos()
        turns = ([{"role": "assistant", "content": response}] if isinstance(response, str)
                 else list(response))
        before, full = self.template(msgs, True), self.template(msgs + turns, False)
        if full.startswith(before):
            text = full[len(before):]
        else:
            text = self._after_generation_prompt(msgs, turns, before)
        text, eos = text.rstrip(), self._eos()
        if text.endswith(eos) and text[:-len(eos)].rstrip().endswith(self._added_tokens):
            text = text[:-len(eos)].rstrip()   # Phi-3's "<|end|>\n<|endoftext|>": the end of
                                               # turn stops the sampler before the EOS
        return text if text.endswith(self._added_tokens) else text + eos

    def _after_generation_prompt(self, msgs: list, turns: list, before: str) -> str:
        """Case 2 of the module docstring: the content, less what the generation prompt adds
        where the content begins with it, and what the template renders after the content."""
        if len(turns) != 1:
            raise ValueError("the chat template's generation prompt does not begin its rendering "
                             "of the response, and the response has several turns: give one "
                             "assistant turn")
        marked = self.template(msgs + [dict(turns[0], content=PLACEHOLDER)], False)
        head, found, tail = marked.partition(PLACEHOLDER)
        if not found or not before.startswith(head):
            raise ValueError("the chat template renders the text before the response "
                             "differently from the prompt (add_generation_prompt=True)")
        added, content = before[len(head):], turns[0]["content"]
        if added.strip() and content.lstrip().startswith(added.strip()):
            content = content.lstrip()[len(added.strip()):]
            content = content.lstrip() if added != added.rstrip() else content
        return content + tail

    def fit(self, prompt, max_tokens: int):
        """`prompt` shortened to at most `max_tokens` tokens once rendered: the content of its
        last user message (a plain prompt: its text) keeps its last characters, as many as fit
        (bisection); None if it does not fit even with that content empty."""
        content = prompt if isinstance(prompt, str) else prompt[-1]["content"]

        def keep(n: int):
            kept = content[len(content) - n:]
            return kept if isinstance(prompt, str) else prompt[:-1] + [dict(prompt[-1],
                                                                            content=kept)]

        def fits(n: int) -> bool:
            return len(P.encode(self.tokenizer, self.prompt(keep(n)))) <= max_tokens
        return keep(P.largest_fitting(fits, len(content))) if fits(0) else None

    def fingerprint(self) -> str:
        """What the texts and their ids depend on besides the records and the code."""
        return sha256(json.dumps([tokenizer_fingerprint(self.tokenizer), self.wrap,
                                  self.template_kwargs], sort_keys=True))

    @functools.cached_property
    def _added_tokens(self) -> tuple[str, ...]:
        """The texts of the tokenizer's added tokens (its special tokens among them)."""
        return tuple(t.content for t in self.tokenizer.added_tokens_decoder.values() if t.content)

    def _eos(self) -> str:
        eos = self.tokenizer.eos_token
        if not eos:
            raise UpstreamError("the tokenizer has no EOS token to end a response with "
                                "(data.tokenizer)")
        return eos
