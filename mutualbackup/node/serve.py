"""``mutualbackup-node serve``: answer one request of the coordinator, then exit.

Run by sshd as the forced command of the coordinator's key, whatever the coordinator asked to
run, as the node's login, which hands over at once to root through the node's one sudo rule: the
request, its name and its arguments, is the first line of stdin. A request that does not need root drops to the
node's login before it runs. The reply goes to stdout as JSON lines
(:mod:`~mutualbackup.node.protocol`). When stdin ends before the request is done, the
coordinator is gone: supervised commands are stopped.
"""

from __future__ import annotations

import os
import select
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a backup's borg starts after few imports
if TYPE_CHECKING:
    import queue
    import threading
    from collections.abc import Mapping
    from typing import Any, BinaryIO

    from mutualbackup.node.preload import Preloaded

from mutualbackup.node import kinds, protocol
from mutualbackup.node.config import ConfigError, NodeConfig, config_directory, load_config
from mutualbackup.node.protocol import REFUSED, Reply

EARLY_SECONDS = 60.0
"""How long a borg started on the coordinator's hint waits for the request (which comes within a second)."""


def serve(kind: str | None, config_dir: str | None = None, stdin: BinaryIO | None = None,
          stdout: BinaryIO | None = None, *, preload: bool = False, early: Preloaded | None = None) -> int:
    """Answer the request read from ``stdin`` (which must be ``kind`` when given); its code is the exit status.
    With ``preload`` (the program itself), a backup's borg starts while the request is checked (node/preload.py);
    ``early``: one the program started on the SSH command's hint, before the request was read."""
    stdin = stdin or LineReader(0)  # unbuffered: a reader thread must never hold stdin's lock at exit
    stdout = stdout or sys.stdout.buffer
    try:
        config: NodeConfig | ConfigError = _config(config_dir)  # while the request comes
    except ConfigError as exc:
        config = exc  # said once the request is read
    line, early = _request_line(stdin, early)
    try:
        decoded: tuple[str, dict[str, Any], str] | protocol.ProtocolError = protocol.decode_request(line)
    except protocol.ProtocolError as exc:
        decoded = exc
    preloaded = _preloaded(decoded, config, early) if preload or early else None
    import threading

    from mutualbackup.node import requests  # the rest of the request's modules, while borg starts
    from mutualbackup.node.system import LocalSystem

    lock = threading.Lock()

    def write(event: str, fields: Mapping[str, Any]) -> None:
        line = protocol.event_line(event, **fields)
        with lock:
            try:
                stdout.write(line)
                stdout.flush()
            except OSError:  # the coordinator is gone; what runs is stopped through `gone`
                pass

    try:
        reply = _answer(kind, decoded, config, stdin, write,  # (made once this process is whom the request needs)
                        lambda: LocalSystem(preloaded=preloaded if os.geteuid() == 0 else None), requests)
    finally:
        if preloaded is not None:
            preloaded.discard()  # when no run used it
    write("result", {"ok": reply.ok, "code": reply.code, "error": reply.error, "data": dict(reply.data)})
    return reply.code


def _request_line(stdin: BinaryIO, early: Preloaded | None) -> tuple[bytes, Preloaded | None]:
    """The request's line, and the borg started on the hint if it is still wanted: a session that sends nothing
    keeps no borg of root's waiting for more than :data:`EARLY_SECONDS` (it is killed; the request, if it
    ever comes, starts its own)."""
    if early is None or not isinstance(stdin, LineReader):
        return stdin.readline(protocol.MAX_HEADER + 1), early
    try:
        return stdin.readline(protocol.MAX_HEADER + 1, timeout=EARLY_SECONDS), early
    except TimeoutError:
        early.discard()
        return stdin.readline(protocol.MAX_HEADER + 1), None


def _preloaded(decoded: tuple[str, dict[str, Any], str] | protocol.ProtocolError,
               config: NodeConfig | ConfigError, early: Preloaded | None = None) -> Preloaded | None:
    """borg started now, as root, for a request meant for this node that will run borg (a backup, a restore onto
    it: node/preload.py), before the rest of the request is checked: ``early``, the one started on the hint, when it
    was started for that command, else a new one. ``early`` is ended when the request does not need it."""
    command = None
    if not isinstance(decoded, protocol.ProtocolError) and not isinstance(config, ConfigError):
        asked, args, addressed = decoded
        from mutualbackup.node import preload

        command = preload.command_for(asked, args, config.name) if addressed == config.name else None
    if early is not None and early.command == command:
        return early
    if early is not None:
        early.discard()
    return _start_borg(config, command) if command is not None else None


def _start_borg(config: NodeConfig | ConfigError, command: str) -> Preloaded | None:
    """borg's ``command`` started early as the node's configuration says, when this process is root."""
    if os.geteuid() != 0 or isinstance(config, ConfigError):
        return None  # refused below, or not root's to start
    from mutualbackup.node import preload

    return preload.for_source(config.borg, config.state, command)


def _answer(kind, decoded, config, stdin, write, system_class, requests) -> Reply:  # noqa: ANN001
    """The reply to the ``decoded`` request (a refusal when it could not even be read, or this node's configuration
    ``config`` not); ``stdin`` gives its further lines."""
    if isinstance(decoded, protocol.ProtocolError):
        return Reply(kind or "?", REFUSED, str(decoded))
    asked, args, addressed = decoded
    if kind is not None and asked != kind:
        return Reply(kind, REFUSED, f"the request says {asked!r} but {kind!r} was asked for")
    import_handlers(asked)
    try:
        if isinstance(config, ConfigError):
            raise config
        _become(asked, config)
    except ConfigError as exc:
        return Reply(asked, REFUSED, str(exc))
    import queue
    import threading

    lines: queue.Queue[bytes | None] = queue.Queue()
    system = system_class()
    threading.Thread(target=_watch, args=(stdin, lines, system.gone), daemon=True).start()

    def feed(timeout: float | None) -> bytes | None:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return None

    session = requests.Session(config, system, write, feed)
    return requests.handle(asked, args, session, addressed)


def _become(kind: str, config: NodeConfig) -> None:
    """Run ``kind`` as whom it needs: root for a source request; the node's login for anything else, dropped
    to at once (the forced command starts ``serve`` as root). ConfigError when this process cannot."""
    if kinds.needs_root(kind):
        if os.geteuid() != 0:
            raise ConfigError(f"{kind!r} needs root, and serve runs as {config.user} without it: the coordinator's "
                              "line must run it through the sudo rule `mutualbackup-node join` installs (run join again)")
        return
    if os.geteuid() != 0:
        return
    import pwd

    try:
        account = pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(f"this node's login {config.user!r} does not exist: run `mutualbackup-node join` again") from None
    if account.pw_uid == 0:
        return
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)


def _config(config_dir: str | None) -> NodeConfig:
    """The node's configuration, as its join wrote it (a node that has not joined answers nothing)."""
    return load_config(config_directory(config_dir))


class LineReader:
    """Lines of a file descriptor read with ``os.read`` (no buffer shared with anything else)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def readline(self, limit: int = -1, timeout: float | None = None) -> bytes:
        """A line (at most ``limit`` bytes); TimeoutError when none is whole within ``timeout`` seconds (what came
        of it is kept for the next call)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending and (limit < 0 or len(self.pending) < limit):
            if deadline is not None and not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"no line within {timeout:g} s")
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


def import_handlers(kind: str | None = None) -> None:
    """Register the request ``kind`` (every request when None): handlers register themselves on import."""
    import importlib

    names = [kinds.module_of(kind)] if kind is not None else sorted({kinds.module_of(k) for k in kinds.KINDS})
    for name in names:
        if name is not None:
            importlib.import_module(name)
