"""What a fingerprint knows of things outside the spec: a file by its content, a worker by the
source of its module.

A file's identity is a digest of its bytes, so `touch` reruns nothing while an edit reruns what
read it. Hashing a large input on every plan would cost a full read, so digests are remembered
(in the ledger) by path, size and mtime: an unchanged stamp is trusted, a moved one is re-hashed.
A worker's identity is a digest of its module's source: an editable install never changes its
version, so the version alone would miss an edit.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

CHUNK = 1 << 20


class FileDigests(Protocol):
    """A memory of content digests by (path, size, mtime); the ledger is one."""

    def file_digest(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def save_file_digest(self, path: str, size: int, mtime_ns: int, digest: str) -> None: ...


def content_digest(path: Path) -> str:
    """A digest of a file's bytes, read in chunks (memory stays flat for any size)."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path, known: FileDigests | None = None) -> str:
    """The content digest of `path`, from `known` when its size and mtime are as recorded."""
    resolved = str(path.resolve())
    st = path.stat()
    if known is not None:
        found = known.file_digest(resolved, st.st_size, st.st_mtime_ns)
        if found is not None:
            return found
    digest = content_digest(path)
    if known is not None:
        known.save_file_digest(resolved, st.st_size, st.st_mtime_ns, digest)
    return digest


def code_digest(target: str) -> str:
    """A digest of the source of the module that defines `target` (`pkg.mod.attr`); '' when
    no module file is found (a builtin, or a target the spec check already rejected)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:cut]))
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            return _source_digest(spec.origin)
    return ""


_seen: dict[tuple[str, int, int], str] = {}


def _source_digest(origin: str) -> str:
    st = Path(origin).stat()
    key = (origin, st.st_size, st.st_mtime_ns)
    if key not in _seen:
        _seen[key] = content_digest(Path(origin))
    return _seen[key]


def digest(*parts: str) -> str:
    """A short stable hash of strings."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def digester(*prefix: str) -> Callable[[str], str]:
    """`digest(*prefix, part)` for many parts: the prefix is hashed once and its state copied
    (a stage's units share their stage's fingerprint as the prefix)."""
    base = hashlib.blake2b(digest_size=12)
    for part in prefix:
        base.update(part.encode())
        base.update(b"\0")

    def one(part: str) -> str:
        h = base.copy()
        h.update(part.encode() + b"\0")
        return h.hexdigest()

    return one
