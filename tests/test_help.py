"""`--help` on every tool: every key of the config tree with its type, value, valid values and
the comment beside its field; an unknown key names the nearest valid one."""
import dataclasses
import importlib
from typing import Annotated

import pytest

from p3o_jax.checks import OneOf, Positive
from p3o_jax.cli.help import field_comments, help_text, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_args import from_args

TOOLS = ("train", "frontier", "compare", "offpolicy", "bench", "memory_plan", "compile_check",
         "export")


def leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, prefix + f.name + ".")
        else:
            yield prefix + f.name


@dataclasses.dataclass(frozen=True)
class Commented:
    """A test dataclass."""
    # a comment above the field,
    # on two lines
    above: int = 1
    beside: Annotated[str, OneOf("a", "b")] = "a"   # a comment beside the field,
                                                    # continued below it
    bare: Annotated[int, Positive] = 2
    # this one belongs to `last`
    last: bool = False


def test_field_comments_come_from_above_beside_and_continuation_lines():
    assert field_comments(Commented) == {
        "above": "a comment above the field, on two lines",
        "beside": "a comment beside the field, continued below it",
        "last": "this one belongs to `last`"}


def test_train_help_lists_every_key_with_type_value_checks_and_comment():
    text = help_text("Train.", ["exp=toy"])
    lines = text.splitlines()
    for key in leaf_keys(ExperimentConfig()):
        assert any(line.startswith(f"  {key}=") for line in lines), key
    i = lines.index("  rl.n_samples=2  [int; >= 2]")     # exp=toy's value, its Range check
    assert lines[i + 1].strip() == "responses per prompt (k > 2: all pairs)"
    assert "  algo=p3o  [str; one of p3o | ppo | dpo | dpo_offline | rloo | grpo | gspo]" in lines
    assert "[rl]  The RL loop every online algorithm shares:" in text
    assert "  rl.top_p=1.0  [float; (0, 1]]" in lines
    assert "  rl.optim.lr=0.0001  [float; > 0]" in lines
    # exp= picks the values shown
    assert "  data.response_len=53  [int; > 0]" in help_text("Train.", ["exp=tldr"]).splitlines()


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("flag", ["--help", "help=true"])
def test_every_tool_answers_help(tool, flag, capsys):
    module = importlib.import_module(f"p3o_jax.cli.{tool}")
    assert module.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    assert "[this command's keys]" in out or tool == "train"


def test_wants_help():
    assert wants_help(["exp=toy", "--help"]) and wants_help(["-h"]) and wants_help(["help=1"])
    assert not wants_help(["help=false", "exp=toy"])


@pytest.mark.parametrize("key, near", [("rl.betaa", "rl.beta"), ("polcy.d_model", "policy"),
                                       ("rl.optim.lrr", "rl.optim.lr")])
def test_unknown_key_names_the_nearest(key, near):
    with pytest.raises(ConfigError, match=f"unknown config key .*did you mean '{near}'"):
        from_args([f"{key}=1"])
