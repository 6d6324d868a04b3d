"""One backup job: a source's ``borg create`` into one replica, recorded in the history.

The coordinator connects to the *source* and runs borg there; borg reaches the
host over SSH with the source's own key (the forced command on the host confines
it to its repository). The ``before:`` commands and borg run under the
:mod:`supervise` wrapper: they die with the coordinator's session, and the
daemon can stop them (SIGINT: borg keeps a checkpoint) when it shuts down.

The job never raises for a failed backup: it records the failure and returns
it, so that one failure never stops other jobs or the daemon. A job aborted by
the daemon is recorded ``interrupted``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.inventory.model import Backup, Node
from mutualbackup.jobs.control import JobControl
from mutualbackup.jobs.crash_cleanup import source_role
from mutualbackup.jobs.runs import RecordedRun, RunFailed, aborted, refused_by_node, running
from mutualbackup.node.protocol import log_lines
from mutualbackup.node.requests import host_ref
from mutualbackup.remote.transport import Result, reply_result

log = logging.getLogger("mutualbackup.jobs.backup")

BACKUP_TIMEOUT = 12 * 3600
REPLY_MARGIN = 120.0
"""How much longer than a job's own timeout the coordinator waits for the node's answer."""
UNREADABLE_SHOWN = 10
"""How many paths of the files borg could not read a backup run records (all are counted)."""


@dataclass(frozen=True)
class Outcome:
    source: str
    target: str
    result: str  # success, warning, failure, interrupted
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
    control: JobControl | None = None,
    on_progress: Callable[[borg.CreateProgress], None] | None = None,
) -> Outcome:
    """Back ``source`` up into its repository on ``host``; record and return the outcome.

    ``timeout`` bounds the whole job (``before:`` commands and borg); ``clock``
    gives the times recorded (and the archive name); ``control`` lets the daemon
    abort the job; ``on_progress`` (an operator's terminal) hears borg's progress as it goes. Never raises
    for a failed backup.
    """
    assert source.backup is not None
    last = ctx.history.last_run("backup", source.name, host.name)
    if last is not None and last.result == "failure" and DISK_FULL in (last.error or ""):
        _roll_back(ctx, source, host, clock, control)  # room may be back: the stale transaction must go first
    if last is not None and int(last.started) >= int(clock()):  # archive names carry the second: never one twice
        time.sleep(max(0.0, min(1.0, int(last.started) + 1 - clock())))
    with RecordedRun(ctx.history, "backup", source.name, host.name, clock=clock, control=control, logger=log) as run:
        _back_up(ctx, run, source, host, timeout, clock, control, on_progress)
    done = run.outcome
    assert done is not None
    if done.result == "failure" and done.exit_code is not None and borg.classify_exit(done.exit_code) == "error":
        _alert_once(ctx, source, host, done.exit_code, done.error or "", run.clock())
    columns = done.columns
    return Outcome(source.name, host.name, done.result, done.exit_code, done.duration, columns.get("archive"),  # type: ignore[arg-type]
                   columns.get("original_bytes"), columns.get("deduplicated_bytes"), error=done.error)  # type: ignore[arg-type]


def _back_up(ctx: Context, run: RecordedRun, source: Node, host: Node, timeout: float,
             clock: Callable[[], float], control: JobControl | None,
             on_progress: Callable[[borg.CreateProgress], None] | None = None) -> None:
    """The ``before:`` commands and borg create; the run's verdict from borg's exit code and output."""
    result = _create(ctx, source, host, run.id, run.started, timeout, clock, control, on_progress)
    exit_code = result.exit_code
    verdict = borg.classify_exit(exit_code)
    said = borg.parse_log(result.stderr)
    if not borg.succeeded(exit_code) and control is not None and control.is_aborted:
        raise RunFailed(f"aborted: {control.reason}; borg exited {exit_code} (a checkpoint archive may remain)", exit_code)
    if not borg.succeeded(exit_code) and host_disk_full(result.stderr, exit_code):
        rolled_back = _roll_back(ctx, source, host, clock, control)
        raise RunFailed(f"{host.name}{DISK_FULL} (exit {exit_code}). "
                        f"{rolled_back} Earlier archives are intact; the next backup succeeds once {host.name} has room: "
                        f"its member frees space on that disk, or lowers storage.capacity, or sets draining: true so "
                        f"that its replicas move.\n{said.tail()}".strip(), exit_code, alert="host-disk-full")
    if not borg.succeeded(exit_code):
        raise RunFailed(f"borg create exited {exit_code}: {borg.exit_hint(exit_code)}\n{said.tail()}".strip(), exit_code)
    stats = borg.parse_create_json(result.stdout)
    run.succeed(
        {"unreadable_files": len(said.unreadable), "unreadable_paths": list(said.unreadable[:UNREADABLE_SHOWN])},
        result=verdict, exit_code=exit_code, error=said.tail() if verdict == "warning" else None, note=stats.name,
        archive=stats.name, original_bytes=stats.original_bytes, compressed_bytes=stats.compressed_bytes,
        deduplicated_bytes=stats.deduplicated_bytes, repository_bytes=stats.repository_bytes, nfiles=stats.nfiles,
    )
    ctx.history.record_archives(source.name, host.name, [(stats.name, run.started, stats.id)], now=clock())


DISK_FULL = "'s disk is full: borg create could not write there"


def host_disk_full(stderr: bytes, exit_code: int) -> bool:
    """Whether borg create failed because the host's disk (not the replica's quota, not the source's disk) is full:
    borg's own free-space check (exit 14), or ENOSPC reported by the remote ``borg serve``."""
    if exit_code == 14:
        return True
    enospc = b"No space left on device" in stderr or b"Errno 28" in stderr
    return enospc and (b"Remote:" in stderr or b"borg/remote.py" in stderr)  # raised in the host's borg serve


def _roll_back(ctx: Context, source: Node, host: Node, clock: Callable[[], float], control: JobControl | None) -> str:
    """The failed transaction dropped on the host at once (a key-free repository check), so that the next backup
    does not meet it; what happened, in a sentence."""
    from mutualbackup.jobs.maintenance import repository_check

    checked = repository_check(ctx, source, host, clock, control)
    if checked.ok:
        return f"What it had written was rolled back on {host.name} (a repository check, without any key)."
    return (f"Rolling it back on {host.name} failed too ({(checked.error or '').splitlines()[0] if checked.error else 'no room'}); "
            "the next backup tries again first.")


def _create(
    ctx: Context, source: Node, host: Node, run_id: int, started: float, timeout: float,
    clock: Callable[[], float], control: JobControl | None,
    on_progress: Callable[[borg.CreateProgress], None] | None = None,
) -> Result:
    """Ask the source for the ``before:`` commands, then ``borg create``; the Result of borg create."""
    assert source.backup is not None
    aborted(control)
    archive = borg.archive_name(source, dt.datetime.fromtimestamp(started, dt.timezone.utc))
    args = {"host": host_ref(host), "archive": archive, "timeout": timeout, "run_id": run_id,
            "backup": backup_spec(source.backup), "signed": ctx.signed(source.member)}
    heard = None
    if on_progress is not None:
        args["progress"] = True
        progress = borg.CreateProgress()

        def heard(event: Mapping[str, Any]) -> None:
            if any([progress.feed(line) for line in log_lines(event)]):
                on_progress(progress)
    with ctx.session(source, control) as transport:
        with running(control, source, source_role(host.name)):
            reply = transport.request("backup", args, timeout=timeout + REPLY_MARGIN, on_event=heard)
    if "before" in reply.data:
        done = reply_result(reply, "before")
        command = reply.data["before"].get("command", "")
        raise RunFailed(f"the before: command failed with exit {done.exit_code}, so no backup was made.\n"
                        f"command: {command}\n{done.stderr_tail()}".strip(), done.exit_code)
    if reply.data.get("not_signed"):
        refused_by_node(ctx.history, source, host, reply.error or "", started)
    if not reply.ok and "create" not in reply.data:
        raise RunFailed(reply.error or f"{source.name} did not back up", None if not reply.data.get("lost") else -1)
    return reply_result(reply, "create")


def backup_spec(backup: Backup) -> dict[str, object]:
    """What a source is told to back up: its node checks it against what its member signed."""
    return {"paths": list(backup.paths), "exclude": list(backup.exclude), "compression": backup.compression,
            "before": list(backup.before)}


def _alert_once(ctx: Context, source: Node, host: Node, exit_code: int, error: str, now: float) -> None:
    """An alert for an error that retrying will not fix (disk full, quota, passphrase...), once per streak."""
    previous = ctx.history.runs(kind="backup", source=source.name, target=host.name, limit=2)[1:]
    if previous and previous[0].result == "failure" and previous[0].exit_code == exit_code:
        return
    ctx.history.add_alert(source.name, host.name, "backup-error", error.splitlines()[0] if error else f"exit {exit_code}", now=now)
