"""Parsers and formatters for the units an inventory is written in.

Sizes, durations, bandwidths and daily windows arrive as short human strings
(``20GiB``, ``26h``, ``100Mbit``, ``01:00-06:00``) and leave as plain numbers.
Every parser raises :class:`ValueError` whose message quotes the input and says
what is expected, so the inventory loader can put it straight after ``FILE:LINE:``.
Pure functions: no I/O.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from mutualbackup.inventory.model import Window

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
DURATION_UNITS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
BANDWIDTH_UNITS: dict[str, int] = {"bit": 1, "kbit": 1000, "Mbit": 1000**2, "Gbit": 1000**3}

_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_DURATION_PART = re.compile(r"\s*(\d+)\s*([A-Za-z]+)")
_CLOCK = re.compile(r"\s*(\d{1,2}):(\d{2})\s*")


def quote(text: str, limit: int = 60) -> str:
    """``text`` in double quotes with control characters escaped, cut at ``limit``.

    In: any string (possibly hostile). Out: a one-line string safe to print.
    """
    if len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text, ensure_ascii=False)


def _scaled(text: str, units: dict[str, int], what: str, example: str) -> int:
    """``NUMBER UNIT`` times the unit's factor, rounded to a whole number."""
    match = _NUMBER_UNIT.fullmatch(text)
    unit_list = ", ".join(units)
    problem = f"{quote(text)} is not a {what}; write a number and a unit, like {example} (units: {unit_list})"
    if not match:
        raise ValueError(problem)
    number, unit = match.groups()
    if unit not in units:
        if unit:
            hint = next((u for u in units if u.lower() == unit.lower()), None)
            problem += f'; did you mean "{hint}"?' if hint else ""
        raise ValueError(problem)
    try:
        value = Decimal(number) * units[unit]
    except InvalidOperation:  # pragma: no cover - the regex admits only valid numbers
        raise ValueError(problem) from None
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def parse_size(text: str) -> int:
    """A size such as ``20GiB``, ``1.5 TB`` or ``4096`` (plain bytes) -> bytes.

    Binary units: B, KiB, MiB, GiB, TiB; decimal: KB, MB, GB, TB. Fractions are
    rounded to the nearest byte. Raises ValueError when ``text`` is not a size.
    """
    if re.fullmatch(r"\s*\d+\s*", text):
        return int(text)
    return _scaled(text, SIZE_UNITS, "size", "20GiB or 1.5TB")


def parse_bandwidth(text: str) -> int:
    """A bandwidth such as ``100Mbit`` or ``1.5Gbit/s`` -> bits per second.

    Units (decimal, per second): bit, kbit, Mbit, Gbit; a trailing ``/s`` is allowed.
    Raises ValueError when ``text`` is not a bandwidth (a unit is required, so
    that bits and bytes are never confused).
    """
    stripped = text.strip()
    if stripped.endswith("/s"):
        stripped = stripped[:-2]
    return _scaled(stripped, BANDWIDTH_UNITS, "bandwidth in bits per second", "100Mbit or 1Gbit")


def parse_duration(text: str) -> int:
    """A duration such as ``26h``, ``7d`` or ``1h30m`` (also ``1h 30m``) -> seconds.

    Units: s, m, h, d, w; each part is a whole number. A bare number is refused
    (it would be ambiguous). Raises ValueError when ``text`` is not a duration.
    """
    problem = (
        f"{quote(text)} is not a duration; write a number and a unit, like 26h, 7d or 1h30m"
        f" (units: {', '.join(reversed(DURATION_UNITS))})"
    )
    position, total, seen = 0, 0, False
    stripped = text.rstrip()
    while position < len(stripped):
        match = _DURATION_PART.match(stripped, position)
        if not match or match.group(2) not in DURATION_UNITS:
            raise ValueError(problem)
        total += int(match.group(1)) * DURATION_UNITS[match.group(2)]
        position, seen = match.end(), True
    if not seen:
        raise ValueError(problem)
    return total


def _clock_minutes(text: str, *, is_end: bool) -> int:
    """``HH:MM`` -> minutes after midnight; ``24:00`` only as an end."""
    match = _CLOCK.fullmatch(text)
    if not match:
        raise ValueError("not HH:MM")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if is_end and (hours, minutes) == (24, 0):
        return 0
    if hours > 23 or minutes > 59:
        raise ValueError("not a time of day")
    return hours * 60 + minutes


def parse_window(text: str) -> Window:
    """A daily window ``HH:MM-HH:MM`` of local time -> :class:`~mutualbackup.inventory.model.Window`.

    The window may cross midnight (``22:00-04:00``); ``24:00`` is accepted as an
    end. Raises ValueError when ``text`` is not a window or when start equals end
    (an empty or full-day window: omit ``window`` to allow any time).
    """
    start_text, dash, end_text = text.partition("-")
    try:
        if not dash:
            raise ValueError("no dash")
        start = _clock_minutes(start_text, is_end=False)
        end = _clock_minutes(end_text, is_end=True)
    except ValueError:
        raise ValueError(
            f'{quote(text)} is not a window; write local start and end times as "HH:MM-HH:MM",'
            ' like "01:00-06:00" (it may cross midnight: "22:00-04:00")'
        ) from None
    if start == end:
        raise ValueError(
            f"{quote(text)} starts and ends at the same time; a window must not be empty"
            " (to allow any time of day, leave window out)"
        )
    return Window(start, end)


def format_size(size: int) -> str:
    """Bytes -> a short binary size for humans: ``512 B``, ``1.5 GiB``, ``2 TiB``.

    One decimal at most, dropped when it is zero. Negative sizes keep their sign.
    """
    size = int(size)
    sign, size = ("-", -size) if size < 0 else ("", size)
    if size < 1024:
        return f"{sign}{size} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value = Decimal(size) / SIZE_UNITS[unit]
        if value < 1024 or unit == "TiB":
            text = f"{value.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}"
            if Decimal(text) >= 1024 and unit != "TiB":
                continue
            return f"{sign}{text.removesuffix('.0')} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_duration(seconds: int) -> str:
    """Seconds -> ``1d 2h``, ``2h 5m``, ``45s``: every non-zero part, largest first.

    Weeks are shown as days (``30d``). ``0`` is ``0s``; negative durations (a
    clock skew) keep their sign. The output parses back with :func:`parse_duration`.
    """
    sign, seconds = ("-", -int(seconds)) if seconds < 0 else ("", int(seconds))
    parts: list[str] = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, DURATION_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return sign + (" ".join(parts) or "0s")


def format_bandwidth(bits_per_second: int) -> str:
    """Bits per second -> ``100 Mbit/s``, ``1.5 Gbit/s``, ``800 bit/s``."""
    for unit in ("Gbit", "Mbit", "kbit"):
        if bits_per_second >= BANDWIDTH_UNITS[unit]:
            value = Decimal(bits_per_second) / BANDWIDTH_UNITS[unit]
            text = f"{value.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}".removesuffix(".0")
            return f"{text} {unit}/s"
    return f"{bits_per_second} bit/s"
