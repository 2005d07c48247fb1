"""A config checked and resolved: every field against its `Annotated` checks
(`check_fields`), and `resolve`, which derives once what depends on the machine and the
checkpoints (the mesh over the devices, the architectures of the checkpoints a run starts from,
the stages a dataset allows) and checks what spans several fields. Nothing is read but those
checkpoints' config.json files; the first problem is a `ConfigError` naming its key."""
from __future__ import annotations

import dataclasses
import sys

import jax

from p3o_jax import hf
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import ConfigError, field_checks
from p3o_jax.config import ExperimentConfig, MeshConfig
from p3o_jax.lora import adapted_weights
from p3o_jax.model import ModelConfig, init_params
from p3o_jax.preflight import check_lengths


def need(ok, key: str, msg: str) -> None:
    """Raise `ConfigError` naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key {key!r}: {msg}")


def check_fields(cfg, prefix: str = "") -> None:
    """Every field of the dataclass tree `cfg` against its `Annotated` checks."""
    for name, checks in field_checks(type(cfg)).items():
        value, key = getattr(cfg, name), prefix + name
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        elif value is not None:
            for check in checks:
                for item in value if isinstance(value, tuple) else (value,):
                    if problem := check.problem(item):
                        raise ConfigError(f"config key {key!r}: {problem}")


def mesh_sizes(mesh: MeshConfig, n_devices: int) -> MeshConfig:
    """`mesh` with its -1 axis resolved over `n_devices`; ConfigError if it does not fit."""
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    need(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
    fixed = 1
    for s in sizes:
        fixed *= max(s, 1)
    need(n_devices % fixed == 0 and (-1 in sizes or fixed == n_devices), "mesh",
         f"data*fsdp*tensor={fixed} does not fit {n_devices} devices")
    sizes = [n_devices // fixed if s == -1 else s for s in sizes]
    return MeshConfig(*sizes)


def resolve(cfg: ExperimentConfig, n_devices: int) -> ExperimentConfig:
    """The config a run uses, derived once: the mesh over `n_devices`, the architectures of the
    checkpoints it starts from (`base_model`'s or `pretrained_sft`'s config.json for `policy`,
    `pretrained_rm`'s for `reward_model`; the configured ones keep their say on dtypes only),
    and the checks across fields. Nothing is read but those config.json files."""
    check_fields(cfg)
    need(cfg.rl.rollout_devices < n_devices, "rl.rollout_devices",
         f"{cfg.rl.rollout_devices} leaves none of the {n_devices} devices for training")
    need(not cfg.rl.rollout_devices or jax.process_count() == 1, "rl.rollout_devices",
         "takes one process's devices (several processes: leave it 0)")
    cfg = dataclasses.replace(cfg, mesh=mesh_sizes(cfg.mesh, n_devices - cfg.rl.rollout_devices))
    if cfg.task == "toy":
        need(not cfg.smoke, "smoke", "is for the real-data tasks (tldr, hh); toy is offline")
    else:
        need(cfg.data.tokenizer or cfg.base_model or cfg.pretrained_sft or cfg.smoke,
             "data.tokenizer", "set it (an HF name or local folder), base_model or pretrained_sft")
    need(not (cfg.smoke and cfg.task == "dataset"), "smoke", "is for task=tldr|hh")
    need(cfg.stage_list, "stages", "name at least one of sft, rm, rl")
    if cfg.task == "dataset":
        cfg = dataset_stages(cfg)
    m = cfg.mesh
    batch_ways = m.data * m.fsdp
    for key, b in (("sft.batch_size", cfg.sft.batch_size), ("rm.batch_size", cfg.rm.batch_size),
                   ("rl.prompts_per_iter", cfg.rl.prompts_per_iter)):
        need(b % batch_ways == 0, key, f"{b} is not divisible by data*fsdp={batch_ways}")
    rl = cfg.rl
    need(rl.prompts_per_iter % rl.minibatches == 0, "rl.minibatches",
         f"must divide rl.prompts_per_iter={rl.prompts_per_iter}")
    mb = rl.prompts_per_iter // rl.minibatches
    need(mb % batch_ways == 0, "rl.minibatches",
         f"minibatch of {mb} prompts is not divisible by data*fsdp={batch_ways}")
    need(not (cfg.base_model and cfg.pretrained_sft), "pretrained_sft",
         "SFT does not run when RL starts from a pretrained SFT policy: drop base_model")
    for key, field in (("base_model", "policy"), ("pretrained_sft", "policy"),
                       ("pretrained_rm", "reward_model")):
        if getattr(cfg, key):
            cfg = dataclasses.replace(cfg, **{field: architecture(cfg, key, field)})
    for name, model in (("policy", cfg.policy), ("reward_model", cfg.rm_model)):
        need(model.n_heads % m.tensor == 0, f"{name}.n_heads",
             f"{model.n_heads} is not divisible by mesh.tensor={m.tensor}")
        if cfg.export_hf:
            try:
                hf.config_to_hf(model)
            except ValueError as e:
                raise ConfigError(f"config key 'export_hf': the {name} has no HF form ({e}); "
                                  f"change it or set export_hf=false") from None
    need(not (rl.lora.rank and rl.train_top_layers), "rl.train_top_layers",
         "train either LoRA adapters (rl.lora.rank > 0) or the top layers, not both")
    need(rl.train_top_layers <= cfg.policy.n_layers, "rl.train_top_layers",
         f"{rl.train_top_layers} > the policy's n_layers={cfg.policy.n_layers}")
    if rl.lora.rank:
        shapes = jax.eval_shape(lambda: init_params(cfg.policy, jax.random.key(0)))
        need(adapted_weights(rl.lora, shapes), "rl.lora.targets",
             f"the policy ({cfg.policy.family}) has none of {rl.lora.targets}")
    check_lengths(cfg)  # against each model's positions (p3o_jax/preflight.py)
    return cfg


def dataset_stages(cfg: ExperimentConfig) -> ExperimentConfig:
    """task=dataset: the stages follow the data. Without `data.preferences` no reward model is
    trained (the reward is `reward_fns`, or `pretrained_rm`); without demonstrations
    (`data.sft`, or the chosen responses of `data.preferences`) SFT does not run and RL starts
    from `base_model` itself. Each stage left out is said on stderr."""
    d, stages, notes = cfg.data, list(cfg.stage_list), []
    need(d.sft or d.preferences or d.prompts, "data.prompts",
         "task=dataset reads your own data: set data.prompts, data.sft or data.preferences")
    need(not ALGORITHMS[cfg.algo].offline or d.preferences, "data.preferences",
         f"algo={cfg.algo} trains on preference pairs: set data.preferences")
    need(d.preferences or cfg.reward_fns or cfg.pretrained_rm, "reward_fns",
         "no reward: set reward_fns (functions), data.preferences (a reward model is trained "
         "on them) or pretrained_rm")
    if "rm" in stages and not d.preferences:
        stages.remove("rm")
        notes.append("rm (no data.preferences; the reward is "
                     + ("pretrained_rm" if cfg.pretrained_rm else "reward_fns") + ")")
    if not (d.sft or d.preferences):   # nothing to fine-tune on: RL starts from base_model
        if "sft" in stages:
            need(cfg.base_model or cfg.pretrained_sft, "base_model",
                 "no data.sft or data.preferences to train SFT on: set base_model (RL starts "
                 "from it) or pretrained_sft")
            stages.remove("sft")
            notes.append(f"sft (no data.sft or data.preferences; RL starts from "
                         f"{cfg.pretrained_sft or cfg.base_model})")
        if cfg.base_model and not cfg.pretrained_sft:
            cfg = dataclasses.replace(cfg, pretrained_sft=cfg.base_model, base_model="")
    need(stages, "stages", f"nothing left to run of {cfg.stages} with this data")
    if notes and jax.process_index() == 0:
        print(f"stages: left out {'; '.join(notes)}", file=sys.stderr)
    return dataclasses.replace(cfg, stages=",".join(stages))


def architecture(cfg: ExperimentConfig, key: str, field: str) -> ModelConfig:
    """The model config of checkpoint `cfg.<key>` (its config.json: a local folder, or the hub
    into its cache), with the dtypes of `cfg.<field>`."""
    dtypes = cfg.policy if field == "policy" else cfg.rm_model
    try:
        return hf.config_from_hf(hf.resolve(getattr(cfg, key)), dtype=dtypes.dtype,
                                 param_dtype=dtypes.param_dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key {key!r}: {e}") from None
