"""What the daemon asks of the history at every tick, kept up to date instead of summed again.

:meth:`History.pair_summaries`, :meth:`History.repository_sizes` and :meth:`History.host_contacts` each read
every run of the history: a year of a thousand members is millions of rows, and the daemon asks several
times a tick. :class:`RunIndex` answers the same questions from one accumulator per (kind, source,
target), built once from the history, then brought forward from the runs added since. A run changes only
while it is ``running``, so the runs below the oldest one still running are folded in for good, and the
runs from there on are laid over a copy at each call (as :class:`~mutualbackup.state.metrics_queries.RunTotals`
does). ``tests/test_run_index.py`` checks at every step of a random history that each answer equals the
history's own query.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable

from mutualbackup.plan.due import PairSummary
from mutualbackup.state.history import History

Key = tuple[str, str, str]  # kind, source, target

OK = ("success", "warning")
FINISHED = ("success", "warning", "failure")
CONTACT_KINDS = ("backup", "check", "prune", "compact")  # as History.host_contacts

_COLUMNS = "id, kind, source, target, started, ended, result, repository_bytes"
SLICE = 200_000  # runs read at once when the history is folded in


@dataclass
class Accumulator:
    """The runs of one kind for one source × target, as far as the daemon's questions go."""

    last_success: float | None = None
    first_success: float | None = None
    last_attempt: float | None = None  # finished: success, warning or failure
    last_success_end: float | None = None
    last_failure: float | None = None
    last_ended: float | None = None  # any result but running (a drill interrupted counts as tried)
    failures_after: list[float] = field(default_factory=list)  # starts of the failures after the last success
    measured: tuple[float, int] | None = None  # (start, bytes) of the newest run that measured the repository

    def fold(self, started: float, ended: float | None, result: str, repository_bytes: int | None) -> None:
        if result in OK:
            if self.last_success is None or started > self.last_success:
                self.last_success = started
                self.failures_after = [f for f in self.failures_after if f > started]
            self.first_success = started if self.first_success is None else min(self.first_success, started)
            if ended is not None:
                self.last_success_end = ended if self.last_success_end is None else max(self.last_success_end, ended)
        elif result == "failure":
            self.last_failure = started if self.last_failure is None else max(self.last_failure, started)
            if self.last_success is None or started > self.last_success:
                self.failures_after.append(started)
        if result in FINISHED:
            self.last_attempt = started if self.last_attempt is None else max(self.last_attempt, started)
        if result != "running":
            self.last_ended = started if self.last_ended is None else max(self.last_ended, started)
        if repository_bytes is not None:
            if self.measured is None or started > self.measured[0]:
                self.measured = (started, repository_bytes)
            elif started == self.measured[0]:
                self.measured = (started, max(self.measured[1], repository_bytes))

    def copy(self) -> Accumulator:
        return Accumulator(self.last_success, self.first_success, self.last_attempt, self.last_success_end,
                           self.last_failure, self.last_ended, list(self.failures_after), self.measured)

    def summary(self) -> PairSummary:
        return PairSummary(last_success=self.last_success, first_success=self.first_success,
                           last_attempt=self.last_attempt, last_success_end=self.last_success_end,
                           failures=len(self.failures_after))


class RunIndex:
    """The history's answers to the daemon, kept incrementally. Thread-safe; one per daemon."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.settled_below = 0
        self._settled: dict[Key, Accumulator] = {}
        self._summaries: dict[str, dict[tuple[str, str], PairSummary]] = {}  # of the settled runs, per kind
        self._dirty: dict[str, set[tuple[str, str]]] = {}  # per kind: pairs folded in since their summary
        self._lock = threading.Lock()

    def current(self) -> dict[Key, Accumulator]:
        """Every accumulator, up to the newest run. The caller must not change them."""
        return self._read()[0]

    def _read(self) -> tuple[dict[Key, Accumulator], set[Key]]:
        """Every accumulator, and the keys the runs still in progress (or after them) touched."""
        with self._lock, self.history.snapshot() as query:
            end = int(query("SELECT COALESCE(MAX(id), 0) FROM runs")[0][0]) + 1
            running = query("SELECT MIN(id) FROM runs WHERE result = 'running'")[0][0]
            settle = min(end, int(running)) if running is not None else end
            while settle > self.settled_below:  # in slices: the first call reads the whole history
                upto = min(settle, self.settled_below + SLICE)
                for key in _fold(self._settled, query(f"SELECT {_COLUMNS} FROM runs WHERE id >= ? AND id < ?",
                                                      (self.settled_below, upto))):
                    self._dirty.setdefault(key[0], set()).add(key[1:])
                self.settled_below = upto
            recent = query(f"SELECT {_COLUMNS} FROM runs WHERE id >= ? AND id < ?", (self.settled_below, end))
            if not recent:
                return self._settled, set()
            current = dict(self._settled)
            for row in recent:
                key = (row["kind"], row["source"], row["target"])
                if current.get(key) is self._settled.get(key):
                    current[key] = self._settled[key].copy() if key in self._settled else Accumulator()
            return current, _fold(current, recent)

    # --- the questions, as History asks them --------------------------------------------------

    def pair_summaries(self, kind: str) -> dict[tuple[str, str], PairSummary]:
        """As :meth:`History.pair_summaries` (a summary that did not change is the same object as before)."""
        current, touched = self._read()
        with self._lock:
            settled = self._summaries.setdefault(kind, {})
            for pair in self._dirty.pop(kind, ()):
                settled[pair] = self._settled[(kind, *pair)].summary()
            if not any(key[0] == kind for key in touched):
                return dict(settled)
        summaries = dict(settled)
        for key in touched:
            if key[0] == kind:
                summaries[key[1:]] = current[key].summary()
        return summaries

    def repository_sizes(self) -> dict[str, int]:
        """As :meth:`History.repository_sizes`."""
        sizes: dict[str, int] = {}
        for (kind, source, _target), acc in self.current().items():
            if kind == "backup" and acc.measured is not None:
                sizes[source] = max(sizes.get(source, 0), int(acc.measured[1]))
        return sizes

    def host_contacts(self) -> tuple[dict[str, float], dict[str, float]]:
        """As :meth:`History.host_contacts`."""
        contact: dict[str, float] = {}
        failed: dict[str, float] = {}
        for (kind, _source, target), acc in self.current().items():
            if kind not in CONTACT_KINDS or not target:
                continue
            if acc.last_success is not None:
                contact[target] = max(contact.get(target, 0.0), acc.last_success)
            if acc.last_failure is not None:
                failed[target] = max(failed.get(target, 0.0), acc.last_failure)
        return contact, failed

    def drills(self) -> dict[str, tuple[float | None, float | None, bool]]:
        """Per source: (start of its last successful drill, start of its last drill that ended in any way,
        whether it has a successful backup) — what :func:`~mutualbackup.jobs.drill.drills_due` needs."""
        found: dict[str, tuple[float | None, float | None, bool]] = {}
        for (kind, source, _target), acc in self.current().items():
            success, ended, backed_up = found.get(source, (None, None, False))
            if kind == "drill":
                success = _newest(success, acc.last_success)
                ended = _newest(ended, acc.last_ended)
            elif kind == "backup":
                backed_up = backed_up or acc.last_success is not None
            found[source] = (success, ended, backed_up)
        return found


def _newest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _fold(accumulators: dict[Key, Accumulator], rows: Iterable) -> set[Key]:  # noqa: ANN401 - sqlite3.Row
    """Fold ``rows`` into ``accumulators``; the keys they touched."""
    touched = set()
    for row in rows:
        key = (row["kind"], row["source"], row["target"])
        acc = accumulators.get(key)
        if acc is None:
            acc = accumulators[key] = Accumulator()
        acc.fold(row["started"], row["ended"], row["result"], row["repository_bytes"])
        touched.add(key)
    return touched
