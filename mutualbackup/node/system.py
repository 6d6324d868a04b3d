"""The node's own side effects, behind one seam: processes (supervised), files, and what runs.

:class:`LocalSystem` is the real one. Unit tests give the node's requests a fake that answers
borg argv (``tests/fake.py``), so the same request code runs in both.

Supervision replaces what a shell wrapper did when the coordinator ran commands itself: a long
command writes a pidfile (pid, the coordinator's run id, the process start time) and is stopped
when the coordinator goes away (its session's stdin ends: SIGINT, so that borg writes a
checkpoint, then SIGTERM, then SIGKILL), when its time is up, or on request (:meth:`stop`,
only while the pid still has the recorded start time, never a reused pid).
"""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from mutualbackup.node.preload import Preloaded, base_environment
from mutualbackup.remote.transport import Result

ORPHAN_INT_SECONDS = 60
"""When the coordinator is gone: how long a command gets after SIGINT before SIGTERM."""
KILL_GRACE_SECONDS = 5
"""After a timeout's SIGTERM, SIGKILL follows this much later."""
_POLL = 0.05


RUN_DIR = "run"
"""Under a node's work or state directory: pidfiles of supervised commands."""


def pidfile_path(workdir: str, peer: str) -> str:
    """The pidfile of the supervised job of this node with ``peer`` (``MEMBER/NODE``).

    ``.`` cannot occur in a slug, so ``MEMBER.NODE`` names the peer unambiguously.
    """
    return posixpath.join(workdir, RUN_DIR, peer.replace("/", ".") + ".pid")


@dataclass(frozen=True)
class PidFile:
    pid: int
    run_id: int | None
    started: str


class System(Protocol):
    """What a request may do on its node."""

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        stdin: bytes | None = None, timeout: float | None = None, on_stderr_line: Callable[[str], object] | None = None,
        pidfile: str | None = None, run_id: int | None = None, pass_fds: Sequence[int] = (),
    ) -> Result:
        """Run ``argv``; with ``pidfile``, supervised (see the module notes). -1 after a timeout."""
        ...

    def stop(self, pidfile: str, int_seconds: float, term_seconds: float, owner: str | None = None) -> tuple[bool, str]:
        """Stop the command of ``pidfile``: (nothing of it runs any more, what happened). With ``owner``,
        only a process of that user (a pidfile its login could have written never makes root signal another's)."""
        ...

    def pidfile(self, path: str) -> PidFile | None: ...

    def read(self, path: str) -> bytes | None: ...

    def write(self, path: str, data: bytes, mode: int = 0o600) -> None: ...

    def create(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        """Write a new file; False (nothing changed) when ``path`` exists already."""
        ...

    def alive(self, pids: Iterable[int]) -> set[int]: ...

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        """Make ``path`` (and its parents) when missing."""
        ...

    def listdir(self, path: str) -> list[str]: ...

    def remove_tree(self, path: str) -> None: ...

    def free_space(self, path: str) -> int:
        """Bytes free (for this user) on the filesystem of ``path``; OSError when it cannot be read."""
        ...


def parse_pidfile(data: bytes) -> PidFile | None:
    """The content of a pidfile, or None when it is empty or garbled."""
    lines = data.decode("utf-8", "replace").split("\n")
    if not lines or not lines[0].strip().isdigit():
        return None
    run = lines[1].strip() if len(lines) > 1 else ""
    return PidFile(int(lines[0]), int(run) if run.isdigit() else None, lines[2].strip() if len(lines) > 2 else "")


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot) while it is alive and no zombie; None otherwise."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


class LocalSystem:
    """The node itself. ``gone`` is set when the coordinator's session ends."""

    def __init__(self, gone: threading.Event | None = None, preloaded: Preloaded | None = None) -> None:
        self.gone = gone or threading.Event()
        self.preloaded = preloaded  # borg started early for this request (node/preload.py); used by the run it fits

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        stdin: bytes | None = None, timeout: float | None = None, on_stderr_line: Callable[[str], object] | None = None,
        pidfile: str | None = None, run_id: int | None = None, pass_fds: Sequence[int] = (),
    ) -> Result:
        argv = tuple(argv)
        merged = {**base_environment(), **(env or {})}
        process = None
        preloaded = self.preloaded
        if preloaded is not None and preloaded.fits(argv, merged, stdin, pass_fds):
            self.preloaded = None  # else kept for a later run it fits (a backup's `before:` commands run first)
            process = preloaded.release(argv, cwd, merged, pass_fds)
        if process is None:  # none fits, or it could not import borg: a process of its own
            try:
                process = subprocess.Popen(
                    argv, env=merged, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, pass_fds=tuple(pass_fds),
                )
            except OSError as error:
                return Result(argv, 127 if isinstance(error, FileNotFoundError) else 126, b"",
                              f"{argv[0]}: {error.strerror}\n".encode())
        if pidfile is not None:
            self._write_pidfile(pidfile, process.pid, run_id)
        try:
            return self._wait(process, argv, stdin, timeout, on_stderr_line, supervised=pidfile is not None)
        finally:
            if pidfile is not None:
                _remove(pidfile)

    def _wait(self, process: subprocess.Popen[bytes], argv: tuple[str, ...], stdin: bytes | None,
              timeout: float | None, on_stderr_line: Callable[[str], None] | None, *, supervised: bool) -> Result:
        out: list[bytes] = []
        err: list[bytes] = []
        threads = [threading.Thread(target=_collect, args=(process.stdout, out), daemon=True),
                   threading.Thread(target=_lines, args=(process.stderr, err, on_stderr_line), daemon=True)]
        if stdin is not None:
            threads.append(threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True))
        ended = threading.Event()  # set the moment the command exits: no poll interval added to any command
        threads.append(threading.Thread(target=lambda: (process.wait(), ended.set()), daemon=True))
        for thread in threads:
            thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        note = b""
        while not ended.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                _end(process, (signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, 10))
                note = f"mutualbackup-node: timed out after {timeout:g}s\n".encode()
                break
            if supervised and self.gone.is_set():
                _end(process, (signal.SIGINT, ORPHAN_INT_SECONDS), (signal.SIGTERM, 10), (signal.SIGKILL, 10))
                note = b"mutualbackup-node: the coordinator went away: stopped\n"
                break
            ended.wait(_POLL)
        process.wait()
        for thread in threads:
            thread.join(timeout=10)
        code = process.returncode
        code = -1 if note else (128 - code if code < 0 else code)
        stderr = b"".join(err)
        if note and stderr and not stderr.endswith(b"\n"):
            stderr += b"\n"
        return Result(argv, code, b"".join(out), stderr + note)

    @staticmethod
    def _write_pidfile(path: str, pid: int, run_id: int | None) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        content = f"{pid}\n{run_id if run_id is not None else ''}\n{process_start(pid) or ''}\n".encode()
        _write_atomically(path, content, 0o600)

    def stop(self, pidfile: str, int_seconds: float, term_seconds: float, owner: str | None = None) -> tuple[bool, str]:
        info = self.pidfile(pidfile)
        if info is None:
            return True, "not running"
        if not info.started or process_start(info.pid) != info.started:
            _remove(pidfile)
            return True, "not running"
        if owner is not None and _process_user(info.pid) != owner:
            return False, f"pid {info.pid} is not {owner}'s: not signalled"
        for sig, seconds in ((signal.SIGINT, int_seconds), (signal.SIGTERM, term_seconds), (signal.SIGKILL, 5)):
            try:
                os.kill(info.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and process_start(info.pid) == info.started:
                time.sleep(0.1)
            if process_start(info.pid) != info.started:
                return True, f"stopped by {signal.Signals(sig).name}"
        if process_start(info.pid) != info.started:
            return True, "stopped"
        return False, f"pid {info.pid} does not die"

    def pidfile(self, path: str) -> PidFile | None:
        data = self.read(path)
        return parse_pidfile(data) if data is not None else None

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, mode: int = 0o600) -> None:
        _write_atomically(path, data, mode)

    def create(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        import tempfile

        fd, temporary = tempfile.mkstemp(prefix=".mutualbackup-tmp.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(temporary, mode)
            os.link(temporary, path)  # fails when the name exists: two concurrent writers never replace each other
            return True
        except FileExistsError:
            return False
        finally:
            _remove(temporary)

    def alive(self, pids: Iterable[int]) -> set[int]:
        return {pid for pid in pids if process_start(pid) is not None}

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        os.makedirs(path, mode=mode, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def remove_tree(self, path: str) -> None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    def free_space(self, path: str) -> int:
        found = os.statvfs(path)
        return found.f_bavail * found.f_frsize


def _process_user(pid: int) -> str | None:
    """The login name of ``pid``'s real user, None when unknown."""
    import pwd

    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return pwd.getpwuid(int(line.split()[1])).pw_name
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return None


def _end(process: subprocess.Popen[bytes], *steps: tuple[signal.Signals, float]) -> None:
    """Signal ``process`` step by step until it ends: the first signal to it alone (borg's SIGINT makes a
    checkpoint), the next ones to its whole group."""
    for index, (sig, seconds) in enumerate(steps):
        try:
            if index == 0:
                process.send_signal(sig)
            else:
                os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=seconds)
            return
        except subprocess.TimeoutExpired:
            continue


def _collect(stream, into: list[bytes]) -> None:  # noqa: ANN001
    into.append(stream.read())


def _lines(stream, into: list[bytes], callback: Callable[[str], object] | None) -> None:  # noqa: ANN001
    """Collect ``stream`` into ``into``; with ``callback``, each line is handed to it as it comes, and a line it
    answers False to is not kept (borg's progress lines of a twelve-hour backup: not held in memory)."""
    pending = b""
    while chunk := stream.read1(65536):
        if callback is None:
            into.append(chunk)
            continue
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if callback(line.rstrip(b"\r").decode("utf-8", "replace")) is not False:
                into.append(line + b"\n")
    if pending and (callback is None or callback(pending.rstrip(b"\r").decode("utf-8", "replace")) is not False):
        into.append(pending)


def _feed(stream, data: bytes) -> None:  # noqa: ANN001
    try:
        stream.write(data)
    except OSError:  # the command exited without reading everything
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    import tempfile

    fd, temporary = tempfile.mkstemp(prefix=".mutualbackup-tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
