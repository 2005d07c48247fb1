"""The config tree: every field refuses an invalid value with one line naming its key (exit 2)
before anything reads a checkpoint or compiles; the cases a new user hits; one grammar."""
import dataclasses
import os
import typing

import pytest

from p3o_jax import checks
from p3o_jax import config as C
from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax.checks import ConfigError
from p3o_jax.cli import frontier, memory_plan
from p3o_jax.cli.train import main

# small stages, so that a value that slipped through would fail fast instead of training
CHEAP = ["stages=sft", "sft.steps=1", "sft.batch_size=8", "eval_prompts=8"]


def leaves(cls, prefix=""):
    """(dotted key, type hint, checks) of every scalar field under dataclass `cls`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        nested = [a for a in (typing.get_args(base) or (base,)) if dataclasses.is_dataclass(a)]
        if nested:
            yield from leaves(nested[0], prefix + f.name + ".")
        else:
            yield prefix + f.name, base, checks.field_checks(cls)[f.name]


def scalar_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def invalid_values(kind, field_checks) -> list[str]:
    """A wrong-type value (where the type has one) and one that violates each check."""
    values = {bool: ["maybe"], int: ["notanumber"], float: ["notanumber"],
              tuple: ["1,2"]}.get(kind, [])     # a bare tuple: set from config.json only
    for c in field_checks:
        if isinstance(c, checks.Range):
            if c.lo is not None:
                values.append(str(kind(c.lo) if c.lo_open else kind(c.lo) - 1))
            if c.hi is not None:
                values.append(str(kind(c.hi) if c.hi_open else kind(c.hi) + 1))
        elif isinstance(c, (checks.OneOf, checks.SubsetOf)):
            values.append("bogus-choice")
        elif isinstance(c, (checks.JsonStrings, checks.JsonObject)):
            values.append("not json")
        elif isinstance(c, checks.ColumnMap):
            values += ["not json", '{"solution": 3}', '{"not an argument": "answer"}']
        elif isinstance(c, checks.Pattern):
            values.append("not valid!")
        elif isinstance(c, (checks.ExistingDir, checks.ModelSource)):
            values.append("/nonexistent/folder")
        elif isinstance(c, checks.WritableDir):
            values.append("/proc/nope")
        elif isinstance(c, checks.Sources):
            values.append("/nonexistent/prompts.jsonl")
        elif isinstance(c, checks.RewardSpecs):
            values.append("/nonexistent/rewards.py:f")
        elif isinstance(c, C.AxisSize):
            values.append("0")
        else:
            raise AssertionError(f"no invalid value known for {c!r}")
    return values


FIELDS = list(leaves(C.ExperimentConfig))
CASES = [(key, v) for key, hint, cs in FIELDS for v in invalid_values(scalar_type(hint), cs)]


def test_every_field_has_an_invalid_value():
    """A field a user can set has a type that can be wrong or a check that can fail: a new
    field without either makes this fail (give it a check in its Annotated hint)."""
    assert len(FIELDS) > 100
    missing = [key for key, hint, cs in FIELDS if not invalid_values(scalar_type(hint), cs)]
    assert not missing, missing


def test_every_invalid_value_is_one_line_naming_the_key(tmp_path, capsys):
    failures = []
    for key, value in CASES:
        rc = main(["exp=toy", f"out_dir={tmp_path}/run", *CHEAP, f"{key}={value}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        if rc != 2 or len(err) != 1 or f"'{key}'" not in err[0]:
            failures.append((key, value, rc, err[-3:]))
    assert not failures, failures
    assert not os.path.exists(tmp_path / "run" / "ckpt"), "something ran"


@pytest.mark.parametrize("args, key, words", [
    (["out_dir=/proc/nope"], "out_dir", "cannot write"),
    (["eval_prompts=-5"], "eval_prompts", "> 0"),
    (["base_model=/tmp/nothing-here"], "base_model", "no such folder"),
    (["exp=toy"], "exp", "given 2 times"),
    (["algo=trpo"], "algo", "not one of"),
    (["stages=sft,rl,eval"], "stages", "comma-separated"),
    (["sft.batch_size=30", "mesh.tensor=2"], "sft.batch_size", "divisible"),
    (["mesh.fsdp=3"], "mesh", "does not fit"),
    (["mesh.data=-1"], "mesh", "at most one"),
])
def test_new_user_mistakes(args, key, words, capsys):
    assert main(["exp=toy", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0] and words in err[0], err


def test_invalid_value_is_reported_before_a_checkpoint_is_read(tmp_path, capsys):
    """rl.iterations=-1 beside an existing (here: unreadable) checkpoint: the value is named,
    not a checkpoint mismatch."""
    os.makedirs(tmp_path / "ckpt" / "p3o" / "3")
    assert main(["exp=toy", f"out_dir={tmp_path}", "rl.iterations=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'rl.iterations': must be > 0, got -1"], err


def test_resolve_derives_once(tmp_path):
    cfg = config_resolve.resolve(config_args.from_args(["exp=toy", "mesh.tensor=2"]), 8)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 4, 2)
    assert cfg.recompute_old is False
    bf16 = config_args.from_args(["exp=toy", "policy.dtype=bfloat16"])
    assert bf16.recompute_old is True
    assert config_args.from_args(["exp=toy", "policy.dtype=bfloat16", "rl.recompute_logp_old=false"]
                       ).recompute_old is False


def test_tools_share_the_grammar(capsys):
    sweep, results, inv, cfg = frontier.parse(["quick=true", "seeds=1,2", "p3o.clip=separate"])
    assert sweep.seeds == (1, 2) and cfg.p3o.clip == "separate" and not inv
    for bad in (["seeds=-1"], ["quick=perhaps"], ["methods=P3O-V2,TRPO"]):
        with pytest.raises(ConfigError):
            frontier.parse(bad)
    assert memory_plan.main(["model=gpt-5"]) == 2
    assert memory_plan.main(["exp=toy", "devices=8", "mesh.tensor=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "'model'" in err[0] and "'mesh'" in err[1], err
    assert memory_plan.main(["exp=toy", "devices=8", "mesh.tensor=2"]) == 0


def test_algorithm_groups_come_from_their_algorithms():
    """A new algorithm is its module and its line in ALGORITHMS: its config group (`p3o.*`)
    is a field of ExperimentConfig without config.py naming it."""
    from p3o_jax.algos import ALGORITHMS
    fields = {f.name: f for f in dataclasses.fields(C.ExperimentConfig)}
    for algo in ALGORITHMS.values():
        if algo.settings:
            assert fields[algo.settings].type is algo.config
            assert getattr(C.ExperimentConfig(), algo.settings) == algo.config()
    with open(C.__file__) as f:
        source = f.read()
    assert not [a.config.__name__ for a in ALGORITHMS.values()
                if a.config and a.config.__name__ in source]
    cfg = config_args.from_args(["exp=toy", "grpo.normalise_std=false"])
    assert cfg.grpo.normalise_std is False and type(cfg) is C.ExperimentConfig
