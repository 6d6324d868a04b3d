"""What every command works with: the validated inventory, the state, the placement,
and a way to reach nodes.

The connector is the seam: the CLI gives the SSH one, unit tests give a fake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from mutualbackup.inventory.model import Federation, Node

if TYPE_CHECKING:  # imported where used: `mutualbackup run` connects before it reads the state (see cmd_run)
    from mutualbackup.jobs.control import JobControl
    from mutualbackup.plan.placement import Placement
    from mutualbackup.remote.transport import Transport
    from mutualbackup.state.history import History

Connector = Callable[[Node], "Transport"]

log = logging.getLogger("mutualbackup")


@dataclass
class Context:
    federation: Federation
    history: History
    connector: Connector
    _placement: Placement | None = field(default=None, repr=False)
    _early: dict[str, _Started] = field(default_factory=dict, repr=False)

    @property
    def placement(self) -> Placement:
        """Sticky placement: the recorded one, kept where still valid, completed."""
        if self._placement is None:
            from mutualbackup.plan.placement import place

            self._placement = place(self.federation, self.history.placement(), self.history.repository_sizes())
        return self._placement

    def reset_placement(self) -> None:
        """Forget the computed placement: the recorded one changed under it."""
        self._placement = None

    def signed(self, member: str) -> dict[str, str]:
        """What a node of ``member`` verifies before it acts: the member file as its admins signed it (read now,
        from the inventory's directory), its signature, and ``federation.yml`` (the defaults under it)."""
        directory = self.federation.directory

        def read(*parts: str) -> str:
            try:
                with open(os.path.join(directory, *parts), encoding="utf-8") as handle:
                    return handle.read()
            except (OSError, UnicodeDecodeError):
                return ""

        return {"file": read("members", f"{member}.yml"), "signature": read("members", f"{member}.yml.sig"),
                "federation": read("federation.yml")}

    def replicas_of(self, source: str) -> tuple[str, ...]:
        """The hosts recorded for ``source`` by the last ``apply`` (what exists in the world)."""
        return self.history.placement().get(source, ())

    def replica_hosts(self, source: str) -> tuple[Node, ...]:
        """The recorded replica hosts of ``source`` that the inventory still has as hosts.

        A recorded host since removed from the inventory (or left without ``storage:``)
        cannot be reached any more: it is skipped with a warning (on stderr, through the
        log), so that the remaining replicas serve. Empty when none is left.
        """
        hosts: list[Node] = []
        for name in self.replicas_of(source):
            try:
                node = self.federation.node(name)
            except KeyError:
                node = None
            if node is None or not node.is_host:
                log.warning("%s is no longer a host in the inventory: skipping its replica of %s", name, source)
                continue
            hosts.append(node)
        return tuple(hosts)

    def connect(self, node: Node) -> Transport:
        """A transport to ``node``: the one :meth:`start` began for it, once it is ready, else a new one."""
        early = self._early.pop(node.name, None)
        return early.ready() if early is not None else self.connector(node)

    def start(self, node: Node, started: Transport | None = None, kind: str | None = None,
              after: Node | None = None) -> None:
        """Begin the next session to ``node`` now, in the background: connected and its program started
        (:meth:`Transport.start`, told ``kind`` when the request to come is known) while this process prepares
        what to ask; the next :meth:`connect` to it takes that session, and raises what went wrong. Never raises
        itself. ``started``: a transport already started (``mutualbackup run`` starts its source's before it
        reads the state). ``after``: a node whose session :meth:`start` began, on the critical path: this one
        connects once that one has (handshakes in one process slow each other down)."""
        if node.name not in self._early:
            first = self._early.get(after.name) if after is not None else None
            self._early[node.name] = _Started(self.connector, node, started, kind, first)

    def close_started(self) -> None:
        """Close the sessions :meth:`start` began that no request used, without waiting for one still connecting
        (an unreachable node takes its whole connect timeout): that one is closed once it is done."""
        while True:
            try:
                _, early = self._early.popitem()
            except KeyError:  # none left (another thread may have taken the last one meanwhile)
                return
            early.close()

    @contextlib.contextmanager
    def session(self, node: Node, control: JobControl | None = None) -> Iterator[Transport]:
        """A connection to ``node`` for the block, closed after it; registered with ``control`` (the daemon
        closes it when it aborts the job)."""
        transport = self.connect(node)
        if control is not None:
            control.attach(transport)
        try:
            if control is not None and control.is_aborted:  # while it connected: nothing is asked of the node
                from mutualbackup.jobs.runs import aborted

                aborted(control)
            yield transport
        finally:
            if control is not None:
                control.detach(transport)
            transport.close()

    def node(self, name: str) -> Node:
        """The node called ``name``; a usage error naming the known ones otherwise."""
        from mutualbackup.errors import UsageError

        try:
            return self.federation.node(name)
        except KeyError:
            known = ", ".join(sorted(n.name for n in self.federation.nodes()))
            raise UsageError(f"no node {name!r} in the inventory (known: {known})") from None

    def source(self, name: str) -> Node:
        from mutualbackup.errors import UsageError

        node = self.node(name)
        if not node.is_source:
            raise UsageError(f"{name} has no backup: section, so it is not a source")
        return node


def require_placeable(federation: Federation, placement: Placement) -> None:
    """Raise an InventoryError (exit 2) when some source cannot get its replicas."""
    from mutualbackup.errors import InventoryError

    if placement.problems:
        raise InventoryError([str(p) for p in placement.problems])


def ssh_connector(federation: Federation) -> Connector:
    """Connector that opens pinned-key SSH sessions with the coordinator's own key."""
    from mutualbackup.remote.ssh import SSHTransport

    key = coordinator_key(federation)

    def connect(node: Node) -> Transport:
        return SSHTransport(node, key)

    connect.key_file = key  # type: ignore[attr-defined]  # what a reloaded inventory is compared with (daemon.py)
    return connect


def coordinator_key(federation: Federation) -> str:
    """The coordinator's private key file, the only credential its SSH connections offer."""
    return os.path.expanduser(federation.coordinator.ssh_key)


class _Started:
    """A session :meth:`Context.start` began: its transport, made and started in a thread of its own."""

    def __init__(self, connector: Connector, node: Node, started: Transport | None, kind: str | None = None,
                 after: _Started | None = None) -> None:
        self.transport = started
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None
        if started is None:
            self.thread = threading.Thread(target=self._start, args=(connector, node, kind, after),
                                           name=f"start {node.name}", daemon=True)
            self.thread.start()

    def _start(self, connector: Connector, node: Node, kind: str | None, after: _Started | None) -> None:
        if after is not None and after.thread is not None:
            after.thread.join()  # connected and started (or failed): the line is free
        try:
            self.transport = connector(node)
            self.transport.start(kind)
        except Exception as error:  # what connecting to it raises, raised by the request that needs it
            self.error = error

    def ready(self) -> Transport:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        return self.transport

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            threading.Thread(target=self._close_when_started, daemon=True).start()
        elif self.transport is not None:
            self.transport.close()

    def _close_when_started(self) -> None:
        assert self.thread is not None
        self.thread.join()
        if self.transport is not None:
            self.transport.close()
