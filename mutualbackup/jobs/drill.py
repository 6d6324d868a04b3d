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

from mutualbackup.restore import node_commands

import dataclasses
import datetime as dt
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed
from mutualbackup.state.history import History
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.plan.drill_sample import (
    Observation, choose_sample, inspect_argv, parse_inspection, top_level_paths, verify_sample,
)
from mutualbackup.borg import Item
from mutualbackup.jobs.runs import RecordedRun, RunFailed, aborted
from mutualbackup.restore.replicas import latest_listing
from mutualbackup.remote.supervision import RUN_DIR, JobControl, run_supervised
from mutualbackup.remote.transport import Result, Transport

log = logging.getLogger("mutualbackup.jobs.drill")

RETRY_AFTER = 6 * 3600
"""A failed drill is tried again after this long (or after ``drill_every`` if shorter)."""
DRILL_TIMEOUT = 6 * 3600


# --- pure: what to sample, what is due, what went wrong -----------------------------


def drills_due(federation: Federation, history: History, now: float | dt.datetime) -> list[str]:
    """Sources whose drill is due at ``now`` (epoch seconds, or an aware datetime), most overdue first.

    Due: at least one successful backup, and no successful drill within
    ``drill_every``; a failed drill is retried after ``min(drill_every, RETRY_AFTER)``.
    The daemon should not start a source's drill while that source's backup runs
    (both lock the repository; borg would wait up to ``--lock-wait``).
    """
    if isinstance(now, dt.datetime):
        now = now.timestamp()
    due: list[tuple[float, str]] = []
    for source in federation.sources():
        assert source.backup is not None
        backups = [r for r in history.runs(kind="backup", source=source.name, limit=50) if r.succeeded]
        if not backups:
            continue
        success = _last_drill(history, source.name, successful=True)
        attempt = _last_drill(history, source.name, successful=False)
        since = success.started if success is not None else -math.inf  # never drilled: as soon as there is a backup
        if now - since < source.backup.drill_every:
            continue
        if attempt is not None and now - attempt.started < min(source.backup.drill_every, RETRY_AFTER):
            continue
        due.append((since, source.name))
    return [name for _, name in sorted(due)]


def _last_drill(history: History, source: str, *, successful: bool):  # -> Run | None
    for run in history.runs(kind="drill", source=source, limit=20):
        if run.result == "running":
            continue
        if not successful or run.succeeded:
            return run
    return None


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


def drill_pidfile(workdir: str, peer: str) -> str:
    """The pidfile of a drill's supervised borg on the source (apart from the backups' pidfiles)."""
    return posixpath.join(workdir, RUN_DIR, "drill-" + peer.replace("/", ".") + ".pid")


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
            env = borg.client_env(ctx.source_paths(transport, source))
            host, archives = latest_listing(ctx, transport, source, env, need_archive=True,
                                            failure="no replica of {source} could be drilled")
            run = RecordedRun(ctx.history, "drill", source.name, host.name, clock=clock, control=control,
                              started=started, logger=log)
            with run:
                sample = _drill(ctx, transport, source, env, host, archives[-1].name, number, run)
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


def _drill(
    ctx: Context, transport: Transport, source: Node, env: dict[str, str], host: Node, archive: str, number: int,
    run: RecordedRun,
) -> DrillOutcome:
    """Sample, hash, extract and compare (see the module notes); RunFailed when the sample does not hold."""
    assert source.backup is not None
    drilling = _Drilling(ctx, transport, source, env, host, archive, run)
    top, items = drilling.sample(number)
    on_disk, live = drilling.extract_and_inspect([item.path for item in items], number)
    verdict = verify_sample(items, on_disk, live)
    if verdict.problems:
        shown = "\n".join(verdict.problems[:10])
        more = f"\n… and {len(verdict.problems) - 10} more" if len(verdict.problems) > 10 else ""
        raise RunFailed(f"the sample of {drilling.where} does not match the archive:\n{shown}{more}")
    return DrillOutcome(
        source=source.name, target=host.name, result="success", duration=0.0, archive=archive,
        top_level="/" + top if top else None, files=len(items), bytes=sum(i.size for i in items if i.type == "-"),
        live_checked=verdict.live_checked, live_changed=verdict.live_changed,
    )


@dataclasses.dataclass
class _Drilling:
    """One drill's borg commands on the source, supervised, with errors that say where and what to do."""

    ctx: Context
    transport: Transport
    source: Node
    env: dict[str, str]
    host: Node
    archive: str
    run: RecordedRun

    @property
    def where(self) -> str:
        return f"{self.archive} on {self.host.name}"

    @property
    def url(self) -> str:
        return borg.repository_url(self.source, self.host)

    def supervised(self, argv: Sequence[str], **options: object) -> Result:
        """A long borg command under the supervisor (it dies with the session; the daemon can stop it)."""
        control = self.run.control
        if control is not None and control.is_aborted:
            raise RunFailed(f"aborted before {argv[1] if len(argv) > 1 else argv[0]} started: {control.reason}")
        pidfile = drill_pidfile(self.ctx.source_paths(self.transport, self.source).workdir, self.host.name)
        return run_supervised(self.transport, self.source, pidfile, self.run.id, argv, env=self.env,
                              timeout=DRILL_TIMEOUT, control=control, **options)  # type: ignore[arg-type]

    def failed(self, what: str, code: int, messages: str) -> RunFailed:
        return RunFailed(
            f"{what} exited {code}: {borg.exit_hint(code)}\n{borg.error_lines(messages)}\n"
            f"The repository of {self.source.name} on {self.host.name} may be damaged: run "
            f"`mutualbackup verify {self.source.name}`, and restore from another replica until it is repaired.", code)

    def sample(self, number: int) -> tuple[str, list[Item]]:
        """The drill's sample (its first top-level path, and the items with their sha256 from the archive)."""
        assert self.source.backup is not None
        catalogue = self.supervised(borg.catalogue_argv(self.source.borg, self.url, self.archive))
        if not borg.succeeded(catalogue.exit_code):
            raise self.failed(f"cannot list {self.where}: borg list", catalogue.exit_code,
                              catalogue.stderr.decode("utf-8", "replace"))
        roots = top_level_paths(self.source.backup.paths)
        top, sample = choose_sample(borg.parse_catalogue(catalogue.stdout), roots, number)
        if not sample:
            raise RunFailed(f"{self.where} holds no file to drill")
        paths = [entry.path for entry in sample]
        hashed = self.supervised(borg.hashes_argv(self.source.borg, self.url, self.archive, paths))
        if not borg.succeeded(hashed.exit_code):
            raise self.failed(f"borg could not read the sample's data in {self.where}: borg list", hashed.exit_code,
                              hashed.stderr.decode("utf-8", "replace"))
        wanted = set(paths)
        items = [item for item in borg.parse_items(hashed.stdout) if item.path in wanted]
        if len(items) != len(wanted):
            raise RunFailed(f"borg listed {len(items)} of the {len(wanted)} sampled item(s) of {self.where}")
        return top, items

    def extract_and_inspect(self, paths: list[str], number: int) -> tuple[dict[str, Observation], dict[str, Observation]]:
        """Extract ``paths`` into a scratch directory on the source; (extracted, live) facts of each; scratch removed."""
        workdir = self.ctx.source_paths(self.transport, self.source).workdir
        made = self.transport.run(
            ("sh", "-c", 'umask 077 && mktemp -d "$1/drill-$2.XXXXXX"', "sh", workdir, f"{number}"), timeout=60
        )
        scratch = made.stdout.decode("utf-8", "replace").strip()
        if not made.ok or not scratch.startswith("/"):
            raise OperationFailed(f"cannot create a scratch directory under {workdir} on {self.source.name}: "
                                  f"{made.stderr_tail(3)}")
        try:
            extracted = self.supervised(
                borg.extract_argv(self.source.borg, self.url, self.archive, paths, progress=False, exact=True),
                cwd=scratch)
            if not borg.succeeded(extracted.exit_code):
                said = borg.parse_log(extracted.stderr)  # --log-json: the messages are JSON lines on stderr
                raise self.failed(f"borg extract of the sample of {self.where}", extracted.exit_code, said.tail(40))
            aborted(self.run.control)
            inspected = self.transport.run(inspect_argv(scratch, paths), timeout=DRILL_TIMEOUT)
            if not inspected.ok:
                raise OperationFailed(f"cannot inspect the extracted sample on {self.source.name}: "
                                      f"{inspected.stderr_tail(5)}")
            return parse_inspection(inspected.stdout, paths)
        finally:
            removed = self.transport.run(node_commands.remove_temporary_dir_argv(scratch), timeout=600)
            if not removed.ok:
                log.warning("could not remove the drill's scratch directory %s on %s: %s", scratch, self.source.name,
                            removed.stderr_tail(3))
