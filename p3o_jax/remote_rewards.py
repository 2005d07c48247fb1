"""Rewards that run elsewhere: OpenRLHF's remote reward protocol, the client that a
`reward_fns=http://host:port/path` entry calls (`RemoteReward`) and the server that serves any
reward functions over it (p3o_jax/cli/reward_server.py).

The protocol (OpenRLHF's `--remote_rm_url`): one POST of JSON per batch of responses,

    {"query": [prompt + response text], "prompts": [prompt text], "labels": [label]}
    -> {"rewards": [float]} (or {"scores": [float]}), optionally "extra_logs": {name: [float]}

`query` is the whole sequence as the policy saw it (chat template and stop token included),
`prompts` its rendered prompt, `labels` one column of the prompts' rows
(`reward_remote.labels`: a column, or a name of data.reward_columns for a dotted path; default
`answer`, data.answer_key's, null where the prompts have none). Two
fields beyond OpenRLHF's, which its servers ignore: `completions` (the response as TRL gives it
to reward functions: its clean text, or for a conversation `[{"role": "assistant", "content":
text}]`), `columns` (the rows' JSON-able columns, with TRL's `prompts` as the data has them,
`completion_ids` and `truncated`) and `trainer_state`, so that `serve` calls TRL-style and
verl-style functions exactly as a local run would. `extra_logs` are logged as
`reward/remote_<host>_<port>_<path>/<name>`; a value of null means "no opinion", as a local function's None.

Batches of `reward_remote.batch` responses go out at most `reward_remote.concurrency` at a
time, each retried `reward_remote.retries` times after a connection error, a timeout
(`reward_remote.timeout_s`) or a 5xx reply, with exponential backoff from 0.5 s. A server that
does not answer at start-up is a `ConfigError` (one line, before anything compiles); one that
fails mid-run past its retries raises, which the RL loop reports as a `RewardError` (exit 3;
the last checkpoint is intact, so the same command resumes once the server is back).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Annotated

from p3o_jax.checks import ConfigError, NonNegative, Pattern, Positive

BACKOFF_S = 0.5


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """How `reward_fns=http://...` entries are called (p3o_jax/remote_rewards.py)."""
    labels: Annotated[str, Pattern(r"|[A-Za-z_]\w*", "a name")] = "answer"  # sent as "labels":
                                        # a column, `answer` (data.answer_key's; nulls where
                                        # the prompts lack it) or a data.reward_columns name;
                                        # "": nulls
    batch: Annotated[int, Positive] = 64            # responses per request
    concurrency: Annotated[int, Positive] = 4       # requests in flight at once
    timeout_s: Annotated[float, Positive] = 60.0    # per request
    retries: Annotated[int, NonNegative] = 3        # after a failed request, before stopping


def _jsonable(values: list) -> bool:
    try:
        json.dumps(values)
        return True
    except (TypeError, ValueError):
        return False


class RemoteReward:
    """A reward function (called as TRL calls one, `async`) that POSTs its batch to a reward
    server: `await f(query=, prompt_texts=, completions=, **columns)` -> one value per
    completion: a float, None, or, with extra_logs, verl's dict {"score": ..., **extras}
    (p3o_jax/reward_calls.py logs the extras)."""

    def __init__(self, url: str, config: RemoteConfig = RemoteConfig()):
        self.url, self.config = url, config
        self.__name__ = url

    def check(self) -> None:
        """ConfigError unless the server answers (any HTTP reply will do: an empty batch)."""
        async def empty_batch():
            async with self._session() as session:
                return await self._post(session, {"query": [], "prompts": [], "labels": []}, 0)
        try:
            asyncio.run(empty_batch())
        except ServerFailed as e:
            if e.status is None:
                raise ConfigError(f"config key 'reward_fns': the reward server {self.url} does "
                                  f"not answer ({e.reason})") from None

    async def __call__(self, query, prompt_texts, completions, trainer_state=None, **columns):
        c = self.config
        labels = columns.get(c.labels) if c.labels else None   # None: nulls (checked at start)
        sent = {k: v for k, v in columns.items() if _jsonable(v)}   # prompts as the data has
        state = {} if trainer_state is None else dataclasses.asdict(trainer_state)   # them too
        n = len(query)
        limit = asyncio.Semaphore(c.concurrency)
        async with self._session() as session:
            async def one(a: int, b: int):
                body = {"query": query[a:b], "prompts": prompt_texts[a:b],
                        "labels": [None] * (b - a) if labels is None else labels[a:b],
                        "completions": completions[a:b],
                        "columns": {k: v[a:b] for k, v in sent.items()},
                        "trainer_state": state}
                async with limit:
                    return _values(await self._post(session, body, c.retries), b - a, self.url)
            parts = await asyncio.gather(*(one(a, min(a + c.batch, n))
                                           for a in range(0, n, c.batch)))
        return [v for part in parts for v in part]

    def _session(self):
        import aiohttp   # here: `import p3o_jax.config` stays light
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))

    async def _post(self, session, body: dict, retries: int) -> dict:
        """The server's JSON reply to `body`, retried `retries` times after a connection
        error, a timeout or a 5xx; ServerFailed after that, or at once for a 4xx."""
        import aiohttp
        for attempt in range(retries + 1):
            status, reason = None, ""
            try:
                async with session.post(self.url, json=body) as reply:
                    status = reply.status
                    if status < 400:
                        return await reply.json(content_type=None)
                    reason = f"HTTP {status}: {(await reply.text())[:200]}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if status is not None and status < 500 or attempt == retries:
                raise ServerFailed(self.url, status, reason, attempt + 1)
            await asyncio.sleep(BACKOFF_S * 2 ** attempt)


class ServerFailed(RuntimeError):
    """A reward server's request failed (after its retries)."""

    def __init__(self, url: str, status: int | None, reason: str, attempts: int):
        super().__init__(f"{url} failed after {attempts} attempt(s): {reason}")
        self.status, self.reason = status, reason


def _values(reply, n: int, url: str) -> list:
    """A server's reply as n values: floats (None for null) or {"score", **extra_logs}."""
    scores = reply.get("rewards", reply.get("scores")) if isinstance(reply, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        got = f"{len(scores)} rewards" if isinstance(scores, list) else repr(reply)[:200]
        raise ValueError(f"{url} answered {got} for {n} responses (expected "
                         f'{{"rewards": [...{n} numbers]}})')
    extras = {k: v for k, v in (reply.get("extra_logs") or {}).items()
              if isinstance(v, list) and len(v) == n}
    if not extras:
        return scores
    return [{"score": s, **{k: v[i] for k, v in extras.items()
                            if isinstance(v[i], (int, float)) and math.isfinite(v[i])}}
            for i, s in enumerate(scores)]
