"""What the metrics and the ledger read from the history, fast whatever its length.

- :func:`read_replica_facts`: the latest runs of each replica (last attempt, last
  success, last finished attempt, last measurement, last checks): one index
  look-up per replica and fact, in one query; :class:`LatestRuns` keeps them between
  scrapes and reads only the runs that changed;
- :class:`RunTotals`: counts and durations of every finished backup attempt,
  kept incrementally: runs that can no longer change (all those before the
  oldest backup still in progress by a live process) are summed once, the runs
  after it at each call. A new instance sums the whole history once;
- :func:`read_running`, :func:`read_drills`.

Each function takes ``query``, from :meth:`History.snapshot`. A backup attempt is
a finished backup run (``success``, ``warning`` or ``failure``); runs
``interrupted`` because the coordinator stopped are not attempts, as for the
scheduler.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from mutualbackup.state.processes import pid_alive

# Upper bounds of the backup duration histogram, in seconds.
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)

Query = Callable[..., list]
Pair = tuple[str, str]

_OK = "result IN ('success', 'warning')"
_FINISHED = "result IN ('success', 'warning', 'failure')"

# The runs "latest" means, per replica: column -> (kind, condition). Each is an index look-up.
_LATEST = {
    "attempt": ("backup", ""),
    "finished": ("backup", f"AND {_FINISHED}"),
    "success": ("backup", f"AND {_OK}"),
    "measured_backup": ("backup", f"AND {_OK} AND repository_bytes IS NOT NULL"),
    "measured_prune": ("prune", f"AND {_OK} AND repository_bytes IS NOT NULL"),
    "checked": ("check", f"AND {_OK}"),
    "repo_check": ("repo-check", f"AND {_FINISHED}"),
    "repo_check_ok": ("repo-check", f"AND {_OK}"),
    "compact": ("compact", f"AND {_FINISHED}"),
    "accepted": ("accept-deletion", f"AND {_OK}"),
}
_LATEST_SQL = (
    "WITH pairs(source, target) AS (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))\n"
    "SELECT source, target,\n"
    + ",\n".join(
        f"  (SELECT id FROM runs WHERE kind = '{kind}' AND source = p.source AND target = p.target {condition}"
        f" ORDER BY started DESC, id DESC LIMIT 1) AS {column}"
        for column, (kind, condition) in _LATEST.items()
    )
    + "\nFROM pairs p"
)
_LATEST_BELOW_SQL = (
    "WITH pairs(source, target) AS (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))\n"
    "SELECT source, target,\n"
    + ",\n".join(
        f"  (SELECT id FROM runs WHERE kind = '{kind}' AND source = p.source AND target = p.target {condition}"
        f" AND id < ? ORDER BY started DESC, id DESC LIMIT 1) AS {column}"
        for column, (kind, condition) in _LATEST.items()
    )
    + "\nFROM pairs p"
)
_RUN_COLUMNS = """id, started, result, original_bytes, compressed_bytes, deduplicated_bytes, repository_bytes,
                  json_extract(detail, '$.unreadable_files') AS unreadable, json_extract(detail, '$.refused') AS refused"""
_RANGE_SQL = f"SELECT kind, source, target, {_RUN_COLUMNS} FROM runs WHERE id >= ? AND id < ?"
_RUNS_BY_ID_SQL = f"SELECT {_RUN_COLUMNS} FROM runs WHERE id IN (SELECT value FROM json_each(?))"
# A range of ids (the unary + keeps SQLite on the rowid range rather than the kind index).
_TALLY_SQL = (
    f"SELECT source, target, {_OK} AS ok, COUNT(*) AS n, TOTAL(ended - started) AS seconds, "
    + ", ".join(f"TOTAL(ended - started <= {bound!r}) AS b{i}" for i, bound in enumerate(DURATION_BUCKETS))
    + f" FROM runs WHERE id >= ? AND id < ? AND +kind = 'backup' AND {_FINISHED} GROUP BY source, target, ok"
)
_DRILL_SQL = f"SELECT source, MAX(started) AS t FROM runs WHERE kind = 'drill' AND {_OK} GROUP BY source"
_RUNNING_SQL = "SELECT id, kind, target, pid FROM runs WHERE result = 'running'"


@dataclass(frozen=True)
class ReplicaFacts:
    """What the history says about one replica (epoch seconds; None: no such run)."""

    last_attempt: float | None = None
    last_success: float | None = None
    last_finished: float | None = None  # start of the latest finished backup attempt
    last_finished_failed: bool = False
    repo_check: float | None = None  # start of the latest finished host-side repository check
    repo_check_failed: bool = False
    last_check_success: float | None = None
    repository_bytes: int | None = None
    archive: tuple[int, int, int] | None = None  # original, compressed, deduplicated
    unreadable_files: int | None = None  # files the last successful backup could not read (None: no success yet)
    compaction_blocked: bool = False  # the latest compaction was refused by the guard (SPEC promise 3)
    last_contact: float | None = None  # start of the latest run that reached the host (a backup or a repository check)


def read_replica_facts(query: Query, pairs: Sequence[Pair], below: int | None = None) -> dict[Pair, ReplicaFacts]:
    """The facts of every replica in ``pairs`` (source, host), in two queries (only runs with an id below
    ``below``, when given)."""
    return {pair: _facts(rows) for pair, rows in _latest_rows(query, pairs, below).items()}


def _latest_rows(query: Query, pairs: Sequence[Pair], below: int | None = None) -> dict[Pair, dict[str, Row]]:
    """Per pair: column -> its latest run (only runs with an id below ``below``, when given)."""
    if not pairs:
        return {}
    sql, args = _LATEST_SQL, (json.dumps([list(p) for p in pairs]),)
    if below is not None:
        sql, args = _LATEST_BELOW_SQL, (*args, *[below] * len(_LATEST))
    latest = query(sql, args)
    ids = {row[c] for row in latest for c in _LATEST if row[c] is not None}
    runs = {row["id"]: _row(row) for row in query(_RUNS_BY_ID_SQL, (json.dumps(sorted(ids)),))} if ids else {}
    return {(row["source"], row["target"]): {c: runs[row[c]] for c in _LATEST if row[c] is not None} for row in latest}


def _facts(latest: dict[str, Row]) -> ReplicaFacts:
    attempt, finished, success, checked, repo_check, repo_check_ok, compact, accepted = (
        latest.get(c) for c in ("attempt", "finished", "success", "checked", "repo_check", "repo_check_ok",
                                "compact", "accepted"))
    measured = [latest[c] for c in ("measured_backup", "measured_prune") if c in latest]
    newest_measure = max(measured, key=lambda r: r.order, default=None)
    return ReplicaFacts(
        last_attempt=attempt.started if attempt else None,
        last_success=success.started if success else None,
        last_finished=finished.started if finished else None,
        last_finished_failed=finished is not None and finished.result == "failure",
        repo_check=repo_check.started if repo_check else None,
        repo_check_failed=repo_check is not None and repo_check.result == "failure",
        last_check_success=checked.started if checked else None,
        repository_bytes=newest_measure.repository_bytes if newest_measure else None,
        archive=(success.original_bytes, success.compressed_bytes or 0, success.deduplicated_bytes or 0)
        if success is not None and success.original_bytes is not None else None,
        unreadable_files=int(success.unreadable or 0) if success is not None else None,
        compaction_blocked=compact is not None and compact.result == "failure" and bool(compact.refused)
        and (accepted is None or accepted.order < compact.order),
        last_contact=max((r.started for r in (success, repo_check_ok) if r is not None), default=None),
    )


@dataclass(frozen=True)
class Row:
    """What the facts need of one run."""

    id: int
    started: float
    result: str
    original_bytes: int | None
    compressed_bytes: int | None
    deduplicated_bytes: int | None
    repository_bytes: int | None
    unreadable: int | None
    refused: object

    @property
    def order(self) -> tuple[float, int]:
        """"Latest" is the newest start, then the highest id (the SQL's ORDER BY started DESC, id DESC)."""
        return (self.started, self.id)


def _row(row) -> Row:  # noqa: ANN001 - sqlite3.Row
    return Row(row["id"], row["started"], row["result"], row["original_bytes"], row["compressed_bytes"],
               row["deduplicated_bytes"], row["repository_bytes"], row["unreadable"], row["refused"])


def _columns_of(kind: str, result: str, repository_bytes: int | None) -> list[str]:
    """The columns of :data:`_LATEST` a run of ``kind`` ending as ``result`` counts for (Python's reading of
    their SQL conditions, for the runs read one by one)."""
    ok, finished = result in ("success", "warning"), result in ("success", "warning", "failure")
    measured = ok and repository_bytes is not None
    conditions = {
        "attempt": kind == "backup", "finished": kind == "backup" and finished, "success": kind == "backup" and ok,
        "measured_backup": kind == "backup" and measured, "measured_prune": kind == "prune" and measured,
        "checked": kind == "check" and ok, "repo_check": kind == "repo-check" and finished,
        "repo_check_ok": kind == "repo-check" and ok, "compact": kind == "compact" and finished,
        "accepted": kind == "accept-deletion" and ok,
    }
    return [column for column, holds in conditions.items() if holds]


class LatestRuns:
    """:func:`read_replica_facts` kept incrementally between scrapes, as :class:`RunTotals` keeps its sums.

    A run changes only while it is ``running``; so every run with an id below :attr:`settled_below` (none
    of them in progress by a live process) is final, and the latest of each column per replica among them
    is kept. At each call the runs from ``settled_below`` to the newest are read and laid over it: a scrape
    reads what changed since the last one, not one index look-up per replica and column. A replica asked
    for the first time is read with the indexed query, bounded to the settled runs. Thread-safe.
    """

    def __init__(self) -> None:
        self.settled_below = 0
        self._settled: dict[Pair, dict[str, Row]] = {}
        self._facts: dict[Pair, ReplicaFacts] = {}  # of the settled rows alone
        self._lock = threading.Lock()

    def read(self, query: Query, pairs: Sequence[Pair], running: Iterable[int]) -> dict[Pair, ReplicaFacts]:
        """The facts of ``pairs``, given the ids of the runs now in progress (by live processes)."""
        end = int(query("SELECT COALESCE(MAX(id), 0) FROM runs")[0][0]) + 1
        settle = min(running, default=end)
        with self._lock:
            if settle > self.settled_below:
                if self._settled:
                    for pair in self._lay(self._settled, query, self.settled_below, settle):
                        self._facts.pop(pair, None)
                self.settled_below = settle
            unknown = [pair for pair in pairs if pair not in self._settled]
            for pair, rows in _latest_rows(query, unknown, self.settled_below).items():
                self._settled[pair] = rows
            facts = {}
            for pair in pairs:
                fact = self._facts.get(pair)
                if fact is None:
                    fact = self._facts[pair] = _facts(self._settled[pair])
                facts[pair] = fact
            settled = {pair: self._settled[pair] for pair in pairs}
        if end > self.settled_below:
            recent = {pair: dict(rows) for pair, rows in settled.items()}
            for pair in self._lay(recent, query, self.settled_below, end):
                facts[pair] = _facts(recent[pair])
        return facts

    @staticmethod
    def _lay(latest: dict[Pair, dict[str, Row]], query: Query, first: int, end: int) -> set[Pair]:
        """Lay the runs with ``first <= id < end`` over ``latest`` (of the pairs it has); the pairs changed."""
        changed = set()
        for row in query(_RANGE_SQL, (first, end)):
            pair = (row["source"], row["target"])
            rows = latest.get(pair)
            if rows is None:
                continue
            run = _row(row)
            for column in _columns_of(row["kind"], row["result"], row["repository_bytes"]):
                held = rows.get(column)
                if held is None or run.order > held.order:
                    rows[column] = run
                    changed.add(pair)
        return changed


@dataclass(frozen=True)
class RunningRun:
    id: int
    kind: str
    target: str


def read_running(query: Query) -> list[RunningRun]:
    """Runs in progress whose process is still alive (a dead one's run will only become ``interrupted``)."""
    return [RunningRun(r["id"], r["kind"], r["target"]) for r in query(_RUNNING_SQL) if pid_alive(r["pid"])]


def read_drills(query: Query) -> dict[str, float]:
    """Source -> start of its last successful restore drill."""
    return {r["source"]: r["t"] for r in query(_DRILL_SQL)}


@dataclass
class RunTally:
    """Finished backup attempts of one replica: counts by result and durations. Sums, so additive."""

    success: int = 0
    failure: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))  # runs lasting <= bound
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return self.success + self.failure

    def add(self, other: RunTally) -> None:
        self.success += other.success
        self.failure += other.failure
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.seconds += other.seconds

    def copy(self) -> RunTally:
        return RunTally(self.success, self.failure, list(self.buckets), self.seconds)


def read_tallies(query: Query, first_id: int, end_id: int) -> dict[Pair, RunTally]:
    """Tallies of the finished backup attempts with ``first_id <= id < end_id``."""
    tallies: dict[Pair, RunTally] = {}
    for row in query(_TALLY_SQL, (first_id, end_id)):
        tally = tallies.setdefault((row["source"], row["target"]), RunTally())
        part = RunTally(buckets=[int(row[f"b{i}"]) for i in range(len(DURATION_BUCKETS))], seconds=float(row["seconds"]))
        if row["ok"]:
            part.success = int(row["n"])
        else:
            part.failure = int(row["n"])
        tally.add(part)
    return tallies


class RunTotals:
    """Tallies of every finished backup attempt, kept incrementally between scrapes.

    Runs with an id below :attr:`settled_below` can no longer change (none was in
    progress by a live process) and are summed once; the runs from there on are
    summed again at each call. Thread-safe.
    """

    def __init__(self) -> None:
        self.settled_below = 0
        self._settled: dict[Pair, RunTally] = {}
        self._lock = threading.Lock()

    def read(self, query: Query, running_backups: Iterable[int]) -> dict[Pair, RunTally]:
        """All tallies, given the ids of the backups now in progress (by live processes)."""
        end = int(query("SELECT COALESCE(MAX(id), 0) FROM runs")[0][0]) + 1
        settle = min(running_backups, default=end)
        with self._lock:
            if settle > self.settled_below:
                for pair, tally in read_tallies(query, self.settled_below, settle).items():
                    self._settled.setdefault(pair, RunTally()).add(tally)
                self.settled_below = settle
            result = dict(self._settled)  # shared, not copied: callers read them, and a merge below copies
            recent = read_tallies(query, self.settled_below, end) if end > self.settled_below else {}
        for pair, tally in recent.items():
            merged = result[pair].copy() if pair in result else RunTally()
            merged.add(tally)
            result[pair] = merged
        return result
