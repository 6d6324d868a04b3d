"""On an operator's terminal: a progress line that log lines go above, and who is at the keyboard.

Written here rather than taken from rich or tqdm: one line rewritten with ``\r`` at most five times a second,
erased for log lines from other threads (:meth:`TerminalProgress.beside_logs`), and nothing at all when the
output is not a terminal — a few dozen lines, where either library would add an import to every command."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from mutualbackup.borg import CreateProgress, ExtractProgress


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


def format_create_progress(progress: CreateProgress, seconds: float) -> str:
    """One progress line of a backup: files and bytes read, bytes new to the repository, the read rate."""
    from mutualbackup.inventory.units import format_size

    rate = progress.original_bytes / seconds if seconds > 0 else 0.0
    return (f"{progress.files} file(s)  {format_size(progress.original_bytes)} read  "
            f"{format_size(progress.deduplicated_bytes)} new  {format_size(int(rate))}/s")


def progress_line(describe: Callable[..., str] = format_progress, *, every: float = 0.2, stream=None):  # noqa: ANN001, ANN201
    """A :class:`TerminalProgress` on ``stream`` (stderr) when it is an operator's terminal; None when it is not
    (a pipe, cron, the journal): then a command prints nothing but its result lines."""
    import sys

    stream = stream or sys.stderr
    return TerminalProgress(stream, describe=describe, every=every) if stream.isatty() else None


def backup_progress(source: str, target: str):  # noqa: ANN201 - TerminalProgress | None
    """A backup's progress line on the operator's terminal (None when stderr is not one)."""
    label = f"{source} → {target}  "
    return progress_line(lambda shown, seconds: label + format_create_progress(shown, seconds))


@contextlib.contextmanager
def showing(progress: "TerminalProgress | None") -> Iterator["TerminalProgress | None"]:
    """Inside, log lines go above ``progress``'s line (nothing at all when there is none)."""
    if progress is None:
        yield None
        return
    with progress.beside_logs():
        yield progress


class TerminalProgress:
    """Rewrites one line of a terminal (at most 5 times a second) as borg extract progresses.

    Log lines written meanwhile to the same terminal go above it: inside
    :meth:`beside_logs`, a log handler writing to ``stream`` erases the progress
    line first and draws it again after (log lines come from other threads too).
    """

    def __init__(self, stream, clock: Callable[[], float] = time.monotonic,  # noqa: ANN001
                 describe: Callable[..., str] = format_progress, every: float = 0.2) -> None:
        self.stream = stream
        self.clock = clock
        self.every = every  # seconds between two updates (0: each step is shown)
        self.describe = describe  # (progress, seconds) -> the line
        self.started = clock()
        self.shown = 0.0
        self.width = 0
        self.text = ""
        self.lock = threading.RLock()

    def __call__(self, progress: ExtractProgress | CreateProgress | str) -> None:
        now = self.clock()
        if now - self.shown < self.every:
            return
        self.shown = now
        with self.lock:
            self._write(self.describe(progress, now - self.started)[:self.columns()])

    def columns(self) -> int:
        """The terminal's width (a line longer than it would wrap, and \r would not erase it)."""
        import shutil

        return max(20, shutil.get_terminal_size((120, 24)).columns - 1)

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
