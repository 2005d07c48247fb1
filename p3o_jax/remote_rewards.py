"""Rewards that run elsewhere: OpenRLHF's remote reward protocol, the client that a
`reward_fns=http://host:port/path` entry calls (`RemoteReward`) and the server that serves any
reward functions over it (`serve`; `python -m p3o_jax.cli.reward_server`).

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
import re
import signal
import urllib.parse
from typing import Annotated

from p3o_jax.checks import ConfigError, NonNegative, Positive

BACKOFF_S = 0.5


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """How `reward_fns=http://...` entries are called (p3o_jax/remote_rewards.py)."""
    labels: str = "answer"              # the argument sent as "labels": a column, `answer`
                                        # (data.answer_key's; nulls where the prompts lack it)
                                        # or a data.reward_columns name; "": nulls
    batch: Annotated[int, Positive] = 64            # responses per request
    concurrency: Annotated[int, Positive] = 4       # requests in flight at once
    timeout_s: Annotated[float, Positive] = 60.0    # per request
    retries: Annotated[int, NonNegative] = 3        # after a failed request, before stopping


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


def check_url(entry: str) -> str | None:
    """What is wrong with a `reward_fns` URL entry, or None."""
    parts = urllib.parse.urlsplit(entry)
    if not parts.hostname:
        return f"{entry!r}: a reward server URL needs a host (http://host:port/path)"
    return None


def remote_name(url: str) -> str:
    """What the metrics call a reward server: remote_<host>_<port>_<path>."""
    parts = urllib.parse.urlsplit(url)
    return "remote_" + re.sub(r"\W+", "_", parts.netloc + parts.path).strip("_")


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
        try:
            asyncio.run(self._post(None, {"query": [], "prompts": [], "labels": []}, retries=0))
        except ServerFailed as e:
            if e.status is None:
                raise ConfigError(f"config key 'reward_fns': the reward server {self.url} does "
                                  f"not answer ({e.reason})") from None

    async def __call__(self, query, prompt_texts, completions, trainer_state=None, **columns):
        import aiohttp   # here: `import p3o_jax.config` stays light
        c = self.config
        labels = columns.get(c.labels) if c.labels else None   # None: nulls (checked at start)
        sent = {k: v for k, v in columns.items() if _jsonable(v)}   # prompts as the data has
        state = {} if trainer_state is None else dataclasses.asdict(trainer_state)   # them too
        n = len(query)
        limit = asyncio.Semaphore(c.concurrency)
        timeout = aiohttp.ClientTimeout(total=c.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
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

    async def _post(self, session, body: dict, retries: int) -> dict:
        import aiohttp
        if session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await self._post(session, body, retries)
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
        raise AssertionError("unreachable")


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


def make_app(fns, workers: int = 1):
    """An aiohttp application that scores POSTed batches (the protocol above) with `fns`
    (`reward_calls.load`'s functions, each called as a local run calls it, with the request's
    `columns`; its `labels` are also the `labels` and, unless a column has that name, the
    `answer` argument; an OpenRLHF client's `completions` are its query after the prompt
    text): "rewards" is their
    weighted sum (null where every function had no opinion), "extra_logs" each function's
    values and extras under its name."""
    from aiohttp import web
    from p3o_jax.reward_calls import TrainerState, call   # reward_calls imports this module

    async def score(request):
        try:
            body = await request.json()
            query = body["query"]
            n = len(query)
            prompts = body.get("prompts") or [""] * n
            completions = body.get("completions") or [
                q[len(p):] if q.startswith(p) else q for q, p in zip(query, prompts)]
            columns = dict(body.get("columns") or {})
            if body.get("labels") is not None:   # OpenRLHF's gold answers: also `answer`
                columns.setdefault("labels", body["labels"])
                columns.setdefault("answer", body["labels"])
            inputs = {"prompts": prompts, "completions": completions,
                      "completion_ids": [[] for _ in range(n)],
                      "truncated": [False] * n, **columns}
            state = TrainerState(**(body.get("trainer_state") or {}))
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"bad request: {type(e).__name__}: {e}"},
                                     status=400)
        if not n:
            return web.json_response({"rewards": [], "scores": [], "extra_logs": {}})
        origin = [f"request row {i}" for i in range(n)]
        try:
            results = await asyncio.to_thread(
                lambda: [(f, *call(f, inputs, origin, workers, state)) for f in fns])
        except Exception as e:   # a RewardError: the same batch would fail again, so 422
            return web.json_response({"error": str(e)}, status=422)   # (not retried)
        total = [0.0] * n
        seen = [False] * n
        logs = {}
        for f, values, extras in results:
            logs[f.name] = [None if math.isnan(v) else float(v) for v in values]
            logs |= {f"{f.name}/{k}": [None if math.isnan(v) else float(v) for v in e]
                     for k, e in extras.items()}
            for i, v in enumerate(values):
                if not math.isnan(v):
                    total[i] += f.weight * float(v)
                    seen[i] = True
        rewards = [t if s else None for t, s in zip(total, seen)]
        return web.json_response({"rewards": rewards, "scores": rewards, "extra_logs": logs})

    app = web.Application(client_max_size=256 * 2 ** 20)
    app.router.add_post("/{tail:.*}", score)
    return app


def serve(fns, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve `fns` on host:port until SIGINT or SIGTERM (any path takes the POST); once it
    listens, one line says so on stdout."""
    from aiohttp import web

    def stop(signum, frame):
        raise web.GracefulExit()
    signal.signal(signal.SIGTERM, stop)
    listening = f"serving {', '.join(f.name for f in fns)} on http://{host}:{port}"
    web.run_app(make_app(fns, workers), host=host, port=port,
                print=lambda _: print(listening, flush=True))
