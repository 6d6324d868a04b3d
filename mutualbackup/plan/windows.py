"""Backup windows in local time: their occurrences, DST included, and each source's slot in them.

Pure: the clock is never read. Every instant taken or returned is a timezone-aware
:class:`datetime.datetime`; results are in UTC. Windows are local wall-clock times in the
coordinator's time zone (a :class:`zoneinfo.ZoneInfo` passed in) and follow its daylight-saving
changes.

A window *occurrence* is one concrete opening of a :class:`~mutualbackup.inventory.model.Window`,
named by the local date on which it opens (``22:00-04:00`` of 2025-03-29 runs
from the evening of the 29th to the morning of the 30th). On DST days:

* a local time the clock jumps over (02:30 on a spring-forward night in Paris)
  is reached at the instant of the jump, so ``01:00-06:00`` that night lasts 4 h;
* a local time that happens twice (02:30 on a fall-back night) means its first
  occurrence, so ``01:00-06:00`` that night lasts 6 h;
* a window lying wholly inside the skipped hour still opens, at the jump, for its
  nominal length.

Within an occurrence each source starts at its own *slot*: the opening plus
``jitter_seconds(source, span)``, with ``span`` the first half of the window, so
sources sharing a window are spread over it and still have time to finish.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from mutualbackup.inventory.model import Backup, Window

UTC = dt.timezone.utc
WINDOW_JITTER_FRACTION = 0.5  # slots lie in this leading fraction of a window


@dataclass(frozen=True)
class Occurrence:
    """One opening of a window: ``[start, end)`` in UTC, opened on local ``date``."""

    date: dt.date
    start: dt.datetime
    end: dt.datetime

    def __contains__(self, instant: dt.datetime) -> bool:
        return self.start <= instant < self.end


def as_utc(instant: dt.datetime, name: str) -> dt.datetime:
    """``instant`` in UTC; ValueError when it is naive (a wall time with no zone)."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {instant.isoformat()}")
    return instant.astimezone(UTC)


def _wall(timestamp: int, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz).replace(tzinfo=None)


def local_to_utc(local: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The instant at which the clocks of ``tz`` reach the naive wall time ``local``.

    An ambiguous time (fall-back) gives its first occurrence; a time the clock
    jumps over (spring-forward) gives the instant of the jump.
    """
    first = local.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == local:
        return first
    # In a gap: the wall clock is below `local` just before the jump, above after.
    other = local.replace(tzinfo=tz, fold=1).astimezone(UTC)
    low, high = sorted((int(first.timestamp()), int(other.timestamp())))
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(middle, tz) >= local:
            high = middle
        else:
            low = middle
    return dt.datetime.fromtimestamp(high, UTC)


@functools.lru_cache(maxsize=16384)
def window_occurrence(window: Window, tz: ZoneInfo, date: dt.date) -> Occurrence:
    """The occurrence of ``window`` that opens on local ``date`` (see the module notes)."""
    midnight = dt.datetime.combine(date, dt.time())
    start = local_to_utc(midnight + dt.timedelta(minutes=window.start), tz)
    end_day = 0 if window.start < window.end else 1
    end = local_to_utc(midnight + dt.timedelta(days=end_day, minutes=window.end), tz)
    if end <= start:  # the whole window lies in a skipped hour
        end = start + dt.timedelta(minutes=window.length)
    return Occurrence(date, start, end)


def local_date(instant: dt.datetime, tz: ZoneInfo) -> dt.date:
    return instant.astimezone(tz).date()


def occurrences_from(window: Window, tz: ZoneInfo, date: dt.date) -> Iterator[Occurrence]:
    while True:
        yield window_occurrence(window, tz, date)
        date += dt.timedelta(days=1)


def occurrence_containing(window: Window, tz: ZoneInfo, instant: dt.datetime) -> Occurrence | None:
    """The occurrence of ``window`` that ``instant`` falls in, or None."""
    instant = as_utc(instant, "instant")
    date = local_date(instant, tz)
    for day in (date - dt.timedelta(days=1), date):
        occurrence = window_occurrence(window, tz, day)
        if instant in occurrence:
            return occurrence
    return None


def next_occurrence(window: Window, tz: ZoneInfo, after: dt.datetime) -> Occurrence:
    """The first occurrence of ``window`` that opens strictly after ``after``."""
    after = as_utc(after, "after")
    start_date = local_date(after, tz) - dt.timedelta(days=1)
    return next(o for o in occurrences_from(window, tz, start_date) if o.start > after)


def occurrence_at_or_before(window: Window, tz: ZoneInfo, instant: dt.datetime) -> Occurrence:
    date = local_date(instant, tz)
    while (occurrence := window_occurrence(window, tz, date)).start > instant:
        date -= dt.timedelta(days=1)
    return occurrence


def jitter_seconds(source: str, span_seconds: int) -> int:
    """A deterministic offset in ``[0, span_seconds)`` for ``source``.

    Taken from BLAKE2b of the name, so it is the same in every process and on
    every run, and differs from one source to the next. ValueError when
    ``span_seconds < 1``.
    """
    if span_seconds < 1:
        raise ValueError(f"span_seconds must be at least 1, got {span_seconds}")
    digest = hashlib.blake2b(source.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % span_seconds


def window_slot(source: str, window: Window, occurrence: Occurrence) -> dt.datetime:
    """When ``source`` starts in ``occurrence``: its opening + the source's jitter.

    The jitter spans the first half of the window's nominal length; on a DST day
    it is pulled back only when it would fall outside a (shortened) occurrence.
    """
    span = max(1, int(window.length * 60 * WINDOW_JITTER_FRACTION))
    offset = jitter_seconds(source, span)
    length = (occurrence.end - occurrence.start).total_seconds()
    if offset >= length:
        offset = int(length // 2)
    return occurrence.start + dt.timedelta(seconds=offset)


def in_window(backup: Backup, tz: ZoneInfo, when: dt.datetime) -> bool:
    """True when ``when`` is inside an occurrence of the backup's window, or it has none."""
    return backup.window is None or occurrence_containing(backup.window, tz, when) is not None


def into_window(source: str, backup: Backup, tz: ZoneInfo, instant: dt.datetime) -> dt.datetime:
    """``instant`` if it is inside the window (or there is none), else the next slot."""
    if backup.window is None or occurrence_containing(backup.window, tz, instant) is not None:
        return instant
    return window_slot(source, backup.window, next_occurrence(backup.window, tz, instant))


def window_closed(backup: Backup, tz: ZoneInfo, now: dt.datetime) -> bool:
    """Outside the backup window, where maintenance goes (a source without a window: any time)."""
    return backup.window is None or not in_window(backup, tz, now)


def clear_of_window(backup: Backup, tz: ZoneInfo, now: dt.datetime, margin: float) -> bool:
    """The window is closed and does not open within ``margin`` seconds (a job started now would
    crowd out backups)."""
    if backup.window is None:
        return True
    if not window_closed(backup, tz, now):
        return False
    return next_occurrence(backup.window, tz, now).start > now + dt.timedelta(seconds=margin)
