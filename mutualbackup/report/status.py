"""The state of each source × replica, from the history: ok, late, failing or never.

- ``never``: no successful backup yet;
- ``failing``: the last ``FAILING_AFTER`` attempts or more failed in a row;
- ``late``: the last success is older than the source's ``rpo``;
- ``ok``: otherwise.

Each row also carries its source's restore drill (:func:`drill_state`): ``ok``,
``overdue``, ``failed`` or ``never``, with the last drill, its replica and error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from mutualbackup.state.history import History, Run
from mutualbackup.plan.compaction_rules import ACCEPTED
from mutualbackup.inventory.model import Federation

FAILING_AFTER = 2


@dataclass(frozen=True)
class ReplicaStatus:
    source: str
    target: str
    state: str
    last_success: float | None
    age_seconds: float | None
    last_attempt: float | None
    consecutive_failures: int
    last_error: str | None
    archive: str | None
    # The source's restore drill (the same on every row of a source; see drill_state).
    drill_state: str = "never"
    last_drill: float | None = None
    last_drill_success: float | None = None
    drill_target: str | None = None
    drill_error: str | None = None
    # Files the last successful backup could not read (borg's warning): how many, and the first paths.
    unreadable_files: int = 0
    unreadable_paths: tuple[str, ...] = ()
    # The guard of promise 3 refused the latest compaction of this replica: why, and the way back.
    compaction_refused: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def replica_state(last_success: float | None, failures: int, rpo: float, now: float) -> str:
    """The state word for one replica (pure)."""
    if last_success is None:
        return "never"
    if failures >= FAILING_AFTER:
        return "failing"
    if now - last_success > rpo:
        return "late"
    return "ok"


def drill_state(
    last_success: float | None, last_failed: bool, first_backup: float | None, drill_every: float, now: float
) -> str:
    """The drill word of one source (pure): ``failed`` (the last drill failed), ``overdue``
    (no successful drill within ``drill_every``, counted from the first backup when never
    drilled), ``ok``, or ``never`` (not drilled yet, and not overdue)."""
    if last_failed:
        return "failed"
    if last_success is not None:
        return "overdue" if now - last_success > drill_every else "ok"
    if first_backup is not None and now - first_backup > drill_every:
        return "overdue"
    return "never"


@dataclass(frozen=True)
class DrillStatus:
    state: str
    last_drill: float | None
    last_success: float | None
    target: str | None
    error: str | None


def source_drill(history: History, source: str, drill_every: float, now: float) -> DrillStatus:
    """The drill status of one source, from its ``drill`` and ``backup`` runs."""
    drills = [r for r in history.runs(kind="drill", source=source, limit=50) if r.result != "running"]
    last = drills[0] if drills else None
    success = next((r for r in drills if r.succeeded), None)
    backups = history.runs(kind="backup", source=source, result="success")
    first_backup = backups[-1].started if backups else None
    failed = last is not None and not last.succeeded
    return DrillStatus(
        state=drill_state(success.started if success else None, failed, first_backup, drill_every, now),
        last_drill=last.started if last else None,
        last_success=success.started if success else None,
        target=(last.target or None) if last else None,
        error=last.error if failed and last is not None else None,
    )


def compute_status(
    federation: Federation, placement: Mapping[str, Sequence[str]], history: History, now: float | None = None
) -> list[ReplicaStatus]:
    now = time.time() if now is None else now
    rows = []
    for source in federation.sources():
        assert source.backup is not None
        drill = source_drill(history, source.name, source.backup.drill_every, now)
        for target in placement.get(source.name, ()):
            success = history.last_run("backup", source.name, target, successful=True)
            last = history.last_run("backup", source.name, target)
            failures = history.consecutive_failures("backup", source.name, target)
            error = last.error if last is not None and not last.succeeded else None
            skipped = _detail(success).get("unreadable_paths") or ()
            compact = history.last_run("compact", source.name, target)
            refused = compact.error if compact is not None and _detail(compact).get("refused") else None
            accepted = history.last_run(ACCEPTED, source.name, target, successful=True)
            if refused and accepted is not None and (accepted.started, accepted.id) > (compact.started, compact.id):
                refused = None  # a member's admin accepted it: the next compaction frees it
            rows.append(
                ReplicaStatus(
                    source=source.name,
                    target=target,
                    state=replica_state(success.started if success else None, failures, source.backup.rpo, now),
                    last_success=success.started if success else None,
                    age_seconds=(now - success.started) if success else None,
                    last_attempt=last.started if last else None,
                    consecutive_failures=failures,
                    last_error=error,
                    archive=success.archive if success else None,
                    drill_state=drill.state,
                    last_drill=drill.last_drill,
                    last_drill_success=drill.last_success,
                    drill_target=drill.target,
                    drill_error=drill.error,
                    unreadable_files=int(_detail(success).get("unreadable_files") or 0),
                    unreadable_paths=tuple(str(p) for p in skipped),
                    compaction_refused=refused,
                )
            )
    return rows


def _detail(run: Run | None) -> dict:
    """The JSON detail of ``run`` as a dict ({} when there is none or it does not parse)."""
    try:
        value = json.loads(run.detail) if run is not None and run.detail else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
