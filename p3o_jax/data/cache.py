"""The one on-disk cache of tokenised data: a dict of numpy arrays per entry, in
`<cache_dir>/<name>-<key>.npz`.

The key hashes everything the arrays depend on: what the caller names (the data's contents,
the tokenizer, the lengths: `tokenizer_fingerprint`, a file's bytes, ...) and the source text
of the code that computes them (`inspect.getsource` of the modules or functions it gives), so
that editing the encoding code invalidates its entries without a hand-bumped version number.
Entries are written atomically (`storage.write_atomically`): a reader sees no file or the
whole file, and a full disk is `storage.WriteFailed` naming the entry.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from p3o_jax import storage


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
    storage.write_atomically(path, lambda f: np.savez(f, **arrays), "wb")
    return arrays
