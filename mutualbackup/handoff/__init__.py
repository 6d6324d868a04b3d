"""``mutualbackup run`` handed to the daemon that serves the same inventory, when one does.

A backup run by the command as a new process pays, before its node can even start, for a Python that imports
the coordinator and paramiko and reads the inventory and the state (about 0.1 s): more than a per-job budget of
0.15 s leaves for everything else. The daemon has all of that already. So the executable first asks it
(:mod:`~mutualbackup.handoff.client`, before anything else is imported), and the daemon runs the very steps the
command would (:func:`mutualbackup.jobs.foreground.back_up_now`) and sends it every line the command would have
printed (:mod:`~mutualbackup.handoff.server`). When no daemon answers, or it declines, the command runs the jobs
itself, as it always did: handing off is only ever a shortcut.

Where: a Unix socket in Linux's abstract namespace, named after the inventory directory's real path
(:func:`address`): no file to leave behind, no path-length limit, one name per inventory.

Trust: a name in the abstract namespace has no file permissions, so each side checks the other's user from the
kernel (``SO_PEERCRED``, :func:`peer_user`). The daemon answers only its own user and root; the command talks
only to a daemon of its own user or root. Whoever may ask is someone who could run ``mutualbackup run`` with the
daemon's inventory, state and key anyway: the socket grants nothing more — back up named sources of the inventory
as the daemon reads it, now. Another user who takes the name first only keeps runs from being handed off.
"""

from __future__ import annotations

import os
import socket

PROTOCOL = 1
REQUEST_LIMIT = 1 << 20
"""The longest request line the daemon reads (a few thousand source names)."""


def address(inventory: str) -> str:
    """The daemon's socket for the inventory directory ``inventory`` (a real path)."""
    import hashlib

    digest = hashlib.sha256(inventory.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"\0mutualbackup/daemon/{digest}"


def peer_user(connection: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket, as the kernel knows it."""
    import struct

    _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
    return uid


def trusted(uid: int) -> bool:
    """Whether a peer of user ``uid`` is trusted: this process's own user, or root."""
    return uid in (os.geteuid(), 0)
