"""From a command line to a config: the `key=value` grammar (`override`, `key_values`,
`tool_args` for a tool's own keys), experiment files (`load_experiment`), the `smoke=true`
preset (`smoke_config`) and `from_args`, which builds and checks a whole config. The schema is
p3o_jax/config.py; what depends on the machine and the checkpoints, p3o_jax/config_resolve.py."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing

from p3o_jax.checks import ConfigError
from p3o_jax.config import ROOT, ExperimentConfig
from p3o_jax.config_resolve import check_fields, need
from p3o_jax.model import ModelConfig
from p3o_jax.train_state import OptimConfig


def parse_value(key: str, text: str, kind):
    """`text` as a value of the type `kind` (bool, int, float, str, their tuples and optionals);
    ConfigError naming `key` if it is none."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(parse_value(key, t, item) for t in text.split(",") if t)
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
        value = parse_value(full, text, hints[head])
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
    from p3o_jax.data.fixtures import TOKENIZER_VOCAB   # here: only smoke runs need the fixtures
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
