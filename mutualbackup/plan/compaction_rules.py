"""The pure rules of the compaction guard (SPEC security promise 3); see :mod:`maintenance`.

Three kinds of evidence, each turned into problems that refuse a compaction:

- **archives** (from the source's borg): every archive the coordinator recorded and
  never pruned must still be listed *with the id recorded under its name*
  (:func:`archive_changes`): a ``borg delete`` followed by a ``borg create`` of the
  same name gives a new id, so it is a replaced archive, not the same one;
- **volume** (from the source's borg): the live size must not be below the baseline,
  which is only ever a size the coordinator measured right after one of its own prunes
  that found the archives exactly as recorded (:func:`baseline_bytes`);
- **host** (read on the host without a key, :func:`foreign_transactions`): every
  transaction borg logged in the repository's ``transactions`` file since the last
  guard that passed must have been committed while a backup or prune of the
  coordinator into that repository was running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

from mutualbackup.borg import Transaction
from mutualbackup.state.history import Run

SHRINK_TOLERANCE = (1024**2, 0.01)  # bytes, fraction: a smaller live size is "shrunk"
TRANSACTION_SLACK = 60.0  # seconds around a run's window: host clock drift since the commit, rounding
WRITING_KINDS = ("backup", "prune")  # the coordinator's runs that commit into a repository
ACCEPTED = "accept-deletion"  # a member's admin accepted a refused compaction's deletions (jobs/acceptance.py)
UNCERTAIN_END_CAP = 12 * 3600.0
"""The longest a run whose end is not known (still ``running``, or ``interrupted`` by a crash: its
recorded end is the restart) counts as writing: 12 h, the backup job's own timeout, and thrice the
prune's. A longer run that crashed makes the guard refuse (an alert, nothing lost), never pass."""


@dataclass(frozen=True)
class ArchiveChanges:
    vanished: tuple[str, ...] = ()  # recorded, never pruned, no longer listed
    replaced: tuple[str, ...] = ()  # listed under a recorded name, but with another id

    def __bool__(self) -> bool:
        return bool(self.vanished or self.replaced)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.vanished + self.replaced))


def archive_changes(recorded: Mapping[str, tuple[str | None, float | None]], listed: Mapping[str, str]) -> ArchiveChanges:
    """Compare the archives recorded (name -> (id, pruned)) with those listed now (name -> id).

    A recorded id that no longer matches the listed one (or that borg no longer gives) is a
    replaced archive; an archive recorded without id (older history) is judged by name only.
    Pruned archives and archives the coordinator never recorded are not judged here.
    """
    vanished, replaced = [], []
    for name, (archive_id, pruned) in recorded.items():
        if pruned is not None:
            continue
        if name not in listed:
            vanished.append(name)
        elif archive_id is not None and listed[name] != archive_id:
            replaced.append(name)
    return ArchiveChanges(tuple(sorted(vanished)), tuple(sorted(replaced)))


def guard_problems(
    vanished: Sequence[str], baseline: int | None, live: int | None, *,
    replaced: Sequence[str] = (), foreign: Sequence[Transaction] = (), offset: float = 0.0,
) -> list[str]:
    """What promise 3 forbids compacting over: vanished or replaced archives, a shrunk live size,
    transactions on the host that no run of the coordinator accounts for.

    ``baseline`` is from :func:`baseline_bytes`, ``live`` the size now; ``offset`` is the
    host's clock minus the coordinator's (to show foreign transactions in the coordinator's time).
    """
    problems = []
    if vanished:
        problems.append(f"{len(vanished)} archive(s) that the coordinator recorded and never pruned are gone: {', '.join(vanished)}")
    if replaced:
        problems.append(
            f"{len(replaced)} archive(s) were deleted and re-created under the same name (their borg id changed since "
            f"the coordinator recorded them): {', '.join(replaced)}"
        )
    if baseline is not None and live is not None:
        floor = baseline - max(SHRINK_TOLERANCE[0], int(baseline * SHRINK_TOLERANCE[1]))
        if live < floor:
            problems.append(
                f"the repository's live data shrank from {baseline} to {live} bytes since the coordinator last measured it "
                "after a prune of its own, without a deletion of its own"
            )
    if foreign:
        listed = ", ".join(f"#{t.number} at {utc_text(t.time)} (host clock)" for t in foreign[:10])
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        problems.append(
            f"the host's transactions log shows {len(foreign)} write(s) made while the coordinator ran no backup or prune "
            f"into this repository: {listed}{more}"
            + (f" (the host's clock is {offset:+.0f} s from the coordinator's)" if abs(offset) >= 1 else "")
        )
    return problems


def foreign_transactions(
    transactions: Sequence[Transaction], since: int, windows: Sequence[tuple[float, float]], offset: float,
    slack: float = TRANSACTION_SLACK,
) -> list[Transaction]:
    """Transactions numbered above ``since`` committed outside every window (coordinator's clock).

    ``windows`` are (start, end) of the coordinator's backup and prune runs into the
    repository; ``offset`` is the host's clock minus the coordinator's, measured now.
    """
    foreign = []
    for transaction in transactions:
        if transaction.number <= since:
            continue
        at = transaction.time - offset
        if not any(start - slack <= at <= end + slack for start, end in windows):
            foreign.append(transaction)
    return foreign


def run_window(run: Run, now: float, cap: float = UNCERTAIN_END_CAP) -> tuple[float, float]:
    """(start, end) during which ``run`` may have written into its repository (coordinator's clock).

    A finished run: its recorded start and end. A run still ``running`` or one whose end is
    uncertain (``mark_interrupted`` set ``end_uncertain``: the process died; the end recorded is
    when the next one noticed) counts only up to ``started + cap``: a crash and a late restart
    must not turn days of foreign writes into the coordinator's own.
    """
    if run.ended is not None and not run_detail(run).get("end_uncertain"):
        return run.started, run.ended
    end = run.ended if run.ended is not None else now
    return run.started, min(end, run.started + cap)


def baseline_bytes(runs: Sequence[Run]) -> int | None:
    """The live size measured after the coordinator's last *verified* prune, or accepted (signed) by one of
    the member's admins since; None when unknown.

    Verified: the prune found every recorded archive with its recorded id before it ran, removed
    only what the retention deletes, and measured the size before listing what remained. A backup's
    own measurement is never a baseline: nothing checked the archives when it was taken.
    """
    for run in runs:  # newest first
        if run.kind == "prune" and run.succeeded and run.repository_bytes is not None and run_detail(run).get("verified"):
            return run.repository_bytes
        if run.kind == ACCEPTED and run.succeeded and run_detail(run).get("live_bytes") is not None:
            return int(run_detail(run)["live_bytes"])  # the size a member's admin accepted, signed
    return None


def checked_through(runs: Sequence[Run]) -> int:
    """The highest transaction number a passed guard already accounted for (-1: none)."""
    for run in runs:  # newest first
        if run.kind in ("compact", ACCEPTED) and run.succeeded and "transactions_checked" in run_detail(run):
            return int(run_detail(run)["transactions_checked"])
    return -1


def run_detail(run: Run) -> dict:
    """A run's recorded detail (JSON), or {} when it has none or it cannot be read."""
    try:
        return json.loads(run.detail) if run.detail else {}
    except ValueError:
        return {}


def utc_text(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
