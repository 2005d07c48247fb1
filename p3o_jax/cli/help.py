"""`--help` (or `help=true`) of every tool: each key with its type, value, valid values and the
comment beside its field, read from the config tree itself.

One source: the dataclasses (config.py's `ExperimentConfig` and the groups it holds, each
tool's own argument dataclass), their `Annotated` checks (p3o_jax/checks.py, `Check.describe`)
and the comments written beside each field in the source, read with `tokenize`. Keys are
grouped by section (the dataclass that holds them, with its docstring's first line); values
are those of the experiment named by `exp=` (each tool's default otherwise).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing

from p3o_jax.checks import field_checks
from p3o_jax.config_args import key_values, load_experiment, parse_value

WIDTH = 96


def wants_help(argv: list[str]) -> bool:
    """Whether the command line asks for help: `--help`, `-h` or `help=<true>`."""
    for a in argv:
        if a in ("--help", "-h", "help"):
            return True
        key, sep, value = a.lstrip("-").partition("=")
        if key == "help" and sep and parse_value("help", value, bool):
            return True
    return False


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """{field name: the comment beside it} of dataclass `cls`, from its source: the comments on
    the comment-only lines right above the field (at its indentation), on its own lines, and on
    the comment-only lines after it that are indented further (a continued comment), joined;
    with the comments of the dataclasses it derives from (ExperimentConfig: ExperimentFields)."""
    out = {k: v for base in cls.__mro__[:0:-1] if dataclasses.is_dataclass(base)
           for k, v in field_comments(base).items()}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):    # no source (a class built at run time)
        return out
    comments: dict[int, tuple[int, str]] = {}   # line -> (column, comment text)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.start[1], tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    alone = lambda n: n in comments and n not in code_lines     # a comment-only line
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = node.lineno - 1      # comment lines right above, at the field's indentation
        while alone(above) and comments[above][0] == node.col_offset:
            above -= 1
        lines = list(range(above + 1, node.end_lineno + 1))
        below = node.end_lineno + 1  # continuation lines, indented further than the field
        while alone(below) and comments[below][0] > node.col_offset:
            lines.append(below)
            below += 1
        text = " ".join(comments[n][1] for n in lines if n in comments)
        if text:
            out[node.target.id] = text
    return out


def type_name(kind) -> str:
    """A field's type as the command line spells it."""
    if typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return type_name(args[0]) + " or none"
    if typing.get_origin(kind) is tuple:
        return f"{type_name(typing.get_args(kind)[0])},..."
    return getattr(kind, "__name__", str(kind))


def value_text(value) -> str:
    """A value as it would be written on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(value_text, value))
    if value == "":
        return '""'
    return str(value)


def section_lines(obj, prefix: str, title: str) -> list[str]:
    """The keys of dataclass instance `obj` (`prefix` before each) and then, as sections of
    their own, those of the dataclasses it holds."""
    cls = type(obj)
    hints = typing.get_type_hints(cls, include_extras=True)
    checks, comments = field_checks(cls), field_comments(cls)
    doc = (cls.__doc__ or "").strip()
    doc = "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split("\n\n")[0].split())
    lines = [f"[{title}]" + (f"  {doc}" if doc else "")]
    groups = []
    for f in dataclasses.fields(cls):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            groups.append((value, key))
            continue
        if value is None and f.name == "reward_model":   # config_args.override: policy's fields
            lines.append(f"  {key}.<field>=...  [any policy.<field>; none: the policy's "
                         f"architecture]")
        valid = "; ".join(c.describe() for c in checks[f.name])
        lines.append(f"  {key}={value_text(value)}  [{type_name(hints[f.name])}"
                     + (f"; {valid}" if valid else "") + "]")
        if f.name in comments:
            lines += textwrap.wrap(comments[f.name], WIDTH, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    for value, key in groups:
        lines += [""] + section_lines(value, key + ".", key)
    return lines


def help_text(doc: str, argv: list[str], own=None, exp: str | None = "toy") -> str:
    """The tool's docstring, then its own keys (dataclass instance `own`) and, unless `exp` is
    None, every key of the experiment (`exp=` on the command line, else `exp`)."""
    lines = [doc.strip(), ""]
    if own is not None:
        lines += section_lines(own, "", "this command's keys") + [""]
    if exp is not None:
        exp = next((v for k, v in key_values([a for a in argv if "=" in a]) if k == "exp"), exp)
        lines += [f"Experiment keys (dotted: group.field=value); values: exp={exp}'s", ""]
        lines += section_lines(load_experiment(exp), "", "experiment")
    return "\n".join(lines)
