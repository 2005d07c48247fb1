"""Compile a run's programs for a named TPU slice or GPU box on this host and print XLA's
memory per device beside the analytic plan's (the library: p3o_jax/compile_check.py).

    python -m p3o_jax.cli.compile_check model=pythia-6.9b target=v5e-16
    python -m p3o_jax.cli.compile_check model=pythia-6.9b target=h100-x8 rl.lora.rank=8 \\
        programs=rl_update jsonl=bench/compile_check.jsonl
    python -m p3o_jax.cli.compile_check exp=tldr target=v4-32 policy.remat=block mesh.tensor=2

Keys of this command: `target` (TPU: v4-8 v4-16 v4-32 v5e-4 v5e-8 v5e-16 v5e-32 v5p-8 v5p-16
v6e-8; NVIDIA: h100-x1 h100-x8 h100-x16 a100-80gb-x1 a100-80gb-x8), `model` (a preset
architecture of p3o_jax/cli/memory_plan.py's MODELS), `programs` (comma-separated, of sft_step
rm_step rl_generate rl_score rl_update; default all), `jsonl` (append the JSON lines to this
file too). Every other key overrides the experiment (`exp=tldr` by default), as for train:
`policy.remat=block`, `rl.train_top_layers=2`, `rl.lora.rank=8`, `mesh.tensor=2`, ...

Prints one JSON line per program as it compiles, then a table (GiB per device). TPU targets
need libtpu (`jax[tpu]`), NVIDIA ones jax-cuda12-plugin and jax-cuda12-pjrt (both in
requirements-test.txt); no accelerator is used. Exit 1 when a program does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Annotated

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the target, run nothing here

from p3o_jax.checks import OneOf  # noqa: E402
from p3o_jax.cli.help import help_text, wants_help  # noqa: E402
from p3o_jax.cli.memory_plan import MODELS, with_preset  # noqa: E402
from p3o_jax.compile_check import PROGRAMS, TARGETS, compile_check, table  # noqa: E402
from p3o_jax.checks import ConfigError  # noqa: E402
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_args import from_args, tool_args


@dataclasses.dataclass(frozen=True)
class CompileArgs:
    target: Annotated[str, OneOf(*TARGETS)] = "v5e-8"
    model: Annotated[str, OneOf("", *MODELS)] = ""
    programs: str = ",".join(PROGRAMS)
    jsonl: str = ""


def parse(argv: list[str]) -> tuple[CompileArgs, ExperimentConfig]:
    """This command's keys and the experiment the rest describe (`exp=tldr` by default, the
    `model` preset applied). Also reads back a JSON line's `args` (bench/compile_table.py)."""
    args, rest = tool_args(argv, CompileArgs())
    exp = [] if any(a.startswith("exp=") for a in rest) else ["exp=tldr"]
    cfg = from_args(exp + rest)
    return args, (with_preset(cfg, args.model) if args.model else cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=CompileArgs(), exp="tldr"))
        return 0
    try:
        args, cfg = parse(argv)
        names = tuple(p for p in args.programs.split(",") if p)
        unknown = set(names) - set(PROGRAMS)
        if unknown or not names:
            raise ConfigError(f"config key 'programs': {sorted(unknown) or 'none given'}; "
                              f"choose from {', '.join(PROGRAMS)}")
        rows = []
        for row in compile_check(cfg, args.target, names):
            row = dict(row, model=args.model or cfg.base_model or "custom",
                       args=" ".join(a for a in argv if not a.startswith("jsonl=")))
            line = json.dumps(row)
            print(line, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(line + "\n")
            rows.append(row)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = rows[0]
    print(f"\n{r['model']} on {r['target']} ({r['devices']} devices x {r['hbm_gib']} GiB), "
          f"mesh data x fsdp x tensor = {r['mesh']}, {r['mode']}, {r['algo']}, params/compute "
          f"{r['dtype']}; GiB per device:\n{table(rows)}")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
