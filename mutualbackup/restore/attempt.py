"""One restore, tried on each replica in turn until one serves: the archive, borg extract, its verdict.

The destination runs borg (``extract`` of :mod:`mutualbackup.node.restore`), with the source's own key
or, elsewhere, through :class:`~mutualbackup.restore.sealed.SealedRestore`; ARCHITECTURE.md, "Restores",
tells the story.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed, TransportError, UsageError
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.runs import RecordedRun, record_failure
from mutualbackup.node.protocol import Reply, log_lines
from mutualbackup.node.requests import host_ref
from mutualbackup.remote.transport import reply_result
from mutualbackup.restore.kit import RecoveryFile
from mutualbackup.restore.sealed import Seal, SealedRestore

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
    """One restore request, once checked: what to extract, from where to where, and how borg gets in."""

    ctx: Context
    source: str
    destination: Node
    directory: str
    hosts: Sequence[Node]
    archive: str | None
    paths: tuple[str, ...]
    dry_run: bool
    force: bool
    detail: dict[str, object]
    recovery: RecoveryFile | None
    seal: Callable[[Node], Seal] | None  # per replica host: the sealed passphrase; None: the source's own key
    on_progress: Callable[[ExtractProgress], None] | None
    on_line: Callable[[str], None] | None

    def run(self) -> RestoreResult:
        """Try each replica in turn; extract from the first that serves. Every outcome is recorded.

        A host that cannot be reached (to hold the restore's line, or by borg before anything was
        written) passes the turn to the next replica.
        """
        errors: list[str] = []
        tried = ""
        try:
            for host in self.hosts:
                tried = host.name
                try:
                    return self._attempt(host)
                except _HostUnusable as exc:
                    log.warning("%s", exc)
                    errors.append(str(exc))
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

    def _record_failure(self, target: str, error: str) -> None:
        record_failure(self.ctx.history, "restore", self.source, target, error, detail=self.detail)

    def _attempt(self, host: Node) -> RestoreResult:
        progress = ExtractProgress(keep_listed=self.dry_run)

        def feed(line: str) -> None:
            if self.on_line is not None:
                self.on_line(line)
            if progress.feed(line) and self.on_progress is not None:
                self.on_progress(progress)

        args = {"host": host_ref(host), "source": self.source, "target": self.directory, "archive": self.archive,
                "paths": list(self.paths), "dry_run": self.dry_run, "force": self.force}
        run = RecordedRun(self.ctx.history, "restore", self.source, host.name, clock=time.time, logger=None)
        log.info("restore start %s from %s into %s:%s (%s)", self.source, host.name, self.destination.name,
                 self.directory, self.detail.get("access"))
        try:
            reply = self._ask(host, args, feed, progress)
        except MutualBackupError as exc:
            run.fail(str(exc), detail=self.detail)
            if isinstance(exc, TransportError):
                raise _RecordedFailure(f"{self.destination.name} cannot be reached: {exc}") from None
            raise
        return self._verdict(run, reply, progress, host)

    def _ask(self, host: Node, args: Mapping[str, Any], feed: Callable[[str], None], progress: ExtractProgress) -> Reply:
        if self.seal is None:
            with self.ctx.session(self.destination) as transport:
                return transport.request("extract", {**args, "sealed": False}, timeout=RESTORE_TIMEOUT + 120,
                                         on_event=lambda event: [feed(line) for line in log_lines(event)])
        sealed = SealedRestore(self.ctx, self.destination, host, self.source, self.seal(host), feed,
                               lambda: progress.opened)
        return sealed.run(args, RESTORE_TIMEOUT + 120)

    def _verdict(self, run: RecordedRun, reply: Reply, progress: ExtractProgress, host: Node) -> RestoreResult:
        """Record how the restore ended; raise when it failed (_HostUnusable: try the next replica)."""
        data = reply.data
        where = f"{self.destination.name}:{self.directory}"
        if data.get("not_sealed"):
            run.fail(reply.error or "", detail=self.detail)
            raise _RecordedFailure(reply.error or "the passphrase could not be sealed for the destination")
        if data.get("host_unusable"):
            run.fail(reply.error or "", detail=self.detail)
            raise _HostUnusable(reply.error or f"{host.name}: cannot authorise the restore there")
        if reply.error and reply.error.startswith("target not empty"):
            run.fail(reply.error, detail=self.detail)
            raise UsageError(f"{where} is not empty; restore into a new directory, or add --force to write over it")
        if data.get("no_such_archive"):
            run.fail(f"no archive {data['no_such_archive']!r}", detail=self.detail)
            raise UsageError(f"no archive {self.archive!r} of {self.source} on {host.name}; see `mutualbackup archives {self.source}`")
        if data.get("no_archive"):
            run.fail(f"{host.name}: no archive of {self.source} yet", detail=self.detail)
            raise _HostUnusable(f"{host.name}: no archive of {self.source} yet")
        if "list" in data:
            listed = reply_result(reply, "list")
            error = (f"{host.name}: borg {data.get('step', 'list')} exited {listed.exit_code}: "
                     f"{borg.exit_hint(listed.exit_code)}\n{borg.error_lines(listed.stderr.decode('utf-8', 'replace'))}")
            run.fail(error, listed.exit_code, self.detail)
            raise _HostUnusable(error)
        if "exit_code" not in data:
            run.fail(reply.error or "the destination did not answer", detail=self.detail)
            raise _RecordedFailure(
                f"restore of {self.source} from {host.name} into {where} was cut off: {reply.error}\n"
                f"{progress.files} item(s) were written before; run the restore again with --force once "
                f"{self.destination.name} is back")
        return self._result(run, reply, progress, host)

    def _result(self, run: RecordedRun, reply: Reply, progress: ExtractProgress, host: Node) -> RestoreResult:
        code = reply_result(reply).exit_code
        archive = str(reply.data.get("archive") or self.archive or "")
        seconds = time.time() - run.started
        detail = dict(self.detail, files=progress.files, bytes=progress.bytes_done, seconds=round(seconds, 3))
        if not borg.succeeded(code):
            unreachable = code in borg.UNREACHABLE and progress.files == 0
            error = (f"{host.name + ': ' if unreachable else ''}borg extract exited {code}: {borg.exit_hint(code)}\n"
                     f"{borg.error_lines(progress.tail(40))}").strip()
            run.fail(error, code, detail, archive=archive, nfiles=progress.files, original_bytes=progress.bytes_done)
            if unreachable:
                raise _HostUnusable(error)
            raise _RecordedFailure(f"restore of {self.source} from {host.name} into "
                                   f"{self.destination.name}:{self.directory} failed: {error}")
        verdict = borg.classify_exit(code)
        warnings = tuple(progress.messages) if verdict == "warning" else ()
        run.succeed(detail, result=verdict, exit_code=code, archive=archive, nfiles=progress.files,
                    original_bytes=progress.bytes_done, error="\n".join(warnings[-15:]) or None)
        log.info("restore end   %s from %s: %s, %d item(s), %.1fs", self.source, host.name, verdict, progress.files, seconds)
        return RestoreResult(
            source=self.source, replica=host.name, archive=archive, node=self.destination.name, directory=self.directory,
            dry_run=self.dry_run, listed=tuple(progress.listed), files=progress.files, bytes=progress.bytes_done,
            seconds=round(seconds, 3), result=verdict, access=str(self.detail.get("access")),
            recovery=self.recovery is not None, warnings=warnings,
        )
