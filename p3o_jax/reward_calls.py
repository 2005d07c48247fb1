"""Reward functions: programs that score the policy's responses, beside or instead of a
reward model (`reward_fns=`, `reward_weights=`, `reward_workers=`): their loading, their calls
and the scorer the RL loop and the evaluation run (`FunctionRewards`).

`reward_fns` is a comma list (`checks.parse_reward_specs`); each entry is
`package.module:function`, `path/to/file.py:function`, a built-in name
(p3o_jax/builtin_rewards.py: `math_answer`, ...), or any of these after `verl:` for verl's
`compute_score`, or a reward server's URL (`http://host:port/path`: OpenRLHF's remote reward
protocol, p3o_jax/remote_rewards.py; `reward_remote.*`). Each function is called as TRL's
GRPOTrainer calls it, by keyword, on a batch:

    f(prompts=..., completions=..., completion_ids=..., **columns, truncated=...,
      trainer_state=...) -> list[float | None]

`prompts[i]` the row's prompt as the data has it (a string or a list of messages),
`completions[i]` the decoded response (for a conversation: `[{"role": "assistant", "content":
text}]`), `completion_ids[i]` its token ids (EOS included), every other column of the prompt's
row (and `answer`, read from `data.answer_key` when that names another column, and the
arguments of `data.reward_columns`, each read from a column or a dotted path), `truncated[i]`
whether the response was cut at `response_len` without a stop token, and `trainer_state`
(`TrainerState`). A function without `**kwargs` gets those it names. `async def` functions are
awaited. A value is a number, None ("no opinion": that sample gets nothing from that function)
or verl's dict `{"score": ..., **extras}`, whose numeric extras are logged as
`reward/<name>/<extra>`. The reward is `sum_f w_f r_f` (+ `w_rm` times the reward model's score
when a reward model is present; `reward_weights`: one weight per function, then optionally the
reward model's; default 1). With `reward_workers=N > 1` each call is split into N chunks run in
a thread pool (for functions that wait: a service, a sandbox).

`verl:` entries are called as verl's reward manager calls them, per response:
`compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`, the ground truth from
the `reward_model` column's "ground_truth", else a `ground_truth` column, else `answer`.

A function that cannot be imported, has positional-only parameters or requires an argument no
call gives is a `ConfigError` at start-up; one that raises, returns the wrong length, NaN or inf
stops the run with `RewardError`, one line naming the function and the prompt's row, the same
line on every process (p3o_jax/cli/train.py: exit 3; the last checkpoint is intact).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from p3o_jax.builtin_rewards import builtin, text_of
from p3o_jax.checks import ConfigError, RewardSpec, parse_reward_specs
from p3o_jax.data.own import column_value, has_column
from p3o_jax.distributed import gather_texts, process_rows, to_host
from p3o_jax.remote_rewards import RemoteConfig, RemoteReward
from p3o_jax.rollout import truncated
from p3o_jax.sharding import shard_batch

RESERVED = ("gold", "reward", "rm", "kl_k1", "kl_k3", "length")  # `evaluate.summarize`'s columns
PASSED = ("prompts", "completions", "completion_ids", "truncated", "trainer_state")  # and columns
REMOTE_PASSED = ("query", "prompt_texts")   # a reward server's only (the rendered sequence)
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
GROUND_TRUTH = ("reward_model", "ground_truth", "answer")  # verl's, in order
TRL_CALL = "f(prompts=, completions=, completion_ids=, **columns, trainer_state=)"


class RewardError(RuntimeError):
    """A reward function failed on a batch (raised, wrong length, NaN or inf)."""


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What reward functions get as `trainer_state` (TRL passes its TrainerState)."""
    global_step: int = 0    # the RL iteration whose responses are scored; in evaluation, the
                            # iterations the evaluated policy was trained (0: the SFT policy)
    max_steps: int = 0      # rl.iterations
    epoch: float = 0.0      # passes over the RL prompts so far (0 where they never repeat: toy)


def _parameters(fn: Callable) -> list[inspect.Parameter]:
    """`fn`'s parameters; a callable without a signature is taken to accept any keyword."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes the keyword argument `name` (by name, or in its **kwargs)."""
    ps = _parameters(fn)
    return any(p.kind is p.VAR_KEYWORD for p in ps) or any(p.name == name for p in ps)


def required(fn: Callable) -> list[str]:
    """The arguments `fn` cannot be called without."""
    return [p.name for p in _parameters(fn)
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    name: str           # what the metrics call it: reward/<name>
    spec: RewardSpec    # its `reward_fns` entry
    fn: Callable        # called as TRL calls it (verl's compute_score: `verl_adapter`'s)
    weight: float = 1.0


def _import(spec: RewardSpec, response_len: int, remote: RemoteConfig) -> Callable:
    if spec.remote:
        return RemoteReward(spec.where, remote)
    if not spec.where:
        return builtin(spec.function, response_len)
    try:
        if spec.where.endswith(".py"):
            module_name = f"reward_file_{os.path.splitext(os.path.basename(spec.where))[0]}"
            loader = importlib.util.spec_from_file_location(module_name, spec.where)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec.where)
    except Exception as e:
        raise ConfigError(f"config key 'reward_fns': {spec.text}: cannot import {spec.where} "
                          f"({type(e).__name__}: {e})") from None
    fn = getattr(module, spec.function, None)
    if not callable(fn):
        raise ConfigError(f"config key 'reward_fns': {spec.text}: {spec.where} has no function "
                          f"{spec.function!r}")
    return fn


def check_signature(fn: Callable, spec: RewardSpec) -> None:
    """ConfigError unless `fn` can be called by keyword as TRL (or, for `verl:`, verl's reward
    manager) calls it; whether the data has the columns it requires waits for `check_columns`."""
    signature = f"{spec.function}({', '.join(map(str, _parameters(fn)))})"
    positional = [p.name for p in _parameters(fn) if p.kind is p.POSITIONAL_ONLY]
    if positional:
        raise ConfigError(f"config key 'reward_fns': {spec.text}: {signature} has positional-only "
                          f"parameters {positional}; reward functions are called by keyword")
    if spec.verl:
        if not all(accepts(fn, a) for a in VERL_ARGS) or set(required(fn)) - set(VERL_ARGS):
            raise ConfigError(f"config key 'reward_fns': {spec.text} must take verl's "
                              f"compute_score(data_source, solution_str, ground_truth, "
                              f"extra_info); it is {signature}")
    elif not accepts(fn, "completions"):
        raise ConfigError(f"config key 'reward_fns': {spec.text} must accept completions= "
                          f"(it is called as {TRL_CALL}); it is {signature}")


def verl_adapter(compute_score: Callable) -> Callable:
    """verl's `compute_score` as a reward function: called per response as verl's reward
    manager calls it, `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`,
    with the row's `data_source` ("" without that column), ground truth (`GROUND_TRUTH`: the
    `reward_model` column's "ground_truth", else `ground_truth`, else `answer`; a row with none
    gets None, no opinion) and `extra_info` (a copy; {} without one). Its float or dict is
    returned as it is."""
    def verl_score(completions, data_source=None, reward_model=None, ground_truth=None,
                   answer=None, extra_info=None, **kwargs):
        n = len(completions)
        column = lambda values: [None] * n if values is None else values
        out = []
        for c, source, rm, truth, a, info in zip(completions, column(data_source),
                                                 column(reward_model), column(ground_truth),
                                                 column(answer), column(extra_info)):
            truth = next((t for t in ((rm or {}).get("ground_truth"), truth, a) if t is not None),
                         None)
            out.append(None if truth is None else compute_score(
                data_source="" if source is None else source, solution_str=text_of(c),
                ground_truth=truth, extra_info=dict(info or {})))
        return out
    return verl_score


def load(text: str, weights: tuple[float, ...], has_rm: bool, response_len: int,
         remote: RemoteConfig = RemoteConfig()) -> tuple[list[RewardFunction], float]:
    """The functions of `reward_fns` with their weights, and the reward model's weight: every
    entry imported and its signature checked, every reward server asked whether it answers
    (ConfigError naming the key). `response_len`: what the built-in soft_overlong_punishment
    counts to; `remote`: how reward servers are called."""
    try:
        specs = parse_reward_specs(text)
    except ValueError as e:
        raise ConfigError(f"config key 'reward_fns': {e}") from None
    n = len(specs)
    if len(weights) not in (0, n, n + has_rm):
        raise ConfigError(f"config key 'reward_weights': {len(weights)} weights for {n} "
                          f"reward functions{' and a reward model' if has_rm else ''}; give "
                          f"{n}{f' or {n + 1}' if has_rm else ''}")
    w = list(weights) or [1.0] * n
    out = []
    for spec, weight in zip(specs, w):
        fn = _import(spec, response_len, remote)
        check_signature(fn, spec)
        if spec.remote:
            fn.check()
        out.append(RewardFunction(spec.name, spec, verl_adapter(fn) if spec.verl else fn, weight))
    names = [f.name for f in out]   # each name once, and none an evaluation column's
    out = [dataclasses.replace(f, name=f.spec.text)
           if names.count(f.name) > 1 or f.name in RESERVED else f for f in out]
    return out, (w[n] if len(w) > n else 1.0)


def check_columns(fns: list[RewardFunction], columns: set[str], where: str) -> None:
    """ConfigError when a function requires an argument no call gives: a column the prompts
    (`where`, with `columns`, those of data.answer_key and data.reward_columns included) lack, or for
    verl no ground truth at all."""
    for f in fns:
        if f.spec.verl and not columns & set(GROUND_TRUTH):
            raise ConfigError(f"config key 'reward_fns': {f.spec.text} needs a ground truth: a "
                              f"reward_model column with ground_truth, a ground_truth column or "
                              f"data.answer_key's column; {where} has {sorted(columns)}")
        labels = f.fn.config.labels if f.spec.remote else ""
        if labels not in ("", "answer") and labels not in columns:
            raise ConfigError(f"config key 'reward_remote.labels': {labels!r} is no column of "
                              f"{where}; it has {sorted(columns)}")
        missing = [c for c in required(f.fn)
                   if c not in columns and c not in PASSED + REMOTE_PASSED * f.spec.remote]
        if missing:
            raise ConfigError(f"config key 'reward_fns': {f.spec.text} needs the column(s) "
                              f"{missing}, which {where} lacks; it has {sorted(columns)}")


def with_paths(columns: dict[str, list], paths: dict[str, str]) -> dict[str, list]:
    """The columns reward functions get: the prompts' own, plus each argument of `paths`
    (`DataConfig.reward_column_paths`: `answer` from data.answer_key, data.reward_columns) read
    from its column or dotted path into a struct column ("reward_model.ground_truth"), where
    the prompts have that column."""
    found = {name: path for name, path in paths.items() if has_column(columns, path)}
    if not found:
        return columns
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return columns | {name: [column_value(r, path) for r in rows] for name, path in found.items()}


def path_columns(columns: set[str], paths: dict[str, str]) -> set[str]:
    """`columns` of the prompts, with the arguments `with_paths` adds."""
    return columns | {name for name, path in paths.items() if has_column(columns, path)}


def _score(value, f: RewardFunction, origin: str):
    """One returned value as (reward or NaN, {extra: number}); RewardError naming the row."""
    extras = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise RewardError(f"reward function {f.spec.text} returned a dict without 'score' "
                              f"for the completion of {origin}")
        extras = {k: float(v) for k, v in value.items() if k != "score"
                  and isinstance(v, numbers.Real) and math.isfinite(v)}
        value = value["score"]
    if value is None:
        return math.nan, extras
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardError(f"reward function {f.spec.text} returned {value!r} for the completion "
                          f"of {origin} (a finite number or None is expected)")
    return float(value), extras


def _valid(values, n: int, f: RewardFunction, origin: list[str]):
    """The function's output as float64 [n] (NaN for None) and its extras {name: [n]}."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {f.spec.text} returned {got} for {n} completions "
                          f"(prompts from {origin[0]} on)")
    scored = [_score(v, f, o) for v, o in zip(values, origin)]
    names = sorted({k for _, extras in scored for k in extras})
    return (np.array([s for s, _ in scored], np.float64),
            {k: np.array([e.get(k, math.nan) for _, e in scored], np.float64) for k in names})


def call(f: RewardFunction, inputs: dict[str, list], origin: list[str], workers: int = 1,
         trainer_state: TrainerState = TrainerState()):
    """`f` on one batch (`inputs`: `PASSED`'s lists and the columns, n each; split into
    `workers` chunks run in threads), checked: (float64 [n], {extra: float64 [n]})."""
    kwargs = {k: v for k, v in inputs.items()
              if accepts(f.fn, k) and (f.spec.remote or k not in REMOTE_PASSED)}
    n = len(inputs["completions"])
    state = {"trainer_state": trainer_state} if accepts(f.fn, "trainer_state") else {}

    def run(a: int, b: int):
        out = f.fn(**{k: v[a:b] for k, v in kwargs.items()}, **state)
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
        raise RewardError(f"reward function {f.spec.text} raised {type(e).__name__}: {e} (on the "
                          f"batch of prompts from {origin[0]} on)") from e
    checked = [_valid(part, b - a, f, origin[a:b]) for part, (a, b) in zip(parts, chunks)]
    names = sorted({k for _, extras in checked for k in extras})
    return (np.concatenate([s for s, _ in checked]),
            {k: np.concatenate([e.get(k, np.full(len(s), np.nan)) for s, e in checked])
             for k in names})


def agree(error: str | None, names: list[str]) -> tuple[str | None, list[str]]:
    """What every process of the run scored: the first process's error, if any had one, and
    every extra metric any of them returned (a collective with several processes), so that
    all stop with the same line, or all place the same arrays."""
    reports = [json.loads(t) for t in gather_texts(json.dumps([error, names]))]
    errors = [e for e, _ in reports if e]
    return (errors[0] if errors else None), sorted({n for _, ns in reports for n in ns})


class FunctionRewards:
    """The reward functions as the RL loop's and the evaluation's host-side scorer:
    `__call__(prompts, samples)` -> {function name: [B, K] float32 on the mesh, NaN where it
    had no opinion, and "<name>/<extra>" for verl-style extras}, each process scoring only the
    rows its devices hold, and `time` the seconds each function took in the last call.

    prompts: {"ids", "mask" [B, P], "row" [B]} (row: the prompt's index in the task's records of
    `split`); samples: `SampleOutput` [B, K, N]. A response that does not end with one of
    `task.eos_ids` was cut at its length (`truncated`); `column_paths`: more arguments read
    from columns (`with_paths`); `trainer_state`: what the functions get (`at` gives a scorer
    with another)."""

    def __init__(self, fns: list[RewardFunction], task, split: str, mesh, workers: int = 1,
                 column_paths: dict[str, str] | None = None,
                 trainer_state: TrainerState = TrainerState()):
        self.fns, self.task, self.split, self.mesh = fns, task, split, mesh
        self.workers, self.column_paths = workers, column_paths or {}
        self.trainer_state, self.time = trainer_state, {}
        self.weights = {f.name: f.weight for f in fns}

    def at(self, trainer_state: TrainerState) -> "FunctionRewards":
        """This scorer, its functions given `trainer_state`."""
        return FunctionRewards(self.fns, self.task, self.split, self.mesh, self.workers,
                               self.column_paths, trainer_state)

    def __call__(self, prompts: dict, samples) -> dict:
        rows, tokens, mask = to_host((prompts["row"], samples.tokens, samples.mask))
        rendered = any(f.spec.remote for f in self.fns)   # reward servers get the prompts' text
        ids = to_host((prompts["ids"], prompts["mask"])) if rendered else None
        self.time = {f.name: 0.0 for f in self.fns}
        parts, error = [], None
        for a, b in process_rows(self.mesh, len(rows)):
            try:
                parts.append(self.score(rows[a:b], tokens[a:b], mask[a:b],
                                        ids and (ids[0][a:b], ids[1][a:b])))
            except RewardError as e:
                error = str(e)
                break
        error, names = agree(error, sorted({k for p in parts for k in p}))
        if error:
            raise RewardError(error)
        return shard_batch({k: np.concatenate([p.get(k, np.full_like(p[self.fns[0].name], np.nan))
                                               for p in parts]) for k in names}, self.mesh)

    def score(self, rows, tokens, mask, prompt_ids=None) -> dict[str, np.ndarray]:
        """{name (and name/extra): [b, K] float32} of the responses tokens, mask [b, K, N] to
        the prompts of `rows` [b]; `prompt_ids`: the prompts' (ids, mask) [b, P], which reward
        servers get rendered (`REMOTE_PASSED`)."""
        b, K, N = tokens.shape
        records = self.task.prompt_records(self.split, rows)
        tokens, mask = tokens.reshape(-1, N), mask.reshape(-1, N)
        ids = [t[m.astype(bool)].tolist() for t, m in zip(tokens, mask)]
        texts = self.task.tokenizer.batch_decode(ids, skip_special_tokens=True)
        rep = lambda xs: [x for x in xs for _ in range(K)]
        prompts = rep(records.prompts)
        inputs = {k: rep(v) for k, v in with_paths(records.columns, self.column_paths).items()}
        inputs |= {"prompts": prompts, "completion_ids": ids,
                   "completions": [[{"role": "assistant", "content": t}] if isinstance(p, list)
                                   else t for p, t in zip(prompts, texts)],
                   "truncated": truncated(tokens, mask, self.task.eos_ids).tolist()}
        if any(f.spec.remote for f in self.fns):
            inputs |= self.rendered(prompt_ids, ids, K)
        out = {}
        for f in self.fns:
            t0 = time.perf_counter()
            scores, extras = call(f, inputs, rep(records.origin), self.workers, self.trainer_state)
            self.time[f.name] += time.perf_counter() - t0
            out[f.name] = scores.astype(np.float32).reshape(b, K)
            out |= {f"{f.name}/{k}": v.astype(np.float32).reshape(b, K) for k, v in extras.items()}
        return out

    def rendered(self, prompt_ids, response_ids: list[list[int]], K: int) -> dict[str, list]:
        """`REMOTE_PASSED`: each prompt and each whole sequence as the policy saw them (template
        and stop tokens kept), from the prompts' (ids, mask) [b, P] and the responses'."""
        if prompt_ids is None:
            raise ValueError("reward servers need the prompts' ids (FunctionRewards.score)")
        decode = lambda ids: self.task.tokenizer.batch_decode(ids, skip_special_tokens=False)
        prompts = [p[m.astype(bool)].tolist() for p, m in zip(*prompt_ids) for _ in range(K)]
        return {"prompt_texts": decode(prompts),
                "query": decode([p + r for p, r in zip(prompts, response_ids)])}
