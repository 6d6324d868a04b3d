"""The state of each source × replica, from the history: ok, late, failing or never.

- ``never``: no successful backup yet;
- ``failing``: the last ``FAILING_AFTER`` attempts or more failed in a row;
- ``late``: the last success is older than the source's ``rpo``;
- ``ok``: otherwise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from .history import History
from .model import Federation

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


def compute_status(
    federation: Federation, placement: Mapping[str, Sequence[str]], history: History, now: float | None = None
) -> list[ReplicaStatus]:
    now = time.time() if now is None else now
    rows = []
    for source in federation.sources():
        assert source.backup is not None
        for target in placement.get(source.name, ()):
            success = history.last_run("backup", source.name, target, successful=True)
            last = history.last_run("backup", source.name, target)
            failures = history.consecutive_failures("backup", source.name, target)
            error = last.error if last is not None and not last.succeeded else None
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
                )
            )
    return rows
