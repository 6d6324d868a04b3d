"""Restore drills: prove, regularly, that the latest backup of each source restores.

A drill, on the source node with its own key:

1. lists the latest archive on the freshest healthy replica (the next when one is down);
2. chooses a bounded sample (:func:`choose_sample`): each drill puts a different
   top-level backup path first, in turn, and walks on through its files from
   where the previous turn stopped, so successive drills exercise every path;
3. asks borg for the sample's own item checksums (``borg list --format {sha256}``,
   which reads and authenticates that data in the repository);
4. extracts the sample into a scratch directory under the source's workdir
   (the long borg commands run under :mod:`supervise`: they die with the
   coordinator's session, and the daemon can stop them);
5. compares the extracted files with the archive (type, permissions, size,
   sha256, symlink target) and, for files unchanged since the archive (same size
   and mtime), the live files too;
6. records a ``drill`` run (source, target = the replica used) and removes the scratch.

:func:`drills_due` tells the daemon which sources need one (``drill_every``).
"""

from __future__ import annotations


import dataclasses
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mutualbackup.context import Context
from mutualbackup.state.history import History
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.jobs.runs import RecordedRun, RunFailed, running
from mutualbackup.node.requests import host_ref
from mutualbackup.restore.replicas import latest_listing
from mutualbackup.jobs.control import JobControl
from mutualbackup.remote.transport import Transport

if TYPE_CHECKING:
    from mutualbackup.state.run_index import RunIndex

log = logging.getLogger("mutualbackup.jobs.drill")

RETRY_AFTER = 6 * 3600
"""A failed drill is tried again after this long (or after ``drill_every`` if shorter)."""
DRILL_TIMEOUT = 6 * 3600


# --- pure: what to sample, what is due, what went wrong -----------------------------


def drills_due(federation: Federation, history: History | RunIndex, now: float | dt.datetime) -> list[str]:
    """Sources whose drill is due at ``now`` (epoch seconds, or an aware datetime), most overdue first.

    Due: at least one successful backup, and no successful drill within
    ``drill_every``; a failed (or interrupted) drill is retried after ``min(drill_every, RETRY_AFTER)``.
    The daemon should not start a source's drill while that source's backup runs
    (both lock the repository; borg would wait up to ``--lock-wait``). ``history`` is the history itself,
    or the daemon's :class:`~mutualbackup.state.run_index.RunIndex` of it (the same answers, kept up to date).
    """
    if isinstance(now, dt.datetime):
        now = now.timestamp()
    drills = history.drills()
    due: list[tuple[float, str]] = []
    for source in federation.sources():
        assert source.backup is not None
        success, attempt, backed_up = drills.get(source.name, (None, None, False))
        if not backed_up:
            continue
        since = success if success is not None else -math.inf  # never drilled: as soon as there is a backup
        if now - since < source.backup.drill_every:
            continue
        if attempt is not None and now - attempt < min(source.backup.drill_every, RETRY_AFTER):
            continue
        due.append((since, source.name))
    return [name for _, name in sorted(due)]


# --- running a drill --------------------------------------------------------------------


@dataclass(frozen=True)
class DrillOutcome:
    source: str
    target: str
    result: str  # success, failure, or interrupted (aborted by the daemon)
    duration: float
    archive: str | None = None
    top_level: str | None = None  # the top-level path this drill exercised first (absolute)
    files: int = 0
    bytes: int = 0
    live_checked: int = 0
    live_changed: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "success"


def run_drill(
    ctx: Context, source: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> DrillOutcome:
    """Drill ``source`` once; record the run (kind ``drill``) and return the outcome. Never raises.

    The long borg commands run supervised (they die with the session, and ``control`` lets the
    daemon stop them); an aborted drill is recorded ``interrupted``. A drill that could not even
    find an archive is recorded with no target.
    """
    assert source.backup is not None
    started = clock()
    run: RecordedRun | None = None
    sample: DrillOutcome | None = None
    try:
        number = len(ctx.history.runs(kind="drill", source=source.name))
        with ctx.session(source, control) as transport:
            host, archives = latest_listing(ctx, transport, source, need_archive=True,
                                            failure="no replica of {source} could be drilled")
            run = RecordedRun(ctx.history, "drill", source.name, host.name, clock=clock, control=control,
                              started=started, logger=log)
            with run:
                sample = _drill(transport, source, host, archives[-1].name, number, run)
                run.succeed({"top_level": sample.top_level, "live_checked": sample.live_checked,
                             "live_changed": sample.live_changed},
                            exit_code=None, archive=sample.archive, nfiles=sample.files, original_bytes=sample.bytes)
    except Exception as exc:  # before the run could start: no archive to drill, the source unreachable
        if run is None:
            run = RecordedRun(ctx.history, "drill", source.name, "", clock=clock, control=control, started=started,
                              logger=log)
            with run:
                raise exc
    assert run is not None and run.outcome is not None
    if sample is not None and run.outcome.ok:
        return dataclasses.replace(sample, duration=run.outcome.duration)
    return DrillOutcome(source.name, run.target, run.outcome.result, run.outcome.duration, error=run.outcome.error)


def _drill(transport: Transport, source: Node, host: Node, archive: str, number: int, run: RecordedRun) -> DrillOutcome:
    """Ask the source to drill ``archive`` (the whole drill runs there); RunFailed when it did not hold."""
    assert source.backup is not None
    args = {"host": host_ref(host), "archive": archive, "number": number, "run_id": run.id,
            "paths": list(source.backup.paths)}
    with running(run.control, source, f"drill/{host.name}"):
        reply = transport.request("drill", args, timeout=DRILL_TIMEOUT + 120)
    if not reply.ok:
        raise RunFailed(reply.error or f"{source.name} did not drill")
    data = reply.data
    return DrillOutcome(source=source.name, target=host.name, result="success", duration=0.0, archive=archive,
                        top_level=data.get("top_level"), files=int(data.get("files", 0)), bytes=int(data.get("bytes", 0)),
                        live_checked=int(data.get("live_checked", 0)), live_changed=int(data.get("live_changed", 0)))
