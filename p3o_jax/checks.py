"""What a valid config value is, stated beside the field it constrains.

A config field carries its constraint as `typing.Annotated` metadata,

    lr: Annotated[float, Positive] = 1e-3
    clip: Annotated[str, OneOf("separate", "joint")] = "joint"

and `config_resolve.check_fields` walks the whole tree once, before anything reads a checkpoint or
compiles, turning the first violation into one line that names the dotted key. `None` (an
optional field left unset) and, for paths, `""` (unset) always pass.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import typing
import urllib.parse

from p3o_jax.paths import is_local_path


STAGES = ("sft", "rm", "rl")   # a run's stages, in the order they run


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (the commands exit 2)."""


class Check:
    def problem(self, value) -> str | None:
        """Why `value` is invalid, or None if it is fine."""
        raise NotImplementedError

    def describe(self) -> str:
        """The valid values, in words (`--help`); by default the first line of the docstring."""
        return (type(self).__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")


@dataclasses.dataclass(frozen=True)
class Range(Check):
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False           # lo itself excluded
    hi_open: bool = False

    def problem(self, value):
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        if low_ok and high_ok:
            return None
        low = "" if self.lo is None else ("(" if self.lo_open else "[") + f"{self.lo:g}"
        high = "" if self.hi is None else f"{self.hi:g}" + (")" if self.hi_open else "]")
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}, got {value}"
        if self.lo is None:
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}, got {value}"
        return f"must be in {low}, {high}, got {value}"

    def describe(self):
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return (("(" if self.lo_open else "[") + f"{self.lo:g}, {self.hi:g}"
                + (")" if self.hi_open else "]"))


Positive = Range(0, lo_open=True)
NonNegative = Range(0)
Probability = Range(0, 1)


@dataclasses.dataclass(frozen=True)
class OneOf(Check):
    choices: tuple

    def __init__(self, *choices):
        object.__setattr__(self, "choices", choices)

    def problem(self, value):
        return None if value in self.choices else f"{value!r} is not one of {self.choices}"

    def describe(self):
        return "one of " + " | ".join(repr(c) if c == "" else str(c) for c in self.choices)


class SubsetOf(OneOf):
    """A comma-separated, non-empty list of `choices`."""

    def problem(self, value):
        items = [s for s in value.split(",") if s]
        bad = [s for s in items if s not in self.choices]
        if not items or bad:
            return f"{value!r}: expected comma-separated values of {self.choices}"
        return None

    def describe(self):
        return "comma-separated, of " + " ".join(map(str, self.choices))


@dataclasses.dataclass(frozen=True)
class Pattern(Check):
    regex: str
    what: str

    def problem(self, value):
        return None if re.fullmatch(self.regex, value) else f"{value!r} is not {self.what}"

    def describe(self):
        return self.what


def _json(value: str):
    """`value` parsed as JSON, None if it is not JSON."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


@dataclasses.dataclass(frozen=True)
class JsonStrings(Check):
    """A JSON list of non-empty strings (`""`: none)."""

    def problem(self, value):
        if not value:
            return None
        texts = _json(value)
        if isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts):
            return None
        return f"{value!r} is not a JSON list of non-empty strings, e.g. [\"\\n\\nHuman:\"]"


@dataclasses.dataclass(frozen=True)
class JsonObject(Check):
    """A JSON object (`""`: none).

    Its keys may not be those of `reserved` (what the caller sets itself)."""
    reserved: tuple[str, ...] = ()

    def problem(self, value):
        if not value:
            return None
        parsed = _json(value)
        if not isinstance(parsed, dict):
            return f"{value!r} is not a JSON object, e.g. {{\"enable_thinking\": false}}"
        taken = sorted(set(parsed) & set(self.reserved))
        return f"{', '.join(taken)}: set by p3o_jax itself" if taken else None


@dataclasses.dataclass(frozen=True)
class ColumnMap(Check):
    """A JSON object of argument names to column names or dotted paths (`""`: none)."""

    def problem(self, value):
        if not value:
            return None
        parsed = _json(value)
        if not isinstance(parsed, dict) or not all(
                isinstance(k, str) and k.isidentifier() and isinstance(v, str)
                and re.fullmatch(r"[\w.-]+", v) for k, v in parsed.items()):
            return (f"{value!r} is not a JSON object of argument names to columns, e.g. "
                    f"{{\"solution\": \"reward_model.ground_truth\"}}")
        return None


@dataclasses.dataclass(frozen=True)
class ExistingDir(Check):
    """A local folder that must exist (`""`: unset)."""

    def problem(self, value):
        if value and not os.path.isdir(os.path.expanduser(value)):
            return f"no such folder: {value}"
        return None


@dataclasses.dataclass(frozen=True)
class WritableDir(Check):
    """A folder this process can create (if missing) and write to (`""`: unset)."""

    def problem(self, value):
        if not value:
            return None
        path = os.path.abspath(os.path.expanduser(value))
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            return f"{existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK) or existing.startswith(("/proc", "/sys")):
            return f"cannot write under {existing}"
        return None


HUB_ID = r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?"


@dataclasses.dataclass(frozen=True)
class ModelSource(Check):
    """A hub repository id ("org/name") or an existing local folder (`""`: unset)."""

    def problem(self, value):
        if not value:
            return None
        if is_local_path(value):
            return None if os.path.isdir(os.path.expanduser(value)) else f"no such folder: {value}"
        return None if re.fullmatch(HUB_ID, value) else (
            f"{value!r} is neither a local folder nor a hub id like 'org/name'")


@dataclasses.dataclass(frozen=True)
class Sources(Check):
    """A comma list of data sources (p3o_jax/data/own.py: `LOCATION[:split=S][:config=C]
    [:weight=W]`, `""`: unset): each well-formed, and a location that looks like a local path
    (a data file's extension, or /, ./, ~) exists; a URI (gs://, s3://, ...) is read later."""

    def problem(self, value):
        from p3o_jax.data import own   # the grammar's one parser
        from p3o_jax.data.validate import UpstreamError
        try:
            sources = own.parse_sources(value, "")
        except UpstreamError as e:
            return str(e).lstrip(": ")
        for s in sources:
            if (is_local_path(s.location, tuple(own.EXTENSIONS))
                    and not os.path.exists(os.path.expanduser(s.location))):
                return f"no such file or folder: {s.location}"
        return None


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One entry of `reward_fns` (p3o_jax/reward_calls.py): a built-in name,
    `package.module:function` or `path/to/file.py:function`, any of them after `verl:` for
    verl's `compute_score`, or a reward server's `http(s)://` URL (p3o_jax/remote_rewards.py)."""
    text: str           # the entry as given
    where: str          # "" (a built-in), a module, a .py file with `~` expanded, or the URL
    function: str
    verl: bool = False
    remote: bool = False

    @property
    def name(self) -> str:
        """What the metrics call it (reward/<name>; a server: remote_<host>_<port>_<path>)."""
        return ("verl_" if self.verl else "") + self.function


def parse_reward_specs(text: str) -> list[RewardSpec]:
    """The entries of a `reward_fns` comma list; ValueError saying what is wrong with one (a
    `file.py` that does not exist included). Importing waits for the run."""
    from p3o_jax.builtin_rewards import BUILTINS
    out = []
    for entry in filter(None, (s.strip() for s in text.split(","))):
        if entry.startswith(("http://", "https://")):   # a reward server
            url = urllib.parse.urlsplit(entry)
            if not url.hostname:
                raise ValueError(f"{entry!r}: a reward server URL needs a host "
                                 f"(http://host:port/path)")
            name = "remote_" + re.sub(r"\W+", "_", url.netloc + url.path).strip("_")
            out.append(RewardSpec(entry, entry, name, remote=True))
            continue
        spec = entry.removeprefix("verl:")
        where, sep, name = spec.rpartition(":")
        if not sep:
            if spec not in BUILTINS:
                raise ValueError(f"{spec!r} is no built-in reward ({', '.join(BUILTINS)}); "
                                 f"give module:function or file.py:function")
        elif not (name.isidentifier() and (where.endswith(".py") or where and all(
                part.isidentifier() for part in where.split(".")))):
            raise ValueError(f"{entry!r}: expected module:function or file.py:function")
        elif where.endswith(".py") and not os.path.isfile(os.path.expanduser(where)):
            raise ValueError(f"{where}: no such file")
        out.append(RewardSpec(entry, os.path.expanduser(where), name if sep else spec,
                              entry.startswith("verl:")))
    return out


@dataclasses.dataclass(frozen=True)
class RewardSpecs(Check):
    """A comma list of reward functions (`""`: unset): each a built-in name,
    `WHERE:function` (a `file.py` that exists) or a reward server's URL (`parse_reward_specs`)."""

    def problem(self, value):
        try:
            parse_reward_specs(value)
        except ValueError as e:
            return str(e)
        return None


@functools.lru_cache(maxsize=None)   # ModelConfig asks on every construction
def field_checks(cls) -> dict[str, tuple[Check, ...]]:
    """{field name: its checks} of a dataclass whose hints use `Annotated[type, Check...]`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: tuple(m for m in getattr(hints[f.name], "__metadata__", ())
                          if isinstance(m, Check))
            for f in dataclasses.fields(cls)}
