"""The one on-disk cache of tokenised data: a dict of numpy arrays per entry, in
`<cache_dir>/<name>-<key>.npz`.

The key hashes everything the arrays depend on: what the caller names (the data's contents,
the tokenizer, the lengths: `tokenizer_fingerprint`, a file's bytes, ...) and the source text
of the code that computes them (`inspect.getsource` of the modules or functions it gives), so
that editing the encoding code invalidates its entries without a hand-bumped version number.
Entries are written atomically: a reader sees no file or the whole file.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def code_fingerprint(code: Sequence[object]) -> str:
    """A hash of the source text of `code` (modules, classes, functions)."""
    return sha256("\0".join(inspect.getsource(c) for c in code))


def tokenizer_fingerprint(tokenizer) -> str:
    """What a tokenizer's encodings depend on: its whole definition (vocabulary, merges,
    normalisation, added tokens), its BOS/EOS ids, its chat template and the versions of the
    libraries that run them."""
    import tokenizers
    import transformers
    tok = tokenizer
    definition = (tok.backend_tokenizer.to_str() if tok.is_fast
                  else json.dumps(sorted(tok.get_vocab().items())))
    return sha256(json.dumps([type(tok).__name__, sha256(definition), tok.bos_token_id,
                              tok.eos_token_id, getattr(tok, "chat_template", None),
                              transformers.__version__, tokenizers.__version__]))


def cached(cache_dir: str | os.PathLike | None, name: str, key: str, code: Sequence[object],
           compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, read from `<cache_dir>/<name>-<hash>.npz` when an earlier call
    wrote them and written there otherwise. The hash covers `key` (what the arrays depend on
    besides the code) and the source of `code` (the code that computes them). Without a
    `cache_dir` (`None`, ""), `compute()` alone; `~` in it is the home folder."""
    if not cache_dir:
        return compute()
    digest = sha256(key + code_fingerprint(code))[:24]
    path = os.path.join(os.path.expanduser(os.fspath(cache_dir)), f"{name}-{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            return dict(stored)
    arrays = compute()
    _save_atomically(path, arrays)
    return arrays


def _save_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
