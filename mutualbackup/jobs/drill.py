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

import datetime as dt
import logging
import math
import posixpath
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.borg import Entry, Item
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed
from mutualbackup.state.history import History
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.restore.extract import choose_replica
from mutualbackup.remote.supervision import RUN_DIR, JobControl, run_supervised
from mutualbackup.remote.transport import Result, Transport

log = logging.getLogger("mutualbackup.jobs.drill")

SAMPLE_BYTES = 64 * 1024**2
"""At most this much file data per drill (except a lone file larger than that, see choose_sample)."""
SAMPLE_FILES = 200
"""At most this many files and symlinks per drill."""
RETRY_AFTER = 6 * 3600
"""A failed drill is tried again after this long (or after ``drill_every`` if shorter)."""
MTIME_TOLERANCE = 5e-6
"""borg lists mtimes to the microsecond; a live file within this of the archive's mtime (and of the same size) is unchanged."""
DRILL_TIMEOUT = 6 * 3600


# --- pure: what to sample, what is due, what went wrong -----------------------------


def top_level_paths(paths: Sequence[str]) -> list[str]:
    """A source's backup paths in archive form (no leading slash), in inventory order."""
    return [borg.archive_path(p).rstrip("/") for p in paths]


def _root_of(path: str, roots: Sequence[str]) -> str:
    """The longest top-level path holding ``path`` ('' when none does)."""
    best = ""
    for root in roots:
        if (path == root or path.startswith(root + "/") or root == "") and len(root) >= len(best):
            best = root
    return best


def _encodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def choose_sample(
    entries: Sequence[Entry],
    roots: Sequence[str],
    drill_number: int,
    *,
    max_bytes: int = SAMPLE_BYTES,
    max_files: int = SAMPLE_FILES,
) -> tuple[str, list[Entry]]:
    """The top-level path this drill exercises first, and the sampled files and symlinks.

    Drill ``n`` puts the ``n mod k``-th top-level path that has files first (``k``
    of them), starting in its sorted file list where its previous turn stopped
    (``(n div k) × max_files``, wrapping), and fills the budget (``max_bytes``,
    ``max_files``) from it, then from the next paths. Files larger than what is
    left of the budget are skipped, except that the first path always gets one
    file: its smallest, alone, when none fits. Hardlinks to earlier files,
    directories and devices are not sampled. Pure and deterministic.
    """
    groups: dict[str, list[Entry]] = {}
    order = list(roots) + [""]
    for entry in entries:
        if entry.kind not in ("-", "l") or not _encodable(entry.path):
            continue
        groups.setdefault(_root_of(entry.path, roots), []).append(entry)
    turns = [root for root in dict.fromkeys(order) if groups.get(root)]
    if not turns:
        return "", []
    first = drill_number % len(turns)
    rounds = drill_number // len(turns)
    chosen: list[Entry] = []
    used = 0
    for position in range(len(turns)):
        root = turns[(first + position) % len(turns)]
        files = sorted(groups[root], key=lambda e: e.path)
        start = (rounds * max_files) % len(files) if position == 0 else 0
        rotated = files[start:] + files[:start]
        taken = 0
        for entry in rotated:
            if len(chosen) >= max_files:
                break
            size = entry.size if entry.kind == "-" else 0
            if used + size <= max_bytes:
                chosen.append(entry)
                used += size
                taken += 1
        if position == 0 and taken == 0:
            smallest = min(files, key=lambda e: (e.size, e.path))
            chosen.append(smallest)
            used += smallest.size
    return turns[first], chosen


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


@dataclass(frozen=True)
class Observation:
    """What the node says about one path: find's type letter ('-' when absent), mode bits, size, mtime, link, sha256."""

    kind: str
    mode: int
    size: int
    mtime: float
    link: str
    sha256: str


MISSING = Observation("-", 0, 0, 0.0, "", "")


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    live_checked: int = 0  # live files unchanged since the archive, and compared
    live_changed: int = 0  # live files changed (or gone) since the archive: not compared


def verify_sample(items: Sequence[Item], extracted: dict[str, Observation], live: dict[str, Observation]) -> Verdict:
    """Compare each sampled item with its extracted copy and, when unchanged since the archive, its live file."""
    verdict = Verdict()
    for item in items:
        got = extracted.get(item.path, MISSING)
        now = live.get(item.path, MISSING)
        if item.type == "-":
            if got.kind != "f":
                verdict.problems.append(f"{item.path}: not extracted")
                continue
            if not item.sha256:
                verdict.problems.append(f"{item.path}: borg gave no checksum")
            elif got.sha256 != item.sha256 or got.size != item.size:
                verdict.problems.append(f"{item.path}: the extracted file does not match the archive's checksum")
            if got.mode != item.permissions:
                verdict.problems.append(f"{item.path}: extracted with mode {got.mode:o}, the archive says {item.permissions:o}")
            unchanged = now.kind == "f" and now.size == item.size and abs(now.mtime - item.mtime) <= MTIME_TOLERANCE
            if unchanged:
                verdict.live_checked += 1
                if now.sha256 != item.sha256:
                    verdict.problems.append(
                        f"/{item.path}: the live file has the archived size and mtime but different content "
                        "(silent corruption on the source, or in the backup)"
                    )
            else:
                verdict.live_changed += 1
        elif item.type == "l":
            target = item.linktarget or item.source
            if got.kind != "l" or got.link != target:
                verdict.problems.append(f"{item.path}: the extracted symlink does not point to {target!r}")
            if now.kind == "l" and now.link == target:
                verdict.live_checked += 1
            else:
                verdict.live_changed += 1
    return verdict


# The inspection script: for each archive path P, the extracted copy (SCRATCH/P) then the
# live file (/P), six NUL-terminated fields each: type, octal mode, size, mtime, link target, sha256.
INSPECT_SCRIPT = r"""scratch=$1; shift
for p do
  for f in "$scratch/$p" "/$p"; do
    if [ -L "$f" ] || [ -e "$f" ]; then
      find "$f" -maxdepth 0 -printf '%y\0%m\0%s\0%T@\0%l\0'
      if [ -f "$f" ] && [ ! -L "$f" ] && h=$(sha256sum < "$f"); then printf '%.64s\0' "$h"; else printf '\0'; fi
    else
      printf -- '-\0\0\0\0\0\0'
    fi
  done
done
"""


def inspect_argv(scratch: str, paths: Sequence[str]) -> tuple[str, ...]:
    return ("sh", "-c", INSPECT_SCRIPT, "sh", scratch, *paths)


def parse_inspection(stdout: bytes, paths: Sequence[str]) -> tuple[dict[str, Observation], dict[str, Observation]]:
    """(extracted, live) observations per archive path from :data:`INSPECT_SCRIPT`'s output."""
    fields = stdout.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) != 12 * len(paths):
        raise ValueError(f"the inspection printed {len(fields)} fields for {len(paths)} path(s)")

    def observation(chunk: list[bytes]) -> Observation:
        kind = chunk[0].decode()
        if kind == "-":
            return MISSING
        return Observation(
            kind=kind, mode=int(chunk[1] or b"0", 8), size=int(chunk[2] or b"0"), mtime=float(chunk[3] or b"0"),
            link=chunk[4].decode("utf-8", "surrogateescape"), sha256=chunk[5].decode(),
        )

    extracted, live = {}, {}
    for index, path in enumerate(paths):
        chunk = fields[12 * index : 12 * index + 12]
        extracted[path] = observation(chunk[:6])
        live[path] = observation(chunk[6:])
    return extracted, live


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


class _DrillFailed(Exception):
    pass


def drill_pidfile(workdir: str, peer: str) -> str:
    """The pidfile of a drill's supervised borg on the source (apart from the backups' pidfiles)."""
    return posixpath.join(workdir, RUN_DIR, "drill-" + peer.replace("/", ".") + ".pid")


def run_drill(
    ctx: Context, source: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> DrillOutcome:
    """Drill ``source`` once; record the run (kind ``drill``) and return the outcome. Never raises.

    The long borg commands run supervised (they die with the session, and ``control`` lets the
    daemon stop them); an aborted drill is recorded ``interrupted``.
    """
    assert source.backup is not None
    started = clock()
    target = ""
    run_id: int | None = None
    try:
        number = len(ctx.history.runs(kind="drill", source=source.name))
        transport = ctx.connect(source)
        if control is not None:
            control.attach(transport)
        try:
            env = borg.client_env(ctx.source_paths(transport, source))
            host, url, archive = _latest_archive(ctx, transport, source, env)
            target = host.name
            run_id = ctx.history.start_run("drill", source.name, target, started=started)
            log.info("drill start   %s on %s (%s)", source.name, target, archive)
            outcome = _drill(ctx, transport, source, env, host, url, archive, number, started, clock, run_id, control)
        finally:
            if control is not None:
                control.detach(transport)
            transport.close()
    except Exception as exc:  # a failed drill, or a bug: never leave the run "running" nor stop the daemon
        if not isinstance(exc, (MutualBackupError, _DrillFailed, ValueError)):
            log.exception("drill of %s crashed", source.name)
        error = str(exc) if isinstance(exc, (MutualBackupError, _DrillFailed, ValueError)) else f"internal error: {exc!r}"
        result = "failure"
        if control is not None and control.is_aborted:
            result, error = "interrupted", f"aborted: {control.reason}\n{error}"
        duration = clock() - started
        try:
            if run_id is None:
                run_id = ctx.history.start_run("drill", source.name, target, started=started)
            ctx.history.finish_run(run_id, result, error=error, ended=started + duration)
        except Exception:  # the history is unavailable: the daemon's shutdown or next start marks the run
            log.exception("could not record the drill of %s", source.name)
        log.warning("drill end     %s on %s: %s: %s", source.name, target or "-", result, error.splitlines()[0])
        return DrillOutcome(source.name, target, result, duration, error=error)
    ctx.history.finish_run(
        run_id, "success", ended=started + outcome.duration, archive=outcome.archive, nfiles=outcome.files,
        original_bytes=outcome.bytes,
        detail={"top_level": outcome.top_level, "live_checked": outcome.live_checked, "live_changed": outcome.live_changed},
    )
    log.info("drill end     %s on %s: success, %d file(s), %.1fs", source.name, target, outcome.files, outcome.duration)
    return outcome


def _latest_archive(ctx: Context, transport: Transport, source: Node, env: dict[str, str]) -> tuple[Node, str, str]:
    errors = []
    for host in choose_replica(ctx, source, None):
        url = borg.repository_url(source, host)
        listed = transport.run(borg.list_argv(source.borg, url), env=env, timeout=600)
        if not borg.succeeded(listed.exit_code):
            errors.append(f"{host.name}: borg list exited {listed.exit_code}: {borg.exit_hint(listed.exit_code)}\n{_borg_error(listed)}")
            continue
        archives = borg.parse_list_json(listed.stdout)
        if archives:
            return host, url, archives[-1].name
        errors.append(f"{host.name}: no archive yet")
    raise OperationFailed(f"no replica of {source.name} could be drilled:\n" + "\n".join(errors))


def _borg_error(result: Result) -> str:
    return borg.error_lines(result.stderr.decode("utf-8", "replace"))


def _drill(
    ctx: Context, transport: Transport, source: Node, env: dict[str, str], host: Node, url: str, archive: str,
    number: int, started: float, clock: Callable[[], float], run_id: int, control: JobControl | None = None,
) -> DrillOutcome:
    assert source.backup is not None
    pidfile = drill_pidfile(ctx.source_paths(transport, source).workdir, host.name)

    def supervised(argv: Sequence[str], **options: object) -> Result:
        """A long borg command under the supervisor (it dies with the session; the daemon can stop it)."""
        if control is not None and control.is_aborted:
            raise _DrillFailed(f"aborted before {argv[1] if len(argv) > 1 else argv[0]} started: {control.reason}")
        return run_supervised(transport, source, pidfile, run_id, argv, env=env, timeout=DRILL_TIMEOUT,
                              control=control, **options)  # type: ignore[arg-type]

    where = f"{archive} on {host.name}"
    damaged = (
        f"\nThe repository of {source.name} on {host.name} may be damaged: run `mutualbackup verify {source.name}`, "
        "and restore from another replica until it is repaired."
    )
    catalogue = supervised(borg.catalogue_argv(source.borg, url, archive))
    if not borg.succeeded(catalogue.exit_code):
        raise _DrillFailed(f"cannot list {where}: borg list exited {catalogue.exit_code}: "
                           f"{borg.exit_hint(catalogue.exit_code)}\n{_borg_error(catalogue)}{damaged}")
    roots = top_level_paths(source.backup.paths)
    top, sample = choose_sample(borg.parse_catalogue(catalogue.stdout), roots, number)
    if not sample:
        raise _DrillFailed(f"{where} holds no file to drill")
    paths = [entry.path for entry in sample]
    hashed = supervised(borg.hashes_argv(source.borg, url, archive, paths))
    if not borg.succeeded(hashed.exit_code):
        raise _DrillFailed(f"borg could not read the sample's data in {where}: borg list exited {hashed.exit_code}: "
                           f"{borg.exit_hint(hashed.exit_code)}\n{_borg_error(hashed)}{damaged}")
    wanted = set(paths)
    items = [item for item in borg.parse_items(hashed.stdout) if item.path in wanted]
    if len(items) != len(wanted):
        raise _DrillFailed(f"borg listed {len(items)} of the {len(wanted)} sampled item(s) of {where}")
    workdir = ctx.source_paths(transport, source).workdir
    made = transport.run(
        ("sh", "-c", 'umask 077 && mktemp -d "$1/drill-$2.XXXXXX"', "sh", workdir, f"{number}"), timeout=60
    )
    scratch = made.stdout.decode("utf-8", "replace").strip()
    if not made.ok or not scratch.startswith("/"):
        raise OperationFailed(f"cannot create a scratch directory under {workdir} on {source.name}: {made.stderr_tail(3)}")
    try:
        extracted = supervised(borg.extract_argv(source.borg, url, archive, paths, progress=False, exact=True),
                               cwd=scratch)
        if not borg.succeeded(extracted.exit_code):
            progress = borg.ExtractProgress()  # --log-json: the messages are JSON lines on stderr
            for line in extracted.stderr.decode("utf-8", "replace").splitlines():
                progress.feed(line)
            raise _DrillFailed(f"borg extract of the sample of {where} exited {extracted.exit_code}: "
                               f"{borg.exit_hint(extracted.exit_code)}\n{borg.error_lines(progress.tail(40))}{damaged}")
        if control is not None and control.is_aborted:
            raise _DrillFailed(f"aborted: {control.reason}")
        inspected = transport.run(inspect_argv(scratch, paths), timeout=DRILL_TIMEOUT)
        if not inspected.ok:
            raise OperationFailed(f"cannot inspect the extracted sample on {source.name}: {inspected.stderr_tail(5)}")
        on_disk, live = parse_inspection(inspected.stdout, paths)
    finally:
        removed = transport.run(node_commands.remove_temporary_dir_argv(scratch), timeout=600)
        if not removed.ok:
            log.warning("could not remove the drill's scratch directory %s on %s: %s", scratch, source.name, removed.stderr_tail(3))
    verdict = verify_sample(items, on_disk, live)
    if verdict.problems:
        shown = "\n".join(verdict.problems[:10])
        more = f"\n… and {len(verdict.problems) - 10} more" if len(verdict.problems) > 10 else ""
        raise _DrillFailed(f"the sample of {where} does not match the archive:\n{shown}{more}")
    return DrillOutcome(
        source=source.name, target=host.name, result="success", duration=clock() - started, archive=archive,
        top_level="/" + top if top else None, files=len(items), bytes=sum(i.size for i in items if i.type == "-"),
        live_checked=verdict.live_checked, live_changed=verdict.live_changed,
    )
