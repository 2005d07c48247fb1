"""What a run can know before it computes, checked before it computes.

A run that trains SFT for an hour and then finds that its reward model folder holds a causal
LM, or that the stage it starts from was never trained, has lost that hour. These checks stop
such runs first, with one line naming the key (a `ConfigError`, exit 2): `check_lengths` (the
config alone, part of `config_resolve.resolve`), `check(cfg)` (files on disk, before the task's data
is built) and `check_vocabularies(cfg, task)` (once its tokenizer is known), both called by
`run_experiment` before anything compiles. They cover:

- the earlier stages a run loads instead of training (`stages=rl`: `<out_dir>/sft`, `rm`, and
  for offline DPO `preferences.npz`), with where they were looked for and how to make them
  (a later stage's output, which only the final table reads, is a warning);
- every pretrained folder's architecture (`config_resolve.resolve` read it) and role, from its
  config.json and safetensors headers (`hf.check_role`): a policy needs an LM head, a
  reward model one score;
- sequence lengths against each model's positions: past a learned position table
  (GPT-2) is an error, past a RoPE model's trained context (`max_len`, its
  max_position_embeddings) a warning;
- each tokenizer's vocabulary against the embedding of the model that reads its ids.
"""
from __future__ import annotations

import os
import warnings

from p3o_jax import hf
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import STAGES, ConfigError
from p3o_jax.retokenize import same_vocabulary


def _error(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: {msg}")


def _positions(key: str, name: str, model, parts: str, length: int) -> None:
    """`length` tokens (`parts`, for the message) against `model`'s positions."""
    if length <= model.max_len:
        return
    if model.rotary_dim == 0:   # a learned position table: no position past it exists
        raise _error(key, f"{parts} = {length} > the {name}'s max_len={model.max_len} (its "
                          f"position table)")
    warnings.warn(f"{parts} = {length} is past the {name}'s trained context of "
                  f"{model.max_len} positions (RoPE extrapolates, but quality past it is "
                  f"untested)", RuntimeWarning, stacklevel=3)


def check_lengths(cfg) -> None:
    """Prompt + response lengths against the positions of the models that read them (a reward
    model with a tokenizer of its own: `check_vocabularies`)."""
    P, N = cfg.prompt_len, cfg.response_len
    key = f"{'toy' if cfg.task == 'toy' else 'data'}.response_len"
    _positions(key, "policy", cfg.policy, f"prompt_len + response_len = {P} + {N}", P + N)
    if cfg.uses_reward_model and cfg.rm_model != cfg.policy:
        _positions(key, "reward_model", cfg.rm_model,
                   f"prompt_len + response_len = {P} + {N}", P + N)


def _missing_stages(cfg) -> None:
    """The outputs of the stages left out, which the pipeline loads instead: an earlier
    stage's (the input of a stage that runs) missing is an error; a later one's, which only
    the final table reads (the reward model after `stages=sft`), a warning, since the stages
    that run are trained and saved before that table stops the run."""
    stages = cfg.stage_list
    wanted = [("sft", "sft", "pretrained_sft=<an HF causal LM folder>", cfg.pretrained_sft)]
    if cfg.uses_reward_model:
        wanted.append(("rm", "rm", "pretrained_rm=<an HF *ForSequenceClassification folder>",
                       cfg.pretrained_rm))
    if "rl" in stages and ALGORITHMS[cfg.algo].offline:
        wanted.append(("rm", "preferences.npz", "", ""))
    missing = [(stage, output, instead) for stage, output, instead, pretrained in wanted
               if stage not in stages and not pretrained
               and not os.path.exists(os.path.join(cfg.out_dir, output))]
    if not missing:
        return
    needs = " and ".join(
        f"the {stage} stage's {'params' if output == stage else 'preference data'} (looked for "
        f"at {os.path.abspath(os.path.join(cfg.out_dir, output))})"
        for stage, output, _ in missing)
    make = ",".join(s for s in STAGES if s in stages or any(s == m[0] for m in missing))
    instead = ", ".join(i for _, _, i in missing if i)
    how = (f"make {'it' if len(missing) == 1 else 'them'} with the same command and "
           f"stages={make} (same out_dir)" + (f", or set {instead}" if instead else ""))
    first = min(STAGES.index(s) for s in stages)
    if all(STAGES.index(stage) > first for stage, _, _ in missing):
        warnings.warn(f"stages={cfg.stages}: the final table needs {needs}, which is not "
                      f"there: the run will stop after its stages are saved; {how}",
                      RuntimeWarning, stacklevel=3)
        return
    raise _error("stages", f"stages={cfg.stages} needs {needs}: not there; {how}")


def _roles(cfg) -> None:
    folders = [("base_model", "policy"), ("pretrained_sft", "policy")]
    if cfg.uses_reward_model:
        folders.append(("pretrained_rm", "reward"))
    for key, role in folders:
        if getattr(cfg, key):
            try:
                hf.check_role(getattr(cfg, key), role)
            except (OSError, ValueError) as e:   # HFFormatError is a ValueError
                raise _error(key, str(e)) from None


def check_vocabularies(cfg, task) -> None:
    """The reward model's vocabulary against the ids it reads: the task's tokens (the policy's
    are checked beside this call in `run_experiment`) or, with a tokenizer of its own, that
    tokenizer's; then it reads re-tokenised responses of up to twice `response_len` tokens
    (p3o_jax/retokenize.py), checked against its positions."""
    if not cfg.uses_reward_model:
        return
    key, n = "reward_model.vocab_size", task.vocab_size
    if cfg.pretrained_rm:
        import transformers  # heavy import, only needed here (config imports this module)
        try:
            own = transformers.AutoTokenizer.from_pretrained(hf.resolve(cfg.pretrained_rm))
        except (OSError, ValueError):   # no tokenizer files: it reads the task's tokens
            own = None
        if own is not None and not same_vocabulary(own, task.tokenizer):
            key, n = "pretrained_rm", len(own)
            P, N = cfg.prompt_len, cfg.response_len
            _positions(key, "reward model", cfg.rm_model,
                       f"prompt_len + 2 * response_len (re-tokenised) = {P} + {2 * N}", P + 2 * N)
    if cfg.rm_model.vocab_size < n:
        raise _error(key, f"the reward model's vocab_size={cfg.rm_model.vocab_size} < the "
                          f"{n} ids of the tokenizer it reads")


def check(cfg) -> None:
    """What `cfg` (resolved) reads from disk, before the task's data is built or anything
    compiles."""
    _missing_stages(cfg)
    _roles(cfg)
