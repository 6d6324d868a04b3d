"""The validated inventory as plain, immutable values.

Everything here is produced by :mod:`mutualbackup.inventory.load` after validation, so
code that receives a :class:`Federation` may trust every field: slugs match the
slug rule, paths are absolute, sizes are bytes, durations are seconds.
Nothing in this module does I/O.
"""

from __future__ import annotations

from functools import cached_property
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Where:
    """A place in the user's inventory, for error messages: ``FILE:LINE``."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Window:
    """A daily window of local time, in minutes after midnight; may cross midnight.

    ``start == end`` is never produced (an empty or full-day window is refused).
    """

    start: int
    end: int

    def contains(self, minute_of_day: int) -> bool:
        if self.start < self.end:
            return self.start <= minute_of_day < self.end
        return minute_of_day >= self.start or minute_of_day < self.end

    @property
    def length(self) -> int:
        """Length of the window in minutes."""
        return (self.end - self.start) % (24 * 60)

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class Retention:
    """How many archives borg prune keeps per period; 0 means that rule is unused."""

    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def prune_flags(self) -> tuple[str, ...]:
        """The ``--keep-*`` flags for ``borg prune``, in a stable order."""
        flags: list[str] = []
        for name in ("hourly", "daily", "weekly", "monthly", "yearly"):
            count = getattr(self, name)
            if count:
                flags.append(f"--keep-{name}={count}")
        return tuple(flags)


@dataclass(frozen=True)
class Backup:
    """The ``backup:`` section of a source node, with defaults already merged in."""

    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    estimate: int | None = None  # bytes
    replicas: int = 2
    every: int = 24 * 3600  # seconds
    window: Window | None = None
    rpo: int = 26 * 3600  # seconds
    retention: Retention = field(default_factory=Retention)
    compression: str = "zstd,3"
    check_every: int = 7 * 24 * 3600
    drill_every: int = 30 * 24 * 3600
    before: tuple[str, ...] = ()


@dataclass(frozen=True)
class Storage:
    """The ``storage:`` section of a host node."""

    path: str
    capacity: int  # bytes
    max_concurrent: int = 2
    bandwidth: int | None = None  # bits per second
    draining: bool = False  # its member takes it out: every replica moves away (make before break)
    host_down_after: float = 3 * 86400.0  # unreachable for longer than this: its replicas move elsewhere


@dataclass(frozen=True)
class Node:
    """One server of a member. ``name`` is ``MEMBER/NODE``."""

    member: str
    slug: str
    address: str
    port: int
    user: str
    host_key: str  # "TYPE BASE64", validated to parse
    workdir: str = "~/.mutualbackup"
    authorized_keys: str = "~/.ssh/authorized_keys"
    borg: str = "borg"
    node_key: str = ""  # "age1…": secrets are sealed for this node with it ("" until the node joined)
    backup: Backup | None = None
    storage: Storage | None = None
    site: str = ""
    where: Where | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{self.member}/{self.slug}"

    @property
    def is_source(self) -> bool:
        return self.backup is not None

    @property
    def is_host(self) -> bool:
        return self.storage is not None


@dataclass(frozen=True)
class Admin:
    """One of a member's own people: signs its member file, and alone can open its recovery kits."""

    name: str
    key: str  # "ssh-ed25519 BASE64" (no comment)


@dataclass(frozen=True)
class Member:
    name: str
    contact: str
    site: str
    nodes: tuple[Node, ...]
    where: Where | None = field(default=None, compare=False)
    admins: tuple[Admin, ...] = ()


@dataclass(frozen=True)
class Coordinator:
    ssh_key: str
    state: str
    metrics: str = "127.0.0.1:9468"  # "ADDRESS:PORT"
    timezone: str = "UTC"

    @property
    def metrics_address(self) -> tuple[str, int]:
        host, _, port = self.metrics.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Federation:
    name: str
    coordinator: Coordinator
    members: tuple[Member, ...]
    directory: str = ""  # the inventory directory it was loaded from

    # The look-ups below are computed once per (immutable) federation: a daemon tick or a placement at a
    # thousand members asks for them thousands of times.

    def nodes(self) -> tuple[Node, ...]:
        return self._nodes

    def node(self, name: str) -> Node:
        """The node called ``MEMBER/NODE``; KeyError when there is none."""
        return self._by_name[name]

    def sources(self) -> tuple[Node, ...]:
        return self._sources

    def hosts(self) -> tuple[Node, ...]:
        return self._hosts

    def member(self, name: str) -> Member:
        return self._members[name]

    @cached_property
    def _nodes(self) -> tuple[Node, ...]:
        return tuple(node for member in self.members for node in member.nodes)

    @cached_property
    def _by_name(self) -> dict[str, Node]:
        found: dict[str, Node] = {}
        for node in self._nodes:
            found.setdefault(node.name, node)  # the first, as a scan would (check reports duplicates)
        return found

    @cached_property
    def _sources(self) -> tuple[Node, ...]:
        return tuple(node for node in self._nodes if node.is_source)

    @cached_property
    def _hosts(self) -> tuple[Node, ...]:
        return tuple(node for node in self._nodes if node.is_host)

    @cached_property
    def _members(self) -> dict[str, Member]:
        found: dict[str, Member] = {}
        for member in self.members:
            found.setdefault(member.name, member)
        return found


