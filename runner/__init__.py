"""runner: a declarative pipeline runner for LLM post-training and batch work on Ray."""

from __future__ import annotations

from importlib import metadata

# the distribution's name on the package index (`runner` there is another project)
DIST = "ray-stage-runner"

try:
    __version__ = metadata.version(DIST)
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
