"""One backup job: a source's ``borg create`` into one replica, recorded in the history.

The coordinator connects to the *source* and runs borg there; borg reaches the
host over SSH with the source's own key (the forced command on the host confines
it to its repository). The job never raises for a failed backup: it records the
failure and returns it, so that one failure never stops other jobs or the daemon.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from . import borg
from .context import Context
from .errors import MutualBackupError
from .model import Node, now_utc

log = logging.getLogger("mutualbackup.backup")

BACKUP_TIMEOUT = 12 * 3600


@dataclass(frozen=True)
class Outcome:
    source: str
    target: str
    result: str  # success, warning, failure
    exit_code: int | None
    duration: float
    archive: str | None = None
    original_bytes: int | None = None
    deduplicated_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("success", "warning")


def run_backup(
    ctx: Context,
    source: Node,
    host: Node,
    *,
    timeout: float = BACKUP_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Back ``source`` up into its repository on ``host``; record and return the outcome."""
    assert source.backup is not None
    started = clock()
    run_id = ctx.history.start_run("backup", source.name, host.name, started=started)
    log.info("backup start  %s -> %s", source.name, host.name)
    exit_code: int | None = None
    try:
        transport = ctx.connect(source)
        try:
            paths = ctx.source_paths(transport, source)
            for command in source.backup.before:
                result = transport.run(("sh", "-c", command), timeout=timeout)
                if not result.ok:
                    raise MutualBackupError(
                        f"the before: command failed with exit {result.exit_code}, so no backup was made.\n"
                        f"command: {command}\n{result.stderr_tail()}"
                    )
            archive = borg.archive_name(source, now_utc())
            url = borg.repository_url(source, host)
            result = transport.run(
                borg.create_argv(source.borg, url, archive, source.backup),
                env=borg.client_env(paths),
                timeout=timeout,
            )
        finally:
            transport.close()
        exit_code = result.exit_code
        verdict = borg.classify_exit(exit_code)
        if verdict in ("success", "warning"):
            stats = borg.parse_create_json(result.stdout)
            outcome = Outcome(
                source.name, host.name, verdict, exit_code, clock() - started, stats.name,
                stats.original_bytes, stats.deduplicated_bytes,
                error=result.stderr_tail() if verdict == "warning" else None,
            )
            ctx.history.finish_run(
                run_id, verdict, exit_code=exit_code, ended=started + outcome.duration, archive=stats.name,
                original_bytes=stats.original_bytes, compressed_bytes=stats.compressed_bytes,
                deduplicated_bytes=stats.deduplicated_bytes, repository_bytes=stats.repository_bytes,
                nfiles=stats.nfiles, error=outcome.error,
            )
            ctx.history.record_archives(source.name, host.name, [(stats.name, started)])
            log.info("backup end    %s -> %s  %s  %.1fs", source.name, host.name, verdict, outcome.duration)
            return outcome
        error = (
            f"borg create exited {exit_code}: {borg.exit_hint(exit_code)}\n{result.stderr_tail()}"
        ).strip()
    except (MutualBackupError, ValueError) as exc:
        error = str(exc)
    duration = clock() - started
    ctx.history.finish_run(run_id, "failure", exit_code=exit_code, error=error, ended=started + duration)
    log.warning("backup end    %s -> %s  failure  %.1fs: %s", source.name, host.name, duration, error.splitlines()[0])
    return Outcome(source.name, host.name, "failure", exit_code, duration, error=error)
