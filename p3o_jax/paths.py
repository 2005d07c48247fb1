"""What a location names: a URI (`scheme://...`, read through fsspec), a local file or folder
(`~` is the home folder, expanded where it is read), or else a hub id. The one test of each,
for the config checks (p3o_jax/checks.py) and the readers (p3o_jax/data/own.py)."""
from __future__ import annotations

import os
import re

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")   # fsspec's: gs://, s3://, hf://, memory://, ...


def is_uri(text: str) -> bool:
    """Whether `text` is a URI (`scheme://...`): read by fsspec, never a local path."""
    return URI.match(text) is not None


def is_local_path(text: str, extensions: tuple[str, ...] = ()) -> bool:
    """Whether `text` names a local file or folder rather than a hub id or a URI: it is no
    URI, and it exists, starts like a path (/, ./, ../, ~) or ends with one of `extensions`
    (a data file's, for data sources)."""
    if is_uri(text):
        return False
    return (os.path.exists(os.path.expanduser(text)) or text.startswith(("/", ".", "~"))
            or text.lower().endswith(extensions))
