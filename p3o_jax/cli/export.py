"""Export any model of a run as a folder transformers loads.

    python -m p3o_jax.cli.export run=runs/toy stage=p3o                 # the finished policy
    python -m p3o_jax.cli.export run=runs/toy stage=rm                  # the reward model
    python -m p3o_jax.cli.export run=runs/toy stage=p3o step=40 to=/tmp/p3o-40   # a checkpoint

`stage` is `sft`, `rm` or an RL algorithm's name; without `step` the stage's final params
(`<run>/<stage>`), with it the train state of `<run>/ckpt/<stage>/<step>` (an RL run that
trained LoRA adapters or the top layers: joined to `<run>/sft`, adapters merged). Policies load with
`AutoModelForCausalLM`, the reward model with `AutoModelForSequenceClassification`. The
tokenizer comes from `tokenizer=` (HF name or folder), else from the run's own exports
(`<run>/hf/sft`, written when the run's stages finish). Output: `to`, by default
`<run>/hf/<stage>` (`<stage>-step<step>` for a checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Annotated

import orbax.checkpoint as ocp
import transformers

from p3o_jax import hf, storage
from p3o_jax.checks import ConfigError, ExistingDir, ModelSource, Pattern, Range, WritableDir
from p3o_jax.checkpoint import load_params
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.config import ExperimentConfig, RLConfig
from p3o_jax.config_args import tool_args
from p3o_jax.lora import LoraConfig
from p3o_jax.model import ModelConfig
from p3o_jax.rl import final_policy, frozen_policy
from p3o_jax.sharding import make_mesh
from p3o_jax.stop_tokens import read_eos_ids


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    run: Annotated[str, ExistingDir()] = ""
    stage: Annotated[str, Pattern(r"[\w-]+", "sft, rm or an algorithm's name")] = "sft"
    step: Annotated[int, Range(-1)] = -1        # -1: the finished stage's params
    to: Annotated[str, WritableDir()] = ""
    tokenizer: Annotated[str, ModelSource()] = ""


def run_config(run: str) -> dict:
    """The run's config.json."""
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"config key 'run': {path} is missing; is {run} a run's out_dir?")
    with open(path) as f:
        return json.load(f)


def run_model_config(run: str, stage: str) -> ModelConfig:
    """The architecture of `stage`'s model, from the run's config.json."""
    cfg = run_config(run)
    model = cfg["reward_model"] or cfg["policy"] if stage == "rm" else cfg["policy"]
    return ModelConfig(**model)


def whole_policy(args: ExportArgs, model_cfg: ModelConfig, trained: dict) -> dict:
    """An RL checkpoint's policy: the state's params, or, when the run trained a part of the
    policy (`rl.lora`, `rl.train_top_layers`), that part joined to the run's SFT policy (the
    frozen rest), adapters merged."""
    rl = run_config(args.run).get("rl", {})
    lora, top = rl.get("lora", {}), rl.get("train_top_layers", 0)
    if not (lora.get("rank") or top):
        return trained
    cfg = ExperimentConfig(rl=RLConfig(lora=LoraConfig(**lora), train_top_layers=top))
    sft = load_params(os.path.join(args.run, "sft"), model_cfg, make_mesh())
    return final_policy(cfg, trained, frozen_policy(cfg, sft))


def stage_params(args: ExportArgs, model_cfg: ModelConfig):
    """The finished stage's params, or those of its checkpoint at `args.step`."""
    if args.step < 0:
        path = os.path.join(args.run, args.stage)
        if not os.path.isdir(path):
            raise ConfigError(f"config key 'stage': {path} does not exist (not finished? give "
                              f"step=N of {os.path.join(args.run, 'ckpt', args.stage)})")
        return load_params(path, model_cfg, make_mesh())
    directory = os.path.abspath(os.path.join(args.run, "ckpt", args.stage))
    with ocp.CheckpointManager(directory) as manager:
        if args.step not in manager.all_steps():
            raise ConfigError(f"config key 'step': {directory} has steps {manager.all_steps()}")
        state = manager.restore(args.step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state
    params = state.get("train", state)["params"]    # RL's: the train state of a `rl.LoopState`
    return whole_policy(args, model_cfg, params["policy"]) if "policy" in params else params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=ExportArgs(), exp=None))
        return 0
    try:
        args, rest = tool_args(argv, ExportArgs())
        if rest or not args.run:
            raise ConfigError("config key 'run': give run=<out_dir> (keys: run, stage, step, "
                              "to, tokenizer)" + (f"; unknown: {rest}" if rest else ""))
        model_cfg = run_model_config(args.run, args.stage)
        params = stage_params(args, model_cfg)
        source = args.tokenizer or os.path.join(args.run, "hf", "sft")
        tokenizer = (transformers.AutoTokenizer.from_pretrained(source)
                     if os.path.isdir(source) or args.tokenizer else None)
        name = args.stage + (f"-step{args.step}" if args.step >= 0 else "")
        to = args.to or os.path.join(args.run, "hf", name)
        eos_ids = read_eos_ids(tokenizer, source) if tokenizer is not None else ()
        hf.save_pretrained(params, model_cfg, to, tokenizer=tokenizer,
                           as_reward_model=args.stage == "rm", eos_ids=eos_ids)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.WriteFailed as e:  # a full disk: nothing half-written in `to`
        print(f"error: {e}", file=sys.stderr)
        return storage.EXIT_IO_ERROR
    print(f"wrote {to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
