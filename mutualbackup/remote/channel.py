"""One SSH channel's command, pumped: stdin sent as it comes, stdout and stderr read, stderr lines
handed over as they arrive, until the exit status, a deadline, or a lost connection."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from mutualbackup.remote.paramiko_import import paramiko

CHUNK = 1 << 16
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Pumped:
    exit_code: int  # the channel's exit status; -1 when none came
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    lost: bool = False  # the connection died before the command ended


def pump(
    channel: paramiko.Channel, live: paramiko.Transport, stdin: bytes | Iterable[bytes] | None,
    timeout: float | None, on_stderr_line: Callable[[str], None] | None,
    on_stdout_line: Callable[[bytes], None] | None = None,
) -> Pumped:
    """Run the command started on ``channel`` to its end; the channel is closed afterwards.

    ``stdin`` is sent chunk by chunk in a thread, then stdin is closed (at once when None).
    ``on_stderr_line`` is called in this thread for each stderr line, without its line ending;
    ``on_stdout_line`` (when given) for each stdout line, with it, as they arrive.
    """
    started = time.monotonic()
    events: queue.Queue[tuple[str, str | None]] = queue.Queue()
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    readers = [threading.Thread(target=_read_stdout, args=(channel, stdout, events, on_stdout_line is not None),
                                daemon=True),
               threading.Thread(target=_read_stderr, args=(channel, stderr, events), daemon=True)]
    for thread in readers:
        thread.start()
    if stdin is None:
        channel.shutdown_write()
    else:
        threading.Thread(target=_write_stdin, args=(channel, stdin), daemon=True).start()
    deadline = None if timeout is None else started + timeout
    open_streams, timed_out, lost = 2, False, False
    try:
        while open_streams or not channel.exit_status_ready():
            kind, text = "", None
            if open_streams:
                try:
                    kind, text = events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    pass
            else:  # both streams closed: wake as soon as the exit status arrives
                channel.status_event.wait(POLL_SECONDS)
            if kind == "done":
                open_streams -= 1
            elif kind == "line" and on_stderr_line is not None:
                on_stderr_line(text or "")
            elif kind == "out" and on_stdout_line is not None:
                on_stdout_line(text)  # type: ignore[arg-type]
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            if not live.is_active():
                lost = True
                break
    finally:
        channel.close()
        for thread in readers:
            thread.join(timeout=5)
    while not events.empty():
        kind, text = events.get()
        if kind == "line" and on_stderr_line is not None:
            on_stderr_line(text or "")
        elif kind == "out" and on_stdout_line is not None:
            on_stdout_line(text)  # type: ignore[arg-type]
    return Pumped(channel.exit_status, b"".join(stdout), b"".join(stderr), timed_out, lost)


def _read_stdout(channel: paramiko.Channel, into: list[bytes], events: queue.Queue, by_line: bool) -> None:
    pending = b""
    try:
        while data := channel.recv(CHUNK):
            into.append(data)
            if by_line:
                pending += data
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    events.put(("out", line + b"\n"))
        if by_line and pending:
            events.put(("out", pending))
    finally:
        events.put(("done", None))


def _read_stderr(channel: paramiko.Channel, into: list[bytes], events: queue.Queue) -> None:
    pending = bytearray()  # the incomplete last line
    try:
        while data := channel.recv_stderr(CHUNK):
            into.append(data)
            searched = len(pending)
            pending += data
            cut = pending.rfind(b"\n", searched)
            if cut >= 0:
                for raw in bytes(pending[:cut]).split(b"\n"):
                    events.put(("line", raw.rstrip(b"\r").decode("utf-8", "replace")))
                del pending[: cut + 1]
        if pending:
            events.put(("line", pending.rstrip(b"\r").decode("utf-8", "replace")))
    finally:
        events.put(("done", None))


def _write_stdin(channel: paramiko.Channel, data: bytes | Iterable[bytes]) -> None:
    try:
        for chunk in (data,) if isinstance(data, bytes) else data:
            channel.sendall(chunk)
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):  # the command exited without reading everything
        pass
