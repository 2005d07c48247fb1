"""Serve reward functions over OpenRLHF's remote reward protocol, so that a verifier runs on
other machines than the training (p3o_jax/remote_rewards.py).

    python -m p3o_jax.cli.reward_server math_answer,final_answer_format port=8000
    python -m p3o_jax.cli.reward_server verl:verl.utils.reward_score:default_compute_score
    python -m p3o_jax.cli.reward_server my_rewards.py:correct host=0.0.0.0 port=8000 workers=8

and in the run: `reward_fns=http://<host>:8000/score` (any path). The first argument is a
`reward_fns` list (local files, modules, built-ins, verl:), each function called as a local run
calls it, their reward the weighted sum (`weights=`); each function's values are sent back as
"extra_logs". Exit 2 for a list that cannot be loaded or a port that cannot be bound (one
line), 0 on SIGINT/SIGTERM.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
import sys
from typing import Annotated

from aiohttp import web

from p3o_jax.checks import ConfigError, Positive, Range, RewardSpecs, parse_reward_specs
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.config_args import tool_args
from p3o_jax.reward_calls import TrainerState, call, load


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    fns: Annotated[str, RewardSpecs()] = ""     # the reward_fns list (or the first argument)
    weights: tuple[float, ...] = ()             # one per function; () = all 1
    host: str = "127.0.0.1"                     # 0.0.0.0: every interface
    port: Annotated[int, Range(0, 65535)] = 8000
    workers: Annotated[int, Positive] = 1       # threads each function's batch is split over
    response_len: Annotated[int, Positive] = 512  # what soft_overlong_punishment counts to


def make_app(fns, workers: int = 1):
    """An aiohttp application that scores POSTed batches (p3o_jax/remote_rewards.py) with `fns`
    (`reward_calls.load`'s functions, each called as a local run calls it, with the request's
    `columns`; its `labels` are also the `labels` and, unless a column has that name, the
    `answer` argument; an OpenRLHF client's `completions` are its query after the prompt
    text): "rewards" is their
    weighted sum (null where every function had no opinion), "extra_logs" each function's
    values and extras under its name."""
    from aiohttp import web

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

    def stop(signum, frame):
        raise web.GracefulExit()
    signal.signal(signal.SIGTERM, stop)
    listening = f"serving {', '.join(f.name for f in fns)} on http://{host}:{port}"
    web.run_app(make_app(fns, workers), host=host, port=port,
                print=lambda _: print(listening, flush=True))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, ServerArgs(), exp=None))
        return 0
    positional = [a for a in argv if "=" not in a]
    try:
        if len(positional) > 1:
            raise ConfigError(f"one reward_fns list expected, got {positional}")
        args, rest = tool_args([a for a in argv if a not in positional]
                               + [f"fns={a}" for a in positional], ServerArgs())
        if rest:
            raise ConfigError(f"unknown key(s) {[r.partition('=')[0] for r in rest]}")
        if not args.fns:
            raise ConfigError("config key 'fns': give the reward functions to serve")
        if any(s.remote for s in parse_reward_specs(args.fns)):
            raise ConfigError("config key 'fns': a reward server serves local functions, not "
                              "another server's URL")
        fns, _ = load(args.fns, args.weights, False, args.response_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        serve(fns, args.host, args.port, args.workers)
    except OSError as e:   # the port taken, the host unknown
        print(f"error: serving on {args.host}:{args.port} failed: {e.strerror or e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
