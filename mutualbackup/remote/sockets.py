"""The TCP connection under an SSH connection: opened apart from paramiko, so that a command can open it before
it imports paramiko (sshd's start for the connection, about 7 ms, then overlaps that import)."""

from __future__ import annotations

import socket

CONNECT_TIMEOUT = 10.0
"""Seconds an SSH connection may take to be made, logged in and to open a session."""

TCP_USER_TIMEOUT_MS = 60_000
"""Linux: drop the connection when sent data (keepalives) stays unacknowledged this long."""


def open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``address:port`` for SSH, with ``TCP_NODELAY`` (and ``TCP_USER_TIMEOUT``).

    paramiko's own socket keeps Nagle's algorithm: a small packet written while an
    earlier one is unacknowledged then waits for the peer's delayed acknowledgement
    (up to 40 ms), several times per key exchange and authentication, and once per
    command's round trip. Every message of ours is a complete request, so nothing
    is gained by holding it back. Raises OSError as :func:`socket.create_connection`.
    """
    sock = socket.create_connection((address, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    except OSError:
        sock.close()
        raise
    return sock
