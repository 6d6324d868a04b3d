"""``mutualbackup-node serve``: answer one request of the coordinator, then exit.

Run by sshd as the forced command of the coordinator's key: the request's name comes from
``SSH_ORIGINAL_COMMAND`` (what the coordinator asked for), its arguments as the first line of
stdin. The reply goes to stdout as JSON lines (:mod:`~mutualbackup.node.protocol`). When stdin
ends before the request is done, the coordinator is gone: supervised commands are stopped.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any, BinaryIO, Mapping

from mutualbackup.node import protocol
from mutualbackup.node.config import ConfigError, NodeConfig, config_directory, load_config
from mutualbackup.node.protocol import REFUSED, Reply


def requested_kind(argv_kind: str | None) -> str:
    """The request's name: given on the command line, else the last word of ``SSH_ORIGINAL_COMMAND``."""
    if argv_kind:
        return argv_kind
    words = os.environ.get("SSH_ORIGINAL_COMMAND", "").split()
    return words[-1] if words else ""


def serve(kind: str, config_dir: str | None = None, stdin: BinaryIO | None = None,
          stdout: BinaryIO | None = None) -> int:
    """Answer the request ``kind`` read from ``stdin``; its code is the exit status (0, 1 or 2)."""
    from mutualbackup.node import requests
    from mutualbackup.node.system import LocalSystem

    stdin = stdin or LineReader(0)  # unbuffered: a reader thread must never hold stdin's lock at exit
    stdout = stdout or sys.stdout.buffer
    lock = threading.Lock()

    def write(event: str, fields: Mapping[str, Any]) -> None:
        line = protocol.event_line(event, **fields)
        with lock:
            try:
                stdout.write(line)
                stdout.flush()
            except OSError:  # the coordinator is gone; what runs is stopped through `gone`
                pass

    reply = _answer(kind, config_dir, stdin, write, LocalSystem, requests)
    write("result", {"ok": reply.ok, "code": reply.code, "error": reply.error, "data": dict(reply.data)})
    return reply.code


def _answer(kind, config_dir, stdin, write, system_class, requests) -> Reply:  # noqa: ANN001
    """The reply to the request on ``stdin`` (a refusal when it cannot even be read)."""
    import_handlers()
    try:
        line = stdin.readline(protocol.MAX_HEADER + 1)
        asked, args = protocol.decode_request(line)
    except protocol.ProtocolError as exc:
        return Reply(kind, REFUSED, str(exc))
    if asked != kind:
        return Reply(kind, REFUSED, f"the request says {asked!r} but {kind!r} was asked for")
    try:
        config = _config(config_dir, args)
    except ConfigError as exc:
        return Reply(kind, REFUSED, str(exc))
    lines: queue.Queue[bytes | None] = queue.Queue()
    system = system_class()
    threading.Thread(target=_watch, args=(stdin, lines, system.gone), daemon=True).start()

    def feed(timeout: float | None) -> bytes | None:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return None

    session = requests.Session(config, system, write, feed)
    return requests.handle(kind, args, session)


def _config(config_dir: str | None, args: Mapping[str, Any]) -> NodeConfig:
    """The node's configuration; a node that has not joined yet takes the one the request describes."""
    directory = config_directory(config_dir)
    try:
        return load_config(directory)
    except ConfigError:
        described = args.get("node_config")
        if not isinstance(described, dict) or os.path.exists(os.path.join(directory, "node.json")):
            raise
        fields = {k: str(described.get(k) or "") for k in
                  ("member", "node", "user", "authorized_keys", "work", "state", "borg", "storage")}
        for key in ("authorized_keys", "work", "state"):
            fields[key] = os.path.expanduser(fields[key])
        return NodeConfig(**fields)


class LineReader:
    """Lines of a file descriptor read with ``os.read`` (no buffer shared with anything else)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def readline(self, limit: int = -1) -> bytes:
        while b"\n" not in self.pending and (limit < 0 or len(self.pending) < limit):
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.pending += chunk
        cut = self.pending.find(b"\n")
        end = len(self.pending) if cut < 0 else cut + 1
        if limit >= 0:
            end = min(end, limit)
        line, self.pending = self.pending[:end], self.pending[end:]
        return line


def _watch(stdin: BinaryIO, lines: queue.Queue, gone: threading.Event) -> None:
    """Hand the coordinator's further lines over; its end means the coordinator is gone."""
    try:
        while line := stdin.readline(protocol.MAX_HEADER + 1):
            lines.put(line)
    except OSError:
        pass
    lines.put(None)
    gone.set()


def import_handlers() -> None:
    """Register every request (their modules register themselves on import)."""
    from mutualbackup.node import drill, host, source  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """``mutualbackup-node serve [KIND] [--config DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_dir = None
    if "--config" in args:
        at = args.index("--config")
        config_dir = args[at + 1] if at + 1 < len(args) else None
        del args[at:at + 2]
    kind = requested_kind(args[0] if args else None)
    return serve(kind, config_dir)


if __name__ == "__main__":
    sys.exit(main())
