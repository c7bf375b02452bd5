"""`python -m runner` is the same program as the `runner` console script."""

from __future__ import annotations


def main() -> int:
    """The `runner` command, its imports (Ray, Hydra: most of a second) within reach of a
    Ctrl-C, which then ends it with 130 and no traceback, as it does once the command runs."""
    try:
        from runner.cli import command
    except KeyboardInterrupt:
        return 130
    return command()


if __name__ == "__main__":
    raise SystemExit(main())
