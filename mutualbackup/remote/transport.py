"""The one seam for side effects on nodes: run an argv, read a file, write a file.

Two implementations satisfy :class:`Transport`: :class:`mutualbackup.remote.ssh.SSHTransport`
(paramiko, host key pinned by the inventory) and the fake in ``tests/fake.py``
used by fast unit tests. The same planner, executor and scheduler code runs over
both. Commands are argv tuples: only the SSH transport joins them into a remote
command line, always with :func:`shlex.join`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

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
        """Open the connection now rather than at the first request (raises like :meth:`request`)."""
        ...

    def start(self, kind: str | None = None) -> None:
        """Connect and start the node's program now, for the next :meth:`request`, before it is known: the node
        starts while the coordinator prepares what to ask (``kind``, when known, tells it what is coming: a
        backup's borg then starts at once). Never raises: that request raises what went wrong."""
        ...

    def close(self) -> None:
        ...


Connector = Callable[["object"], Transport]
"""Opens a Transport to a :class:`mutualbackup.inventory.model.Node` (the argument)."""


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


