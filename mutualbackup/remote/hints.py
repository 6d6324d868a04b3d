"""Where ``mutualbackup run`` connected the last time it was given the same command line: its source is
connected to, and its node program started, before the rest of the program is imported or the inventory read.

A run's first connection waits for Python's imports and the inventory (about 0.1 s) before it can start; the
node's start (sshd, sudo, Python, borg's import) then follows. A command line run again (cron, a timer, an
operator's shell history) names the same source of the same inventory: the endpoint it connected to last time
(name, address, port, login, pinned host key, the coordinator's key file) is kept in the user's cache
(``$XDG_CACHE_HOME/mutualbackup/connections.json``, 0600), keyed by the command line, the working directory and
the ``MUTUALBACKUP_*`` environment.

A hint is only ever a guess: nothing is sent on its connection before the inventory has been read and names
that very endpoint for that source (``cli._started_early``); any other connection is closed unused (the node's
program ends, having run nothing). A hint whose connection is not started within :data:`HINT_SECONDS` is
dropped, and the run connects as it would have. The pinned host key is checked as on any connection. The cache
is used only when it and its directory are the user's own and nobody else can write them (no symbolic link),
and only a regular file is read as a key. What a stale or hostile hint can do: make the coordinator log in, with
its own key, to the endpoint the hint names and close that session unused, at most :data:`HINT_SECONDS` into
the run; every request goes to the endpoint the inventory names.
"""

from __future__ import annotations

import json
import os
import stat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: all this runs before the program imports
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from mutualbackup.remote.ssh import SSHTransport

HINT_SECONDS = 2.0
"""How long a hinted connection may take to start (the inventory's own connection waits longer)."""
KEY_FILE_LIMIT = 64 * 1024
KEPT = 32
"""Command lines remembered (the oldest is forgotten first)."""
FIELDS = ("name", "address", "port", "user", "host_key", "key_file")


class Endpoint:
    """What a connection to one node is made of: its name, address, port, login, pinned host key, and the
    coordinator's key file. It stands in for the node while the inventory is not read yet."""

    __slots__ = FIELDS

    def __init__(self, name: str, address: str, port: int, user: str, host_key: str, key_file: str) -> None:
        self.name, self.address, self.port, self.user = name, address, port, user
        self.host_key, self.key_file = host_key, key_file

    @classmethod
    def of(cls, node: object, key_file: str) -> Endpoint:
        """The endpoint of an inventory's node (anything with those attributes)."""
        return cls(*(getattr(node, field) for field in FIELDS[:-1]), key_file)

    def as_list(self) -> list[object]:
        return [getattr(self, field) for field in FIELDS]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and self.as_list() == other.as_list()

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.address}:{self.port})"


def cache_file(environ: Mapping[str, str]) -> str | None:
    """Where hints are kept: ``$XDG_CACHE_HOME/mutualbackup/connections.json`` (``~/.cache`` by default); None
    without an absolute place for it (no home)."""
    base = environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".cache") if os.path.isabs(home) else ""
    return os.path.join(base, "mutualbackup", "connections.json") if base else None


def key(argv: Sequence[str], environ: Mapping[str, str], cwd: str) -> str:
    """A command line as the hints know it (a digest): its words, where it ran, and the ``MUTUALBACKUP_*``
    environment."""
    import hashlib

    mine = sorted((name, value) for name, value in environ.items() if name.startswith("MUTUALBACKUP_"))
    return hashlib.sha256(json.dumps([cwd, list(argv), mine]).encode("utf-8", "surrogateescape")).hexdigest()


def owned_privately(info: os.stat_result, *, or_root: bool = False) -> bool:
    """Whether a file or directory is this user's (or root's, ``or_root``) and nobody else can write it."""
    owners = (os.geteuid(), 0) if or_root else (os.geteuid(),)
    return info.st_uid in owners and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _own(info: os.stat_result) -> bool:
    return owned_privately(info)


def _own_file(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and _own(info)


def _private_directory(path: str) -> bool:
    try:
        info = os.lstat(os.path.dirname(path))
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _own(info)


def _read(path: str) -> dict[str, list[object]]:
    if not _private_directory(path):
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    with os.fdopen(fd, encoding="utf-8") as handle:
        if not _own_file(os.fstat(fd)):
            return {}
        try:
            kept = json.load(handle)
        except (OSError, ValueError):
            return {}
    return kept if isinstance(kept, dict) else {}


def _replaceable(path: str) -> bool:
    """Whether the cache may be written: absent, or a regular file of the user's own that nobody else can write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return _own_file(info)


def _usable_key(path: str) -> bool:
    """Whether the hinted key file may be read now: a regular file of a key's size (not a pipe, not a device)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= KEY_FILE_LIMIT


def _kept(path: str, command: str) -> dict[str, object]:
    """What is kept for ``command``: ``endpoint`` (its fields) and ``state`` (the state directory it used)."""
    kept = _read(path).get(command)
    if isinstance(kept, list):  # as written before the state directory was kept too
        kept = {"endpoint": kept}
    return kept if isinstance(kept, dict) else {}


def recall(path: str, command: str) -> Endpoint | None:
    """The endpoint ``command`` connected to last time, if it is remembered (and well formed)."""
    fields = _kept(path, command).get("endpoint")
    if not isinstance(fields, list) or len(fields) != len(FIELDS):
        return None
    name, address, port, user, host_key, key_file = fields
    if not all(isinstance(v, str) for v in (name, address, user, host_key, key_file)) or type(port) is not int:
        return None
    return Endpoint(name, address, port, user, host_key, key_file)


def recalled_state(path: str, command: str) -> str | None:
    """The state directory ``command`` used last time (where a daemon may run it: mutualbackup/handoff)."""
    state = _kept(path, command).get("state")
    return state if isinstance(state, str) and os.path.isabs(state) else None


def remember(path: str, command: str, endpoint: Endpoint | None, state: str | None = None) -> None:
    """Keep ``endpoint`` as where ``command`` connects, and ``state`` as its state directory (the last
    :data:`KEPT` command lines used; None: what was kept stays). Best effort: a cache that cannot be written (a
    read-only home, a directory that is not the user's own) changes nothing but the next run's start."""
    kept = _read(path)
    entry = dict(_kept(path, command)) if command in kept else {}
    if endpoint is not None:
        entry["endpoint"] = endpoint.as_list()
    if state is not None:
        entry["state"] = state
    if list(kept)[-1:] == [command] and kept[command] == entry:
        return
    kept.pop(command, None)
    kept[command] = entry
    kept = dict(list(kept.items())[-KEPT:])
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not _private_directory(path) or not _replaceable(path):
            return
        fd, temporary = tempfile.mkstemp(prefix=".connections.", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(kept, handle)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass


class Hinted:
    """A connection started on a hint: its command line's key, the endpoint, and the transport (or None when
    the hinted address did not answer)."""

    def __init__(self, path: str | None, command: str, endpoint: Endpoint | None,
                 transport: SSHTransport | None) -> None:
        self.path, self.command, self.endpoint, self.transport = path, command, endpoint, transport
        self.state: str | None = None  # the state directory the command uses, once its inventory is read

    def keep_state(self, state: str) -> None:
        """Remember the state directory the command uses (the next run asks that directory's daemon first)."""
        self.state = state
        if self.path is not None and recalled_state(self.path, self.command) != state:
            remember(self.path, self.command, None, state)

    def take(self, node: object, key_file: str) -> SSHTransport | None:
        """The started transport when the inventory's ``node`` is the endpoint it was started for (it then stands
        for that node); else None, the transport closed unused. Either way ``node`` is remembered."""
        endpoint = Endpoint.of(node, key_file)
        transport, self.transport = self.transport, None
        if transport is not None and endpoint == self.endpoint:
            transport.node = node  # type: ignore[assignment]
        elif transport is not None:
            transport.close()
            transport = None
        if self.path is not None:
            remember(self.path, self.command, endpoint, self.state)
        return transport

    def close(self) -> None:
        """Close a transport nothing took (a run that failed before it connected)."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def start(argv: Sequence[str], environ: Mapping[str, str], cwd: str, kind: str) -> Hinted:
    """The connection ``argv`` made last time, started now for a request ``kind`` (:meth:`SSHTransport.start`),
    before anything else is imported; within :data:`HINT_SECONDS`, or not at all."""
    path, command = cache_file(environ), key(argv, environ, cwd)
    if path is None:
        return Hinted(None, command, None, None)
    endpoint = recall(path, command)
    if endpoint is None or not _usable_key(endpoint.key_file):
        return Hinted(path, command, endpoint, None)
    from mutualbackup.remote.sockets import open_socket

    try:
        opened = open_socket(endpoint.address, endpoint.port, HINT_SECONDS)
    except OSError:
        return Hinted(path, command, endpoint, None)  # moved, or down: the run connects as it would have
    import threading

    from mutualbackup.remote.ssh import SSHTransport

    outcome: list[SSHTransport] = []

    def started() -> None:
        try:
            transport = SSHTransport(endpoint, endpoint.key_file, opened=opened)  # type: ignore[arg-type]
            transport.start(kind)  # (a refused connection is kept in it, for the inventory's decision)
        except Exception:  # noqa: BLE001 - a key that cannot be read, a pinned key that does not parse: no hint
            return
        outcome.append(transport)

    thread = threading.Thread(target=started, name="hinted connection", daemon=True)
    thread.start()  # this thread only waits: the handshake has the process to itself
    thread.join(HINT_SECONDS)
    if thread.is_alive() or not outcome:
        import socket

        try:
            opened.shutdown(socket.SHUT_RDWR)  # ends a handshake still waiting for its peer
        except OSError:
            pass
        opened.close()
        if outcome:
            outcome[0].close()
        return Hinted(path, command, endpoint, None)
    return Hinted(path, command, endpoint, outcome[0])
