"""Your own data (`task=dataset`): prompts, demonstrations and preference pairs from files,
`save_to_disk` folders or hub datasets, in TRL's column conventions, rendered with the
tokenizer's chat template.

A source (`data.sft`, `data.preferences`, `data.prompts`, `data.eval`) is a comma list of
`LOCATION[:split=S][:config=C][:weight=W]`: a `.jsonl`, `.json`, `.parquet`, `.csv` or
`.arrow` file (by extension), a folder written by `datasets`' `save_to_disk`, or a hub
dataset name (its `split`, default train, and `config`). All are read by HF `datasets`.
Several sources are mixed by their weights (`mix`): source i makes up w_i / sum(w) of the
rows, its own rows shuffled and repeated or cut to that count.

Columns (names configurable, `data.prompt_key` ...), each value a string or a conversation
(a list of `{"role", "content"}` messages):

    kind        columns                                       prompt is
    prompt      prompt                                        prompt (a conversation ends
                (or those of sft / preference below)          with a user turn)
    sft         prompt + completion, or messages              messages minus the last turn
    preference  prompt + chosen + rejected, or chosen +       the messages chosen and
                rejected alone (implicit prompt)              rejected share

A conversational prompt is rendered with `apply_chat_template(add_generation_prompt=True)`;
a response is what the template adds after it, ending in the tokenizer's EOS (appended once).
`data.wrap_prompts` turns plain-string prompts (and their completions) into one user turn
(and one assistant turn). Every other column of
a prompt record is kept (`Records.columns`) for the reward functions.

Bad input raises `UpstreamError` (a `ValueError`) naming the source and row, before anything
compiles: a missing file or column (with the columns that exist), a value of the wrong type, a
conversation without its final user (prompt) or assistant (response) turn.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from p3o_jax.data import prompts as P
from p3o_jax.data.loader import ragged_columns, save_npz_atomically
from p3o_jax.data.validate import UpstreamError

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
KINDS = ("prompt", "sft", "preference")
ENCODING_VERSION = 1    # part of the cache key: bump when `encode`'s output changes


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
    """`Source`s of a comma list (`key`: the config key, for the error)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        location, *options = item.split(":")
        fields = {}
        for option in options:
            name, sep, value = option.partition("=")
            if not sep or name not in ("split", "config", "weight"):
                raise UpstreamError(f"{key}: {item!r}: options are split=, config=, weight= "
                                f"(LOCATION[:split=S][:config=C][:weight=W]), got {option!r}")
            fields[name] = value
        try:
            weight = float(fields.pop("weight", 1.0))
        except ValueError:
            raise UpstreamError(f"{key}: {item!r}: weight must be a number") from None
        if not weight > 0:
            raise UpstreamError(f"{key}: {item!r}: weight must be > 0")
        out.append(Source(location, weight=weight, **fields))
    return out


def is_conversation(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _kind_of(value) -> str:
    return "a conversation" if is_conversation(value) else type(value).__name__


def read_source(source: Source):
    """The rows of one source as an HF `datasets.Dataset`."""
    import datasets  # heavy: only runs that read their own files import it

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    loc = source.location
    if os.path.isdir(loc):
        try:
            ds = datasets.load_from_disk(loc)
        except FileNotFoundError as e:
            raise UpstreamError(f"{loc}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = source.split or "train"
            if split not in ds:
                raise UpstreamError(f"{loc}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    ext = os.path.splitext(loc)[1].lower()
    if ext in EXTENSIONS or loc.startswith((".", "/", "~")):
        if not os.path.isfile(loc):
            raise UpstreamError(f"{loc}: no such file")
        if ext not in EXTENSIONS:
            raise UpstreamError(f"{loc}: unknown file type; use one of {', '.join(EXTENSIONS)}")
        try:
            return datasets.load_dataset(EXTENSIONS[ext], data_files=loc, split="train")
        except Exception as e:  # pyarrow/json parse errors: name the file
            raise UpstreamError(f"{loc}: cannot be read as {ext[1:]} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    try:  # a hub dataset (into the HF cache)
        return datasets.load_dataset(loc, source.config or None, split=source.split or "train")
    except Exception as e:
        raise UpstreamError(f"{loc}: neither a local file or folder nor a readable hub dataset "
                        f"({type(e).__name__}: {str(e)[:300]})") from None


@dataclasses.dataclass(frozen=True)
class Keys:
    """Column names (`data.*_key`)."""
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"


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
                       _sha256(self.fingerprint + json.dumps(rows)))


def _source_fingerprint(ds, source: Source) -> str:
    """What a cache of this source depends on: the file's bytes, else datasets' fingerprint."""
    if os.path.isfile(source.location):
        with open(source.location, "rb") as f:
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
        if needed <= cols:
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


def _row(record: dict, shape: str, keys: Keys):
    """(prompt, {response key: value}) of one record; ValueError saying what is wrong."""
    if shape == "messages":
        msgs = record[keys.messages]
        if not is_conversation(msgs):
            raise ValueError(f"{keys.messages!r} must be a conversation, got {_kind_of(msgs)}")
        return msgs[:-1], {"response": msgs[-1:]}
    if shape == "implicit":
        prompt, chosen, rejected = _common_prefix(record[keys.chosen], record[keys.rejected])
        return prompt, {"chosen": chosen, "rejected": rejected}
    names = {"prompt": {}, "completion": {"response": keys.completion},
             "explicit": {"chosen": keys.chosen, "rejected": keys.rejected}}[shape]
    return record[keys.prompt], {n: record[column] for n, column in names.items()}


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
                    msgs = record.get(keys.messages) if shape == "messages" else None
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
                             _sha256(json.dumps([kind, shape, dataclasses.astuple(keys),
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
                  {c: [] for c in names}, [], _sha256(json.dumps(
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


# ---------------------------------------------------------------------------------------------
# rendering and encoding

@dataclasses.dataclass(frozen=True)
class Render:
    """How records become text: the tokenizer's chat template for conversations."""
    tokenizer: object
    wrap: bool = False        # plain-string prompts as one user turn

    def conversation(self, prompt) -> list | None:
        """The prompt as the messages the template renders (None: a plain string)."""
        if isinstance(prompt, str) and not self.wrap:
            return None
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return msgs

    def template(self, msgs: list, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UpstreamError("the data has conversations but the tokenizer has no chat template "
                            "(data.tokenizer: use one that has, or plain-string prompts)")
        return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def prompt(self, prompt) -> str:
        msgs = self.conversation(prompt)
        return prompt if msgs is None else self.template(msgs, True)

    def response(self, prompt, response, origin: str) -> str:
        """The text of `response` after `prompt`, without the EOS (appended as a token)."""
        msgs = self.conversation(prompt)
        if msgs is None:
            return response
        turns = ([{"role": "assistant", "content": response}] if isinstance(response, str)
                 else list(response))
        before, full = self.template(msgs, True), self.template(msgs + turns, False)
        if not full.startswith(before):
            raise UpstreamError(f"{origin}: the chat template does not render the response as a "
                            f"continuation of the prompt (the text before it changes)")
        text = full[len(before):].rstrip()
        eos = self.tokenizer.eos_token
        return text[:-len(eos)] if eos and text.endswith(eos) else text

    def fingerprint(self) -> str:
        tok = self.tokenizer
        definition = (tok.backend_tokenizer.to_str() if tok.is_fast
                      else json.dumps(sorted(tok.get_vocab().items())))
        return _sha256(json.dumps([ENCODING_VERSION, _sha256(definition), tok.eos_token_id,
                                   getattr(tok, "chat_template", None), self.wrap]))


def encode(records: Records, render: Render, prompt_len: int, response_len: int,
           long_prompts: str, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """Token ids of every record, ragged (`loader.Encoded`'s columns: `f"{field}.ids"`,
    `f"{field}.offsets"` for "prompt" and each response field), plus "row": the records kept.
    Prompts over `prompt_len` tokens keep their last ones (`long_prompts="truncate"`) or are
    dropped ("filter"), counted on stderr; responses keep their first `response_len` tokens,
    EOS included. Cached in `cache_dir` by the records', the rendering's and the lengths' hash."""
    key = _sha256(records.fingerprint + render.fingerprint()
                  + json.dumps([prompt_len, response_len, long_prompts]))[:24]
    path = os.path.join(cache_dir, f"own-{records.kind}-{key}.npz") if cache_dir else None
    if path and os.path.exists(path):
        with np.load(path) as cached:
            return dict(cached)
    tok = render.tokenizer
    prompt_ids = P.encode_batch(tok, [render.prompt(p) for p in records.prompts])
    too_long = np.array([len(ids) > prompt_len for ids in prompt_ids], bool)
    keep = np.flatnonzero(~too_long) if long_prompts == "filter" else np.arange(len(records))
    if too_long.any():
        print(f"data: {int(too_long.sum())} of {len(records)} prompts ({records.kind} rows) are "
              f"longer than {prompt_len} tokens: "
              f"{'dropped' if long_prompts == 'filter' else 'their last tokens kept'} "
              f"(data.long_prompts={long_prompts})", file=sys.stderr)
    if not len(keep):
        raise UpstreamError(f"every {records.kind} prompt is longer than {prompt_len} tokens "
                        f"(data.prompt_len)")
    chunk = {"prompt": [P.cut_prompt(tok, prompt_ids[i], prompt_len) for i in keep]}
    for name, values in records.responses.items():
        texts = [render.response(records.prompts[i], values[i], records.origin[i]) for i in keep]
        chunk[name] = [P.cut_response(tok, ids, response_len)
                       for ids in P.encode_batch(tok, texts)]
    columns = ragged_columns([chunk], list(chunk))
    columns["row"] = keep.astype(np.int64)
    if path:
        save_npz_atomically(path, columns)
    return columns


class Examples(Sequence):
    """`loader.Encoded` examples, each with its record's index as "row" (int64 [])."""

    def __init__(self, encoded: Sequence, rows: np.ndarray):
        self.encoded, self.rows = encoded, rows

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        return dict(self.encoded[index], row=self.rows[index])


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
