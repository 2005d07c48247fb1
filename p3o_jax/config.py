"""Experiment configuration: one dataclass tree, every hyper-parameter in one place (the
schema; `--help` prints it, p3o_jax/cli/help.py).

An experiment is a Python file `experiments/<name>.py` with a `config() -> ExperimentConfig`.
Every command (train, frontier, compare, bench, memory plan) takes the same grammar: `key=value`,
dotted for nested fields, values parsed by the field's type (tuples comma-separated):

    python -m p3o_jax.cli.train exp=toy algo=ppo rl.beta=0.1 policy.d_model=128 stages=rl

A field states what a valid value is beside its type (`Annotated[int, Positive]`,
p3o_jax/checks.py). Apart from the schema: p3o_jax/config_args.py parses a command line into a
config (`from_args`, every field checked; `smoke=true`'s preset), p3o_jax/config_resolve.py
derives, once, what depends on the machine and the checkpoint (mesh sizes, the base model's
architecture, whether to recompute pi_old's log-probs) and checks what spans several fields.
Both run before any checkpoint is read or anything compiles, and stop at the first problem with
a `ConfigError`: one line naming the key (exit 2).

Each RL algorithm's own group (`p3o`, `ppo`, `dpo`, ...) comes with its `ALGORITHMS` entry
(p3o_jax/algos/__init__.py): a new algorithm edits nothing here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated

from p3o_jax.algos import ALGORITHMS
from p3o_jax.algos.reward_model import RMConfig
from p3o_jax.algos.sft import SFTConfig
from p3o_jax.checks import (Check, ColumnMap, ExistingDir, JsonObject, JsonStrings, ModelSource,
                            NonNegative, OneOf, Pattern, Positive, Range, RewardSpecs, Sources,
                            STAGES, SubsetOf, WritableDir)
from p3o_jax.data.builders import HH_SUBSETS
from p3o_jax.data.own import LONG_PROMPTS
from p3o_jax.data.validate import ON_BAD_RECORD
from p3o_jax.importance import MODES as ROLLOUT_IS_MODES
from p3o_jax.logger import LogConfig
from p3o_jax.lora import LoraConfig
from p3o_jax.model import ModelConfig
from p3o_jax.remote_rewards import RemoteConfig
from p3o_jax.toy_task import ToyTaskConfig
from p3o_jax.train_state import OptimConfig

COLUMN = Pattern(r"[\w.-]+", "a column name (letters, digits, '_', '.', '-')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# apply_chat_template's arguments that the data pipeline sets itself
RESERVED_TEMPLATE_KEYS = ("conversation", "tokenize", "add_generation_prompt",
                          "continue_final_message", "return_dict")


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
    pack_responses: bool = False    # scoring and every minibatch of the update run each prompt
                                    # and its responses' real tokens packed as trees (the
                                    # prompt once, its responses after it), not [P | N] rows
                                    # padded to response_len (p3o_jax/packing.py); one process
    sampler_gather_once: bool = True  # FSDP: the sampler all-gathers the policy's weights
                                    # once per call (a compute-dtype copy per device); false:
                                    # each block's at every decode step (two blocks resident,
                                    # the whole model moved per token; sampler.weights_for_decode)
    engine: Annotated[str, OneOf("static", "continuous")] = "static"  # the RL sampler:
                                    # static (a KV-cache row per response, decoded until the
                                    # longest ends) | continuous (`slots` rows refilled as
                                    # responses end; for long, uneven responses: p3o_jax/engine.py)
    slots: Annotated[int, NonNegative] = 0  # continuous: decode slots (0: a quarter of the
                                    # responses, at least 8); the KV cache holds this many rows
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=5)
    lora: LoraConfig = LoraConfig()     # rank > 0: train LoRA adapters, not the policy
                                    # (p3o_jax/lora.py)
    train_top_layers: Annotated[int, NonNegative] = 0  # N > 0: train the top N blocks, final
                                    # norm and untied LM head only (p3o_jax/top_layers.py); 0: all
    mask_truncated: bool = False    # responses cut at response_len without a stop token leave
                                    # the loss (TRL's mask_truncated_completions; P3O: their pairs)
    max_staleness: Annotated[int, NonNegative] = 0  # s > 0: generation runs up to s policy
                                    # versions ahead of the update, the reward functions of
                                    # one batch beside the sampling of the next (p3o_jax/rl.py);
                                    # 0: sample, score, update in turn
    rollout_is: Annotated[str, OneOf(*ROLLOUT_IS_MODES)] = "token"  # off-policy rollouts
                                    # (stale, or a sampler that rounds apart): the update's
                                    # gradient weighed by min(pi_prox / pi_behav, cap) per
                                    # token | sequence | none (p3o_jax/importance.py)
    rollout_is_cap: Annotated[float, Positive] = 2.0
    rollout_devices: Annotated[int, NonNegative] = 0  # N > 0: the RL sampler runs on the last N
                                    # devices (a mesh of its own, fsdp over them), every other
                                    # program on the rest (`mesh` is over those); the weights
                                    # copied device to device after each update; one process


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
    # LOCATION[:split=S][:config=C][:weight=W]: a .jsonl/.json/.parquet/.csv/.arrow file or a
    # save_to_disk folder (local, or a URI: gs://, s3://, hf://, ...), or a hub dataset;
    # several are mixed by their weights
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
    answer_key: Annotated[str, COLUMN] = "answer"  # the built-ins' and verl's answer: a column,
                                    # or a dotted path into a struct column, e.g.
                                    # reward_model.ground_truth (reward functions get `answer`)
    reward_columns: Annotated[str, ColumnMap()] = ""  # more arguments for the reward
                                    # functions, a JSON object {argument: column or dotted path},
                                    # e.g. {"solution": "reward_model.ground_truth"} (TRL's
                                    # accuracy_reward on verl's layout)
    wrap_prompts: bool = False      # render plain-string prompts as one user turn (and their
                                    # completions as the assistant's) with the chat template
    long_prompts: Annotated[str, OneOf(*LONG_PROMPTS)] = "error"  # prompts over prompt_len
                                    # tokens: stop naming the first (error), cut the content of
                                    # their last user message, the template kept (truncate), or
                                    # drop them (filter)
    chat_template_kwargs: Annotated[str, JsonObject(RESERVED_TEMPLATE_KEYS)] = ""  # a JSON
                                    # object handed to every apply_chat_template call, e.g.
                                    # {"enable_thinking": false} (Qwen3)

    @property
    def hh_subset_list(self) -> tuple[str, ...]:
        return tuple(s for s in self.hh_subsets.split(",") if s)

    @property
    def stop_sequence_list(self) -> tuple[str, ...]:
        """`stop_sequences` parsed (checked by its `JsonStrings`)."""
        return tuple(json.loads(self.stop_sequences)) if self.stop_sequences else ()

    @property
    def reward_column_paths(self) -> dict[str, str]:
        """{argument: column or dotted path} the reward functions get beside the prompts' own
        columns: `answer` from `answer_key` (where it names another column) and
        `reward_columns` (checked by its `ColumnMap`)."""
        paths = {"answer": self.answer_key} if self.answer_key != "answer" else {}
        return paths | (json.loads(self.reward_columns) if self.reward_columns else {})

    @property
    def chat_template_kwargs_dict(self) -> dict:
        """`chat_template_kwargs` parsed (checked by its `JsonObject`)."""
        return json.loads(self.chat_template_kwargs) if self.chat_template_kwargs else {}


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
class ExperimentFields:
    """Every field of an experiment but the RL algorithms' own groups (`ExperimentConfig`
    adds those)."""
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
    reward_fns: Annotated[str, RewardSpecs()] = ""  # reward functions, a comma list of
                                    # module:function, file.py:function, built-ins
                                    # (p3o_jax/builtin_rewards.py) or verl:<those>, called as TRL
                                    # and verl call them, or reward servers' http(s):// URLs;
                                    # the reward is their weighted sum, plus the
                                    # reward model's score when one is trained or given
                                    # (p3o_jax/reward_calls.py)
    reward_weights: tuple[float, ...] = ()  # one per reward function, then optionally the
                                    # reward model's; () = all 1
    reward_workers: Annotated[int, Positive] = 1  # threads each reward function's batch is
                                    # split over (for functions that wait on a service)
    reward_remote: RemoteConfig = RemoteConfig()  # reward servers (reward_fns=http://...)
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
        """Whether the RL loop recomputes pi_old's log-probs (`rl.recompute_logp_old`): always
        for stale rollouts, whose sampler ran older weights (`rl.max_staleness`)."""
        if self.rl.max_staleness > 0:
            return True
        if self.rl.recompute_logp_old is None:
            return self.policy.dtype != "float32"
        return self.rl.recompute_logp_old


# each algorithm's own group (`p3o.clip=joint`), from its ALGORITHMS entry
ALGORITHM_GROUPS = {a.settings: a.config for a in ALGORITHMS.values() if a.settings}
ExperimentConfig = dataclasses.make_dataclass(
    "ExperimentConfig",
    [(name, group, dataclasses.field(default=group())) for name, group in ALGORITHM_GROUPS.items()],
    bases=(ExperimentFields,), frozen=True)
ExperimentConfig.__module__ = __name__      # pickles and prints as p3o_jax.config's
ExperimentConfig.__doc__ = ("An experiment: `ExperimentFields` and each RL algorithm's group "
                            f"({', '.join(ALGORITHM_GROUPS)}).")
