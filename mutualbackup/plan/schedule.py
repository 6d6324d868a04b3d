"""When each replica of each source is backed up, and which jobs to start now.

Everything here is a pure function of its arguments: no I/O, and the clock is
never read -- ``now`` is always passed in. Every instant taken or returned is a
timezone-aware :class:`datetime.datetime`; results are in UTC. Windows are local
wall-clock times in the coordinator's time zone (a :class:`zoneinfo.ZoneInfo`
passed in) and follow its daylight-saving changes.

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
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from mutualbackup.inventory.model import Backup, Federation, Window

UTC = dt.timezone.utc
DAY_SECONDS = 24 * 3600
DEFAULT_ESTIMATE_SECONDS = 600.0  # a job of unknown size or bandwidth
WINDOW_JITTER_FRACTION = 0.5  # slots lie in this leading fraction of a window
FIRST_RUN_JITTER_CAP = 3600  # first runs without a window spread over min(every, this)
SLACK_FRACTION = 0.1  # a due date may come this much earlier than every...
SLACK_CAP = 2 * 3600  # ...but never more than this (absorbs DST days and late runs)


@dataclass(frozen=True)
class JobState:
    """What the history says about one source × target (replica)."""

    source: str  # "MEMBER/NODE"
    target: str  # "MEMBER/NODE" of the host
    last_success: dt.datetime | None = None  # start time of the last successful backup
    last_attempt: dt.datetime | None = None  # start time of the last attempt (success or failure)
    consecutive_failures: int = 0
    running: bool = False


@dataclass(frozen=True)
class Job:
    """One backup to start now."""

    source: str
    target: str
    reason: str  # "due" | "retry" | "never"
    due: dt.datetime  # when it became due
    estimated_seconds: float


@dataclass(frozen=True)
class Occurrence:
    """One opening of a window: ``[start, end)`` in UTC, opened on local ``date``."""

    date: dt.date
    start: dt.datetime
    end: dt.datetime

    def __contains__(self, instant: dt.datetime) -> bool:
        return self.start <= instant < self.end


# --------------------------------------------------------------------------- time


def _utc(instant: dt.datetime, name: str) -> dt.datetime:
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


def _local_date(instant: dt.datetime, tz: ZoneInfo) -> dt.date:
    return instant.astimezone(tz).date()


def _occurrences_from(window: Window, tz: ZoneInfo, date: dt.date) -> Iterator[Occurrence]:
    while True:
        yield window_occurrence(window, tz, date)
        date += dt.timedelta(days=1)


def occurrence_containing(window: Window, tz: ZoneInfo, instant: dt.datetime) -> Occurrence | None:
    """The occurrence of ``window`` that ``instant`` falls in, or None."""
    instant = _utc(instant, "instant")
    date = _local_date(instant, tz)
    for day in (date - dt.timedelta(days=1), date):
        occurrence = window_occurrence(window, tz, day)
        if instant in occurrence:
            return occurrence
    return None


def next_occurrence(window: Window, tz: ZoneInfo, after: dt.datetime) -> Occurrence:
    """The first occurrence of ``window`` that opens strictly after ``after``."""
    after = _utc(after, "after")
    start_date = _local_date(after, tz) - dt.timedelta(days=1)
    return next(o for o in _occurrences_from(window, tz, start_date) if o.start > after)


def _occurrence_at_or_before(window: Window, tz: ZoneInfo, instant: dt.datetime) -> Occurrence:
    date = _local_date(instant, tz)
    while (occurrence := window_occurrence(window, tz, date)).start > instant:
        date -= dt.timedelta(days=1)
    return occurrence


# ------------------------------------------------------------------------- jitter


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


# ---------------------------------------------------------------------- due times


def next_due(
    source: str,
    backup: Backup,
    last_success: dt.datetime | None,
    tz: ZoneInfo,
    now: dt.datetime,
) -> dt.datetime:
    """When ``source`` (one replica of it) is, or was, due for its next backup.

    The result may lie in the past (overdue since then). Only the never-backed-up
    case depends on ``now``.

    * Never backed up, with a window: the opening of the occurrence ``now`` is in
      (due now), else of the next one.
    * Never backed up, no window: the source's jittered slot in the current
      period of ``min(every, 1h)`` (periods aligned on the Unix epoch), so that
      first runs are spread instead of all starting at once. (With no history
      to remember it by, a first run held back by a limit past the end of its
      period waits for its slot in the next period.)
    * No window: ``last_success + every``.
    * Window and ``every >= 1 day``: take the opening of the occurrence that
      ``last_success`` started in (or the latest one before it, for a run made
      outside the window); the due time is the slot in the first occurrence that
      opens at or after that opening ``+ every - slack``, with
      ``slack = min(10 % of every, 2 h)``. A daily backup thus stays daily across
      DST days and after late runs (retries, queueing), and never drifts.
    * Window and ``every < 1 day``: ``last_success + every`` when that is inside
      an occurrence (repeated runs within the window), else the slot of the next
      occurrence.

    ValueError when ``now`` or ``last_success`` is naive.
    """
    now = _utc(now, "now")
    every = max(1, backup.every)
    window = backup.window
    if last_success is None:
        if window is None:
            period = min(every, FIRST_RUN_JITTER_CAP)
            timestamp = int(now.timestamp())
            slot = timestamp - timestamp % period + jitter_seconds(source, period)
            return dt.datetime.fromtimestamp(slot, UTC)
        current = occurrence_containing(window, tz, now)
        return (current or next_occurrence(window, tz, now)).start
    last = _utc(last_success, "last_success")
    if window is None:
        return last + dt.timedelta(seconds=every)
    if every >= DAY_SECONDS:
        anchor = _occurrence_at_or_before(window, tz, last).start
        slack = min(every * SLACK_FRACTION, SLACK_CAP)
        threshold = anchor + dt.timedelta(seconds=every - slack)
        first_date = _local_date(threshold, tz) - dt.timedelta(days=1)
        occurrence = next(o for o in _occurrences_from(window, tz, first_date) if o.start >= threshold)
        return window_slot(source, window, occurrence)
    candidate = last + dt.timedelta(seconds=every)
    if occurrence_containing(window, tz, candidate) is not None:
        return candidate
    return window_slot(source, window, next_occurrence(window, tz, candidate))


def retry_delay(consecutive_failures: int, *, base: float = 300, cap: float = 4 * 3600) -> float:
    """Seconds to wait after ``consecutive_failures`` failures in a row.

    ``base * 2 ** (n - 1)`` capped at ``cap``: 300, 600, 1200, … 14400, 14400…
    with the defaults; 0 when there is no failure.
    """
    if consecutive_failures < 1:
        return 0.0
    return float(min(cap, base * 2 ** min(consecutive_failures - 1, 64)))


def _failing(state: JobState) -> bool:
    """True when the last attempt failed (and came after the last success)."""
    return (
        state.consecutive_failures >= 1
        and state.last_attempt is not None
        and (state.last_success is None or state.last_attempt > state.last_success)
    )


def _into_window(source: str, backup: Backup, tz: ZoneInfo, instant: dt.datetime) -> dt.datetime:
    """``instant`` if it is inside the window (or there is none), else the next slot."""
    if backup.window is None or occurrence_containing(backup.window, tz, instant) is not None:
        return instant
    return window_slot(source, backup.window, next_occurrence(backup.window, tz, instant))


def next_attempt(
    source: str, backup: Backup, state: JobState, tz: ZoneInfo, now: dt.datetime
) -> dt.datetime:
    """When the next attempt of ``state``'s job should start.

    Without a pending failure this is :func:`next_due`. After ``n >= 1``
    consecutive failures it is ``last_attempt + retry_delay(n)``, moved to the
    source's slot in the next occurrence when that falls outside the window, and
    never before :func:`next_due` when the source has succeeded before (a
    failed manual run does not make a backup due early). Retries never stop;
    the delay is capped.
    """
    due = next_due(source, backup, state.last_success, tz, now)
    if not _failing(state):
        return due
    assert state.last_attempt is not None
    retry = _utc(state.last_attempt, "last_attempt") + dt.timedelta(
        seconds=retry_delay(state.consecutive_failures)
    )
    retry = _into_window(source, backup, tz, retry)
    return retry if state.last_success is None else max(due, retry)


def in_window(backup: Backup, tz: ZoneInfo, when: dt.datetime) -> bool:
    """True when ``when`` is inside an occurrence of the backup's window, or it has none."""
    return backup.window is None or occurrence_containing(backup.window, tz, when) is not None


def estimate_seconds(size_bytes: int | None, bandwidth_bits: int | None) -> float:
    """How long sending ``size_bytes`` at ``bandwidth_bits`` per second takes.

    :data:`DEFAULT_ESTIMATE_SECONDS` (10 min) when either is unknown or the
    bandwidth is not positive.
    """
    if size_bytes is None or bandwidth_bits is None or bandwidth_bits <= 0:
        return DEFAULT_ESTIMATE_SECONDS
    return max(0, size_bytes) * 8 / bandwidth_bits


# ------------------------------------------------------------------- job selection


def _reason(state: JobState) -> str:
    if _failing(state):
        return "retry"
    return "never" if state.last_success is None else "due"


def select_jobs(
    federation: Federation,
    placements: Mapping[str, Sequence[str]],
    states: Mapping[tuple[str, str], JobState],
    now: dt.datetime,
    tz: ZoneInfo,
    *,
    global_limit: int = 4,
    sizes: Mapping[str, int] | None = None,
    max_per_source: int | None = None,
) -> list[Job]:
    """The jobs to start at ``now``, in the order to start them.

    ``placements`` maps each source to its targets; ``states`` maps
    ``(source, target)`` to its history (a missing entry means never tried);
    ``sizes`` gives measured sizes of sources, else ``backup.estimate`` is used.

    A replica is a candidate when it is not running, its :func:`next_attempt`
    is at or before ``now`` and ``now`` is inside its window (or it has none).
    Candidates are taken most overdue first, then longest estimated duration
    (size over the target's bandwidth), then by source and target name, while
    the limits allow: at most ``storage.max_concurrent`` running jobs per target
    host and ``global_limit`` in all (running states count), at most
    ``max_per_source`` per source when given, and never twice the same source ×
    target. A candidate over a limit is not selected now; it stays due.
    Sources without a placement, and targets that are not hosts of the
    federation, are ignored.
    """
    now = _utc(now, "now")
    hosts = {node.name: node for node in federation.hosts()}
    per_target: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    for (source_name, target_name), state in states.items():
        if state.running:
            per_target[target_name] += 1
            per_source[source_name] += 1
    running = sum(per_target.values())

    candidates: list[Job] = []
    for node in sorted(federation.sources(), key=lambda n: n.name):
        backup = node.backup
        assert backup is not None
        if not in_window(backup, tz, now):
            continue
        size = sizes[node.name] if sizes is not None and node.name in sizes else backup.estimate
        for target in dict.fromkeys(placements.get(node.name, ())):
            host = hosts.get(target)
            if host is None or host.storage is None:
                continue
            state = states.get((node.name, target)) or JobState(node.name, target)
            if state.running:
                continue
            due = next_attempt(node.name, backup, state, tz, now)
            if due > now:
                continue
            estimate = estimate_seconds(size, host.storage.bandwidth)
            candidates.append(Job(node.name, target, _reason(state), due, estimate))
    candidates.sort(key=lambda job: (job.due, -job.estimated_seconds, job.source, job.target))

    selected: list[Job] = []
    for job in candidates:
        if running >= global_limit:
            break
        storage = hosts[job.target].storage
        assert storage is not None
        if per_target[job.target] >= storage.max_concurrent:
            continue
        if max_per_source is not None and per_source[job.source] >= max_per_source:
            continue
        selected.append(job)
        running += 1
        per_target[job.target] += 1
        per_source[job.source] += 1
    return selected


def next_wakeup(
    federation: Federation,
    placements: Mapping[str, Sequence[str]],
    states: Mapping[tuple[str, str], JobState],
    now: dt.datetime,
    tz: ZoneInfo,
) -> dt.datetime | None:
    """The earliest instant after ``now`` at which a job that is idle now becomes startable.

    That is a due time or retry time still to come, or the opening of the next
    window for a job that is overdue while its window is closed. Jobs already
    due inside their window are waiting for capacity, which only a finishing
    job frees: the caller wakes for that itself. With unchanged ``states``,
    :func:`select_jobs` returns nothing new between ``now`` and this instant.
    None when nothing is scheduled.
    """
    now = _utc(now, "now")
    hosts = {node.name for node in federation.hosts()}
    earliest: dt.datetime | None = None
    for node in federation.sources():
        backup = node.backup
        assert backup is not None
        for target in dict.fromkeys(placements.get(node.name, ())):
            state = states.get((node.name, target)) or JobState(node.name, target)
            if target not in hosts or state.running:
                continue
            due = next_attempt(node.name, backup, state, tz, now)
            if due <= now:
                if in_window(backup, tz, now):
                    continue
                due = now
            if backup.window is not None and not in_window(backup, tz, due):
                due = next_occurrence(backup.window, tz, due).start
            if earliest is None or due < earliest:
                earliest = due
    return earliest
