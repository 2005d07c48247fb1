"""Memory plans on the command line: bytes per device of each stage, before anything compiles
(the estimate itself: p3o_jax/memory_plan.py).

    python -m p3o_jax.cli.memory_plan                                 # presets x TPU slices
    python -m p3o_jax.cli.memory_plan model=pythia-6.9b slice=v5e-16 mesh.tensor=2
    python -m p3o_jax.cli.memory_plan exp=tldr slice=v4-8 rl.minibatches=8 [key=value ...]

Keys of this command: `model` (a preset architecture of MODELS), `slice` (devices and HBM of
SLICES), `devices` and `hbm_gib` (instead of a slice); every other key overrides the experiment
(`exp=tldr` by default), as for train. Exit 1 when the plan does not fit the HBM.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Annotated

from p3o_jax import model as M
from p3o_jax.checks import NonNegative, OneOf
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_args import from_args, tool_args
from p3o_jax.config_resolve import resolve
from p3o_jax.memory_plan import GIB, SLICES, MemoryPlanError, StagePlan, make_plan

# Architectures of the hub checkpoints (their config.json), for plans without a download.
MODELS = {
    "pythia-410m": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=1024,
                                 n_layers=24, n_heads=16, d_ff=4096, max_len=2048,
                                 rotary_pct=0.25),
    "pythia-1b": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=2048, n_layers=16,
                               n_heads=8, d_ff=8192, max_len=2048, rotary_pct=0.25),
    "pythia-2.8b": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=2560,
                                 n_layers=32, n_heads=32, d_ff=10240, max_len=2048,
                                 rotary_pct=0.25),
    "pythia-6.9b": M.ModelConfig(family="gpt_neox", vocab_size=50432, d_model=4096,
                                 n_layers=32, n_heads=32, d_ff=16384, max_len=2048,
                                 rotary_pct=0.25),
    "llama-7b": M.ModelConfig(family="llama", vocab_size=32000, d_model=4096, n_layers=32,
                              n_heads=32, d_ff=11008, max_len=4096),
    "llama-3-8b": M.ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32,
                                n_heads=32, n_kv_heads=8, d_ff=14336, max_len=8192,
                                rope_theta=500000.0),
}

@dataclasses.dataclass(frozen=True)
class PlanArgs:
    model: Annotated[str, OneOf("", *MODELS)] = ""
    slice: Annotated[str, OneOf("", *SLICES)] = ""
    devices: Annotated[int, NonNegative] = 0        # instead of a slice
    hbm_gib: Annotated[float, NonNegative] = 0.0    # instead of a slice


def with_preset(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """`cfg` with the policy (and reward model) of preset `name`, its dtypes and
    `policy.remat` kept (and `base_model`'s tokenizer as `data.tokenizer`: nothing is read)."""
    policy = dataclasses.replace(MODELS[name], dtype=cfg.policy.dtype,
                                 param_dtype=cfg.policy.param_dtype, remat=cfg.policy.remat)
    data = dataclasses.replace(cfg.data, tokenizer=cfg.data.tokenizer or cfg.base_model)
    return dataclasses.replace(cfg, policy=policy, reward_model=None, base_model="", data=data)


def overview(exp: str = "tldr", models=("pythia-1b", "pythia-2.8b", "pythia-6.9b", "llama-7b"),
             slices=("v4-8", "v4-32", "v5e-8", "v5e-16")) -> str:
    """A markdown table: `exp`'s settings with each preset on each slice, FSDP over all chips
    or over half of them x tensor parallelism 2. The RL stage's components, then the peak
    of the worst stage of the run and whether it fits the chips' HBM: as it is, with remat,
    or with remat and the sampler gathering block by block (`rl.sampler_gather_once=false`)."""
    base = from_args([f"exp={exp}"])
    gib = lambda b: f"{b / GIB:.1f}"
    lines = ["| model | slice (chips x GiB) | fsdp x tensor | params | opt state | ref + RM | "
             "sampling | P3O act. | act. remat | RL peak | worst stage: peak / remat | fits |",
             "|---" * 12 + "|"]
    for name in models:
        cfg = with_preset(base, name)
        for slice_name in slices:
            chips, hbm, _ = SLICES[slice_name]
            for t in (1, 2):
                mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=t)
                plan = make_plan(dataclasses.replace(cfg, mesh=mesh), chips)
                streamed = make_plan(dataclasses.replace(cfg, mesh=mesh, rl=dataclasses.replace(
                    cfg.rl, sampler_gather_once=False)), chips)
                rl = next(s for s in plan.stages if s.stage == "rl")
                worst = max(plan.stages, key=StagePlan.peak)
                fits = ("yes" if plan.peak() <= hbm * GIB else
                        "with remat" if plan.peak(remat=True) <= hbm * GIB else
                        "with remat, streamed sampler" if streamed.peak(remat=True) <= hbm * GIB
                        else "no")
                lines.append(
                    f"| {name} | {slice_name} ({chips} x {hbm}) | {chips // t} x {t} | "
                    f"{gib(rl.params)} | {gib(rl.opt_state)} | {gib(rl.frozen)} | "
                    f"{gib(rl.sampling)} | {gib(rl.activations)} | {gib(rl.activations_remat)} | "
                    f"{gib(rl.peak())} | {worst.stage}: {gib(plan.peak())} / "
                    f"{gib(plan.peak(remat=True))} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=PlanArgs(), exp="tldr"))
        return 0
    if not argv:
        print(overview())
        return 0
    try:
        args, rest = tool_args(argv, PlanArgs())
        exp = [] if any(a.startswith("exp=") for a in rest) else ["exp=tldr"]
        cfg = from_args(exp + rest)
        if args.model:
            cfg = with_preset(cfg, args.model)
        chips, hbm, hosts = SLICES[args.slice] if args.slice else (args.devices or 1, 0, 1)
        hbm = args.hbm_gib or hbm
        plan = make_plan(resolve(cfg, chips), chips)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"{args.slice} ({hosts} hosts)" if args.slice else f"{chips} devices"
    print(f"{where}, mesh {plan.mesh}; GiB per device:\n{plan.table()}")
    if hbm:
        try:
            plan.check(int(hbm * GIB))
        except MemoryPlanError as e:
            print(f"does not fit: {e}", file=sys.stderr)
            return 1
        print(f"fits in {hbm} GiB per device (peak {plan.peak() / GIB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
