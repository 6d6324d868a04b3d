"""What a running job shares with the daemon: an abort request, its connections, and where its command runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mutualbackup.inventory.model import Node
from mutualbackup.remote.transport import Transport


@dataclass
class JobControl:
    """What a running job shares with the daemon: an abort request and where to send it.

    The job registers its transports and its current supervised command; the
    daemon calls :meth:`abort` and then stops the command through a new
    connection (:func:`stop_remote`), or, as a last resort, :meth:`close_transports`.
    """

    aborted: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    _transports: list[Transport] = field(default_factory=list)
    _current: tuple[Node, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def abort(self, reason: str) -> None:
        self.reason = reason
        self.aborted.set()

    @property
    def is_aborted(self) -> bool:
        return self.aborted.is_set()

    def attach(self, transport: Transport) -> None:
        """Register a connection of the job; one attached after :meth:`abort` is closed at once (the job was
        stopped while it connected)."""
        with self._lock:
            self._transports.append(transport)
            late = self.is_aborted
        if late:
            try:
                transport.close()
            except Exception:  # closing is best effort
                pass

    def detach(self, transport: Transport) -> None:
        with self._lock:
            if transport in self._transports:
                self._transports.remove(transport)

    def running_on(self, node: Node | None, role: str | None = None) -> None:
        with self._lock:
            self._current = (node, role) if node is not None and role is not None else None

    @property
    def current(self) -> tuple[Node, str] | None:
        """(node, role) of the supervised command running now, if any (``src/HOST``, ``repo/SOURCE``...)."""
        with self._lock:
            return self._current

    def close_transports(self) -> None:
        with self._lock:
            transports = list(self._transports)
        for transport in transports:
            try:
                transport.close()
            except Exception:  # closing is best effort
                pass
