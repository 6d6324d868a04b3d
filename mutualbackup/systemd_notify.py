"""systemd's notify protocol (sd_notify(3)), for ``Type=notify`` and ``WatchdogSec=``: one datagram per
state change to ``$NOTIFY_SOCKET`` (a path, or ``@`` for the abstract namespace). Without that variable
(not under systemd) every call does nothing."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """READY=1 once the daemon serves, WATCHDOG=1 from its loop (at most every half watchdog interval),
    STOPPING=1 when it stops."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog = int(usec) / 1e6 if watched else None
        self._pinged = 0.0

    def notify(self, state: str) -> bool:
        """Send ``state`` (``KEY=VALUE`` lines); False when there is nobody to tell or it could not be sent."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode("utf-8"), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def ping(self) -> None:
        """WATCHDOG=1, when a watchdog is set and half its interval has passed since the last one."""
        if self.watchdog is None:
            return
        now = time.monotonic()
        if now - self._pinged >= self.watchdog / 2:
            self._pinged = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
