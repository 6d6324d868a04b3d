"""The one seam for side effects on nodes: run an argv, read a file, write a file.

Two implementations satisfy :class:`Transport`: :class:`mutualbackup.remote.ssh.SSHTransport`
(paramiko, host key pinned by the inventory) and the fake in ``tests/fake.py``
used by fast unit tests. The same planner, executor and scheduler code runs over
both. Commands are argv tuples: only the SSH transport joins them into a remote
command line, always with :func:`shlex.join`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from mutualbackup.node.protocol import Reply


@dataclass(frozen=True)
class Result:
    """What a command did on a node. ``exit_code`` is -1 when the connection was lost."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stderr_tail(self, lines: int = 15) -> str:
        """The last lines of stderr, decoded leniently, for error messages and history."""
        text = self.stderr.decode("utf-8", errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:])


class Transport(Protocol):
    """Runs commands and moves small files on one node."""

    node_name: str

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> Result:
        """Run ``argv`` on the node and wait for it.

        ``env`` values are not secret (they may show in ``ps`` on the node).
        stdin is closed after ``stdin`` is sent (closed at once when None); an
        iterable is sent chunk by chunk as it yields them (it may block meanwhile:
        the command runs already).
        ``timeout`` (seconds) kills the remote command and returns exit code -1.
        Raises TransportError when the node cannot be reached or its host key is
        not the pinned one; a command that fails is a Result, not an exception.
        """
        ...

    def request(
        self,
        kind: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_event: Callable[[Mapping[str, Any]], None] | None = None,
        feed: Iterable[bytes] = (),
    ) -> Reply:
        """Ask the node's ``mutualbackup-node serve`` for ``kind`` with ``args``; its reply.

        ``on_event`` gets each event the node sends before its result, as it comes; ``feed``
        is sent after the request, line by line, as it yields (it may block meanwhile).
        A reply that never came (the connection was lost, ``timeout`` expired) is a failed
        Reply with ``data["lost"]`` set. Raises TransportError when the node cannot be reached.
        """
        ...

    def connect(self) -> None:
        """Open the connection now rather than at the first command (raises like :meth:`run`)."""
        ...

    def home(self) -> str:
        """The login user's home directory on the node (to expand ``~/``)."""
        ...

    def read_file(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist."""
        ...

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Replace the file atomically (write a temporary file, then rename), with ``mode``."""
        ...

    def close(self) -> None:
        ...


Connector = Callable[["object"], Transport]
"""Opens a Transport to a :class:`mutualbackup.inventory.model.Node` (the argument)."""


def expand_home(path: str, home: str) -> str:
    """``~/x`` becomes ``HOME/x``; other paths are returned unchanged."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return home.rstrip("/") + path[1:]
    return path


def resolve_path(path: str, transport: Transport) -> str:
    """``path`` with a leading ``~`` expanded on the node; asks the node only when needed."""
    if path == "~" or path.startswith("~/"):
        return expand_home(path, transport.home())
    return path


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """The remote shell command line for ``argv``: every word quoted, never interpolated.

    ``env`` is passed through ``env NAME=VALUE`` and ``cwd`` through ``cd DIR &&``.
    """
    words: list[str] = []
    if env:
        words += ["env", "--"] + [f"{name}={value}" for name, value in sorted(env.items())]
    words += list(argv)
    line = shlex.join(words)
    if cwd is not None:
        line = f"cd {shlex.quote(cwd)} && {line}"
    return line


def reply_result(reply: Reply, key: str | None = None) -> Result:
    """A command's outcome that a request's reply carries (``exit_code``, ``stdout``, ``stderr``; under
    ``key`` when given) as a Result.

    A reply without one (the node refused, failed before running anything, or never answered)
    is a Result with exit code -1 and the reply's error as stderr.
    """
    from mutualbackup.node.protocol import ProtocolError, unpack

    data = reply.data.get(key) if key is not None else reply.data
    if isinstance(data, Mapping) and isinstance(data.get("exit_code"), int):
        try:
            return Result((reply.kind,), data["exit_code"], unpack(data.get("stdout", "")), unpack(data.get("stderr", "")))
        except (ProtocolError, ValueError):
            pass
    return Result((reply.kind,), -1, b"", (reply.error or "the node gave no answer").encode() + b"\n")


def stdin_bytes(stdin: bytes | Iterable[bytes] | None) -> bytes:
    """All of a :meth:`Transport.run` ``stdin`` at once (for transports that cannot stream)."""
    if stdin is None:
        return b""
    return stdin if isinstance(stdin, bytes) else b"".join(stdin)
