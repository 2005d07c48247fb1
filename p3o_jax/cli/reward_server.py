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

import dataclasses
import sys
from typing import Annotated

from p3o_jax.checks import ConfigError, Positive, Range, RewardSpecs, parse_reward_specs
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.config_args import tool_args


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    fns: Annotated[str, RewardSpecs()] = ""     # the reward_fns list (or the first argument)
    weights: tuple[float, ...] = ()             # one per function; () = all 1
    host: str = "127.0.0.1"                     # 0.0.0.0: every interface
    port: Annotated[int, Range(0, 65535)] = 8000
    workers: Annotated[int, Positive] = 1       # threads each function's batch is split over
    response_len: Annotated[int, Positive] = 512  # what soft_overlong_punishment counts to


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, ServerArgs(), exp=None))
        return 0
    from p3o_jax import remote_rewards, reward_calls
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
        fns, _ = reward_calls.load(args.fns, args.weights, False, args.response_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        remote_rewards.serve(fns, args.host, args.port, args.workers)
    except OSError as e:   # the port taken, the host unknown
        print(f"error: serving on {args.host}:{args.port} failed: {e.strerror or e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
