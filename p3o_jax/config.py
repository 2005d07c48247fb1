"""Experiment configuration: one dataclass tree, every hyper-parameter in one place.

An experiment is a Python file `experiments/<name>.py` with a `config() -> ExperimentConfig`.
The command line overrides any field with `key=value`, dotted for nested fields:

    python -m p3o_jax.train exp=toy algo=ppo rl.beta=0.1 policy.d_model=128 stages=rl

Values are parsed by the field's type; an unknown key, a value of the wrong type or an
impossible batch/mesh split stops the run before anything is compiled, with one line naming the
key (`ConfigError`). `smoke=true` shrinks a real-data experiment to an offline run of a minute
(`smoke_config`); the other keys on the command line still apply on top of it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing

from p3o_jax.data.builders import HH_SUBSETS
from p3o_jax.data.fixtures import TOKENIZER_VOCAB
from p3o_jax.data.validate import ON_BAD_RECORD
from p3o_jax.model import ModelConfig
from p3o_jax.toy_task import ToyTaskConfig

ALGOS = ("p3o", "ppo", "dpo", "dpo_offline")
STAGES = ("sft", "rm", "rl")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1          # -1: all remaining devices
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 10
    decay: str = "constant"     # constant | cosine | linear
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 400
    batch_size: int = 64
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=20, decay="cosine")


@dataclasses.dataclass(frozen=True)
class RMConfig:
    n_pairs: int = 4096             # SFT-policy sample pairs labelled by the simulated annotator
    steps: int = 300
    batch_size: int = 64
    annotator_temperature: float = 1.0
    optim: OptimConfig = OptimConfig(lr=5e-4, warmup_steps=20, decay="cosine")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Shared by P3O, PPO and online DPO: the rollout loop and the KL-regularised objective."""
    iterations: int = 100
    prompts_per_iter: int = 64
    n_samples: int = 2              # responses per prompt (P3O/DPO use pairs; k > 2 averages pairs)
    epochs: int = 4
    minibatches: int = 1
    beta: float = 0.05
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_every: int = 0             # > 0: evaluate on the eval prompts every N iterations and
                                    # at the end ("eval" rows in metrics.jsonl; p3o_jax.frontier)
    reward_offset: float = 0.0      # adds scale * delta(x) (a fixed N(0,1)-like value per prompt)
                                    # to the RM's scores: the invariance experiment
    recompute_logp_old: bool | None = None  # False: pi_old's log-probs are the sampler's; True:
                                    # a training forward recomputes them; None: recompute unless
                                    # the policy computes in float32 (in bfloat16 the cached
                                    # decode and the full forward round apart)
    # P3O
    clip: str = "joint"             # separate (V1) | joint (V2)
    eps: float = 0.2
    ratio_bound: float = 10.0
    delta_norm: str = "none"        # none | batch_std  (both keep reward-shift invariance)
    # PPO
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.5
    target_kl: float = 0.0          # > 0: adaptive KL controller (Ziegler et al.)
    kl_horizon: float = 10000.0
    # DPO (online and offline)
    dpo_beta: float = 0.1
    dpo_epochs: int = 1             # offline DPO: passes over the preference data
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=5)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Real data (task=tldr|hh): the TFDS datasets of `p3o_jax.data` and the tokenizer."""
    data_dir: str = ""              # where the datasets are built (once); "" = TFDS's default
    manual_dir: str = ""            # upstream files placed by hand; "" = download what's missing
    hh_subsets: str = ",".join(HH_SUBSETS)    # task=hh: comma-separated, read as one dataset
    tokenizer: str = ""             # HF name or local folder; "" = base_model's
    prompt_len: int = 512           # P: TL;DR posts are cut to fit, HH keeps the last P tokens
    response_len: int = 53          # N: generated tokens; SFT/RM targets keep their first N
    on_bad_record: str = "raise"    # corrupt records: raise (file:line) | skip (counted)
    stop_sequences: str = ""        # JSON list of strings ending a sampled response, e.g.
                                    # ["\n\nHuman:"] (cut, EOS appended); "" = none

    @property
    def hh_subset_list(self) -> tuple[str, ...]:
        return tuple(s for s in self.hh_subsets.split(",") if s)

    @property
    def stop_sequence_list(self) -> tuple[str, ...]:
        """`stop_sequences` parsed; ValueError unless a JSON list of non-empty strings."""
        import json  # here, to keep DataConfig's changes in one hunk for merging
        if not self.stop_sequences:
            return ()
        try:
            texts = json.loads(self.stop_sequences)
        except json.JSONDecodeError:
            texts = None
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts)):
            raise ValueError(f"{self.stop_sequences!r} is not a JSON list of non-empty strings, "
                             'e.g. ["\\n\\nHuman:"]')
        return tuple(texts)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Per-stage checkpoints under `<out_dir>/ckpt/<stage>` (p3o_jax/checkpoint.py); a stage
    also saves on a signal and at its end."""
    every_steps: int = 100          # save every N steps (0: off)
    every_minutes: float = 10.0     # save after the first step, then whenever M minutes have
                                    # passed since the last save (0: off)
    keep: int = 3                   # keep the last K checkpoints of each stage
    async_save: bool = True         # write in the background while training goes on
    max_nonfinite: int = 5          # stop after K non-finite updates in a row (each is skipped)


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Several processes in one run (p3o_jax/distributed.py). Under SLURM (`srun`), Open MPI
    and on Cloud TPU VMs nothing needs setting: jax reads the coordinator and the process ids
    from the cluster. Elsewhere give all three, here or as the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    coordinator: str = ""           # host:port of process 0 ("": env, else the cluster's)
    num_processes: int = 0          # 0: env, else the cluster's; 1: a single process, no set-up
    process_id: int = -1            # -1: env, else the cluster's
    init_timeout_s: int = 300       # how long processes wait for each other at start-up
    check_memory: bool = False      # before compiling: stop if p3o_jax.memory_plan's estimate
                                    # of a stage exceeds the per-device budget
    hbm_gib: float = 0.0            # that budget in GiB; 0: the device's own limit (GPU/TPU)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "toy"
    task: str = "toy"
    algo: str = "p3o"
    stages: str = "sft,rm,rl"
    seed: int = 0
    out_dir: str = "runs/toy"
    eval_prompts: int = 512
    log_every: int = 10
    policy: ModelConfig = ModelConfig()       # with base_model: only dtype, param_dtype used
    reward_model: ModelConfig | None = None   # None: same architecture as the policy
    base_model: str = ""            # HF name or local folder SFT starts from; "" = from scratch
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


# ---------------------------------------------------------------------------------------------
# overrides

def _parse(key: str, text: str, kind):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() == "none":
            return None
        kind = args[0]
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
        raise ConfigError(f"unknown config key {full!r}")
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


def need(ok, key: str, msg: str) -> None:
    """Raise `ConfigError` naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key {key!r}: {msg}")


def validate(cfg: ExperimentConfig, n_devices: int) -> None:
    """Checks that need no compile: enums, positive sizes, batch/mesh divisibility, and the
    models' (`validate_models`; with `base_model`, once its config is read)."""
    need(cfg.algo in ALGOS, "algo", f"{cfg.algo!r} is not one of {ALGOS}")
    need(all(s in STAGES for s in cfg.stage_list), "stages", f"{cfg.stages!r}: stages are {STAGES}")
    need(cfg.task in ("toy", "tldr", "hh"), "task", f"{cfg.task!r} is not toy, tldr or hh")
    need(cfg.rl.clip in ("separate", "joint"), "rl.clip", f"{cfg.rl.clip!r}: separate or joint")
    need(cfg.rl.delta_norm in ("none", "batch_std"), "rl.delta_norm", "none or batch_std")
    need(cfg.rl.n_samples >= 2, "rl.n_samples", "needs at least 2 responses per prompt")
    need(cfg.rl.eps > 0, "rl.eps", "must be > 0")
    need(cfg.rl.ratio_bound > 1, "rl.ratio_bound", "must be > 1")
    need(cfg.rl.temperature > 0, "rl.temperature", "must be > 0")
    m = cfg.mesh
    sizes = [m.data, m.fsdp, m.tensor]
    need(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1, "mesh",
         f"sizes must be positive with at most one -1, got {sizes}")
    fixed = 1
    for s in sizes:
        fixed *= s if s > 0 else 1
    need(n_devices % fixed == 0 and (-1 in sizes or fixed == n_devices), "mesh",
         f"data*fsdp*tensor={fixed} does not fit {n_devices} devices")
    batch_ways = m.data * (m.fsdp if m.fsdp > 0 else n_devices // fixed)
    for key, b in (("sft.batch_size", cfg.sft.batch_size), ("rm.batch_size", cfg.rm.batch_size),
                   ("rl.prompts_per_iter", cfg.rl.prompts_per_iter)):
        need(b > 0 and b % batch_ways == 0, key, f"{b} is not divisible by data*fsdp={batch_ways}")
    mb = cfg.rl.prompts_per_iter // max(cfg.rl.minibatches, 1)
    need(cfg.rl.minibatches > 0 and cfg.rl.prompts_per_iter % cfg.rl.minibatches == 0,
         "rl.minibatches", f"must divide rl.prompts_per_iter={cfg.rl.prompts_per_iter}")
    need(mb % batch_ways == 0, "rl.minibatches",
         f"minibatch of {mb} prompts is not divisible by data*fsdp={batch_ways}")
    if not cfg.base_model:
        validate_models(cfg)
    c = cfg.checkpoint
    need(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: off)")
    need(c.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0: off)")
    need(c.keep > 0, "checkpoint.keep", "must be > 0")
    need(c.max_nonfinite > 0, "checkpoint.max_nonfinite", "must be > 0")
    if cfg.task == "toy":
        need(not cfg.smoke, "smoke", "is for the real-data tasks (tldr, hh); toy is offline")
        return
    d = cfg.data
    need(d.prompt_len > 0, "data.prompt_len", "must be > 0")
    need(d.response_len > 0, "data.response_len", "must be > 0")
    need(d.on_bad_record in ON_BAD_RECORD, "data.on_bad_record", f"one of {ON_BAD_RECORD}")
    try:
        d.stop_sequence_list
    except ValueError as e:
        raise ConfigError(f"config key 'data.stop_sequences': {e}") from None
    need(d.tokenizer or cfg.base_model or cfg.smoke, "data.tokenizer",
         "set it (an HF name or local folder) or base_model")
    if cfg.task == "hh":
        unknown = [s for s in d.hh_subset_list if s not in HH_SUBSETS]
        need(d.hh_subset_list and not unknown, "data.hh_subsets",
             f"{d.hh_subsets!r}: comma-separated subsets of {HH_SUBSETS}")


def validate_models(cfg: ExperimentConfig) -> None:
    """The checks that need the models' architecture: heads over `mesh.tensor`, and prompt +
    response within the policy's positions."""
    for name, model in (("policy", cfg.policy), ("reward_model", cfg.rm_model)):
        need(model.n_heads % cfg.mesh.tensor == 0, f"{name}.n_heads",
             f"{model.n_heads} is not divisible by mesh.tensor={cfg.mesh.tensor}")
    if cfg.task != "toy":
        length = cfg.data.prompt_len + cfg.data.response_len
        need(length <= cfg.policy.max_len, "data.response_len",
             f"prompt_len + response_len = {length} > the policy's max_len={cfg.policy.max_len}")


def load_experiment(name_or_path: str) -> ExperimentConfig:
    """`toy` -> experiments/toy.py; or a path to any .py file with `config()`."""
    path = name_or_path
    if not path.endswith(".py"):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(root, "experiments", f"{name_or_path}.py")
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
        log_every=1, base_model="", reward_model=None,
        policy=ModelConfig(family="gpt_neox", vocab_size=TOKENIZER_VOCAB, d_model=32, n_layers=2,
                           n_heads=4, d_ff=64, max_len=128, rotary_pct=0.5),
        data=dataclasses.replace(cfg.data, data_dir="", manual_dir="", tokenizer="",
                                 prompt_len=96, response_len=16),
        sft=dataclasses.replace(cfg.sft, steps=4, batch_size=8, optim=fast),
        rm=dataclasses.replace(cfg.rm, n_pairs=80, steps=4, batch_size=8, optim=fast),
        rl=dataclasses.replace(cfg.rl, iterations=2, prompts_per_iter=8, minibatches=1),
    )


def from_args(args: list[str]) -> ExperimentConfig:
    """Build the config from `exp=NAME key=value ...` (with `smoke=true`: on `smoke_config`)."""
    pairs = []
    for a in args:
        key, sep, value = a.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"argument {a!r}: expected key=value")
        pairs.append((key, value))
    exp = next((v for k, v in pairs if k == "exp"), "toy")

    def build(base: ExperimentConfig) -> ExperimentConfig:
        for key, value in pairs:
            if key != "exp":
                base = override(base, key, value)
        return base
    cfg = build(load_experiment(exp))
    return build(smoke_config(load_experiment(exp))) if cfg.smoke else cfg
