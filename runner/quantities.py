"""Memory sizes and durations as people type them (`512M`, `8G`; `90s`, `10m`, `2h`, `1-12:00:00`).

Slurm users write a bare number of memory as megabytes and a bare number of time as minutes,
so both are read that way here. Parsers return None for text they cannot read, so the caller
can name the key and the value in its own message.
"""

from __future__ import annotations

import re

MEMORY_HELP = "expected a size such as 512M or 8G (K, M, G, T; a plain number is megabytes)"
DURATION_HELP = (
    "expected a duration such as 90s, 10m or 2h (a plain number is minutes; "
    "Slurm's [D-]HH:MM:SS works too)"
)

# 8G, 8GB, 8GiB and 8Gi (Kubernetes' spelling)
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B|(?<=[KMGT])i)?", re.IGNORECASE)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Slurm: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_CLOCK = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def memory_bytes(value: str | int | float) -> int | None:
    """Bytes in `512M`, `8G`, `1.5GiB`, `8Gi` or a bare number of megabytes; None when
    unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value * (1 << 20)) if value >= 0 else None
    match = _MEMORY.fullmatch(value.strip())
    if match is None:
        return None
    number, unit = float(match[1]), (match[2].upper() or "M")
    return int(number * (1 << (10 * _POWERS[unit])))


def duration_seconds(value: str | int | float) -> float | None:
    """Seconds in `90s`, `10m`, `2h`, `1d`, a bare number of minutes, or `[D-]HH:MM:SS`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) * 60 if value > 0 else None
    text = value.strip()
    seconds: float | None = None
    if match := _DURATION.fullmatch(text):
        seconds = float(match[1]) * _SECONDS[match[2].lower()]
    elif re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text) * 60
    elif match := _CLOCK.fullmatch(text):
        seconds = _clock(match)
    return seconds if seconds is not None and seconds > 0 else None


def _clock(match: re.Match[str]) -> float:
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + (first or 0) * 3600 + (second or 0) * 60 + (third or 0)
    if third is not None:  # HH:MM:SS
        return (first or 0) * 3600 + (second or 0) * 60 + third
    return (first or 0) * 60 + (second or 0)  # MM:SS
