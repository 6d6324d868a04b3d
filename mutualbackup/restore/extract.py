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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.restore import recovery_file
from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed, TransportError, UsageError
from mutualbackup.restore.recovery_file import RecoveryFile
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.runs import RecordedRun, record_failure
from mutualbackup.restore.replicas import choose_replica
from mutualbackup.restore.temporary_key import (
    Access, Delegated, EarlyGrant, GateClosed, HostGrant, authorised, expanded, new_restore_key,
    read_source_passphrase, refuse_target, remove_temporary,
)
from mutualbackup.remote.transport import Transport

log = logging.getLogger("mutualbackup.restore.extract")

RESTORE_TIMEOUT = 24 * 3600


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

    def _record_failure(self, target: str, error: str) -> None:
        record_failure(self.ctx.history, "restore", self.source, target, error, detail=self.detail)

    def _pick_archive(
        self, transport: Transport, access: Access, host: Node, url: str, grant: HostGrant | None
    ) -> tuple[str | None, str]:
        """The archive to extract (the latest when none is asked), or (None, why this replica cannot be used)."""
        argv = borg.list_argv(self.destination.borg, url)
        result = access.run(transport, argv, timeout=600, grant=grant)
        if result.exit_code == node_commands.TARGET_UNUSABLE and access.delegated is not None:
            raise OperationFailed(f"cannot create a temporary directory under {access.delegated.tmp.directory} "
                                  f"on {self.destination.name}: {result.stderr_tail(3)}")
        if result.exit_code == borg.REPO_KEY_MISSING and self.recovery is not None:
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
        run = RecordedRun(self.ctx.history, "restore", self.source, host.name, clock=time.time, logger=None)
        log.info("restore start %s from %s into %s:%s (%s)", self.source, host.name, self.destination.name, self.directory, access.name)
        try:
            result = access.run(transport, argv, in_target=True, cwd=cwd, timeout=RESTORE_TIMEOUT, on_stderr_line=feed,
                                grant=grant)
            refuse_target(result.exit_code, self.destination.name, self.directory, progress.tail(3))
        except GateClosed as exc:
            run.fail(str(exc.cause), archive=archive, detail=self.detail)
            exc.recorded = True
            raise
        except MutualBackupError as exc:
            run.fail(str(exc), archive=archive, detail=self.detail)
            if isinstance(exc, UsageError):
                raise
            raise _RecordedFailure(
                f"restore of {self.source} from {host.name} into {self.destination.name}:{self.directory} was cut off: {exc}\n"
                f"{progress.files} item(s) were written before; run the restore again with --force once "
                f"{self.destination.name} is back"
            ) from None
        return self._verdict(run, result.exit_code, progress, host, archive, access)

    def _verdict(self, run: RecordedRun, code: int, progress: ExtractProgress, host: Node, archive: str,
                 access: Access) -> RestoreResult:
        """Record how borg extract ended; raise when it failed (_HostUnusable: try the next replica)."""
        seconds = time.time() - run.started
        detail = dict(self.detail, files=progress.files, bytes=progress.bytes_done, seconds=round(seconds, 3))
        if not borg.succeeded(code):
            error = (f"{host.name + ': ' if code in borg.UNREACHABLE and progress.files == 0 else ''}"
                     f"borg extract exited {code}: {borg.exit_hint(code)}\n{borg.error_lines(progress.tail(40))}").strip()
            if code in borg.UNREACHABLE and progress.files == 0:
                run.fail(error, code, detail, archive=archive)
                raise _HostUnusable(error)
            run.fail(error, code, detail, archive=archive, nfiles=progress.files, original_bytes=progress.bytes_done)
            raise _RecordedFailure(
                f"restore of {self.source} from {host.name} into {self.destination.name}:{self.directory} failed: {error}"
            )
        verdict = borg.classify_exit(code)
        warnings = tuple(progress.messages) if verdict == "warning" else ()
        run.succeed(detail, result=verdict, exit_code=code, archive=archive, nfiles=progress.files,
                    original_bytes=progress.bytes_done, error="\n".join(warnings[-15:]) or None)
        log.info("restore end   %s from %s: %s, %d item(s), %.1fs", self.source, host.name, verdict, progress.files, seconds)
        return RestoreResult(
            source=self.source, replica=host.name, archive=archive, node=self.destination.name, directory=self.directory,
            dry_run=self.dry_run, listed=tuple(progress.listed), files=progress.files, bytes=progress.bytes_done,
            seconds=round(seconds, 3), result=verdict, access=access.name, recovery=self.recovery is not None,
            warnings=warnings,
        )



