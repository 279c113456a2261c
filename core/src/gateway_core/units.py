"""Parsing and printing of the quantities people write in config: memory sizes and durations.

Owns `parse_memory` ("2 G", "512 MiB", 1073741824 → bytes), `format_memory`, `parse_duration`
("8h", "1h30m", "90s", 600 → seconds) and `format_duration`.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 10**3,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 10**6,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 10**9,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 10**12,
    "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int, or a string like ``"2 G"`` (binary), ``"512 MiB"``, ``"1.5 GB"``.

    Single letters K, M, G, T are binary multiples, as in the original gateway's config.
    Raises ValueError naming the bad value.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"memory size must not be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a memory size, got {type(value).__name__}")
    match = _PATTERN.match(value)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(
            f"invalid memory size {value!r}; use a number with an optional unit "
            "(K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_memory(nbytes: int) -> str:
    """A short human form: 2147483648 → ``"2 GiB"``, 1536 → ``"1.5 KiB"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} B"


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)\s*([dhms])", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(?:[0-9]*\.?[0-9]+\s*[dhms]\s*)+$", re.IGNORECASE)


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number of seconds, or a string like ``"8h"``, ``"1h30m"``, ``"90s"``,
    ``"2d"`` (units d, h, m, s; a bare number in a string is seconds).

    Raises ValueError naming the bad value.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    text = value.strip()
    if re.fullmatch(r"[0-9]*\.?[0-9]+", text):
        return float(text)
    if not _DURATION.match(text):
        raise ValueError(
            f"invalid duration {value!r}; use seconds or a number with a unit "
            '(d, h, m, s), e.g. "8h" or "1h30m"'
        )
    return float(
        sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_PART.findall(text))
    )


def format_duration(seconds: float) -> str:
    """A short human form: 28800 → ``"8h"``, 5400 → ``"1h30m"``, 0.5 → ``"0.5s"``."""
    if seconds != int(seconds) or seconds < 1:
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, size in _DURATION_UNITS.items():
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)
