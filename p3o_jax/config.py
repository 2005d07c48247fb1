"""Experiment configuration: one dataclass tree, every hyper-parameter in one place.

An experiment is a Python file `experiments/<name>.py` with a `config() -> ExperimentConfig`.
Every command (train, frontier, bench, memory plan) takes the same grammar: `key=value`,
dotted for nested fields, values parsed by the field's type (tuples comma-separated):

    python -m p3o_jax.cli.train exp=toy algo=ppo rl.beta=0.1 policy.d_model=128 stages=rl

A field states what a valid value is beside its type (`Annotated[int, Positive]`,
p3o_jax/checks.py). `from_args` parses and checks every field; `resolve` then derives, once,
what depends on the machine and the checkpoint (mesh sizes, the base model's architecture,
whether to recompute pi_old's log-probs) and checks what spans several fields (batches over
the mesh, lengths over positions). Both run before any checkpoint is read or anything compiles,
and stop at the first problem with a `ConfigError`: one line naming the key (exit 2).
`smoke=true` shrinks a real-data experiment to an offline run of a minute (`smoke_config`); the
other keys on the command line still apply on top of it.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import types
import typing
from typing import Annotated

import jax

from p3o_jax import hf
from p3o_jax.algos import ALGORITHMS
from p3o_jax.algos.dpo import DPOConfig
from p3o_jax.algos.grpo import GRPOConfig
from p3o_jax.algos.gspo import GSPOConfig
from p3o_jax.algos.p3o import P3OConfig
from p3o_jax.algos.ppo import PPOConfig
from p3o_jax.algos.reward_model import RMConfig
from p3o_jax.algos.rloo import RLOOConfig
from p3o_jax.algos.sft import SFTConfig
from p3o_jax.checks import (Check, ConfigError, ExistingDir, JsonStrings, ModelSource, NonNegative, OneOf, Pattern,
                            Positive, Range, RewardSpecs, Sources, STAGES, SubsetOf,
                            WritableDir, field_checks)
from p3o_jax.data.builders import HH_SUBSETS
from p3o_jax.data.fixtures import TOKENIZER_VOCAB
from p3o_jax.data.validate import ON_BAD_RECORD
from p3o_jax.logger import LogConfig
from p3o_jax.lora import LoraConfig, adapted_weights
from p3o_jax.model import ModelConfig, init_params
from p3o_jax.preflight import check_lengths
from p3o_jax.toy_task import ToyTaskConfig
from p3o_jax.train_state import OptimConfig

COLUMN = Pattern(r"[\w.-]+", "a column name (letters, digits, '_', '.', '-')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class AxisSize(Check):
    """A mesh axis: a positive size, or -1 for all the devices the other axes leave."""

    def problem(self, value):
        return None if value == -1 or value > 0 else f"must be > 0 or -1 (the rest), got {value}"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: Annotated[int, AxisSize()] = 1
    fsdp: Annotated[int, AxisSize()] = -1       # -1: all remaining devices
    tensor: Annotated[int, AxisSize()] = 1


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL loop every online algorithm shares: rollouts, the KL-regularised objective's
    beta, the update's epochs and minibatches. Each algorithm's own settings are its config
    group (`p3o`, `ppo`, `dpo`, `rloo`, `grpo`, `gspo`)."""
    iterations: Annotated[int, Positive] = 100
    prompts_per_iter: Annotated[int, Positive] = 64
    n_samples: Annotated[int, Range(2)] = 2     # responses per prompt (k > 2: all pairs)
    epochs: Annotated[int, Positive] = 4
    minibatches: Annotated[int, Positive] = 1
    beta: Annotated[float, NonNegative] = 0.05  # KL coefficient (PPO: its starting value)
    temperature: Annotated[float, Positive] = 1.0
    top_k: Annotated[int, NonNegative] = 0
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    eval_every: Annotated[int, NonNegative] = 0  # > 0: evaluate on the eval prompts every N
                                    # iterations and at the end ("eval:<algo>" rows)
    reward_offset: Annotated[float, NonNegative] = 0.0  # adds scale * delta(x), a fixed
                                    # N(0,1)-like value per prompt, to the RM's scores: the
                                    # invariance experiment (rl.prompt_offset)
    recompute_logp_old: bool | None = None  # False: pi_old's log-probs are the sampler's; True:
                                    # a training forward recomputes them; None: recompute unless
                                    # the policy computes in float32 (in bfloat16 the cached
                                    # decode and the full forward round apart)
    pack_prompts: bool = True       # each prompt pass (prefill, scoring, every minibatch of
                                    # the update) runs on the prompts' real tokens packed back
                                    # to back (p3o_jax/packing.py); one process only
    sampler_gather_once: bool = True  # FSDP: the sampler all-gathers the policy's weights
                                    # once per call (a compute-dtype copy per device); false:
                                    # each block's at every decode step (two blocks resident,
                                    # the whole model moved per token; sampler.weights_for_decode)
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=5)
    lora: LoraConfig = LoraConfig()     # rank > 0: train LoRA adapters, not the policy
                                    # (p3o_jax/lora.py)
    train_top_layers: Annotated[int, NonNegative] = 0  # N > 0: train the top N blocks, final
                                    # norm and untied LM head only (p3o_jax/top_layers.py); 0: all


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Real data: the TFDS datasets of `p3o_jax.data` (task=tldr|hh) or your own files
    (task=dataset), and the tokenizer."""
    data_dir: Annotated[str, WritableDir()] = ""    # where the datasets are built (once);
                                                    # "" = TFDS's default
    manual_dir: Annotated[str, ExistingDir()] = ""  # upstream files placed by hand
    hh_subsets: Annotated[str, SubsetOf(*HH_SUBSETS)] = ",".join(HH_SUBSETS)  # task=hh
    tokenizer: Annotated[str, ModelSource()] = ""   # HF name or local folder; "" = base_model's
    prompt_len: Annotated[int, Positive] = 512      # P: TL;DR posts are cut to fit, HH keeps
                                                    # the last P tokens
    response_len: Annotated[int, Positive] = 53     # N: generated tokens; SFT/RM targets keep
                                                    # their first N
    on_bad_record: Annotated[str, OneOf(*ON_BAD_RECORD)] = "raise"  # raise (file:line) | skip
    stop_sequences: Annotated[str, JsonStrings()] = ""  # JSON list of strings ending a sampled
                                    # response, e.g. ["\n\nHuman:"] (cut, EOS appended)
    # task=dataset: your own data (p3o_jax/data/own.py). Each is a comma list of sources,
    # LOCATION[:split=S][:config=C][:weight=W]: a .jsonl/.json/.parquet/.csv/.arrow file, a
    # save_to_disk folder or a hub dataset; several are mixed by their weights
    sft: Annotated[str, Sources()] = ""          # demonstrations: prompt + completion, or
                                                 # messages
    preferences: Annotated[str, Sources()] = ""  # prompt + chosen + rejected (or chosen +
                                                 # rejected alone); with them the rm stage
                                                 # trains a reward model
    prompts: Annotated[str, Sources()] = ""      # RL prompts; "" = the prompts of data.sft or
                                                 # data.preferences
    eval: Annotated[str, Sources()] = ""         # held-out prompts; "" = a slice of the prompts
                                                 # held out (eval_prompts, at most a tenth)
    prompt_key: Annotated[str, COLUMN] = "prompt"  # the columns' names
    completion_key: Annotated[str, COLUMN] = "completion"
    messages_key: Annotated[str, COLUMN] = "messages"
    chosen_key: Annotated[str, COLUMN] = "chosen"
    rejected_key: Annotated[str, COLUMN] = "rejected"
    wrap_prompts: bool = False      # render plain-string prompts as one user turn (and their
                                    # completions as the assistant's) with the chat template
    long_prompts: Annotated[str, OneOf("truncate", "filter")] = "truncate"  # prompts over
                                    # prompt_len tokens: keep their last tokens, or drop them

    @property
    def hh_subset_list(self) -> tuple[str, ...]:
        return tuple(s for s in self.hh_subsets.split(",") if s)

    @property
    def stop_sequence_list(self) -> tuple[str, ...]:
        """`stop_sequences` parsed (checked by its `JsonStrings`)."""
        return tuple(json.loads(self.stop_sequences)) if self.stop_sequences else ()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Per-stage checkpoints under `<out_dir>/ckpt/<stage>` (p3o_jax/checkpoint.py); a stage
    also saves on a signal and at its end."""
    every_steps: Annotated[int, NonNegative] = 100      # save every N steps (0: off)
    every_minutes: Annotated[float, NonNegative] = 10.0  # after the first step, then whenever
                                                        # M minutes have passed (0: off)
    keep: Annotated[int, Positive] = 3                  # the last K checkpoints of a stage
    async_save: bool = True                             # write while training goes on
    max_nonfinite: Annotated[int, Positive] = 5         # stop after K skipped updates in a row


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Several processes in one run (p3o_jax/distributed.py). Under SLURM (`srun`), Open MPI
    and on Cloud TPU VMs nothing needs setting: jax reads the coordinator and the process ids
    from the cluster. Elsewhere give all three, here or as the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    coordinator: Annotated[str, Pattern(r"|[\w.-]+:\d+", "host:port")] = ""   # "": env/cluster
    num_processes: Annotated[int, NonNegative] = 0  # 0: env, else the cluster's; 1: no set-up
    process_id: Annotated[int, Range(-1)] = -1      # -1: env, else the cluster's
    init_timeout_s: Annotated[int, Positive] = 300  # how long processes wait for each other
    check_memory: bool = False      # before compiling: stop if p3o_jax.memory_plan's estimate
                                    # of a stage exceeds the per-device budget
    hbm_gib: Annotated[float, NonNegative] = 0.0    # that budget in GiB; 0: the device's own


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: Annotated[str, Pattern(r"[\w.-]+", "a name of letters, digits, '.', '_', '-'")] = "toy"
    task: Annotated[str, OneOf("toy", "tldr", "hh", "dataset")] = "toy"  # dataset: data.* files
    algo: Annotated[str, OneOf(*ALGORITHMS)] = "p3o"
    stages: Annotated[str, SubsetOf(*STAGES)] = "sft,rm,rl"
    seed: Annotated[int, NonNegative] = 0
    out_dir: Annotated[str, WritableDir()] = "runs/toy"
    eval_prompts: Annotated[int, Positive] = 512
    log_every: Annotated[int, Positive] = 10
    log: LogConfig = LogConfig()    # log.backends=jsonl,tensorboard,wandb (p3o_jax/logger.py)
    policy: ModelConfig = ModelConfig()       # with base_model: only dtype, param_dtype used
    reward_model: ModelConfig | None = None   # None: same architecture as the policy
    base_model: Annotated[str, ModelSource()] = ""  # HF name or local folder SFT starts from
    pretrained_sft: Annotated[str, ModelSource()] = ""  # an SFT policy (HF name or folder) that
                                    # RL starts from instead of training one (stage sft)
    pretrained_rm: Annotated[str, ModelSource()] = ""   # a *ForSequenceClassification reward
                                    # model used instead of training one (stage rm); its own
                                    # tokenizer, if it has another, scores re-tokenised text
    reward_fns: Annotated[str, RewardSpecs()] = ""  # reward functions, a comma list of module:function,
                                    # file.py:function, built-ins (p3o_jax/rewards.py) or
                                    # verl:<those>; the reward is their weighted sum, plus the
                                    # reward model's score when one is trained or given
                                    # (p3o_jax/reward_fns.py)
    reward_weights: tuple[float, ...] = ()  # one per reward function, then optionally the
                                    # reward model's; () = all 1
    reward_workers: Annotated[int, Positive] = 1  # threads each reward function's batch is
                                    # split over (for functions that wait on a service)
    export_hf: bool = True          # each trained stage also writes <out_dir>/hf/<stage>, a
                                    # folder transformers loads (p3o_jax/cli/export.py: any
                                    # checkpoint)
    smoke: bool = False             # tiny offline run of a real-data experiment (smoke_config)
    mesh: MeshConfig = MeshConfig()
    toy: ToyTaskConfig = ToyTaskConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    rl: RLConfig = RLConfig()
    p3o: P3OConfig = P3OConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    rloo: RLOOConfig = RLOOConfig()
    grpo: GRPOConfig = GRPOConfig()
    gspo: GSPOConfig = GSPOConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: bool = True             # continue each stage from its checkpoints; false: start over
    dist: DistConfig = DistConfig()

    @property
    def rm_model(self) -> ModelConfig:
        return self.reward_model or self.policy

    @property
    def stage_list(self) -> tuple[str, ...]:
        return tuple(s for s in self.stages.split(",") if s)

    @property
    def prompt_len(self) -> int:
        return self.toy.prompt_len if self.task == "toy" else self.data.prompt_len

    @property
    def response_len(self) -> int:
        return self.toy.response_len if self.task == "toy" else self.data.response_len

    @property
    def uses_reward_model(self) -> bool:
        """Whether a reward model scores RL's responses: one is trained here (stage rm) or
        given (`pretrained_rm`), or, without reward functions, the one an earlier run trained."""
        return bool(self.pretrained_rm) or "rm" in self.stage_list or not self.reward_fns

    @property
    def recompute_old(self) -> bool:
        """Whether the RL loop recomputes pi_old's log-probs (`rl.recompute_logp_old`)."""
        if self.rl.recompute_logp_old is None:
            return self.policy.dtype != "float32"
        return self.rl.recompute_logp_old


# ---------------------------------------------------------------------------------------------
# key=value

def _parse(key: str, text: str, kind):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_parse(key, t, item) for t in text.split(",") if t)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r}: expected a bool, got {text!r}")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {text!r}") from None
    raise ConfigError(f"config key {key!r}: cannot be set from the command line")


def override(cfg, key: str, text: str, _prefix: str = ""):
    """Return a copy of dataclass `cfg` with dotted `key` set from the string `text`."""
    head, _, rest = key.partition(".")
    full = _prefix + head
    hints = typing.get_type_hints(type(cfg))
    if head not in hints:
        near = difflib.get_close_matches(head, hints, n=1)
        raise ConfigError(f"unknown config key {full!r}"
                          + (f"; did you mean {_prefix + near[0]!r}?" if near else "")
                          + " (--help lists every key)")
    current = getattr(cfg, head)
    if rest:
        if current is None and head == "reward_model":
            current = cfg.policy
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {full + '.' + rest!r}")
        value = override(current, rest, text, full + ".")
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full!r} is a group; set one of its fields ({full}.<field>)")
    else:
        value = _parse(full, text, hints[head])
    try:
        if hasattr(cfg, "rebased"):   # ModelConfig: head_dim, d_ff, ... follow d_model etc.
            return cfg.rebased(**{head: value})
        return dataclasses.replace(cfg, **{head: value})
    except ValueError as e:  # a dataclass's own validation (e.g. ModelConfig)
        raise ConfigError(f"config key {full!r}: {e}") from None


def key_values(argv: list[str]) -> list[tuple[str, str]]:
    """`key=value` arguments as pairs (a leading `--` is allowed)."""
    pairs = []
    for a in argv:
        key, sep, value = a.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {a!r}: expected key=value")
        pairs.append((key, value))
    return pairs


def tool_args(argv: list[str], tool):
    """Split a command line between a tool's own settings (`tool`, a dataclass; its fields are
    set from the matching keys) and the rest, returned as `key=value` strings for `from_args`."""
    own = {f.name for f in dataclasses.fields(tool)}
    rest = []
    for key, value in key_values(argv):
        if key.partition(".")[0] in own:
            tool = override(tool, key, value)
        else:
            rest.append(f"{key}={value}")
    check_fields(tool)
    return tool, rest


# ---------------------------------------------------------------------------------------------
# validation

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
    cfg = dataclasses.replace(cfg, mesh=mesh_sizes(cfg.mesh, n_devices))
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


# ---------------------------------------------------------------------------------------------
# building a config

def load_experiment(name_or_path: str) -> ExperimentConfig:
    """`toy` -> experiments/toy.py; or a path to any .py file with `config()`."""
    path = name_or_path
    if not path.endswith(".py"):
        path = os.path.join(ROOT, "experiments", f"{name_or_path}.py")
    if not os.path.exists(path):
        raise ConfigError(f"config key 'exp': no experiment file {path}")
    spec = importlib.util.spec_from_file_location(f"experiment_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config()


def smoke_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """What `smoke=true` makes of a real-data experiment: SFT -> RM -> RL, a few steps each,
    then the table, offline and in about a minute on a CPU. The data paths and the tokenizer
    are emptied, so that the run generates them under `<out_dir>/smoke_data`
    (`p3o_jax.data.fixtures.smoke_data`: tiny upstream-format files, a tokenizer trained on
    them), and the policy is a tiny GPT-NeoX trained from scratch. Outputs go to
    `<out_dir>-smoke`."""
    fast = OptimConfig(lr=1e-3, warmup_steps=0)
    return dataclasses.replace(
        cfg, smoke=True, out_dir=cfg.out_dir.rstrip("/") + "-smoke", eval_prompts=8,
        log_every=1, base_model="", reward_model=None,  # keeps pretrained_sft/_rm if given
        policy=ModelConfig(family="gpt_neox", vocab_size=TOKENIZER_VOCAB, d_model=32, n_layers=2,
                           n_heads=4, d_ff=64, max_len=128, rotary_pct=0.5),
        data=dataclasses.replace(cfg.data, data_dir="", manual_dir="", tokenizer="",
                                 prompt_len=96, response_len=16),
        sft=dataclasses.replace(cfg.sft, steps=4, batch_size=8, optim=fast),
        rm=dataclasses.replace(cfg.rm, n_pairs=80, steps=4, batch_size=8, optim=fast),
        rl=dataclasses.replace(cfg.rl, iterations=2, prompts_per_iter=8, minibatches=1),
    )


def from_args(argv: list[str]) -> ExperimentConfig:
    """The config of `exp=NAME key=value ...` (with `smoke=true`: on `smoke_config`), every
    field checked. `exp` may be given once."""
    pairs = key_values(argv)
    exps = [v for k, v in pairs if k == "exp"]
    need(len(exps) <= 1, "exp", f"given {len(exps)} times ({', '.join(exps)}); give it once")
    exp = exps[0] if exps else "toy"

    def build(base: ExperimentConfig) -> ExperimentConfig:
        for key, value in pairs:
            if key != "exp":
                base = override(base, key, value)
        return base
    cfg = build(load_experiment(exp))
    if cfg.smoke:
        cfg = build(smoke_config(load_experiment(exp)))
    check_fields(cfg)
    return cfg
