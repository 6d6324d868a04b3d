"""The SSH implementation of :class:`mutualbackup.remote.transport.Transport` (paramiko).

One :class:`SSHTransport` talks to one node. It connects on first use, keeps the
connection for later calls (reconnecting once if it was lost in between) and
closes it in :meth:`SSHTransport.close`. The node's host key is pinned by the
inventory: it is the only key ever accepted, no ``known_hosts`` file is read or
written, and a different key is a refused connection (:class:`HostKeyMismatch`).

Commands are argv tuples; :func:`mutualbackup.remote.transport.command_line` is the only
place they become a remote command line. Timeouts are enforced on both ends: the
remote command runs under coreutils ``timeout`` (closing an SSH channel does not
signal a command that has no terminal), and the local side stops waiting at the
deadline.
"""

from __future__ import annotations

import base64
import binascii
import shlex
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from mutualbackup.errors import HostKeyMismatch, TransportError
from mutualbackup.node.protocol import FAILED, ProtocolError, Reply, decode_event, encode_request, reply_of
from mutualbackup.remote.channel import pump
from mutualbackup.remote.paramiko_import import paramiko
from mutualbackup.remote.sockets import CONNECT_TIMEOUT, open_socket

if TYPE_CHECKING:  # a node, or what stands for one before the inventory is read (remote/hints.Endpoint)
    from mutualbackup.inventory.model import Node

KEEPALIVE_SECONDS = 10
"""Interval of SSH keepalive messages on an idle connection."""


def parse_host_key(host_key: str) -> paramiko.PKey:
    """A pinned ``"TYPE BASE64"`` host key as a paramiko key; ValueError when it does not parse."""
    parts = host_key.split()
    if len(parts) < 2:
        raise ValueError(f"expected 'TYPE BASE64', got {host_key!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        return paramiko.PKey.from_type_string(parts[0], blob)
    except (binascii.Error, paramiko.SSHException, ValueError) as error:
        raise ValueError(f"cannot parse host key {parts[0]} {parts[1][:16]}…: {error}") from error


def _handle_channel_request(channel: paramiko.Channel, message: paramiko.Message) -> None:
    """Record ``exit-signal`` as 128 + N, like a shell; leave every other request to paramiko.

    paramiko ignores ``exit-signal``, so a remote command killed by a signal would
    otherwise look like a lost connection (exit status -1).
    """
    start = message.packet.tell()
    try:
        if message.get_text() == "exit-signal":
            message.get_boolean()
            name = message.get_text()
            number = getattr(signal, "SIG" + name, None)
            channel.exit_status = 128 + int(number) if number is not None else 255
            channel.status_event.set()
            return
    except Exception:  # a malformed request: let paramiko deal with it
        pass
    message.packet.seek(start)
    paramiko.Channel._handle_request(channel, message)


class _PinnedTransport(paramiko.Transport):
    """paramiko's Transport, understanding ``exit-signal``, and acknowledging promptly.

    After authentication OpenSSH's sshd sends a ``hostkeys-00@openssh.com`` global
    request that wants no reply, then (as a separate small packet) the
    confirmation of our session channel. With Nagle's algorithm on the server's
    socket, that confirmation waits until the first packet is acknowledged, and
    our kernel delays a bare acknowledgement by up to 40 ms: every new
    connection paid that once more before its first command. Answering every
    reply-less global request with an ``SSH_MSG_IGNORE`` (RFC 4253 §11.2: to be
    ignored by the peer) carries the acknowledgement at once.
    """

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        paramiko.common.MSG_CHANNEL_REQUEST: _handle_channel_request,
    }

    def _parse_global_request(self, m: paramiko.Message) -> None:
        start = m.packet.tell()
        try:
            m.get_text()
            wants_reply = m.get_boolean()
        except Exception:  # a malformed request: paramiko deals with it
            wants_reply = True
        m.packet.seek(start)
        super()._parse_global_request(m)  # type: ignore[misc]
        if not wants_reply:  # paramiko's own reply acknowledges the others
            self._send_message(ignore_message())  # type: ignore[attr-defined]


def ignore_message() -> paramiko.Message:
    """An empty ``SSH_MSG_IGNORE``: a packet the peer discards, sent to carry a TCP acknowledgement."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_IGNORE)
    message.add_string(b"")
    return message


class SSHTransport:
    """Runs commands and moves small files on one node over SSH, host key pinned.

    ``key_file`` is the coordinator's private key (OpenSSH format); it is the only
    credential offered (no agent, no ``~/.ssh`` keys). Usable as a context manager.
    Thread-safe: several threads may call :meth:`run` at once (one channel each).
    """

    def __init__(self, node: Node, key_file: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 opened: socket.socket | OSError | None = None) -> None:
        """``opened``: the TCP connection to the node, already made for the first connection
        (:func:`mutualbackup.remote.sockets.open_socket`), or why it could not be (raised by the first request)."""
        self.node = node
        self.node_name = node.name
        self.key_file = key_file
        self.connect_timeout = connect_timeout
        self._where = f"{node.address}:{node.port}"
        try:
            self._pinned = parse_host_key(node.host_key)
        except ValueError as error:
            raise TransportError(f"{node.name}: the pinned host_key does not parse ({error})") from error
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._home: str | None = None
        self._started: tuple[paramiko.Transport, paramiko.Channel] | TransportError | None = None
        self._opened = opened

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if any (a session :meth:`start` opened with it); the next call reconnects."""
        with self._lock:
            self._started = None
            if isinstance(self._opened, socket.socket):
                self._opened.close()
            self._opened = None
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- connection ---------------------------------------------------------

    def _transport(self) -> paramiko.Transport:
        """The live paramiko transport, connecting (or reconnecting) when needed."""
        with self._lock:
            if self._client is not None:
                live = self._client.get_transport()
                if live is not None and live.is_active():
                    return live
                self._client.close()
                self._client = None
            self._client = self._connect()
            live = self._client.get_transport()
            assert live is not None
            return live

    def _connect(self) -> paramiko.SSHClient:
        """Open an authenticated connection; raises TransportError or HostKeyMismatch."""
        node = self.node
        try:
            pkey = paramiko.PKey.from_path(self.key_file)
        except TypeError as error:  # paramiko's word for a key that needs a passphrase
            raise TransportError(f"cannot read the coordinator key {self.key_file}: it is protected by a passphrase, "
                                 "and the coordinator runs unattended: give it a key without one") from error
        except (OSError, paramiko.SSHException, ValueError) as error:
            raise TransportError(f"cannot read the coordinator key {self.key_file}: {error}") from error
        client = paramiko.SSHClient()
        # Never load system or user known_hosts: the pinned key is the only one.
        # paramiko looks it up under this name and, finding it, offers its type
        # first in the key exchange, so the server presents that key type.
        name = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
        client.get_host_keys().add(name, self._pinned.get_name(), self._pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        timeout = self.connect_timeout
        opened, self._opened = self._opened, None
        try:
            sock: socket.socket | None = None
            try:
                if isinstance(opened, OSError):
                    raise opened
                sock = opened or open_socket(node.address, node.port, timeout)
                client.connect(
                    node.address,
                    port=node.port,
                    username=node.user,
                    pkey=pkey,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=timeout,
                    banner_timeout=timeout,
                    auth_timeout=timeout,
                    channel_timeout=timeout,
                    transport_factory=_PinnedTransport,
                    sock=sock,
                )
            except BaseException:
                client.close()
                if sock is not None:
                    sock.close()
                raise
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise self._refused(error, timeout) from error
        live = client.get_transport()
        assert live is not None
        live.set_keepalive(KEEPALIVE_SECONDS)
        return client

    def _refused(self, error: BaseException, timeout: float) -> TransportError:
        """What a failed connection means, for a tired operator (HostKeyMismatch for a changed host key)."""
        node, where = self.node, self._where
        if isinstance(error, paramiko.BadHostKeyException):
            return HostKeyMismatch(
                f"{node.name} ({where}) presented host key {error.key.get_name()} "
                f"{error.key.fingerprint}, but the inventory pins "
                f"{error.expected_key.get_name()} {error.expected_key.fingerprint}. "
                f"The connection was refused: if {node.name} was reinstalled, verify the new "
                f"key out of band and update host_key in the inventory; nothing was sent."
            )
        if isinstance(error, paramiko.AuthenticationException):
            return TransportError(
                f"cannot log in to {node.name} ({where}) as {node.user}: the node refused the "
                f"coordinator key {self.key_file} ({error}); check its authorized_keys"
            )
        if isinstance(error, ConnectionRefusedError):
            return TransportError(f"cannot connect to {node.name} ({where}): connection refused (is sshd running?)")
        if isinstance(error, socket.timeout):
            return TransportError(f"cannot connect to {node.name} ({where}): no answer within {timeout:g}s")
        if isinstance(error, socket.gaierror):
            return TransportError(f"cannot connect to {node.name} ({where}): cannot resolve {node.address} ({error})")
        why = getattr(error, "strerror", None) or error or type(error).__name__
        return TransportError(f"cannot connect to {node.name} ({where}): {why}")

    def _open_channel(self) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new session channel; reconnects once if the kept connection died meanwhile."""
        for attempt in (1, 2):
            live = self._transport()
            try:
                return live, live.open_session(timeout=self.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as error:
                if attempt == 2 or live.is_active():
                    raise TransportError(
                        f"cannot open a session on {self.node_name} ({self._where}): {error}"
                    ) from error
        raise AssertionError("unreachable")

    # -- commands -----------------------------------------------------------

    def request(
        self,
        kind: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_event: Callable[[Mapping[str, Any]], None] | None = None,
        feed: Iterable[bytes] = (),
    ) -> Reply:
        """Ask the node's ``mutualbackup-node serve`` for ``kind``; see :meth:`Transport.request`."""
        live, channel = self._session(f"mutualbackup-node serve {kind}",
                                      f"cannot ask {self.node_name} ({self._where}) for {kind}")
        answered = threading.Event()
        replies: list[Reply] = []

        def stdin() -> Iterator[bytes]:
            yield encode_request(kind, args, self.node.name)
            yield from feed
            while not answered.wait(0.5) and not channel.closed:  # stdin stays open while the request runs
                pass

        def heard(line: bytes) -> None:
            try:
                event = decode_event(line)
            except ProtocolError:
                return
            if event["event"] == "result":
                replies.append(reply_of(kind, event))
                answered.set()
            elif on_event is not None:
                on_event(event)

        pumped = pump(channel, live, stdin(), timeout, None, on_stdout_line=heard)
        answered.set()
        if replies:
            return replies[0]
        why = (f"timed out after {timeout:g}s" if pumped.timed_out else "the connection was lost" if pumped.lost
               else f"the node ended without an answer (exit {pumped.exit_code})")
        tail = pumped.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        return Reply(kind, FAILED, f"{self.node_name}: {kind}: {why}" + ("\n" + "\n".join(tail) if tail else ""),
                     {"lost": True})

    def connect(self) -> None:
        """Open (or check) the connection now; TransportError or HostKeyMismatch as :meth:`request`."""
        self._transport()

    def start(self, kind: str | None = None) -> None:
        """Connect and start ``serve`` for the next :meth:`request` now (see :meth:`Transport.start`); what fails
        is kept for that request to raise."""
        command = f"mutualbackup-node serve {kind}" if kind else "mutualbackup-node serve"
        try:
            started = self._session(command, f"cannot start serve on {self.node_name} ({self._where})")
        except TransportError as error:
            started = error
        with self._lock:
            self._started = started

    def _session(self, command: str, failure: str) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A channel running ``serve`` (the forced command, whatever ``command`` says): the one :meth:`start`
        opened when it is still open, else a new one."""
        with self._lock:
            started, self._started = self._started, None
        if isinstance(started, TransportError):
            raise started
        if started is not None:
            live, channel = started
            if live.is_active() and not channel.closed and not channel.exit_status_ready():
                return live, channel
            channel.close()
        live, channel = self._open_channel()
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as error:
            channel.close()
            raise TransportError(f"{failure}: {error}") from error
        return live, channel

    # -- files --------------------------------------------------------------

    def __repr__(self) -> str:
        return f"SSHTransport({self.node_name!r}, {self._where}, key_file={shlex.quote(self.key_file)})"

