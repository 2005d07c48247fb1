"""The commands quoted in the README, docs/ and bench/NOTES.md name keys that exist and values
their fields parse (the config grammar's own `override`, each tool's own keys included); the
cheap ones (`memory_plan`, `--help`) run. A command with a <placeholder> or `...` is a
template and is left out; so is a line that is no command of this project's tools."""
import dataclasses
import glob
import importlib
import os
import re
import shlex

import pytest

from p3o_jax.cli import bench, compare, compile_check, export, frontier, memory_plan, reward_server
from p3o_jax.cli.help import wants_help
from p3o_jax.config_args import key_values, load_experiment, override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "bench/NOTES.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# tool -> (its own keys, the experiment it defaults to)
TOOLS = {"train": (None, "toy"), "frontier": (frontier.FrontierArgs(), "toy"),
         "compare": (compare.CompareArgs(), "toy"),
         "bench": (bench.BenchArgs(), None), "memory_plan": (memory_plan.PlanArgs(), "tldr"),
         "compile_check": (compile_check.CompileArgs(), "tldr"), "export": (export.ExportArgs(), None),
         "reward_server": (reward_server.ServerArgs(), None)}
MAKE_TOOLS = {"train": "train", "frontier": "frontier", "compare": "compare", "bench": "bench"}


def quoted(text: str) -> list[str]:
    """Command lines of the text's ```bash blocks (continuations joined, comments dropped)
    and of its inline code spans that start like a command."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    spans = (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text,
                                                                           flags=re.S)))
    lines += [s for s in spans if re.match(r"(make (train|frontier|compare|bench)|(\.venv/bin/)?python"
                                           r" -m p3o_jax\.cli\.)", s)]
    return lines


def invocation(line: str):
    """(tool, its key=value arguments) of a command line, or None if it runs none of the
    tools (or is a template)."""
    if "<" in line or "..." in line:
        return None
    try:
        words = shlex.split(line.split(" # ")[0])
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):       # VAR=value before a command
        words = words[1:]
    if "--" in words:                                             # scripts/launch_local.py ... --
        words = words[words.index("--") + 1:]
    if not words:
        return None
    if words[0] == "make" and len(words) > 1 and words[1] in MAKE_TOOLS:
        make_vars = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        args = shlex.split(make_vars.get("ARGS", ""))
        exp = [f"exp={make_vars['EXP']}"] if "EXP" in make_vars else []
        return MAKE_TOOLS[words[1]], exp + args
    if words[0].endswith("python") and words[1:2] == ["-m"] and words[2].startswith("p3o_jax.cli."):
        return words[2].rpartition(".")[2], words[3:]
    if words[0].endswith(("python", "bash")) and words[1:2] and words[1].startswith(
            ("bench/", "scripts/")):
        return "script", words[1:2]                               # bench/*.py, scripts/*
    if words[0] in ("scripts/tpu_pod.sh", "sbatch"):            # <launcher> ... EXP "ARGS"
        script = next(i for i, w in enumerate(words) if w.startswith("scripts/"))
        rest = words[script + 1:]
        rest = rest[2:] if words[0] == "scripts/tpu_pod.sh" else rest   # TPU name, zone
        return "train", [f"exp={rest[0]}"] + (shlex.split(rest[1]) if len(rest) > 1 else [])
    return None


def check_keys(tool: str, args: list[str]) -> None:
    """Every key=value of `args` sets a field of the tool's own keys, of the benchmark's
    workload or of the experiment, from a value its type parses (ConfigError otherwise)."""
    own, default_exp = TOOLS[tool]
    if tool == "reward_server":         # its first argument is a reward_fns list
        args = [f"fns={a}" if "=" not in a else a for a in args]
    pairs = key_values(args)
    exp = next((v for k, v in pairs if k == "exp"), default_exp)
    cfg = load_experiment(exp) if exp else None
    own_keys = {f.name for f in dataclasses.fields(own)} if own is not None else set()
    for key, value in pairs:
        if key == "exp":
            continue
        if key.partition(".")[0] in own_keys:
            override(own, key, value)
        elif tool == "bench":
            override(bench.Workload(), key, value)
        else:
            assert cfg is not None, f"{tool} takes no experiment keys: {key}"
            override(cfg, key, value)


def documented():
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            for line in quoted(f.read()):
                if (call := invocation(line)) is not None:
                    found.append(pytest.param(*call, id=f"{doc}: {line[:70]}"))
    return found


COMMANDS = documented()


def test_the_docs_quote_commands_of_every_kind():
    tools = {p.values[0] for p in COMMANDS}
    assert {"train", "frontier", "bench", "memory_plan", "compile_check", "export",
            "script"} <= tools
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("tool, args", COMMANDS)
def test_documented_command(tool, args, capsys):
    if tool == "script":
        assert os.path.isfile(os.path.join(ROOT, args[0])), args[0]
        return
    if wants_help(args):
        assert importlib.import_module(f"p3o_jax.cli.{tool}").main(args) == 0
        return
    check_keys(tool, args)
    if tool == "memory_plan" and (not args or any(a.startswith("model=") for a in args)):
        # cheap and offline with a preset architecture: shapes only, nothing compiles
        assert memory_plan.main(args) in (0, 1), capsys.readouterr().err


def test_a_wrong_key_in_a_quoted_command_fails():
    tool, args = invocation('make train EXP=hh ARGS="rl.betta=0.1"')
    with pytest.raises(Exception, match="did you mean 'rl.beta'"):
        check_keys(tool, args)
    assert invocation("make train ARGS=\"base_model=<HF folder>\"") is None
