"""When each replica of each source is backed up, and which jobs to start now.

Everything here is a pure function of its arguments: no I/O, and the clock is
never read -- ``now`` is always passed in. Window arithmetic (occurrences, DST,
slots) is in :mod:`mutualbackup.plan.windows`.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from mutualbackup.inventory.model import Backup, Federation, Node
from mutualbackup.plan.windows import (
    UTC, as_utc, clear_of_window, in_window, into_window, jitter_seconds, local_date, next_occurrence, occurrence_at_or_before,
    occurrence_containing, occurrences_from, window_closed, window_slot,
)

DAY_SECONDS = 24 * 3600
DEFAULT_ESTIMATE_SECONDS = 600.0  # a job of unknown size or bandwidth
FIRST_RUN_JITTER_CAP = 3600  # first runs without a window spread over min(every, this)
SLACK_FRACTION = 0.1  # a due date may come this much earlier than every...
SLACK_CAP = 2 * 3600  # ...but never more than this (absorbs DST days and late runs)
MAINTENANCE_PER_HOST = 1  # maintenance holds a repository lock and reads the whole repository
WINDOW_MARGIN = 3600.0  # maintenance and drills do not start this close before a backup window opens


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


@dataclass(frozen=True)
class Job:
    """One backup to start now."""

    source: str
    target: str
    reason: str  # "due" | "retry" | "never"
    due: dt.datetime  # when it became due
    estimated_seconds: float


# --------------------------------------------------------------------------- time


# ------------------------------------------------------------------------- jitter


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


def _failing(state: JobState) -> bool:
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
    if not _failing(state):
        return due
    assert state.last_attempt is not None
    retry = as_utc(state.last_attempt, "last_attempt") + dt.timedelta(
        seconds=retry_delay(state.consecutive_failures)
    )
    retry = into_window(source, backup, tz, retry)
    return retry if state.last_success is None else max(due, retry)


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


@dataclass
class Occupancy:
    """What runs now, counted the way every limit reads it: jobs per host, per source, maintenance per host, in all.

    Built from the running jobs (:meth:`of`), then shared by :func:`select_jobs`,
    :func:`select_maintenance` and :func:`select_drills` in one tick, each taking what it starts.
    """

    global_limit: int
    per_host: Counter[str] = field(default_factory=Counter)
    per_source: Counter[str] = field(default_factory=Counter)
    maintaining: Counter[str] = field(default_factory=Counter)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    total: int = 0

    @classmethod
    def of(cls, running: Iterable[tuple[str, str, str]], global_limit: int) -> Occupancy:
        """From ``(kind, source, target)`` of every running job (a drill's target is the replica it reads)."""
        occupancy = cls(global_limit)
        for kind, source, target in running:
            occupancy.take(kind, source, target)
        return occupancy

    @property
    def full(self) -> bool:
        return self.total >= self.global_limit

    def admits(self, host: Node, source: str, *, max_per_source: int | None = None, maintenance: bool = False) -> bool:
        """Whether a job of ``source`` on ``host`` fits: the host's ``max_concurrent``, one maintenance
        job per host, ``max_per_source`` jobs per source (when given), and the global limit."""
        assert host.storage is not None
        if self.full or self.per_host[host.name] >= host.storage.max_concurrent:
            return False
        if max_per_source is not None and self.per_source[source] >= max_per_source:
            return False
        return not (maintenance and self.maintaining[host.name] >= MAINTENANCE_PER_HOST)

    def take(self, kind: str, source: str, target: str) -> None:
        self.total += 1
        self.per_host[target] += 1
        self.per_source[source] += 1
        self.pairs.add((source, target))
        if kind == "maintenance":
            self.maintaining[target] += 1


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
    occupancy: Occupancy | None = None,
) -> list[Job]:
    """The backups to start at ``now``, in the order to start them.

    ``placements`` maps each source to its targets; ``states`` maps
    ``(source, target)`` to its history (a missing entry means never tried);
    ``sizes`` gives measured sizes of sources, else ``backup.estimate`` is used.

    A replica is a candidate when it is not running, its :func:`next_attempt`
    is at or before ``now`` and ``now`` is inside its window (or it has none).
    Candidates are taken most overdue first, then longest estimated duration
    (size over the target's bandwidth), then by source and target name, while
    the limits allow: at most ``storage.max_concurrent`` running jobs per target
    host and ``global_limit`` in all, at most ``max_per_source`` per source when
    given, and never twice the same source × target. What runs is ``occupancy``
    (taken from as jobs are selected) or, without one, the running ``states``.
    A candidate over a limit is not selected now; it stays due. Sources without
    a placement, and targets that are not hosts of the federation, are ignored.
    """
    now = as_utc(now, "now")
    hosts = {node.name: node for node in federation.hosts()}
    if occupancy is None:
        occupancy = Occupancy.of((("backup", s, t) for (s, t), state in states.items() if state.running), global_limit)
    candidates = _due_backups(federation, hosts, placements, states, now, tz, sizes)
    selected: list[Job] = []
    for job in candidates:
        if occupancy.full:
            break
        if occupancy.admits(hosts[job.target], job.source, max_per_source=max_per_source):
            selected.append(job)
            occupancy.take("backup", job.source, job.target)
    return selected


def _due_backups(
    federation: Federation, hosts: Mapping[str, Node], placements: Mapping[str, Sequence[str]],
    states: Mapping[tuple[str, str], JobState], now: dt.datetime, tz: ZoneInfo, sizes: Mapping[str, int] | None,
) -> list[Job]:
    """The replicas whose backup is due at ``now`` inside their window, in the order to start them."""
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
    return candidates


# --------------------------------------------------------------- maintenance and drills


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


def select_maintenance(
    federation: Federation, placements: Mapping[str, Sequence[str]], backups: Mapping[tuple[str, str], PairSummary],
    checks: Mapping[tuple[str, str], PairSummary], occupancy: Occupancy, now: dt.datetime, tz: ZoneInfo,
) -> list[tuple[str, str]]:
    """Replicas whose maintenance (check, then guarded compaction) starts now, most overdue first.

    Due per :func:`maintenance_due`; only while the source's window is closed and does not open within
    :data:`WINDOW_MARGIN`; at most one per source, one maintenance job per host, within the host's
    ``max_concurrent`` and the global limit (``occupancy``, taken from).
    """
    stamp = now.timestamp()
    candidates = []
    for source, targets in placements.items():
        backup = federation.node(source).backup
        if backup is None or not clear_of_window(backup, tz, now, WINDOW_MARGIN):
            continue
        for target in targets:
            due = maintenance_due(backup, backups.get((source, target)), checks.get((source, target)))
            if due is not None and due <= stamp:
                candidates.append((due, source, target))
    chosen = []
    for _due, source, target in sorted(candidates):
        if occupancy.full:
            break
        host = federation.node(target)
        if host.storage is None or (source, target) in occupancy.pairs:
            continue
        if occupancy.admits(host, source, max_per_source=1, maintenance=True):
            chosen.append((source, target))
            occupancy.take("maintenance", source, target)
    return chosen


def select_drills(
    federation: Federation, due: Sequence[str], replica: Callable[[str], str], occupancy: Occupancy,
    now: dt.datetime, tz: ZoneInfo,
) -> list[tuple[str, str]]:
    """(source, replica read) of the restore drills that start now, among the sources ``due``, in that order.

    Only for a source with no job running whose window is closed and does not open within
    :data:`WINDOW_MARGIN`; a drill counts against the replica's host (``replica(source)``, "" when
    none) and the global limit.
    """
    chosen = []
    for source in due:
        if occupancy.full:
            break
        backup = federation.node(source).backup
        if occupancy.per_source[source] or backup is None or not clear_of_window(backup, tz, now, WINDOW_MARGIN):
            continue
        target = replica(source)
        host = federation.node(target) if target else None
        if host is not None and host.storage is not None and not occupancy.admits(host, source):
            continue
        chosen.append((source, target))
        occupancy.take("drill", source, target)
    return chosen


def maintenance_wakeup(
    federation: Federation, placements: Mapping[str, Sequence[str]], backups: Mapping[tuple[str, str], PairSummary],
    checks: Mapping[tuple[str, str], PairSummary], busy: Collection[tuple[str, str]], now: dt.datetime, tz: ZoneInfo,
) -> dt.datetime | None:
    """The earliest instant after ``now`` at which an idle replica's maintenance becomes due outside its window."""
    wake: dt.datetime | None = None
    for source, targets in placements.items():
        backup = federation.node(source).backup
        if backup is None:
            continue
        for target in targets:
            if (source, target) in busy:
                continue
            due = maintenance_due(backup, backups.get((source, target)), checks.get((source, target)))
            if due is None:
                continue
            when = max(now, dt.datetime.fromtimestamp(due, UTC))
            if not window_closed(backup, tz, when):
                occurrence = occurrence_containing(backup.window, tz, when) if backup.window else None
                if occurrence is None:
                    continue
                when = occurrence.end
            if when > now and (wake is None or when < wake):
                wake = when
    return wake


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
    now = as_utc(now, "now")
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
