"""Which jobs start now: due backups, maintenance and restore drills, within every limit.

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

from mutualbackup.inventory.model import Federation, Node
from mutualbackup.plan.due import (
    JobState, PairSummary, estimate_seconds, failing, maintenance_due, remembered_next_attempt,
)
from mutualbackup.plan.windows import (
    UTC, as_utc, clear_of_window, in_window, next_occurrence, occurrence_containing, window_closed,
)

MAINTENANCE_PER_HOST = 1  # maintenance holds a repository lock and reads the whole repository
WINDOW_MARGIN = 3600.0  # maintenance and drills do not start this close before a backup window opens


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


# ------------------------------------------------------------------- job selection


def _reason(state: JobState) -> str:
    if failing(state):
        return "retry"
    return "never" if state.last_success is None else "due"


GLOBAL_LIMIT_FLOOR, GLOBAL_LIMIT_CAP = 8, 256


def global_limit_for(federation: Federation) -> int:
    """How many jobs the daemon runs at once: every host's ``max_concurrent`` together, between 8 and 256.

    Each job costs the coordinator a thread and an SSH session that carries requests and replies, never the
    data (borg sends it from the source to the host): a federation of a thousand hosts must not be held to
    a handful of backups at a time, or its night cannot end in its window (bench/night_bench.py)."""
    total = sum(h.storage.max_concurrent for h in federation.hosts() if h.storage is not None)
    return max(GLOBAL_LIMIT_FLOOR, min(GLOBAL_LIMIT_CAP, total))


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
    memo: dict | None = None,
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
    candidates = _due_backups(federation, hosts, placements, states, now, tz, sizes, memo)
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
    memo: dict | None = None,
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
            due = remembered_next_attempt(memo, node.name, backup, state, tz, now)
            if due > now:
                continue
            estimate = estimate_seconds(size, host.storage.bandwidth)
            candidates.append(Job(node.name, target, _reason(state), due, estimate))
    candidates.sort(key=lambda job: (job.due, -job.estimated_seconds, job.source, job.target))
    return candidates


# --------------------------------------------------------------- maintenance and drills


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
    memo: dict | None = None,
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
            due = remembered_next_attempt(memo, node.name, backup, state, tz, now)
            if due <= now:
                if in_window(backup, tz, now):
                    continue
                due = now
            if backup.window is not None and not in_window(backup, tz, due):
                due = next_occurrence(backup.window, tz, due).start
            if earliest is None or due < earliest:
                earliest = due
    return earliest
