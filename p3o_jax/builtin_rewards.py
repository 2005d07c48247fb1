"""Built-in reward functions (`reward_fns=math_answer,final_answer_format`), called as TRL
calls reward functions, by keyword (p3o_jax/reward_calls.py). A completion is a string, or
for conversations a list of messages whose last holds the text (`text_of`).

    math_answer               1 if the completion's final answer equals the `answer` column's,
                              compared symbolically by HF math-verify (fractions, LaTeX,
                              \\boxed{x}, GSM8K's "#### x", units), 0 if not, None for a row
                              without an answer or whose answer is no expression
    final_answer_format       1 if the completion ends with "#### x" or \\boxed{x}, else 0
    length_penalty            -0.001 per completion token
    soft_overlong_punishment  DAPO's: 0 up to the last fifth of `response_len` tokens, then
                              down linearly to -1 at `response_len`

`make_format_reward(pattern)`, `make_length_penalty(per_token)` and
`make_soft_overlong_punishment(max_len, cache_len)` build others, for a file of your own
(`reward_fns=my_rewards.py:strict_format`).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading

import math_verify
from math_verify import ExprExtractionConfig, LatexExtractionConfig

# a number, a fraction a/b, or a LaTeX \frac{a}{b}: what a plain-text answer ends with
_NUMBER = re.compile(r"-?\\d?frac\{[^{}]*\}\{[^{}]*\}|-?\d(?:[\d,]*\d)?(?:\.\d+)?"
                     r"(?:\s*/\s*\d+(?:\.\d+)?)?"
                     r"|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_GSM8K = re.compile(r"####\s*([^\n]+)")
TIMEOUT_S = 5   # math-verify's limit for one parse and one comparison


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
    \\boxed{}, else the last number (a fraction a/b and a LaTeX \\frac{a}{b} count as
    one); None if there is none."""
    if found := _GSM8K.findall(text):
        return found[-1].strip()
    if (boxed := _boxed(text)) is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gold_answer(text: str) -> str:
    """The answer a gold solution states: after GSM8K's last "####", else its last
    \\boxed{}, else the whole text (never a number picked out of it)."""
    if found := _GSM8K.findall(text):
        return found[-1].strip()
    boxed = _boxed(text)
    return (text if boxed is None else boxed).strip()


def grade(gold: str, completion: str) -> float | None:
    """1.0 if the completion's final answer equals the gold answer (`gold_answer` of `gold`,
    read whole as a LaTeX expression), 0.0 if not or if it has none, None if the gold is no
    expression. The completion's answer is `final_answer`'s: after its last "####", else its
    last \\boxed{}, else its last number; never an expression picked out of its text, which
    RL learns to exploit (restating "15 + 19" scored as the answer 34). Both are compared by
    math-verify, symbolically. Its timeouts need the main thread: `MathGrader` runs this in
    processes of their own."""
    gold, completion = (t.replace("\u2212", "-") for t in (gold, completion))   # unicode minus
    parsed_gold = math_verify.parse(f"${gold_answer(gold)}$", [LatexExtractionConfig()],
                                    parsing_timeout=TIMEOUT_S)
    if not parsed_gold:
        return None
    answer = final_answer(completion)
    if answer is None:
        return 0.0
    answer = _THOUSANDS.sub("", answer)
    latex = "\\" in answer or "^" in answer or _boxed(completion) is not None
    parsed = math_verify.parse(f"${answer}$" if latex else answer,
                               [LatexExtractionConfig(boxed_match_priority=0),
                                ExprExtractionConfig()],
                               extraction_mode="first_match", parsing_timeout=TIMEOUT_S)
    return float(math_verify.verify(parsed_gold, parsed, timeout_seconds=TIMEOUT_S))


class MathGrader:
    """`grade` in worker processes of their own (`python -m p3o_jax.builtin_rewards`, one JSON
    pair per line in, its grade out), shared by the threads of `reward_workers`: math-verify's
    timeouts use SIGALRM, which only a process's main thread can set, and a grading stuck in
    C code past `wait_s` is stopped by killing its worker (it scores 0). A subprocess, not
    multiprocessing, so that nothing re-runs the caller's main script."""

    def __init__(self, processes: int = min(os.cpu_count() or 1, 8),
                 wait_s: float = 4 * TIMEOUT_S):
        self.processes, self.wait_s = processes, wait_s
        self.idle: list[subprocess.Popen] = []
        self.started = 0            # workers alive: idle or grading
        self.changed = threading.Condition()

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """`grade(gold, completion)` of each pair."""
        with concurrent.futures.ThreadPoolExecutor(self.processes) as pool:
            return list(pool.map(self.grade_one, pairs))

    def grade_one(self, pair: tuple[str, str]) -> float | None:
        worker, line = self.take(), None
        try:
            worker.stdin.write(json.dumps(pair) + "\n")
            worker.stdin.flush()
            if select.select([worker.stdout], [], [], self.wait_s)[0]:
                line = worker.stdout.readline()
        finally:
            self.give_back(worker, alive=bool(line))      # else hung or gone: killed
        if line is None:                                  # still grading after wait_s
            return 0.0
        if not line:
            raise RuntimeError(f"math_answer's grading process exited ({worker.returncode})")
        return json.loads(line)

    def take(self) -> subprocess.Popen:
        """An idle worker, or a new one while fewer than `processes` run; else wait for one of
        those to come back or to be lost (several callers share the workers: `reward_workers`'
        threads each run a pool of `processes` threads)."""
        with self.changed:
            while not self.idle and self.started >= self.processes:
                self.changed.wait()
            if self.idle:
                return self.idle.pop()
            self.started += 1
        try:
            return self._start()
        except BaseException:
            self.give_back(None, alive=False)
            raise

    def give_back(self, worker: subprocess.Popen | None, alive: bool) -> None:
        """`worker` idle again, or (not `alive`: it hung, failed or never started) killed and
        its place freed for a new one."""
        if worker is not None and not alive:
            worker.kill()
            worker.wait()
        with self.changed:
            if alive:
                self.idle.append(worker)
            else:
                self.started -= 1
            self.changed.notify()

    def _start(self) -> subprocess.Popen:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        worker = subprocess.Popen([sys.executable, "-m", "p3o_jax.builtin_rewards"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        if worker.stdout.readline() != "ready\n":   # set up: timed from here on
            worker.kill()
            raise RuntimeError(f"math_answer's grading process did not start ({worker.wait()})")
        return worker


GRADER = MathGrader()


def math_answer(completions, answer, **kwargs) -> list[float | None]:
    """1.0 where the completion's final answer equals the `answer` column's (a bare answer
    or a solution text, e.g. GSM8K's), 0.0 where not, None without a gold answer (`grade`)."""
    rows = [i for i, a in enumerate(answer) if a is not None]
    graded = GRADER([(str(answer[i]), text_of(completions[i])) for i in rows])
    out = [None] * len(completions)
    for i, g in zip(rows, graded):
        out[i] = g
    return out


def make_format_reward(pattern: str):
    """A reward function: 1.0 where `pattern` (a regular expression, DOTALL) matches the
    completion's text (`re.search`), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)

    def format_reward(completions, **kwargs) -> list[float]:
        return [float(regex.search(text_of(c)) is not None) for c in completions]
    return format_reward


def make_length_penalty(per_token: float):
    """A reward function: -per_token for each token of the completion (EOS included)."""
    def length_penalty(completion_ids, **kwargs) -> list[float]:
        return [-per_token * len(ids) for ids in completion_ids]
    return length_penalty


def make_soft_overlong_punishment(max_len: int, cache_len: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of a completion of L tokens:
    0 for L <= max_len - cache_len, ((max_len - cache_len) - L) / cache_len up to max_len,
    -1 beyond."""
    def soft_overlong_punishment(completion_ids, **kwargs) -> list[float]:
        return [0.0 if len(ids) <= max_len - cache_len else
                ((max_len - cache_len) - len(ids)) / cache_len if len(ids) <= max_len else -1.0
                for ids in completion_ids]
    return soft_overlong_punishment


final_answer_format = make_format_reward(r"(####\s*[^\n]+|\\boxed\{.*\})\s*$")
final_answer_format.__name__ = "final_answer_format"
length_penalty = make_length_penalty(0.001)

BUILTINS = ("math_answer", "final_answer_format", "length_penalty", "soft_overlong_punishment")


def builtin(name: str, response_len: int):
    """The built-in reward function `name` (one of `BUILTINS`) for responses of up to
    `response_len` tokens: soft_overlong_punishment's max_len (its cache_len a fifth of it,
    DAPO's 4096 of 20480)."""
    if name == "soft_overlong_punishment":
        return make_soft_overlong_punishment(response_len, max(response_len // 5, 1))
    return {"math_answer": math_answer, "final_answer_format": final_answer_format,
            "length_penalty": length_penalty}[name]


if __name__ == "__main__":   # a `MathGrader` worker
    logging.getLogger("math_verify").setLevel(logging.ERROR)   # its timeouts score 0, quietly
    grade("1/2", r"so $\frac{1}{2}$ #### 1/2")  # the parsers' lazy set-up, before the clock
    print("ready", flush=True)
    for request in sys.stdin:
        print(json.dumps(grade(*json.loads(request))), flush=True)
