"""Tiny arithmetic workers: the demo's first stages, and cheap items for tests and benchmarks."""

from __future__ import annotations


class Power:
    """Raise a number to `exponent`."""

    def __init__(self, exponent: int = 2) -> None:
        self.exponent = exponent

    def __call__(self, item: int) -> int:
        return int(int(item) ** self.exponent)


class Describe:
    """Say whether a number is even, and how many digits it has."""

    def __call__(self, item: int | str) -> dict[str, int | bool]:
        value = int(item)
        return {"value": value, "even": value % 2 == 0, "digits": len(str(abs(value)))}
