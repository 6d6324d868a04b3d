"""One run of a job in the history, from its start to its verdict: the lifecycle every job shares.

A :class:`RecordedRun` is recorded ``running`` when it is made (committed at once: a ``kill -9`` leaves it
there for the next start to mark ``interrupted``) and gets exactly one verdict:
``success`` or ``warning``, ``failure``, or ``interrupted`` (the daemon aborted it, or the
coordinator process was stopped). Each start and end is one log line.

Used as a context manager (``with RecordedRun(...) as run:``), it turns whatever goes wrong in the
block into its verdict: a :class:`RunFailed` (with an exit code, and an alert when a human is needed), any
:class:`~mutualbackup.errors.MutualBackupError` or ValueError, a bug (logged with its
traceback: one job's bug never stops the daemon), or Ctrl-C / SystemExit (``interrupted``,
then raised on).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from mutualbackup.errors import MutualBackupError
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.control import JobControl
from mutualbackup.state.history import History

log = logging.getLogger("mutualbackup.jobs")


class RunFailed(Exception):
    """A job's step failed; ``alert`` (an alert kind) also records an alert: the failure needs a human."""

    def __init__(self, message: str, exit_code: int | None = None, *, alert: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.alert = alert


@dataclass(frozen=True)
class RunOutcome:
    """The verdict of one run: what ``status``, the CLI and the daemon need of it."""

    kind: str
    source: str
    target: str
    result: str  # success, warning, failure, interrupted
    duration: float
    error: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)
    exit_code: int | None = None
    columns: Mapping[str, object] = field(default_factory=dict)  # what else the run recorded (archive, sizes...)

    @property
    def ok(self) -> bool:
        return self.result in ("success", "warning")


class RecordedRun:
    """One run, recorded ``running`` at construction; :meth:`succeed`, :meth:`fail` or :meth:`interrupt` ends it."""

    def __init__(
        self, history: History, kind: str, source: str, target: str, *, clock: Callable[[], float],
        control: JobControl | None = None, started: float | None = None, logger: logging.Logger | None = log,
    ):
        self.log = logger
        self.history, self.kind, self.source, self.target = history, kind, source, target
        self.clock, self.control = clock, control
        self.started = clock() if started is None else started
        self.id = history.start_run(kind, source, target, started=self.started)
        self.saved: dict[str, object] = {}  # detail recorded while running (see :meth:`save`), kept at the end
        self.outcome: RunOutcome | None = None
        if self.log is not None:
            self.log.info("%-7s start  %s -> %s", kind, source, target or "-",
                          extra={"event": f"{kind} start", "source": source, "target": target or None})

    @property
    def aborted(self) -> bool:
        return self.control is not None and self.control.is_aborted

    def save(self, **detail: object) -> None:
        """Record ``detail`` now (committed: it survives a crash), and keep it in the run's final detail."""
        self.saved.update(detail)
        self.history.set_detail(self.id, self.saved)

    def _detail(self, detail: Mapping[str, object] | None) -> dict[str, object] | None:
        merged = {**self.saved, **(detail or {})}
        return merged or None

    def succeed(self, detail: Mapping[str, object] | None = None, *, result: str = "success",
                exit_code: int | None = 0, error: str | None = None, note: str = "", **fields: object) -> RunOutcome:
        """End the run ``success`` (or ``warning``); ``fields`` are more columns of the run (sizes, archive…);
        ``note`` ends the log line (the archive's name, say)."""
        return self._end(result, error, exit_code, detail, fields, note)

    def fail(self, error: str, exit_code: int | None = None, detail: Mapping[str, object] | None = None,
             **fields: object) -> RunOutcome:
        """End the run ``failure`` (``interrupted``, saying why, when the daemon aborted it)."""
        if self.aborted and self.control is not None and "aborted" not in error:
            error = f"aborted: {self.control.reason}\n{error}"
        return self._end("interrupted" if self.aborted else "failure", error, exit_code, detail, fields)

    def __enter__(self) -> RecordedRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        """Whatever the block raised becomes the run's verdict (see the module notes); only Ctrl-C and
        SystemExit get out. A block that ended without a verdict is a failure (a bug)."""
        if exc is None:
            if self.outcome is None:
                self.fail("internal error: the job ended without a verdict")
            return False
        if self.outcome is not None and isinstance(exc, Exception):
            self._log_bug(exc)
            return True
        if isinstance(exc, RunFailed):
            if exc.alert:
                self.history.add_alert(self.source, self.target, exc.alert, str(exc), now=self.clock())
            self.fail(str(exc), exc.exit_code)
        elif isinstance(exc, (MutualBackupError, ValueError)):
            self.fail(str(exc))
        elif isinstance(exc, Exception):  # a bug must not leave the run "running" nor stop the daemon
            self._log_bug(exc)
            self.fail(f"internal error: {exc!r}")
        else:  # Ctrl-C of a foreground command, SystemExit: not "running" forever
            if self.outcome is None:
                self.interrupt(f"the coordinator process was stopped during this run ({type(exc).__name__})")
            return False
        return True

    def _log_bug(self, exc: BaseException) -> None:
        (self.log or log).error("%s of %s -> %s crashed", self.kind, self.source, self.target or "-",
                                exc_info=(type(exc), exc, exc.__traceback__))

    def interrupt(self, error: str) -> RunOutcome:
        return self._end("interrupted", error, None, None, {})

    def _end(self, result: str, error: str | None, exit_code: int | None, detail: Mapping[str, object] | None,
             fields: Mapping[str, object], note: str = "") -> RunOutcome:
        ended = self.clock()
        merged = self._detail(detail)
        self.history.finish_run(self.id, result, exit_code=exit_code, error=error, ended=ended, detail=merged,
                                **fields)  # type: ignore[arg-type]
        duration = ended - self.started
        self.outcome = RunOutcome(self.kind, self.source, self.target, result, duration, error, merged or {}, exit_code,
                                  dict(fields))
        facts = {"event": f"{self.kind} end", "source": self.source, "target": self.target or None, "result": result,
                 "duration": round(duration, 3), "error": error.splitlines()[0] if error else None}
        if self.log is None:
            pass
        elif result in ("success", "warning"):
            self.log.info("%-7s end    %s -> %s  %s  %.1fs%s", self.kind, self.source, self.target or "-", result,
                          duration, f"  {note}" if note else "", extra=facts)
        else:
            self.log.warning("%-7s end    %s -> %s  %s  %.1fs: %s", self.kind, self.source, self.target or "-", result,
                             duration, error.splitlines()[0] if error else "", extra=facts)
        return self.outcome


@contextlib.contextmanager
def running(control: JobControl | None, node: Node, role: str) -> Iterator[None]:
    """Tell ``control`` that the job's supervised command runs on ``node`` under ``role`` (so that the
    daemon can stop it through a new connection) while the block runs."""
    if control is not None:
        control.running_on(node, role)
    try:
        yield
    finally:
        if control is not None:
            control.running_on(None)


def aborted(control: JobControl | None) -> None:
    """Raise :class:`RunFailed` when the daemon asked the job to stop."""
    if control is not None and control.is_aborted:
        raise RunFailed(f"aborted: {control.reason}")


def record_failure(history: History, kind: str, source: str, target: str, error: str, *,
                   detail: Mapping[str, object] | None = None, **fields: object) -> None:
    """A failed run that never started work (nothing could be reached, or the request was refused)."""
    run_id = history.start_run(kind, source, target)
    history.finish_run(run_id, "failure", error=error, detail=detail, **fields)  # type: ignore[arg-type]


def refused_by_node(history: History, source: Node, host: Node, error: str, now: float) -> None:
    """A node refused to act on its member's file (unsigned, tampered with, or not what the request says):
    logged and alerted once per streak; the run fails with the node's words."""
    log.error("%s refused the job: %s", source.name, error)
    first = error.splitlines()[0] if error else "refused"
    alerts = [a for a in history.alerts() if a["kind"] == "member-file-refused" and a["source"] == source.name]
    if not alerts or alerts[0]["message"] != first:
        history.add_alert(source.name, host.name, "member-file-refused", first, now=now)
