"""A restore onto a node that is not the source: the destination's key, the host's line, the sealed passphrase.

The destination makes a key pair for this restore and tells its public half; the replica's host
then holds a temporary line for it (``grant``). The passphrase is sealed for the destination's
``node_key`` (by the source, or by the coordinator from an admin's recovery kit) from the start, while
the destination starts: it needs nothing of this restore's key. Once the line is in, the coordinator
relays the ciphertext to the destination, which opens it and runs borg.
As soon as borg has connected (its first progress), the host's line is withdrawn; it is in any
case when the restore ends, or when the coordinator's session drops.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed
from mutualbackup.inventory.model import Node
from mutualbackup.node.protocol import FAILED, Reply, log_lines

log = logging.getLogger("mutualbackup.restore")

Seal = Callable[[], str]
"""Gives the passphrase sealed for the destination (armored age), or raises saying why it cannot."""


class SealedRestore:
    """One ``extract`` on the destination with a sealed passphrase, through ``host``'s temporary line."""

    def __init__(self, ctx: Context, destination: Node, host: Node, source: str, seal: Seal,
                 on_line: Callable[[str], None], connected: Callable[[], bool]):
        self.ctx, self.destination, self.host, self.source = ctx, destination, host, source
        self.seal, self.on_line, self.connected = seal, on_line, connected
        self.to_destination: queue.Queue[bytes] = queue.Queue()
        self.withdraw = threading.Event()
        self.granted = threading.Event()
        self.grant_error: str | None = None
        self.seal_error: str | None = None
        self.sealed: str | None = None
        self.key_heard = False
        self.sealing = threading.Thread(target=self._seal, name="restore-seal", daemon=True)
        self.threads: list[threading.Thread] = []

    def run(self, args: Mapping[str, Any], timeout: float) -> Reply:
        """The destination's reply; ``data["not_sealed"]`` when the passphrase could not be sealed for it,
        ``data["host_unusable"]`` when the host's line could not be had."""
        self.ctx.start(self.host, after=self.destination)  # its program starts while the destination's borg does
        self.sealing.start()  # for the destination's node_key: it needs nothing of this restore's key
        try:
            with self.ctx.session(self.destination) as transport:
                reply = transport.request("extract", {**args, "sealed": True}, timeout=timeout,
                                          on_event=self._heard, feed=self._feed())
        finally:
            self.withdraw.set()
            self.to_destination.put(b"")
            for thread in (self.sealing, *self.threads):
                thread.join(timeout=120)
            self.ctx.close_started()  # the host's session, when the destination ended before its key
        if self.seal_error is not None and self.key_heard:  # the destination waited for it; else its reply says why
            return Reply(reply.kind, FAILED, self.seal_error, {"not_sealed": True})
        if self.grant_error is not None and not self.granted.is_set():
            return Reply(reply.kind, FAILED, self.grant_error, {"host_unusable": True})
        return reply

    def _feed(self) -> Iterator[bytes]:
        line = self.to_destination.get()
        if line:
            yield line

    def _heard(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "key":
            self.key_heard = True
            thread = threading.Thread(target=self._authorise, name="restore-authorise", daemon=True,
                                      args=(str(event.get("public_key", "")), str(event.get("restore_id", ""))))
            self.threads.append(thread)
            thread.start()
        elif log_lines(event):
            for line in log_lines(event):
                self.on_line(line)
            if self.connected():
                self.withdraw.set()  # sshd reads authorized_keys only at login: the line has done its work

    def _authorise(self, public_key: str, restore_id: str) -> None:
        """The host's line while the seal ends (it began with the restore); then the passphrase to the destination.
        No line is asked for when the seal has already failed."""
        holder = threading.Thread(target=self._hold, args=(public_key, restore_id), name="restore-line", daemon=True)
        if self.sealing.is_alive() or self.sealed is not None:
            self.threads.append(holder)
            holder.start()
        self.sealing.join()
        if self.sealed is None:
            self.withdraw.set()
            self.to_destination.put(_message(refused=self.seal_error or "the passphrase could not be sealed"))
            return
        sealed = self.sealed
        while not self.granted.wait(0.01):
            if not holder.is_alive():
                self.to_destination.put(_message(refused=self.grant_error or f"{self.host.name} did not accept the key"))
                return
        self.to_destination.put(_message(sealed=sealed))

    def _seal(self) -> None:
        try:
            self.sealed = self.seal()
        except MutualBackupError as exc:
            self.seal_error = str(exc)

    def _hold(self, public_key: str, restore_id: str) -> None:
        """The host's temporary line, held until withdrawn (or the session ends)."""

        def until_withdrawn() -> Iterator[bytes]:
            self.withdraw.wait()
            yield b"withdraw\n"

        def heard(event: Mapping[str, Any]) -> None:
            if event.get("event") == "added":
                log.info("temporary restore line added on %s", self.host.name)
                self.granted.set()

        try:
            with self.ctx.session(self.host) as transport:
                reply = transport.request("grant", {"source": self.source, "public_key": public_key,
                                                    "restore_id": restore_id}, on_event=heard, feed=until_withdrawn())
        except MutualBackupError as exc:
            self.grant_error = f"{self.host.name}: cannot be reached to authorise the restore: {exc}"
            return
        if not reply.ok:
            self.grant_error = f"{self.host.name}: cannot authorise the restore there: {reply.error}"
            if self.granted.is_set():
                log.error("could not remove the temporary restore line from %s (%s): sshd refuses it after its "
                          "expiry-time, and the next `mutualbackup apply` or restore through %s removes it",
                          self.host.name, reply.error, self.host.name)
        elif self.granted.is_set():
            log.info("temporary restore line removed from %s", self.host.name)


def _message(**fields: str) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def sealed_by_source(ctx: Context, source: Node, destination: Node) -> str:
    """The source's passphrase sealed (by the source) for ``destination``, a node of the same member."""
    if not destination.node_key:
        raise OperationFailed(f"{destination.name} has no node_key in the inventory: join it (`mutualbackup-node "
                              "join`) and paste the node_key it printed into its member file")
    try:
        with ctx.session(source) as transport:
            reply = transport.request("seal", {"node": destination.name, "node_key": destination.node_key,
                                               "signed": ctx.signed(source.member)}, timeout=120)
    except MutualBackupError as exc:
        raise OperationFailed(
            f"restoring onto another node needs {source.name}'s passphrase, sealed by {source.name} for "
            f"{destination.name}, and {source.name} cannot be reached ({exc}).\n"
            "Restore with the member's recovery kit instead: --recovery KIT --identity KEY (an admin's key)."
        ) from None
    if not reply.ok:
        raise OperationFailed(f"{source.name} did not seal its passphrase for {destination.name}: {reply.error}")
    return str(reply.data["sealed"])
