"""Built-in reward functions, with TRL's signature `f(prompts, completions, **columns) ->
list[float | None]` (`reward_fns=math_answer,final_answer_format`; p3o_jax/reward_fns.py
calls them). A completion is a string, or for conversations a list of messages whose last
holds the text (`text_of`).

    math_answer           1 if the completion's final answer equals the `answer` column's
                          (GSM8K's "#### x", \\boxed{x}, else the last number), 0 if not, None
                          for a row without an answer
    final_answer_format   1 if the completion ends with "#### x" or \\boxed{x}, else 0
    length_penalty        -0.001 per completion token

`make_format_reward(pattern)` and `make_length_penalty(per_token)` build others, for a
file of your own (`reward_fns=my_rewards.py:strict_format`).
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*([^\n]+)")


def text_of(completion) -> str:
    """The text of a completion: itself, or the content of a conversation's last message."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """The final answer of a solution text: after GSM8K's last "####", else the last
    \\boxed{}, else the last number; None if there is none."""
    if found := _GSM8K.findall(text):
        return found[-1].strip()
    if (boxed := _boxed(text)) is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(answer: str) -> str:
    """An answer compared as a number where it is one ("1,000.0" == "1000", "$5" == "5")."""
    text = answer.strip().strip("$").rstrip(".").replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        return " ".join(text.split())
    return repr(int(value)) if value.is_integer() else repr(value)


def math_answer(prompts, completions, answer, **_) -> list[float | None]:
    """1.0 where the completion's `final_answer` equals the `answer` column's (itself a
    solution text, e.g. GSM8K's, or a bare answer), 0.0 where not, None without an answer."""
    out = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            out.append(None)
            continue
        ref = final_answer(str(reference))
        got = final_answer(text_of(completion))
        out.append(float(got is not None and ref is not None
                         and _normalise(got) == _normalise(ref)))
    return out


def make_format_reward(pattern: str):
    """A reward function: 1.0 where `pattern` (a regular expression, DOTALL) matches the
    completion's text (`re.search`), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)

    def format_reward(prompts, completions, **_) -> list[float]:
        return [float(regex.search(text_of(c)) is not None) for c in completions]
    format_reward.__name__ = "format_reward"
    return format_reward


def make_length_penalty(per_token: float):
    """A reward function: -per_token for each token of the completion (EOS included)."""
    def length_penalty(prompts, completions, completion_ids, **_) -> list[float]:
        return [-per_token * len(ids) for ids in completion_ids]
    return length_penalty


final_answer_format = make_format_reward(r"(####\s*[^\n]+|\\boxed\{.*\})\s*$")
final_answer_format.__name__ = "final_answer_format"
length_penalty = make_length_penalty(0.001)

BUILTINS = {"math_answer": math_answer, "final_answer_format": final_answer_format,
            "length_penalty": length_penalty}
