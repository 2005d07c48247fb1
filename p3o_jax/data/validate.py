"""Reading and validating upstream jsonl records.

Every upstream file (TL;DR ``*.jsonl``, comparison ``batch*.json``, HH ``*.jsonl.gz``) is
JSON Lines: one JSON object per line. `read_jsonl` reads it as bytes, so that each record
is checked in order:

1. the line decodes as UTF-8 (strictly),
2. it parses as JSON and is an object,
3. the format's parser (`parse_tldr_post`, `parse_tldr_comparison`, `parse_hh_pair`) finds
   every field present, of the right type, with non-empty text that is encodable as UTF-8
   (JSON escapes can smuggle in lone surrogates), and ``choice`` in {0, 1}.

A record failing any check is corrupt: a `DataError` naming the file and its 1-based line.
With ``on_bad_record="raise"`` the first one is raised; with ``"skip"`` it is appended to a
caller-supplied list and reading goes on. Blank lines are ignored. A broken gzip stream
is always raised, since nothing after it can be read.

A well-formed record the dataset cannot use is not an error: its parser returns `Skipped`
with the reason (a CNN/DM article among the TL;DR comparisons; an HH pair whose dialogues
share no prompt), and `Counts` tallies a split's records read, kept and skipped by reason.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

from p3o_jax.data import prompts

OnBadRecord = Literal["raise", "skip"]
ON_BAD_RECORD = ("raise", "skip")
COMPARISON_SPLITS = ("train", "valid1", "valid2")
# Skip reasons
CORRUPT = "corrupt (on_bad_record=skip)"
NO_SHARED_PROMPT = "no shared prompt (dialogues differ in the first Human turn)"


class UpstreamError(ValueError):
    """Upstream data that cannot be used (a file missing, empty, a Git LFS pointer, not
    downloadable; a split without usable records); the message is one line naming it."""


class DataError(UpstreamError):
    """A bad upstream record: ``str(err) == f"{file}:{line}: {msg}"`` (line is 1-based)."""

    def __init__(self, file: str | os.PathLike, line: int, msg: str):
        self.file, self.line, self.msg = os.fspath(file), line, msg
        super().__init__(f"{self.file}:{line}: {msg}")

    def __reduce__(self):
        return DataError, (self.file, self.line, self.msg)


class RecordError(ValueError):
    """Raised by the record parsers; `read_jsonl` turns it into a `DataError`."""


class Skipped(NamedTuple):
    """A well-formed record the dataset does not use: why, and its split where it says."""
    reason: str
    split: str | None = None


@dataclasses.dataclass
class Counts:
    """One split's records: read (non-blank lines), kept, and skipped by reason."""
    read: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, record: dict | Skipped) -> None:
        self.read += 1
        if isinstance(record, Skipped):
            self.skipped[record.reason] += 1
        else:
            self.kept += 1

    def summary(self, name: str) -> str:
        """E.g. ``"hh_rlhf/helpful-base train: 5 records read, 4 kept, skipped: 1 no shared
        prompt"`` (reasons sorted; ``"skipped: none"`` when none is)."""
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{name}: {self.read} records read, {self.kept} kept, skipped: {reasons}"


def read_jsonl(
    path: str | os.PathLike,
    parse: Callable[[dict], dict | Skipped],
    *,
    on_bad_record: OnBadRecord = "raise",
    skipped: list[DataError] | None = None,
) -> Iterator[tuple[int, dict | Skipped]]:
    """Yields ``(line_number, parse(record))`` for each non-blank line of a jsonl file
    (``.gz`` too): a record, or `Skipped`. Bad records raise `DataError`, or with
    ``on_bad_record="skip"`` are appended to ``skipped`` and yielded as ``Skipped(CORRUPT)``.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    if on_bad_record == "skip" and skipped is None:
        raise ValueError('on_bad_record="skip" needs a `skipped` list to report into')
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    with opener(path, "rb") as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = parse(_decode_object(raw))
                except RecordError as e:
                    error = DataError(path, line_no, str(e))
                    if on_bad_record == "raise":
                        raise error from None
                    skipped.append(error)
                    record = Skipped(CORRUPT)
                yield line_no, record
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, line_no + 1, f"unreadable file ({e})") from e


def _decode_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, types: type | tuple[type, ...], where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in obj:
        raise RecordError(f"missing field {name!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        expected = " or ".join(t.__name__ for t in _tuple(types))
        raise RecordError(f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _text(obj: dict, key: str, where: str = "", *, allow_empty: bool = False) -> str:
    value, name = _field(obj, key, str, where), f"{where}{key}"
    if not allow_empty and not value.strip():
        raise RecordError(f"field {name!r} is empty")
    _check_encodable(value, name)
    return value


def _check_encodable(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(f"field {name!r} holds undecodable text ({e.reason})") from None


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def parse_tldr_post(obj: dict) -> dict:
    """A ``tldr_3_filtered`` record -> {id, subreddit, title, post, summary} (all str)."""
    return {key: _text(obj, key) for key in ("id", "subreddit", "title", "post", "summary")}


def parse_tldr_comparison(obj: dict) -> dict | Skipped:
    """A comparisons record -> flat dict, or `Skipped` for a CNN/DM article (no ``info.post``).

    Returns {id, subreddit, title, post, summary_0, summary_1, policy_0, policy_1, note_0,
    note_1, worker, batch, extra, split: str; choice: int}. A null ``note`` becomes "", and
    ``extra`` (free-form, may be absent) is kept as a JSON string.
    """
    info = _field(obj, "info", dict)
    if "post" not in info and "article" in info:
        split = obj.get("split")
        return Skipped("CNN/DM article", split if split in COMPARISON_SPLITS else None)
    out = {key: _text(info, key, "info.") for key in ("id", "subreddit", "title", "post")}
    summaries = _field(obj, "summaries", list)
    if len(summaries) != 2:
        raise RecordError(f"field 'summaries' must hold 2 summaries, got {len(summaries)}")
    for i, summary in enumerate(summaries):
        where = f"summaries[{i}]."
        if not isinstance(summary, dict):
            raise RecordError(f"field 'summaries[{i}]' must be dict, got {type(summary).__name__}")
        out[f"summary_{i}"] = _text(summary, "text", where)
        out[f"policy_{i}"] = _text(summary, "policy", where, allow_empty=True)
        note = summary.get("note")
        out[f"note_{i}"] = "" if note is None else _text(summary, "note", where, allow_empty=True)
    choice = _field(obj, "choice", int)
    if choice not in (0, 1):
        raise RecordError(f"field 'choice' must be 0 or 1, got {choice}")
    out["choice"] = choice
    out["worker"] = _text(obj, "worker", allow_empty=True)
    out["batch"] = _text(obj, "batch", allow_empty=True)
    out["split"] = _text(obj, "split")
    if out["split"] not in COMPARISON_SPLITS:
        raise RecordError(f"field 'split' must be one of {COMPARISON_SPLITS}, got {out['split']!r}")
    extra = obj.get("extra")
    out["extra"] = json.dumps({} if extra is None else extra, ensure_ascii=False, sort_keys=True)
    _check_encodable(out["extra"], "extra")
    return out


def parse_hh_pair(obj: dict) -> dict | Skipped:
    """An HH-RLHF record -> {prompt, chosen, rejected} (`prompts.split_hh_pair`: the shared
    dialogue up to an ``"\\n\\nAssistant:"``, then the rest of each, so that
    ``prompt + chosen`` is the upstream ``chosen`` dialogue exactly). Empty responses are
    valid. `Skipped` if the two dialogues share no prompt; each must be a Human/Assistant
    dialogue (start with ``"\\n\\nHuman:"``, have an ``"\\n\\nAssistant:"`` turn)."""
    chosen, rejected = _dialogue(obj, "chosen"), _dialogue(obj, "rejected")
    try:
        prompt, chosen_response, rejected_response = prompts.split_hh_pair(chosen, rejected)
    except ValueError:
        return Skipped(NO_SHARED_PROMPT)
    return {"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response}


def _dialogue(obj: dict, key: str) -> str:
    text = _text(obj, key)
    if not text.startswith(prompts.HH_HUMAN_TAG) or prompts.HH_ASSISTANT_TAG not in text:
        raise RecordError(f"field {key!r} is not a Human/Assistant dialogue (it must start "
                          f"with {prompts.HH_HUMAN_TAG!r} and have an "
                          f"{prompts.HH_ASSISTANT_TAG!r} turn)")
    return text
