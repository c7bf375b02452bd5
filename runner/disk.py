"""A full disk met by a unit's own writes.

A job's stdout, a shard's log and output are written by processes on the worker's side: when
the disk under the run directory is full, the runner sees no `OSError`, only a unit that
failed (or one that ended with its output cut short). Before such a unit is recorded, the
runner looks at the free space where it wrote; a full disk there stops the run with the one
message every other full-disk write gives (`store.storage_error`), and the unit is recorded
cancelled, never done or failed, so a rerun once there is room runs it again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from runner.errors import StorageError
from runner.store import storage_error

# less free space than this where a unit wrote counts as a full disk (what is left below one
# write's buffer is as good as none)
FULL_BELOW = 64 << 10


def full(where: str | Path, root: Path) -> StorageError | None:
    """The error to stop the run with when the file system holding `where` (a directory the
    unit wrote into, under the run directory `root`) is full; None while it has room."""
    try:
        fs = os.statvfs(where)
    except OSError:
        return None
    if fs.f_bavail * fs.f_frsize >= FULL_BELOW:
        return None
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # the run directory's own disk is named as such; a disk mounted below it, by its path
    if os.stat(where).st_dev == os.stat(root).st_dev:
        return storage_error(root, exc)
    return storage_error(root, exc, Path(where))
