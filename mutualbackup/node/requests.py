"""The fixed set of requests a node answers, and how their arguments are checked.

Each request is a function of a :class:`Session` and its checked arguments, registered with
:func:`request`: its side (``source`` requests act on this node's own backups and run as root;
``host`` requests act on repositories this node stores and run as the unprivileged login; ``any``).
A request refuses (:class:`Refused`, nothing ran) anything it does not expect; it fails
(:class:`Failed`) when the work could not be done. No request runs a command or reads a file
the coordinator names: argv and paths are built here, from the node's configuration and checked
names, addresses and keys.
"""

from __future__ import annotations

import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mutualbackup.inventory import value_checks
from mutualbackup.inventory.model import Node, Storage
from mutualbackup.node import kinds
from mutualbackup.node.config import NodeConfig
from mutualbackup.node.protocol import DONE, FAILED, REFUSED, Reply
from mutualbackup.node.system import System

Args = Mapping[str, Any]


class Refused(Exception):
    """The request or its arguments are not acceptable here: nothing ran."""


class Failed(Exception):
    """The work was tried and could not be done."""


@dataclass(frozen=True)
class Request:
    name: str
    side: str  # "source", "host" or "any"
    handler: Callable[["Session", Args], Mapping[str, Any]]

    @property
    def needs_root(self) -> bool:
        """Source requests read and write the member's files and the root-only state (its pidfiles too)."""
        return kinds.needs_root(self.name)


REQUESTS: dict[str, Request] = {}


def request(name: str, side: str) -> Callable[[Callable[["Session", Args], Mapping[str, Any]]], Callable]:
    """Register a request handler under ``name``."""

    def register(handler: Callable[["Session", Args], Mapping[str, Any]]) -> Callable:
        if kinds.KINDS.get(name) != (side, handler.__module__.rsplit(".", 1)[-1]):
            raise AssertionError(f"request {name!r} ({side}, {handler.__module__}) is not so in node/kinds.py")
        REQUESTS[name] = Request(name, side, handler)
        return handler

    return register


class Session:
    """What a request works with: the node's configuration and system, a way to speak, and the
    further lines the coordinator sends (``feed``; None at their end)."""

    def __init__(self, config: NodeConfig, system: System, emit: Callable[[str, Mapping[str, Any]], None],
                 feed: Callable[[float | None], bytes | None] | None = None):
        self.config = config
        self.system = system
        self._emit = emit
        self._feed = feed
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._emit(event, fields)

    def next_line(self, timeout: float | None = None) -> bytes | None:
        """The coordinator's next line on stdin, None when it ended (or after ``timeout``)."""
        return self._feed(timeout) if self._feed is not None else None


class LineBatch:
    """borg's log lines, sent as one ``lines`` event at most every ``every`` seconds and at the end: one SSH
    packet for many lines (a restore's ``--list --progress`` says hundreds, on a machine borg keeps busy)."""

    def __init__(self, session: Session, every: float = 0.1) -> None:
        self.session, self.every = session, every
        self.pending: list[str] = []
        self.sent = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.pending.append(line)
            if time.monotonic() - self.sent >= self.every:
                self._send()

    def flush(self) -> None:
        with self.lock:
            self._send()

    def _send(self) -> None:
        if self.pending:
            self.session.emit("lines", lines=self.pending)
            self.pending = []
        self.sent = time.monotonic()


def handle(kind: str, args: Args, session: Session, addressed: str) -> Reply:
    """Answer one request meant for the node ``addressed``: its data, or why it was refused or failed.
    Never raises for a bad request."""
    if addressed != session.config.name:
        return Reply(kind, REFUSED, f"this server is {session.config.name} (pinned when it joined), and the request "
                                    f"is meant for {addressed}: the inventory gives {addressed} this server's address, "
                                    "port or host key. Nothing was done; correct the inventory")
    found = REQUESTS.get(kind)
    if found is None:
        return Reply(kind, REFUSED, f"{session.config.name} does not take a request {kind!r}")
    if found.side == "host" and not session.config.storage:
        return Reply(kind, REFUSED, f"{session.config.name} lends no storage: it takes no {kind!r} request")
    try:
        return Reply(kind, DONE, None, dict(found.handler(session, args)))
    except Refused as exc:
        data = {"not_signed": True} if type(exc).__name__ == "NotSigned" else {}
        return Reply(kind, REFUSED, f"{session.config.name} refused {kind!r}: {exc}", data)
    except Failed as exc:
        return Reply(kind, FAILED, str(exc))
    except Exception as exc:  # a bug, or the system refused (a permission): say so, never a half answer
        import traceback

        traceback.print_exc()
        return Reply(kind, FAILED, f"{session.config.name}: internal error in the node program during {kind}: {exc!r}")


# --- checking arguments ---------------------------------------------------------------------


def text(args: Args, key: str, *, optional: bool = False) -> str:
    value = args.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise Refused(f"{key!r} must be text")
    try:
        return value_checks.check_line(value)
    except ValueError as exc:
        raise Refused(f"{key!r}: {exc}") from None


def number(args: Args, key: str, *, optional: bool = False, default: float | None = None) -> float | None:
    value = args.get(key)
    if value is None and optional:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Refused(f"{key!r} must be a number of at least 0")
    return float(value)


def integer(args: Args, key: str, *, optional: bool = False) -> int | None:
    value = args.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Refused(f"{key!r} must be a whole number of at least 0")
    return value


def flag(args: Args, key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise Refused(f"{key!r} must be true or false")
    return value


def node_name(value: object, what: str) -> tuple[str, str]:
    """``MEMBER/NODE`` checked with the slug rule."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise Refused(f"{what} must be MEMBER/NODE")
    member, slug = value.split("/")
    try:
        return value_checks.check_slug(member), value_checks.check_slug(slug)
    except ValueError as exc:
        raise Refused(f"{what}: {exc}") from None


def host_of(args: Args, key: str = "host") -> Node:
    """The replica host a source request names: its name, address, port, login, pinned key, storage path."""
    value = args.get(key)
    if not isinstance(value, dict):
        raise Refused(f"{key!r} must describe a host")
    member, slug = node_name(value.get("name"), f"{key}.name")
    try:
        address = value_checks.check_address(str(value.get("address")))
        user = value_checks.check_user(str(value.get("user")))
        host_key = value_checks.check_host_key(str(value.get("host_key")))
        storage = value_checks.check_absolute_path(str(value.get("storage")))
    except ValueError as exc:
        raise Refused(f"{key}: {exc}") from None
    port = value.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise Refused(f"{key}.port must be a TCP port")
    return Node(member=member, slug=slug, address=address, port=port, user=user, host_key=host_key,
                storage=Storage(path=storage, capacity=1))


def host_ref(host: Node) -> dict[str, Any]:
    """How the coordinator describes ``host`` in a request (:func:`host_of` reads it back)."""
    assert host.storage is not None
    return {"name": host.name, "address": host.address, "port": host.port, "user": host.user,
            "host_key": host.host_key, "storage": host.storage.path}


def source_of(args: Args, key: str = "source") -> str:
    """The source (``MEMBER/NODE``) whose repository a host request is about; never this node's member's own
    sources' names forged as another's: the repository path is the host's storage path + that name."""
    member, slug = node_name(args.get(key), key)
    return f"{member}/{slug}"


def repository_path(config: NodeConfig, source: str) -> str:
    """Where this host keeps the repository of ``source``: STORAGE/MEMBER/NODE."""
    member, slug = source.split("/")
    return posixpath.join(config.storage, member, slug)
