"""`python -m runner` is the same program as the `runner` console script."""

from __future__ import annotations

from runner.cli import command

if __name__ == "__main__":
    raise SystemExit(command())
