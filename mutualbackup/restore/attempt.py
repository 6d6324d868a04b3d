"""One restore, tried on each replica in turn until one serves: the archive, borg extract, its verdict.

How borg on the destination reaches a repository (the source's own key, or a temporary key) is
:class:`~mutualbackup.restore.temporary_key.Access`; ARCHITECTURE.md, "Restores", tells the story.
"""

from __future__ import annotations

from mutualbackup.restore import node_commands

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed, TransportError, UsageError
from mutualbackup.restore.recovery_file import RecoveryFile
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.runs import RecordedRun, record_failure
from mutualbackup.restore.temporary_key import (
    Access, GateClosed, HostGrant, refuse_target,
)
from mutualbackup.remote.transport import Transport

log = logging.getLogger("mutualbackup.restore")


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


class _HostUnusable(Exception):
    """This replica could not be used, and nothing was written yet: try the next one."""


class _RecordedFailure(OperationFailed):
    """A failed restore already recorded in the history."""


@dataclass
class RestoreJob:
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
