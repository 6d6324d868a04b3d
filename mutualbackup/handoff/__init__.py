"""``mutualbackup run`` handed to the daemon that serves the same inventory and state, when one does.

A backup run by the command as a new process pays, before its node can even start, for a Python that imports
the coordinator and paramiko and reads the inventory and the state (about 0.1 s): more than a per-job budget of
0.15 s leaves for everything else. The daemon has all of that already. So the command asks it first
(:mod:`~mutualbackup.handoff.client`), and the daemon runs the very steps the command would
(:func:`mutualbackup.jobs.foreground.back_up_now`) and sends it every line the command would have printed
(:mod:`~mutualbackup.handoff.server`). When no daemon answers, or it declines, the command runs the jobs itself,
as it always did: handing off is only ever a shortcut.

Where: a Unix socket in the state directory (:data:`SOCKET`), which is the daemon's own (0700) and which nobody
else may write: nobody else can reach the socket (0600), nor put one in its place. Through
``/proc/self/fd`` when the path is longer than a socket's address can be.

Trust: each side also asks the kernel who the other is (``SO_PEERCRED``, :func:`peer_user`): the daemon answers
only its own user and root, the command talks only to its own user or root, and neither trusts the overflow
user (someone a user namespace does not map). Whoever may ask is someone who could run ``mutualbackup run`` with
the daemon's inventory, state and key anyway: the socket grants nothing more — back up named sources of the
inventory, now.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator

PROTOCOL = 2
SOCKET = "daemon.sock"
"""The daemon's socket, in the state directory."""
REQUEST_LIMIT = 1 << 20
"""The longest request line the daemon reads (a few thousand source names)."""
ADDRESS_LIMIT = 100
"""Longer socket paths go through ``/proc/self/fd`` (a Unix socket's address holds 107 bytes)."""


@contextlib.contextmanager
def address(state: str) -> Iterator[str]:
    """The socket's address in the state directory ``state``, for one ``bind`` or ``connect`` inside the block."""
    path = os.path.join(state, SOCKET)
    if len(path.encode("utf-8", "surrogateescape")) <= ADDRESS_LIMIT:
        yield path
        return
    directory = os.open(state, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{SOCKET}"
    finally:
        os.close(directory)


def peer_user(connection: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket, as the kernel knows it."""
    import struct

    _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
    return uid


def trusted(uid: int) -> bool:
    """Whether a peer of user ``uid`` is trusted: this process's own user, or root; never the overflow user (as
    whom a user namespace shows whoever it does not map), nor anyone when that is this process's own user."""
    overflow = _overflow_user()
    return uid in (os.geteuid(), 0) and overflow not in (uid, os.geteuid())


def private_directory(path: str) -> bool:
    """Whether ``path`` is a directory of this user or root that nobody else may write (where a socket found is
    the daemon's)."""
    from mutualbackup.remote.hints import owned_privately

    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and owned_privately(info, or_root=True)


def _overflow_user() -> int:
    try:
        with open("/proc/sys/kernel/overflowuid", "rb") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 65534
