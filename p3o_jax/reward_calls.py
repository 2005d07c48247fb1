"""Reward functions: programs that score the policy's responses, beside or instead of a
reward model (`reward_fns=`, `reward_weights=`, `reward_workers=`).

`reward_fns` is a comma list; each entry is `package.module:function`,
`path/to/file.py:function`, a built-in name (p3o_jax/rewards.py: `math_answer`, ...), or any
of these after `verl:` for verl's `compute_score(data_source, solution_str, ground_truth,
extra_info)` (`verl_adapter`). Each function is called as TRL's

    f(prompts, completions, completion_ids=..., **columns) -> list[float | None]

on a batch: `prompts[i]` the row's prompt as the data has it (a string or a list of
messages), `completions[i]` the decoded response (for a conversation: `[{"role":
"assistant", "content": text}]`), `completion_ids[i]` its token ids, and every other column
of the prompt's row as a keyword (a function without `**kwargs` gets those it names). `None`
means no opinion: that sample gets nothing from that function. The reward is
`sum_f w_f r_f` (+ `w_rm` times the reward model's score when a reward model is present;
`reward_weights`: one weight per function, then optionally the reward model's; default 1).
`async def` functions are awaited; with `reward_workers=N > 1` each call is split into N
chunks run in a thread pool (for functions that wait: a service, a sandbox).

A function that cannot be imported or has the wrong signature is a `ConfigError` at start-up;
one that raises, returns the wrong length, NaN or inf stops the run with `RewardError`, one
line naming the function and the prompt's row (p3o_jax/cli/train.py: exit 3; the last
checkpoint is intact).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from p3o_jax.checks import ConfigError
from p3o_jax.distributed import to_host
from p3o_jax.rewards import BUILTINS, text_of


RESERVED = ("gold", "reward", "rm", "kl_k1", "kl_k3", "length")  # `evaluate.summarize`'s columns


class RewardError(RuntimeError):
    """A reward function failed on a batch (raised, wrong length, NaN or inf)."""


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    name: str           # what the metrics call it: reward/<name>
    spec: str           # the `reward_fns` entry
    fn: Callable
    weight: float = 1.0

    @property
    def params(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    def accepts(self, column: str) -> bool:
        ps = self.params.parameters.values()
        return any(p.kind is p.VAR_KEYWORD for p in ps) or column in self.params.parameters

    def needs(self) -> list[str]:
        """Keyword arguments the function requires (no default): columns it must get."""
        return [p.name for p in list(self.params.parameters.values())[2:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _import(spec: str, key: str) -> Callable:
    if ":" not in spec:
        if spec in BUILTINS:
            return BUILTINS[spec]
        raise ConfigError(f"config key {key!r}: {spec!r} is no built-in reward "
                          f"({', '.join(BUILTINS)}); give module:function or file.py:function")
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"config key {key!r}: {where}: no such file")
            module_name = f"reward_fns_{os.path.splitext(os.path.basename(where))[0]}"
            loader = importlib.util.spec_from_file_location(module_name, where)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config key {key!r}: {spec}: cannot import {where} "
                          f"({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key {key!r}: {spec}: {where} has no function {name!r}")
    return fn


def _check_signature(fn: Callable, spec: str, key: str, min_positional: int) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < min_positional and not any(p.kind is p.VAR_POSITIONAL for p in ps):
        want = ("f(prompts, completions, **columns)" if min_positional == 2 else
                "compute_score(data_source, solution_str, ground_truth, extra_info)")
        raise ConfigError(f"config key {key!r}: {spec} must have the signature {want}; it has "
                          f"{fn.__name__}{sig}")


def verl_adapter(compute_score: Callable) -> Callable:
    """A TRL-signature reward function from verl's `compute_score(data_source, solution_str,
    ground_truth, extra_info)` (a float, or a dict with "score"), reading verl's columns:
    `data_source`, the ground truth from `reward_model["ground_truth"]` (verl's parquet
    layout), a `ground_truth` column or an `answer` column, and `extra_info`."""
    def verl_score(prompts, completions, data_source=None, reward_model=None,
                   ground_truth=None, answer=None, extra_info=None, **_):
        n = len(completions)
        truth = (ground_truth or answer
                 or [(r or {}).get("ground_truth") for r in reward_model or [None] * n])
        out = []
        for i in range(n):
            s = compute_score(data_source[i] if data_source else "", text_of(completions[i]),
                              truth[i], extra_info[i] if extra_info else None)
            out.append(s["score"] if isinstance(s, dict) else s)
        return out
    return verl_score


def load(fns: str, weights: tuple[float, ...], has_rm: bool) -> tuple[list[RewardFunction], float]:
    """The functions of `reward_fns` with their weights, and the reward model's weight: every
    entry imported and its signature checked (ConfigError naming the key)."""
    specs = [s.strip() for s in fns.split(",") if s.strip()]
    n = len(specs)
    if len(weights) not in (0, n, n + has_rm):
        raise ConfigError(f"config key 'reward_weights': {len(weights)} weights for {n} "
                          f"reward functions{' and a reward model' if has_rm else ''}; give "
                          f"{n}{f' or {n + 1}' if has_rm else ''}")
    w = list(weights) or [1.0] * n
    out = []
    for spec, weight in zip(specs, w):
        verl = spec.startswith("verl:")
        fn = _import(spec[5:] if verl else spec, "reward_fns")
        _check_signature(fn, spec, "reward_fns", 4 if verl else 2)
        if verl:
            fn = verl_adapter(fn)
        name = getattr(fn, "__name__", "reward")
        if verl:
            name = "verl_" + spec.rpartition(":")[2]
        out.append(RewardFunction(name, spec, fn, weight))
    names = [f.name for f in out]   # each name once, and none an evaluation column's
    out = [dataclasses.replace(f, name=f.spec) if names.count(f.name) > 1 or f.name in RESERVED
           else f for f in out]
    return out, (w[n] if len(w) > n else 1.0)


def check_columns(fns: list[RewardFunction], columns: set[str], where: str) -> None:
    """ConfigError when a function requires a column the prompts (`where`) do not have."""
    for f in fns:
        missing = [c for c in f.needs() if c not in columns and c != "completion_ids"]
        if missing:
            raise ConfigError(f"config key 'reward_fns': {f.spec} needs the column(s) "
                              f"{missing}, which {where} lacks; it has {sorted(columns)}")


def _valid(values, n: int, f: RewardFunction, origin: list[str]) -> np.ndarray:
    """The function's output as float64 [n] (NaN for None); RewardError naming the row."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {f.spec} returned {got} for {n} completions "
                          f"(prompts from {origin[0]} on)")
    out = np.full(n, np.nan)
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardError(f"reward function {f.spec} returned {v!r} for the completion of "
                              f"{origin[i]} (a finite number or None is expected)")
        out[i] = float(v)
    return out


def call(f: RewardFunction, prompts: list, completions: list, columns: dict[str, list],
         origin: list[str], workers: int = 1) -> np.ndarray:
    """`f` on one batch (split into `workers` chunks run in threads), checked: float64 [n]."""
    kwargs = {k: v for k, v in columns.items() if f.accepts(k)}
    n = len(completions)

    def run(a: int, b: int):
        out = f.fn(prompts[a:b], completions[a:b], **{k: v[a:b] for k, v in kwargs.items()})
        return asyncio.run(out) if inspect.isawaitable(out) else out

    bounds = np.linspace(0, n, max(min(workers, n), 1) + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:]))
    try:
        if len(chunks) == 1:
            parts = [run(0, n)]
        else:
            with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
                parts = list(pool.map(lambda ab: run(*ab), chunks))
    except Exception as e:
        raise RewardError(f"reward function {f.spec} raised {type(e).__name__}: {e} (on the "
                          f"batch of prompts from {origin[0]} on)") from e
    values = [v for part, (a, b) in zip(parts, chunks)
              for v in _valid(part, b - a, f, origin[a:b])]
    return np.asarray(values, np.float64)


class FunctionRewards:
    """The reward functions as the RL loop's and the evaluation's host-side scorer:
    `__call__(prompts, samples)` -> {function name: [B, K] float32 on the mesh, NaN where it
    had no opinion}, each process scoring only the rows its devices hold (`place(n, read)`,
    `Run.batch`), and `time` the seconds each function took in the last call.

    prompts: {"ids", "mask" [B, P], "row" [B]} (row: the prompt's index in the task's records of
    `split`); samples: `SampleOutput` [B, K, N]."""

    def __init__(self, fns: list[RewardFunction], task, split: str, place, workers: int = 1):
        self.fns, self.task, self.split, self.place = fns, task, split, place
        self.workers, self.time = workers, {}
        self.weights = {f.name: f.weight for f in fns}

    def __call__(self, prompts: dict, samples) -> dict:
        rows, tokens, mask = to_host((prompts["row"], samples.tokens, samples.mask))
        B, K, _ = tokens.shape
        self.time = {f.name: 0.0 for f in self.fns}

        def read(a: int, b: int) -> dict:
            records = self.task.prompt_records(self.split, rows[a:b])
            ids = [t[m.astype(bool)].tolist() for t, m in
                   zip(tokens[a:b].reshape(-1, tokens.shape[-1]),
                       mask[a:b].reshape(-1, mask.shape[-1]))]
            texts = self.task.tokenizer.batch_decode(ids, skip_special_tokens=True)
            conversational = [isinstance(p, list) for p in records.prompts]
            completions = [[{"role": "assistant", "content": t}] if conversational[i // K] else t
                           for i, t in enumerate(texts)]
            rep = lambda xs: [x for x in xs for _ in range(K)]
            columns = {k: rep(v) for k, v in records.columns.items()}
            columns["completion_ids"] = ids
            out = {}
            for f in self.fns:
                t0 = time.perf_counter()
                out[f.name] = call(f, rep(records.prompts), completions, columns,
                                   rep(records.origin), self.workers
                                   ).astype(np.float32).reshape(b - a, K)
                self.time[f.name] += time.perf_counter() - t0
            return out
        return self.place(B, read)
