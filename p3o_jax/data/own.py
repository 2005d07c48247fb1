"""Your own data (`task=dataset`): prompts, demonstrations and preference pairs from files,
`save_to_disk` folders or hub datasets, in TRL's column conventions, rendered with the
tokenizer's chat template (p3o_jax/data/render.py) and tokenised once (p3o_jax/data/cache.py).

A source (`data.sft`, `data.preferences`, `data.prompts`, `data.eval`) is a comma list of
`LOCATION[:split=S][:config=C][:weight=W]`: a `.jsonl`, `.json`, `.parquet`, `.csv` or
`.arrow` file (by extension), a folder written by `datasets`' `save_to_disk`, either of them
local (`~` is the home folder) or an fsspec URI (`gs://`, `s3://`, `hf://`, `memory://`, ...),
or a hub dataset name (its `split`, default train, and `config`). The options are the trailing
`:name=value` parts only, so a URI's own `:` stays in its location. All are read by HF
`datasets`. Several sources are mixed by their weights (`mix`): source i makes up w_i / sum(w)
of the rows, its own rows shuffled and repeated or cut to that count.

Columns (names configurable, `data.prompt_key` ...), each value a string or a conversation
(a list of `{"role", "content"}` messages):

    kind        columns                                       prompt is
    prompt      prompt                                        prompt (a conversation ends
                (or those of sft / preference below)          with a user turn)
    sft         prompt + completion, or messages              messages minus the last turn
    preference  prompt + chosen + rejected, or chosen +       the messages chosen and
                rejected alone (implicit prompt)              rejected share

`encode` turns records into token ids: a prompt is what the sampler sees, a response what the
model writes after it, ending in one stop token (render.py says how, templates whose generation
prompt is not the start of the rendered turn included); prompts over the token budget stop the
run naming their row, or are cut (the content of the last user message, the template kept), or
dropped (`data.long_prompts`). `data.wrap_prompts` turns plain-string prompts (and their
completions) into one user turn (and one assistant turn). Every other column of a prompt record
is kept (`Records.columns`) for the reward functions.

Bad input raises `UpstreamError` (a `ValueError`) naming the source and row, before anything
compiles: a missing file or column (with the columns that exist), a value of the wrong type, a
conversation without its final user (prompt) or assistant (response) turn, a prompt over the
budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from p3o_jax.data import prompts as P
from p3o_jax.data import render as R
from p3o_jax.data.cache import cached, sha256
from p3o_jax.data.loader import ragged_columns
from p3o_jax.data.validate import UpstreamError
from p3o_jax.paths import is_local_path, is_uri

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
KINDS = ("prompt", "sft", "preference")
OPTIONS = ("split", "config", "weight")
LONG_PROMPTS = ("error", "truncate", "filter")
_OPTION = re.compile(r"([A-Za-z_]\w*)=([^:]*)")   # a trailing `:name=value` of a source


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of a source list: `LOCATION[:split=S][:config=C][:weight=W]`."""
    location: str
    split: str = ""
    config: str = ""
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.location + (f":{self.split}" if self.split else "")


def parse_sources(text: str, key: str) -> list[Source]:
    """`Source`s of a comma list (`key`: the config key, for the error). An item's options are
    its trailing `:name=value` parts (`OPTIONS`); the rest is its location, `:` and all."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        location, fields = item, {}
        while (m := _OPTION.fullmatch(location.rpartition(":")[2])) and ":" in location:
            name, value = m.groups()
            if name not in OPTIONS:
                raise UpstreamError(f"{key}: {item!r}: options are split=, config=, weight= "
                                    f"(LOCATION[:split=S][:config=C][:weight=W]), got {name}=")
            if name in fields:
                raise UpstreamError(f"{key}: {item!r}: {name}= given twice")
            fields[name] = value
            location = location.rpartition(":")[0]
        if not location:
            raise UpstreamError(f"{key}: {item!r}: no location before the options")
        try:
            weight = float(fields.pop("weight", 1.0))
        except ValueError:
            raise UpstreamError(f"{key}: {item!r}: weight must be a number") from None
        if not weight > 0:
            raise UpstreamError(f"{key}: {item!r}: weight must be > 0")
        out.append(Source(location, weight=weight, **fields))
    return out


def is_file_source(location: str) -> bool:
    """Whether a source is a file or `save_to_disk` folder, local or at a URI, rather than a
    hub dataset name."""
    return is_uri(location) or is_local_path(location, tuple(EXTENSIONS))


def is_conversation(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _kind_of(value) -> str:
    return "a conversation" if is_conversation(value) else type(value).__name__


def read_source(source: Source):
    """The rows of one source as an HF `datasets.Dataset`: a file or `save_to_disk` folder
    (local, `~` expanded, or at an fsspec URI), else a hub dataset."""
    import datasets  # heavy: only runs that read their own files import it
    import fsspec

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    loc = source.location
    if not is_file_source(loc):
        try:  # a hub dataset (into the HF cache)
            return datasets.load_dataset(loc, source.config or None,
                                         split=source.split or "train")
        except Exception as e:
            raise UpstreamError(f"{loc}: neither a local file or folder, a URI nor a readable "
                                f"hub dataset ({type(e).__name__}: {str(e)[:300]})") from None
    path = os.path.expanduser(loc)
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        is_dir, is_file = fs.isdir(inner), fs.isfile(inner)
    except Exception as e:   # an unknown protocol, missing credentials, ...
        raise UpstreamError(f"{loc}: cannot be reached ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    if is_dir:
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise UpstreamError(f"{loc}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = source.split or "train"
            if split not in ds:
                raise UpstreamError(f"{loc}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if not is_file:
        raise UpstreamError(f"{loc}: no such file")
    ext = os.path.splitext(inner)[1].lower()
    if ext not in EXTENSIONS:
        raise UpstreamError(f"{loc}: unknown file type; use one of {', '.join(EXTENSIONS)}")
    try:
        return datasets.load_dataset(EXTENSIONS[ext], data_files=path, split="train")
    except Exception as e:  # pyarrow/json parse errors: name the file
        raise UpstreamError(f"{loc}: cannot be read as {ext[1:]} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None


@dataclasses.dataclass(frozen=True)
class Keys:
    """Column names (`data.*_key`)."""
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"


def has_column(columns, path: str) -> bool:
    """Whether `path` (a column name, or a dotted path into a struct column) can be read from
    rows with these `columns` (its struct's fields are checked row by row: `column_value`)."""
    return path in columns or path.split(".")[0] in columns


def column_value(record: dict, path: str):
    """The value a column name names in a record: `record[path]`, or for a dotted path into
    struct (dict) columns, `record["a"]["b"]` for "a.b"; None where a part is missing."""
    if path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclasses.dataclass
class Records:
    """The rows of a source list as `kind` asks: for each row its prompt (a string or a
    conversation), the responses of the kind (`responses[key][i]`: "response", or "chosen"
    and "rejected"), every other column (`columns[name][i]`) and where it came from
    (`origin[i]`: "file row N")."""
    kind: str
    prompts: list
    responses: dict[str, list]
    columns: dict[str, list]
    origin: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, rows) -> "Records":
        rows = [int(r) for r in rows]
        pick = lambda xs: [xs[i] for i in rows]
        return Records(self.kind, pick(self.prompts), {k: pick(v) for k, v in self.responses.items()},
                       {k: pick(v) for k, v in self.columns.items()}, pick(self.origin),
                       sha256(self.fingerprint + json.dumps(rows)))


def _source_fingerprint(ds, source: Source) -> str:
    """What a cache of this source depends on: a local file's bytes, else datasets'
    fingerprint (a URI's: from the files' metadata, as datasets' own cache keys them)."""
    path = os.path.expanduser(source.location)
    if not is_uri(path) and os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return f"{source.name}:{getattr(ds, '_fingerprint', '')}"


def _shape(ds, source: Source, kind: str, keys: Keys) -> str:
    """Which column layout `source` has for `kind`; UpstreamError naming the columns it lacks."""
    cols = set(ds.column_names)
    layouts = {"prompt": [("prompt", {keys.prompt}), ("messages", {keys.messages}),
                          ("implicit", {keys.chosen, keys.rejected})],
               "sft": [("completion", {keys.prompt, keys.completion}),
                       ("messages", {keys.messages})],
               "preference": [("explicit", {keys.prompt, keys.chosen, keys.rejected}),
                              ("implicit", {keys.chosen, keys.rejected})]}[kind]
    for name, needed in layouts:
        if all(has_column(cols, path) for path in needed):
            return name
    wanted = " or ".join("+".join(sorted(n)) for _, n in layouts)
    raise UpstreamError(f"{source.name}: no column(s) {wanted} for {kind} rows; it has "
                    f"{sorted(cols)} (rename them with data.prompt_key, data.completion_key, ...)")


def _common_prefix(chosen, rejected):
    """Implicit prompt: the messages (or, for strings, the text up to the last whitespace)
    chosen and rejected share, and the rest of each."""
    if is_conversation(chosen) and is_conversation(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = os.path.commonprefix([chosen, rejected])
        cut = max(common.rfind(" "), common.rfind("\n")) + 1
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise ValueError("chosen and rejected must both be strings or both conversations")


def _value(record: dict, path: str):
    """`column_value`, a ValueError where a dotted path finds nothing in this row."""
    value = column_value(record, path)
    if value is None and path not in record:
        raise ValueError(f"{path!r} is missing (a dotted path into a struct column)")
    return value


def _row(record: dict, shape: str, keys: Keys):
    """(prompt, {response key: value}) of one record; ValueError saying what is wrong. A
    column name may be a dotted path into a struct column (`column_value`)."""
    if shape == "messages":
        msgs = _value(record, keys.messages)
        if not is_conversation(msgs):
            raise ValueError(f"{keys.messages!r} must be a conversation, got {_kind_of(msgs)}")
        return msgs[:-1], {"response": msgs[-1:]}
    if shape == "implicit":
        prompt, chosen, rejected = _common_prefix(_value(record, keys.chosen),
                                                  _value(record, keys.rejected))
        return prompt, {"chosen": chosen, "rejected": rejected}
    names = {"prompt": {}, "completion": {"response": keys.completion},
             "explicit": {"chosen": keys.chosen, "rejected": keys.rejected}}[shape]
    return _value(record, keys.prompt), {n: _value(record, c) for n, c in names.items()}


def _check(prompt, responses: dict, wrap: bool) -> None:
    """ValueError if the values of a row are not usable."""
    if not (isinstance(prompt, str) or is_conversation(prompt) or prompt == []):
        raise ValueError(f"prompt must be a string or a conversation, got {_kind_of(prompt)}")
    conversational = is_conversation(prompt) or wrap
    if is_conversation(prompt):
        for m in prompt:
            if not isinstance(m["content"], str):
                raise ValueError(f"a message's content must be a string, got "
                                 f"{type(m['content']).__name__}")
        if prompt[-1]["role"] != "user":
            raise ValueError(f"the prompt conversation must end with a user turn, not "
                             f"{prompt[-1]['role']!r}")
    elif prompt == []:
        raise ValueError("the conversation has no turns before its last one (the prompt)")
    elif not prompt:
        raise ValueError("the prompt is empty")
    for name, value in responses.items():
        if isinstance(value, str):
            continue
        if not is_conversation(value):
            raise ValueError(f"{name} must be a string or a conversation, got {_kind_of(value)}")
        if not conversational:
            raise ValueError(f"{name} is a conversation but the prompt is a plain string "
                             f"(data.wrap_prompts=true renders it as a user turn)")
        if value[-1]["role"] != "assistant":
            raise ValueError(f"{name} must end with an assistant turn, not {value[-1]['role']!r}")


def load_records(text: str, key: str, kind: str, keys: Keys, seed: int,
                 wrap: bool = False) -> Records:
    """Every row of the sources `text` (config key `key`) as `kind` records, checked (UpstreamError
    naming the source and row); several sources mixed by their weights (`mix`)."""
    sources = parse_sources(text, key)
    if not sources:
        raise UpstreamError(f"{key}: no source given")
    parts = []
    for source in sources:
        ds = read_source(source)
        shape = _shape(ds, source, kind, keys)
        used = {keys.prompt, keys.completion, keys.messages, keys.chosen, keys.rejected}
        prompts_, responses, origin = [], {}, []
        columns = {c: [] for c in ds.column_names if c not in used}
        for i, record in enumerate(ds):
            try:
                prompt, resp = _row(record, shape, keys)
                if kind == "prompt":   # a messages column may hold the prompt whole
                    msgs = column_value(record, keys.messages) if shape == "messages" else None
                    prompt = msgs if is_conversation(msgs) and msgs[-1]["role"] == "user" else prompt
                    resp = {}
                _check(prompt, resp, wrap)
            except ValueError as e:
                raise UpstreamError(f"{source.name}: row {i}: {e}") from None
            prompts_.append(prompt)
            for name, value in resp.items():
                responses.setdefault(name, []).append(value)
            for c in columns:
                columns[c].append(record[c])
            origin.append(f"{source.name} row {i}")
        if not prompts_:
            raise UpstreamError(f"{source.name}: no rows")
        parts.append(Records(kind, prompts_, responses, columns, origin,
                             sha256(json.dumps([kind, shape, dataclasses.astuple(keys),
                                                 _source_fingerprint(ds, source)]))))
    return mix(parts, [s.weight for s in sources], seed)


def mix(parts: list[Records], weights: Sequence[float], seed: int) -> Records:
    """Records of several sources as one: part i gives round(w_i / sum(w) * total) rows (total:
    all their rows), its own rows in a seeded order, repeated or cut to that count; one part
    is itself. Columns a part lacks are None for its rows."""
    if len(parts) == 1:
        return parts[0]
    total, w = sum(map(len, parts)), np.asarray(weights, np.float64)
    counts = np.maximum(np.round(w / w.sum() * total).astype(int), 1)
    rng = np.random.default_rng(seed)
    names = sorted({c for p in parts for c in p.columns})
    out = Records(parts[0].kind, [], {k: [] for k in parts[0].responses},
                  {c: [] for c in names}, [], sha256(json.dumps(
                      [p.fingerprint for p in parts] + [int(c) for c in counts])))
    for part, count in zip(parts, counts):
        order = np.concatenate([rng.permutation(len(part))
                                for _ in range(-(-count // len(part)))])[:count]
        sub = part.take(order)
        out.prompts += sub.prompts
        out.origin += sub.origin
        for k in out.responses:
            out.responses[k] += sub.responses[k]
        for c in names:
            out.columns[c] += sub.columns.get(c, [None] * count)
    return out


def encode(records: Records, render: R.Render, prompt_len: int, response_len: int,
           long_prompts: str, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """Token ids of every record, ragged (`loader.Encoded`'s columns: `f"{field}.ids"`,
    `f"{field}.offsets"` for "prompt" and each response field), plus "row": the records kept.

    A prompt is `render.prompt`'s text encoded; one over `prompt_len` tokens stops the run with
    an UpstreamError naming its row and length (`long_prompts="error"`), is shortened by
    `render.fit` (the content of its last user message keeps its last characters: "truncate")
    or is dropped ("filter"), those cut or dropped counted on stderr. A response is
    `render.response`'s text after its (shortened) prompt, its ids those that follow the
    prompt's in the encoding of both (`prompts.encode_responses`), cut to the first
    `response_len` (the stop token is lost if it is longer). Cached in `cache_dir`
    (`cache.cached`) by the records', the rendering's, the lengths' and the code's hash."""
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPTS}, got {long_prompts!r}")
    key = json.dumps([records.fingerprint, render.fingerprint(), prompt_len, response_len,
                      long_prompts])
    return cached(cache_dir, f"own-{records.kind}", key,
                  (sys.modules[__name__], R, P, ragged_columns),
                  lambda: _encode(records, render, prompt_len, response_len, long_prompts))


def _encode(records: Records, render: R.Render, prompt_len: int, response_len: int,
            long_prompts: str) -> dict[str, np.ndarray]:
    """`encode` without its cache."""
    tok = render.tokenizer
    values = list(records.prompts)
    texts = [_rendered(render.prompt, records, i, values[i]) for i in range(len(records))]
    prompt_ids = P.encode_batch(tok, texts)
    long = [i for i, ids in enumerate(prompt_ids) if len(ids) > prompt_len]
    if long and long_prompts == "error":
        i = long[0]
        more = f" (and {len(long) - 1} more of the {len(records)})" if len(long) > 1 else ""
        raise UpstreamError(
            f"{records.origin[i]}: the prompt is {len(prompt_ids[i])} tokens, more than "
            f"data.prompt_len={prompt_len}{more}: raise data.prompt_len, or set "
            f"data.long_prompts=truncate (cut the last user message) or filter (drop them)")
    if long:
        print(f"data: {len(long)} of {len(records)} prompts ({records.kind} rows) are longer "
              f"than {prompt_len} tokens: "
              f"{'dropped' if long_prompts == 'filter' else 'their last user message cut to fit'}"
              f" (data.long_prompts={long_prompts})", file=sys.stderr)
    if long_prompts == "truncate":
        for i in long:
            fitted = _rendered(lambda v: render.fit(v, prompt_len), records, i, values[i])
            if fitted is None:
                raise UpstreamError(f"{records.origin[i]}: the prompt is over data.prompt_len="
                                    f"{prompt_len} tokens even with its last user message empty")
            values[i], texts[i] = fitted, render.prompt(fitted)
            prompt_ids[i] = P.encode(tok, texts[i])
    keep = (sorted(set(range(len(records))) - set(long)) if long_prompts == "filter"
            else list(range(len(records))))
    if not keep:
        raise UpstreamError(f"every {records.kind} prompt is longer than {prompt_len} tokens "
                            f"(data.prompt_len)")
    chunk = {"prompt": [prompt_ids[i] for i in keep]}
    for name, responses in records.responses.items():
        after = [_rendered(lambda v: render.response(v, responses[i]), records, i, values[i])
                 for i in keep]
        chunk[name] = [P.cut_response(tok, ids, response_len, append_eos=False) for ids in
                       P.encode_responses(tok, [texts[i] for i in keep], chunk["prompt"], after)]
    columns = ragged_columns([chunk], list(chunk))
    columns["row"] = np.asarray(keep, np.int64)
    return columns


def _rendered(fn, records: Records, i: int, value):
    """`fn(value)` for record i; its ValueError as an UpstreamError naming the row."""
    try:
        return fn(value)
    except UpstreamError:
        raise
    except ValueError as e:
        raise UpstreamError(f"{records.origin[i]}: {e}") from None


class Examples(Sequence):
    """`loader.Encoded` examples, each with its record's index as "row" (int64 [])."""

    def __init__(self, encoded: Sequence, rows: np.ndarray):
        self.encoded, self.rows = encoded, rows

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        return dict(self.encoded[index], row=self.rows[index])
