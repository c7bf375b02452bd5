"""Files a task writes for the run directory, brought back through Ray when the nodes do not
share a filesystem (`cluster.shared_fs: false`).

With a shared filesystem a task writes straight into the run directory. Without one it
writes on its own node, in its process's scratch folder, and hands the bytes back with its
reply; the runner writes them where they belong. A file is then complete once its unit has
answered (not while it runs), and a task killed before it answers leaves nothing behind: a
cancelled task removes its copies, a killed worker's scratch folder is swept (`scratch`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from runner import scratch


@dataclass(frozen=True)
class Dest:
    """One file for the run directory at `path`; `carried`: written on the task's node and
    brought back in the reply."""

    path: str
    carried: bool = False
    # the name it gets on the task's node (made once, so `here` is stable): only a carried
    # file has one, for a stem costs a random number per job launch
    stem: str = ""

    def __post_init__(self) -> None:
        if self.carried and not self.stem:
            object.__setattr__(self, "stem", uuid.uuid4().hex)

    def here(self) -> str:
        """Where the task writes it on its own node."""
        if not self.carried:
            return self.path
        return os.path.join(scratch.folder(), f"{self.stem}-{Path(self.path).name}")


class DestFields(TypedDict):
    """A `Dest`'s fields, as it travels in a task's arguments (`remote.plain`)."""

    path: str
    carried: bool
    stem: str


def collect(dests: Iterable[Dest]) -> dict[str, bytes]:
    """In the task, as it answers: the carried files' bytes by their run-directory path (their
    copies on this node are removed)."""
    found = {}
    for dest in dests:
        if not dest.carried:
            continue
        local = Path(dest.here())
        try:
            found[dest.path] = local.read_bytes()
        except OSError:
            continue
        local.unlink(missing_ok=True)
    return found


def discard(dests: Iterable[Dest]) -> None:
    """In the task, when it ends without answering (cancelled): remove the carried copies."""
    for dest in dests:
        if dest.carried:
            Path(dest.here()).unlink(missing_ok=True)


def pack(root: Path, paths: Iterable[Path]) -> dict[str, bytes]:
    """The bytes of the files among `paths` that exist (directories: every file below them),
    by their path relative to `root`: what travels with a task, or back with its reply."""
    found = {}
    for path in paths:
        below = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
        for file in below:
            if file.is_file():
                found[str(file.relative_to(root))] = file.read_bytes()
    return found


def under(root: Path, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """Files packed by `pack`, by their paths under `root` (for `land`)."""
    return {str(root / rel): data for rel, data in files.items()}


def unpack(root: Path, files: Mapping[str, bytes]) -> None:
    """Write files packed by `pack` under `root`."""
    land(under(root, files))


def land(files: Mapping[str, bytes]) -> None:
    """On the runner: write the files a task brought back where they belong."""
    for path, data in files.items():
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
