"""When each replica is due: its next backup (``every``, inside its window), the retries after
failures, its next maintenance, and how long a transfer takes. Pure: ``now`` is passed in."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from mutualbackup.inventory.model import Backup
from mutualbackup.plan.windows import (
    UTC, as_utc, into_window, jitter_seconds, local_date, next_occurrence, occurrence_at_or_before,
    occurrence_containing, occurrences_from, window_slot,
)


DAY_SECONDS = 24 * 3600

DEFAULT_ESTIMATE_SECONDS = 600.0  # a job of unknown size or bandwidth

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
class PairSummary:
    """Runs of one kind for one source x target, as the scheduler sees them (epoch seconds)."""

    last_success: float | None
    first_success: float | None
    last_attempt: float | None  # the last finished run that was not interrupted
    last_success_end: float | None
    failures: int  # failed runs since the last success (interrupted ones not counted)


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
    now = as_utc(now, "now")
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
    last = as_utc(last_success, "last_success")
    if window is None:
        return last + dt.timedelta(seconds=every)
    if every >= DAY_SECONDS:
        anchor = occurrence_at_or_before(window, tz, last).start
        slack = min(every * SLACK_FRACTION, SLACK_CAP)
        threshold = anchor + dt.timedelta(seconds=every - slack)
        first_date = local_date(threshold, tz) - dt.timedelta(days=1)
        occurrence = next(o for o in occurrences_from(window, tz, first_date) if o.start >= threshold)
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


def failing(state: JobState) -> bool:
    """True when the last attempt failed (and came after the last success)."""
    return (
        state.consecutive_failures >= 1
        and state.last_attempt is not None
        and (state.last_success is None or state.last_attempt > state.last_success)
    )


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
    if not failing(state):
        return due
    assert state.last_attempt is not None
    retry = as_utc(state.last_attempt, "last_attempt") + dt.timedelta(
        seconds=retry_delay(state.consecutive_failures)
    )
    retry = into_window(source, backup, tz, retry)
    return retry if state.last_success is None else max(due, retry)


def remembered_next_attempt(
    memo: dict | None, source: str, backup: Backup, state: JobState, tz: ZoneInfo, now: dt.datetime
) -> dt.datetime:
    """:func:`next_attempt`, remembered in ``memo`` (the daemon's, emptied when the inventory changes) when
    it does not depend on ``now``: the replica succeeded before, or is failing. At every tick of a thousand
    members, most replicas' next attempt is the same as at the last one."""
    if memo is None or (state.last_success is None and not failing(state)):
        return next_attempt(source, backup, state, tz, now)
    key = (source, state.target, id(backup), state.last_success, state.last_attempt, state.consecutive_failures)
    due = memo.get(key)
    if due is None:
        if len(memo) > MEMO_LIMIT:
            memo.clear()
        due = memo[key] = next_attempt(source, backup, state, tz, now)
    return due


MEMO_LIMIT = 200_000


def estimate_seconds(size_bytes: int | None, bandwidth_bits: int | None) -> float:
    """How long sending ``size_bytes`` at ``bandwidth_bits`` per second takes.

    :data:`DEFAULT_ESTIMATE_SECONDS` (10 min) when either is unknown or the
    bandwidth is not positive.
    """
    if size_bytes is None or bandwidth_bits is None or bandwidth_bits <= 0:
        return DEFAULT_ESTIMATE_SECONDS
    return max(0, size_bytes) * 8 / bandwidth_bits


def maintenance_due(backup: Backup, backups: PairSummary | None, checks: PairSummary | None) -> float | None:
    """When the next maintenance job of one replica is due (epoch), or None before its first backup.

    ``check_every`` after the last successful check (after the first successful
    backup when never checked); after failed checks, no earlier than the retry
    back-off of :func:`retry_delay`.
    """
    if backups is None or backups.first_success is None:
        return None
    base = checks.last_success if checks is not None and checks.last_success is not None else backups.first_success
    due = base + backup.check_every
    if checks is not None and checks.failures and checks.last_attempt is not None:
        due = max(due, checks.last_attempt + retry_delay(checks.failures))
    return due
