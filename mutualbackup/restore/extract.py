"""Listing archives and restoring them onto any node of the federation.

Borg always runs on the node that needs the files (the *destination*) and reads
the repository on a replica's host over SSH: plaintext never passes through the
host or the coordinator. Two ways to reach the repository:

- **source key**: the destination is the source itself, with its own key and
  0600 passphrase file (the lines ``apply`` wrote already accept it);
- **temporary key** (any other node, or ``--recovery``): a key pair made in the
  coordinator's memory, whose private half goes over the SSH channel's stdin into a
  0700 temporary directory of the destination; the host accepts it through a
  temporary restricted line in its managed ``authorized_keys`` block
  (``mutualbackup-restore:SOURCE:ID``, one repository, append-only, a 10M quota,
  sshd ``expiry-time``), held by one SSH session on the host and withdrawn as soon
  as borg has connected to the host (sshd reads the file only at login), and in any
  case when the restore ends, failed or not, or when that session drops. The
  passphrase is read from the source's 0600 file (or from the recovery file the
  operator holds) into the coordinator's memory and written to borg's fd 3
  through the same stdin: never in argv, an environment value, a log, the history
  or a file of the coordinator (:mod:`mutualbackup.restore.temporary_key`).
"""

from __future__ import annotations

from mutualbackup.restore import node_commands

import contextlib
import datetime as dt
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from mutualbackup import borg
from mutualbackup.restore import recovery_file
from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed, TransportError, UsageError
from mutualbackup.restore.recovery_file import RecoveryFile
from mutualbackup.inventory.model import Node
from mutualbackup.restore.temporary_key import (
    Access, Delegated, EarlyGrant, GateClosed, HostGrant, authorised, expanded, new_restore_key,
    read_source_passphrase, refuse_target, remove_temporary,
)
from mutualbackup.report.status import FAILING_AFTER
from mutualbackup.remote.transport import Transport

log = logging.getLogger("mutualbackup.restore.extract")

RESTORE_TIMEOUT = 24 * 3600
UNREACHABLE = borg.UNREACHABLE
REPO_KEY_MISSING = 44
"""borg's RepoKeyNotFoundError: the repository's own key is gone (``--recovery`` imports the exported one)."""


@dataclass(frozen=True)
class RestoreResult:
    source: str
    replica: str
    archive: str
    node: str
    directory: str
    dry_run: bool
    listed: tuple[str, ...]  # paths written (or that would be, with --dry-run)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    result: str = "success"  # success or warning
    access: str = "source key"  # or "temporary key"
    recovery: bool = False
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data["listed"] = list(self.listed)
        data["warnings"] = list(self.warnings)
        data["rate_bytes_per_second"] = round(self.bytes / self.seconds) if self.seconds > 0 else None
        return data


# --- choosing a replica ---------------------------------------------------------------


def replica_order(ctx: Context, source: str, candidates: Sequence[str]) -> list[str]:
    """``candidates`` best first: healthy before failing, then the freshest successful backup."""

    def key(target: str) -> tuple[bool, float]:
        run = ctx.history.last_run("backup", source, target, successful=True)
        healthy = ctx.history.consecutive_failures("backup", source, target) < FAILING_AFTER
        return (healthy, run.started if run else 0.0)

    return sorted(candidates, key=key, reverse=True)


def choose_replica(ctx: Context, source: Node | str, requested: str | None, among: Sequence[str] | None = None) -> list[Node]:
    """Replicas to try, best first: the requested one, else freshest healthy first.

    ``among`` replaces the recorded replicas (the hosts of a recovery file).
    """
    name = source if isinstance(source, str) else source.name
    if among is not None:
        replicas = tuple(among)
    else:
        recorded = ctx.replicas_of(name)
        if not recorded:
            raise OperationFailed(f"{name} has no provisioned replica: run `mutualbackup apply` first")
        replicas = tuple(host.name for host in ctx.replica_hosts(name))
        if requested is not None and requested in recorded and requested not in replicas:
            raise UsageError(f"{requested} is no longer a host in the inventory: choose another --replica "
                             f"(replicas: {', '.join(replicas) or 'none'})")
        if not replicas:
            raise OperationFailed(f"none of the recorded replicas of {name} ({', '.join(recorded)}) is a host in the "
                                  "inventory any more: run `mutualbackup apply`")
    if requested is not None:
        if requested not in replicas:
            raise UsageError(f"{requested} holds no replica of {name} (replicas: {', '.join(replicas)})")
        return [ctx.node(requested)]
    return [ctx.node(t) for t in replica_order(ctx, name, replicas)]


def list_archives(ctx: Context, source: Node, replica: str | None = None) -> tuple[Node, list[borg.ArchiveEntry]]:
    """The archives of ``source`` on the chosen replica (falls back to the next when one is down)."""
    errors = []
    for host in choose_replica(ctx, source, replica):
        transport = ctx.connect(source)
        try:
            paths = ctx.source_paths(transport, source)
            result = transport.run(
                borg.list_argv(source.borg, borg.repository_url(source, host)), env=borg.client_env(paths), timeout=600
            )
        finally:
            transport.close()
        if borg.succeeded(result.exit_code):
            return host, borg.parse_list_json(result.stdout)
        errors.append(f"{host.name}: borg list exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}")
    raise OperationFailed(f"cannot list the archives of {source.name}:\n" + "\n".join(errors))


# --- restore --------------------------------------------------------------------------


def restore(
    ctx: Context,
    source: Node | str,
    destination: Node,
    directory: str,
    *,
    archive: str | None = None,
    paths: Sequence[str] = (),
    replica: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_other_member: bool = False,
    recovery: RecoveryFile | None = None,
    requested_by: str = "",
    on_progress: Callable[[ExtractProgress], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Extract ``archive`` (default: the latest) of ``source`` into ``directory`` on ``destination``.

    ``source`` is a Node, or only its name when it is gone from the inventory
    (then ``recovery`` is required). Raises UsageError (exit 2) for a refused
    request (another member without ``allow_other_member``, or one that hosts a
    replica of the source, see :func:`check_other_member`; a recovery file that
    disagrees with the inventory, see :func:`mutualbackup.restore.recovery_file.usable_hosts`; a
    non-empty target without ``force``; a relative directory) and OperationFailed
    when the restore fails; the history records every attempted restore, with who asked.
    """
    source_name = source if isinstance(source, str) else source.name
    source_node = source if isinstance(source, Node) else None
    if not directory.startswith("/"):
        raise UsageError(f"the target directory must be absolute, got {directory!r}")
    if recovery is not None and recovery.source != source_name:
        raise UsageError(f"the recovery file is for {recovery.source}, not {source_name}")
    if source_node is None and recovery is None:
        raise UsageError(f"{source_name} is not in the inventory: restore it with --recovery FILE")
    source_member = source_name.split("/", 1)[0]
    other_member = destination.member != source_member
    if other_member:
        check_other_member(ctx, source_name, destination, recovery, allow_other_member)
    if recovery is not None:
        among, skipped = recovery_file.usable_hosts(recovery, ctx.federation)
        for name in skipped:
            log.warning("%s (in the recovery file) is no longer in the inventory: skipping its repository", name)
        hosts = choose_replica(ctx, source_name, replica, among)
    else:
        hosts = choose_replica(ctx, source_name, replica)

    def repository_path(host: Node) -> str:
        if recovery is not None:  # computed from the inventory: the file's path was only compared with it
            return recovery_file.repository_path(source_name, host)
        assert source_node is not None
        return borg.repository_path(source_node, host)

    delegated = recovery is not None or destination.name != source_name
    detail: dict[str, object] = {
        "to": f"{destination.name}:{directory}", "paths": list(paths), "dry_run": dry_run,
        "requested_by": requested_by, "other_member": other_member, "recovery": recovery is not None,
        "access": "temporary key" if delegated else "source key",
    }
    job = _Job(ctx, source_name, destination, directory, hosts, repository_path, archive, tuple(paths), dry_run,
               detail, recovery, on_progress, on_line)
    transport = ctx.connect(destination)
    try:
        if not delegated:
            assert source_node is not None
            workdir = expanded(transport, source_node.workdir)
            access = Access(env=borg.client_env(borg.SourcePaths(workdir)), prepare=None if dry_run else (directory, force))
            try:
                return job.run(transport, access)
            finally:
                job.release()
        return _restore_delegated(job, transport, source_node, force)
    finally:
        transport.close()


def check_other_member(
    ctx: Context, source: str, destination: Node, recovery: RecoveryFile | None, allowed: bool
) -> None:
    """Refuse, or warn about, a restore onto a node of another member than the source's.

    That member sees the plaintext, and its node receives the passphrase, which unlocks
    the repository key for good. Refused outright when that member also holds (or is
    planned to hold) a replica of the source: it would have both the ciphertext and the
    passphrase. Otherwise refused without ``allowed`` (``--allow-other-member``), and
    logged as a warning with it.
    """
    source_member = source.split("/", 1)[0]
    holding = sorted(
        {*ctx.replicas_of(source), *ctx.placement.replicas.get(source, ()),
         *(r.host for r in (recovery.repositories if recovery is not None else ()))}
    )
    theirs = [host for host in holding if host.split("/", 1)[0] == destination.member]
    consequence = (
        f"{destination.member} could decrypt every archive of {source}, past and future, from now on: the passphrase "
        "unlocks the repository key for good, and rotating the passphrase does not undo it"
    )
    if theirs:
        raise UsageError(
            f"refusing to restore {source} onto {destination.name}: {destination.member} hosts a replica of {source} "
            f"({', '.join(theirs)}), and this restore would show it {source_member}'s plaintext and send it the "
            f"passphrase too; holding both the encrypted repository and the passphrase, {consequence}.\n"
            f"--allow-other-member does not lift this: restore onto a node of {source_member}, or of a member that "
            f"holds no replica of {source}."
        )
    if not allowed:
        raise UsageError(
            f"restoring {source} onto {destination.name} would show {source_member}'s plaintext to {destination.member} "
            f"and send it {source}'s passphrase: {consequence}.\n"
            f"Add --allow-other-member only once {source_member} agreed; the history records it and who asked."
        )
    log.warning(
        "restoring %s onto %s (--allow-other-member): %s sees the plaintext and receives the passphrase; %s",
        source, destination.name, destination.member, consequence,
    )


def _restore_delegated(job: "_Job", transport: Transport, source_node: Node | None, force: bool) -> RestoreResult:
    """The temporary-key restore: borg extract starts as soon as the destination is connected.

    A key pair is made in memory; then, all at once, the first replica's host
    accepts its public half, the passphrase is read from the source, and borg
    extract starts on the destination with the private key on its stdin; its
    ssh waits (the gate of :func:`node_commands.delegated_argv`) until the host's
    line is in and the passphrase has followed on stdin. The same round trip
    checks the target and removes the temporary directory. The host's line is
    withdrawn in the background as soon as borg reports on the archive (its
    connection is up): when all goes well, nothing is left to do once borg ends.
    """
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), secrets.token_hex(4))
    key = new_restore_key(borg.restore_comment(job.source, restore_id))
    with contextlib.ExitStack() as cleanup, ThreadPoolExecutor(max_workers=3, thread_name_prefix="restore") as pool:
        first = job.hosts[0]
        early = EarlyGrant(pool, authorised(job.ctx, first, job.source, job.repository_path(first), key.public_key, restore_id))
        cleanup.callback(early.close)
        workdir = pool.submit(_connected_workdir, transport, job.destination)
        if job.recovery is None and source_node is not None:
            secret = pool.submit(read_source_passphrase, job.ctx, source_node)
            passphrase: Callable[[], bytes] = secret.result
        else:
            assert job.recovery is not None
            known = job.recovery.passphrase.encode("utf-8")
            passphrase = lambda: known  # noqa: E731
        delegated = Delegated.under(workdir.result(), restore_id, job.hosts, key)

        def grant(host: Node, path: str) -> contextlib.AbstractContextManager[HostGrant]:
            if host is first:
                return early.take()
            return authorised(job.ctx, host, job.source, path, key.public_key, restore_id)

        access = Access(env={}, passphrase=passphrase, grant=grant, name="temporary key",
                        prepare=None if job.dry_run else (job.directory, force), delegated=delegated)
        try:
            return job.run(transport, access)
        finally:
            revoked = pool.submit(job.release)
            if delegated.left_behind:
                remove_temporary(transport, job.destination, delegated.tmp)
            revoked.result()


def _connected_workdir(transport: Transport, destination: Node) -> str:
    """The destination's workdir, ``~`` expanded; the connection is opened either way."""
    transport.connect()
    return expanded(transport, destination.workdir)


class _HostUnusable(Exception):
    """This replica could not be used, and nothing was written yet: try the next one."""


class _RecordedFailure(OperationFailed):
    """A failed restore already recorded in the history."""


@dataclass
class _Job:
    """One restore request, once validated: what to extract, from where to where."""

    ctx: Context
    source: str
    destination: Node
    directory: str
    hosts: Sequence[Node]
    repository_path: Callable[[Node], str]
    archive: str | None
    paths: tuple[str, ...]
    dry_run: bool
    detail: dict[str, object]
    recovery: RecoveryFile | None
    on_progress: Callable[[ExtractProgress], None] | None
    on_line: Callable[[str], None] | None
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def release(self) -> None:
        """Withdraw the authorisation that served the restore (kept open by :meth:`run` until now)."""
        self.held.close()

    def run(self, transport: Transport, access: Access) -> RestoreResult:
        """Try each replica in turn until one is reached; extract from the first that is.

        The archive list is read first when no archive is named (to find the latest)
        or with a recovery file (to find out whether a repository lost its key);
        otherwise borg extract goes first, and a host that cannot be reached before
        anything was written passes the turn to the next replica. Every outcome is
        recorded in the history.
        """
        errors: list[str] = []
        tried = ""
        try:
            for host in self.hosts:
                tried = host.name
                path = self.repository_path(host)
                url = borg.url_of(host, path)
                with contextlib.ExitStack() as stack:
                    try:
                        grant = stack.enter_context(access.grant(host, path))
                    except (TransportError, OperationFailed) as exc:
                        errors.append(self._skip(host, exc))
                        continue
                    try:
                        chosen = self.archive
                        if self.archive is None or self.recovery is not None:
                            chosen, error = self._pick_archive(transport, access, host, url, grant)
                            if chosen is None:
                                errors.append(error)
                                continue
                        result = self._extract(transport, access, host, url, chosen, grant)
                    except _HostUnusable as exc:
                        errors.append(str(exc))
                        continue
                    except GateClosed as exc:
                        if exc.from_grant and isinstance(exc.cause, (TransportError, OperationFailed)):
                            errors.append(self._skip(host, exc.cause))
                            continue
                        if isinstance(exc.cause, UsageError):
                            raise exc.cause from None
                        if not exc.recorded:
                            self._record_failure(host.name, str(exc.cause))
                        raise _RecordedFailure(str(exc.cause)) from None
                    self.held.enter_context(stack.pop_all())  # withdrawn by release(), or below
                    return result
        except (_RecordedFailure, UsageError):
            raise
        except MutualBackupError as exc:
            self._record_failure(tried, str(exc))
            raise OperationFailed(
                f"restore of {self.source} into {self.destination.name}:{self.directory} failed: {exc}\n"
                f"Run it again once {self.destination.name} is reachable (add --force if something was written)."
            ) from None
        message = f"no replica of {self.source} could be used:\n" + "\n".join(errors)
        self._record_failure("", message)
        raise OperationFailed(message)

    def _skip(self, host: Node, error: BaseException) -> str:
        """Why ``host``'s replica is passed over (the host's line could not be had there); logged as a warning."""
        if isinstance(error, TransportError):
            why = f"{host.name}: cannot be reached to authorise the restore: {error}"
        else:
            why = f"{host.name}: cannot authorise the restore there (nothing was changed on it): {error}"
        log.warning("%s", why)
        return why

    def _record_failure(self, target: str, error: str, **fields: object) -> None:
        run_id = self.ctx.history.start_run("restore", self.source, target)
        self.ctx.history.finish_run(run_id, "failure", error=error, detail=self.detail, **fields)  # type: ignore[arg-type]

    def _pick_archive(
        self, transport: Transport, access: Access, host: Node, url: str, grant: HostGrant | None
    ) -> tuple[str | None, str]:
        """The archive to extract (the latest when none is asked), or (None, why this replica cannot be used)."""
        argv = borg.list_argv(self.destination.borg, url)
        result = access.run(transport, argv, timeout=600, grant=grant)
        if result.exit_code == node_commands.TARGET_UNUSABLE and access.delegated is not None:
            raise OperationFailed(f"cannot create a temporary directory under {access.delegated.tmp.directory} "
                                  f"on {self.destination.name}: {result.stderr_tail(3)}")
        if result.exit_code == REPO_KEY_MISSING and self.recovery is not None:
            self._import_key(transport, access, host, url, grant)
            result = access.run(transport, argv, timeout=600, grant=grant)
        if not borg.succeeded(result.exit_code):
            return None, (f"{host.name}: borg list exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n"
                          f"{borg.error_lines(result.stderr.decode('utf-8', 'replace'))}")
        archives = borg.parse_list_json(result.stdout)
        if not archives:
            return None, f"{host.name}: no archive of {self.source} yet"
        if self.archive is None:
            return archives[-1].name, ""
        if self.archive not in {a.name for a in archives}:
            raise UsageError(f"no archive {self.archive!r} of {self.source} on {host.name}; see `mutualbackup archives {self.source}`")
        return self.archive, ""

    def _import_key(self, transport: Transport, access: Access, host: Node, url: str, grant: HostGrant | None) -> None:
        """Put the exported key back into a repository whose own key is missing."""
        assert self.recovery is not None
        entry = self.recovery.repository(host.name)
        assert entry is not None
        log.warning("the repository of %s on %s has lost its key: importing the one from the recovery file", self.source, host.name)
        result = access.run(transport, borg.key_import_argv(self.destination.borg, url), payload=entry.key.encode(),
                            timeout=600, grant=grant)
        if not borg.succeeded(result.exit_code):
            raise OperationFailed(
                f"the repository on {host.name} has no key and `borg key import` failed (exit {result.exit_code}): "
                f"{borg.error_lines(result.stderr.decode('utf-8', 'replace'))}"
            )

    def _extract(
        self, transport: Transport, access: Access, host: Node, url: str, archive: str, grant: HostGrant | None
    ) -> RestoreResult:
        progress = ExtractProgress(keep_listed=self.dry_run)

        def feed(line: str) -> None:
            if self.on_line is not None:
                self.on_line(line)
            changed = progress.feed(line)
            if grant is not None and progress.opened:
                grant.withdraw_soon()  # borg is connected: the line has done its work
            if changed and self.on_progress is not None:
                self.on_progress(progress)

        argv = borg.extract_argv(self.destination.borg, url, archive, self.paths, dry_run=self.dry_run)
        cwd = None if access.prepare is not None else "/" if self.dry_run else self.directory
        started = time.time()
        run_id = self.ctx.history.start_run("restore", self.source, host.name, started=started)
        log.info("restore start %s from %s into %s:%s (%s)", self.source, host.name, self.destination.name, self.directory, access.name)
        try:
            result = access.run(transport, argv, in_target=True, cwd=cwd, timeout=RESTORE_TIMEOUT, on_stderr_line=feed,
                                grant=grant)
            refuse_target(result.exit_code, self.destination.name, self.directory, progress.tail(3))
        except GateClosed as exc:
            self.ctx.history.finish_run(run_id, "failure", error=str(exc.cause), archive=archive, detail=self.detail)
            exc.recorded = True
            raise
        except MutualBackupError as exc:
            self.ctx.history.finish_run(run_id, "failure", error=str(exc), archive=archive, detail=self.detail)
            if isinstance(exc, UsageError):
                raise
            raise _RecordedFailure(
                f"restore of {self.source} from {host.name} into {self.destination.name}:{self.directory} was cut off: {exc}\n"
                f"{progress.files} item(s) were written before; run the restore again with --force once "
                f"{self.destination.name} is back"
            ) from None
        seconds = time.time() - started
        verdict = borg.classify_exit(result.exit_code)
        detail = dict(self.detail, files=progress.files, bytes=progress.bytes_done, seconds=round(seconds, 3))
        failed = verdict not in ("success", "warning")
        if failed and result.exit_code in UNREACHABLE and progress.files == 0:
            error = (f"{host.name}: borg extract exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n"
                     f"{borg.error_lines(progress.tail(40))}")
            self.ctx.history.finish_run(run_id, "failure", exit_code=result.exit_code, error=error, archive=archive, detail=detail)
            raise _HostUnusable(error)
        if failed:
            error = (f"borg extract exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n"
                     f"{borg.error_lines(progress.tail(40))}").strip()
            self.ctx.history.finish_run(run_id, "failure", exit_code=result.exit_code, error=error, archive=archive,
                                        detail=detail, nfiles=progress.files, original_bytes=progress.bytes_done)
            raise _RecordedFailure(
                f"restore of {self.source} from {host.name} into {self.destination.name}:{self.directory} failed: {error}"
            )
        warnings = tuple(progress.messages) if verdict == "warning" else ()
        self.ctx.history.finish_run(
            run_id, verdict, exit_code=result.exit_code, archive=archive, detail=detail, nfiles=progress.files,
            original_bytes=progress.bytes_done, error="\n".join(warnings[-15:]) or None,
        )
        log.info("restore end   %s from %s: %s, %d item(s), %.1fs", self.source, host.name, verdict, progress.files, seconds)
        return RestoreResult(
            source=self.source, replica=host.name, archive=archive, node=self.destination.name, directory=self.directory,
            dry_run=self.dry_run, listed=tuple(progress.listed), files=progress.files, bytes=progress.bytes_done,
            seconds=round(seconds, 3), result=verdict, access=access.name, recovery=self.recovery is not None,
            warnings=warnings,
        )


# --- for the command line --------------------------------------------------------------


def requested_by() -> str:
    """Who runs this command, for the history: ``user@host`` (and the sudo caller, if any)."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    who = f"{user}@{socket.gethostname()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{who} (sudo by {sudo})" if sudo and sudo != user else who


def format_progress(progress: ExtractProgress, seconds: float) -> str:
    """One progress line: items, bytes (of the total), rate."""
    from mutualbackup.inventory.units import format_size

    rate = progress.bytes_done / seconds if seconds > 0 else 0.0
    total = f" of {format_size(progress.bytes_total)}" if progress.bytes_total else ""
    return f"{progress.files} item(s)  {format_size(progress.bytes_done)}{total}  {format_size(int(rate))}/s"


class TerminalProgress:
    """Rewrites one line of a terminal (at most 5 times a second) as borg extract progresses.

    Log lines written meanwhile to the same terminal go above it: inside
    :meth:`beside_logs`, a log handler writing to ``stream`` erases the progress
    line first and draws it again after (log lines come from other threads too).
    """

    def __init__(self, stream, clock: Callable[[], float] = time.monotonic) -> None:  # noqa: ANN001
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.shown = 0.0
        self.width = 0
        self.text = ""
        self.lock = threading.RLock()

    def __call__(self, progress: ExtractProgress) -> None:
        now = self.clock()
        if now - self.shown < 0.2:
            return
        self.shown = now
        with self.lock:
            self._write(format_progress(progress, now - self.started))

    def _write(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width))
        self.width = len(text)
        self.text = text
        self.stream.flush()

    def _erase(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0

    def write_above(self, text: str) -> None:
        """Write ``text`` (whole lines) where the progress line is, then draw the progress line again."""
        with self.lock:
            self._erase()
            self.stream.write(text)
            if self.text and text.endswith("\n"):
                self._write(self.text)
            else:
                self.stream.flush()

    @contextlib.contextmanager
    def beside_logs(self, logger: logging.Logger | None = None) -> Iterator["TerminalProgress"]:
        """While inside, ``logger``'s handlers (default: the root's) that write to ``stream`` write above the line.

        On leaving, the progress line is erased, then the handlers get their stream back.
        """
        above = _Above(self)
        swapped: list[tuple[logging.StreamHandler, object]] = []
        for handler in (logger or logging.getLogger()).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                swapped.append((handler, handler.setStream(above)))  # type: ignore[arg-type]
        try:
            yield self
        finally:
            with self.lock:  # a log line from another thread waits: it must not land on an erased line's end
                self.done()
                for handler, stream in swapped:
                    handler.setStream(stream)  # type: ignore[arg-type]

    def done(self) -> None:
        with self.lock:
            if self.width:
                self._erase()
                self.stream.flush()
            self.text = ""


class _Above:
    """The stream a log handler writes to while a progress line is shown: see :meth:`TerminalProgress.write_above`."""

    def __init__(self, progress: TerminalProgress) -> None:
        self.progress = progress

    def write(self, text: str) -> int:
        self.progress.write_above(text)
        return len(text)

    def flush(self) -> None:
        self.progress.stream.flush()

    def __getattr__(self, name: str) -> object:  # isatty, encoding, fileno...: the terminal's
        return getattr(self.progress.stream, name)
