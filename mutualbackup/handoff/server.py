"""The daemon's side: it runs the jobs of a ``mutualbackup run`` handed to it and sends back what to print.

A request is accepted only when the daemon would do exactly what the command would: it serves that inventory,
has read it as its files are now and found it valid, and uses the state the command would use. Otherwise it
declines, saying why, and the command runs the jobs itself. The jobs then run in the daemon's process, each in
the daemon's own slot for its replica (so its scheduler does not start that replica meanwhile, and its shutdown
stops them as its own), through :func:`mutualbackup.jobs.foreground.back_up_now` as the command runs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from mutualbackup.errors import MutualBackupError
from mutualbackup.handoff import PROTOCOL, REQUEST_LIMIT, address, peer_user, trusted
from mutualbackup.jobs.control import JobControl

if TYPE_CHECKING:
    from mutualbackup import borg
    from mutualbackup.daemon import Daemon
    from mutualbackup.jobs.backup import Outcome

log = logging.getLogger("mutualbackup.handoff")

READ_SECONDS = 5.0
"""How long a connected command may take to send its request."""
MAX_CLIENTS = 32
"""Commands served at once; more are declined (they run their jobs themselves)."""
PROGRESS_EVERY = 0.2
"""Seconds between two progress messages (the command's progress line is drawn at most five times a second)."""
GONE = "the operator's `mutualbackup run` ended (interrupted) before this backup did"


class Request:
    """What a command asks, checked field by field: anything else is declined."""

    FIELDS = {"sources": list, "replica": (str, type(None)), "json": bool, "progress": bool,
              "inventory": str, "state": (str, type(None))}

    def __init__(self, line: bytes) -> None:
        message = json.loads(line)
        if not isinstance(message, dict) or message.get("protocol") != PROTOCOL or set(message) != {"protocol", "run"}:
            raise ValueError("not a request of this version")
        fields = message["run"]
        if not isinstance(fields, dict) or set(fields) != set(self.FIELDS):
            raise ValueError("not the fields of a run")
        for name, kind in self.FIELDS.items():
            if not isinstance(fields[name], kind):
                raise ValueError(f"{name} is not a {kind}")
        if not all(isinstance(name, str) for name in fields["sources"]):
            raise ValueError("a source that is not a name")
        self.sources: list[str] = fields["sources"]
        self.replica: str | None = fields["replica"]
        self.json: bool = fields["json"]
        self.progress: bool = fields["progress"]
        self.inventory: str = fields["inventory"]
        self.state: str | None = fields["state"]


class HandoffServer:
    """Listens on :func:`mutualbackup.handoff.address` of the daemon's inventory; one thread per command."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.inventory = os.path.realpath(daemon.ctx.federation.directory)
        self.listener: socket.socket | None = None
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> bool:
        """Listen (and accept in a thread); False, logged, when the name is taken (another daemon of this
        inventory, or another process holding it): runs are then not handed off, nothing else changes."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address(self.inventory))
            listener.listen(16)
        except OSError as exc:
            listener.close()
            log.warning("`mutualbackup run` will run its jobs itself, not in this daemon: %s (another daemon of this "
                        "inventory, or another process, holds its socket)", exc)
            return False
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="handoff", daemon=True).start()
        return True

    def close(self) -> None:
        """Accept no more commands (those being served finish with the daemon's jobs)."""
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                uid = peer_user(connection)
            except OSError:
                connection.close()
                continue
            if not trusted(uid):
                log.warning("a process of user %d asked this daemon to run a backup: refused (only its own user "
                            "and root may)", uid)
                connection.close()
                continue
            if not self.clients.acquire(blocking=False):
                _send(connection, {"refused": f"the daemon serves {MAX_CLIENTS} commands already"})
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), name="handed-off run", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            with connection:
                Served(self, connection).serve()
        except Exception:  # a bug here must not stop the daemon
            log.exception("serving a handed-off `mutualbackup run` failed")
        finally:
            self.clients.release()
            self.daemon.wake.set()

    def refusal(self, request: Request) -> str | None:
        """Why the daemon would not do what the command would (None: it would)."""
        daemon = self.daemon
        if request.inventory != self.inventory:
            return "this daemon serves another inventory"
        if daemon.stop.is_set():
            return "the daemon is stopping"
        if not daemon.reads_inventory_as_it_is():
            return "the daemon has not read the inventory as it is now (or found it invalid)"
        ctx = daemon.ctx
        state = request.state or ctx.federation.coordinator.state
        if os.path.realpath(state) != os.path.realpath(ctx.history.path.parent):
            return "this daemon uses another state directory"
        return None


class Served:
    """One command's request, from its reading to the exit code sent back."""

    def __init__(self, server: HandoffServer, connection: socket.socket) -> None:
        self.server, self.connection = server, connection
        self.daemon = server.daemon
        self.gone = threading.Event()  # the command closed its end (interrupted)
        self.current: JobControl | None = None
        self.lock = threading.Lock()

    def serve(self) -> None:
        connection = self.connection
        try:
            request = Request(_request_line(connection))
        except (OSError, ValueError):
            request = None
        if request is None:
            self.send({"refused": "not a request this daemon reads"})
            return
        refused = self.server.refusal(request)
        if refused:
            self.send({"refused": refused})
            return
        connection.settimeout(None)
        ctx = self.daemon.ctx  # the inventory as the check above found it (a reload replaces daemon.ctx, not this)
        self.send({"accepted": os.getpid()})
        log.info("running a `mutualbackup run` handed to the daemon: sources %s", request.sources or "all")
        threading.Thread(target=self._watch, name="handed-off run's command", daemon=True).start()
        from mutualbackup.jobs.foreground import back_up_now, exit_code

        try:
            outcomes = back_up_now(ctx, request.sources, request.replica, SocketReport(self, request), self.claim)
        except MutualBackupError as exc:
            self.send({"error": str(exc), "code": exc.exit_code})
            return
        except Exception:
            log.exception("a handed-off `mutualbackup run` failed")
            self.send({"error": "the daemon failed while running this command's backups: its log says why",
                       "code": 1})
            return
        self.send({"exit": exit_code(outcomes)})

    def _watch(self) -> None:
        """The command sends nothing after its request: anything, or its end, means it is gone."""
        with contextlib.suppress(OSError):
            self.connection.recv(1)
        self.gone.set()
        with self.lock:
            control = self.current
        if control is not None:
            stop(control)

    @contextlib.contextmanager
    def claim(self, source: str, target: str) -> Iterator[tuple[JobControl | None, str | None]]:
        """The daemon's slot for the replica ``source`` -> ``target`` while its backup runs (the scheduler's
        jobs take the same slots)."""
        from mutualbackup.daemon import RunningJob

        job = RunningJob("backup", source, target, "mutualbackup run", thread=threading.current_thread())
        refused = GONE if self.gone.is_set() else self.daemon.take_slot(job)
        if refused:
            yield None, refused
            return
        with self.lock:
            self.current = job.control
        if self.gone.is_set():
            stop(job.control)
        try:
            yield job.control, None
        finally:
            with self.lock:
                self.current = None
            self.daemon.give_slot_back(job)

    def send(self, message: dict[str, object]) -> None:
        """One message to the command; nothing when it is gone."""
        if not self.gone.is_set() and not _send(self.connection, message):
            self.gone.set()


def _request_line(connection: socket.socket) -> bytes:
    """The command's request: one line of at most :data:`REQUEST_LIMIT` bytes within :data:`READ_SECONDS`."""
    deadline = time.monotonic() + READ_SECONDS
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > REQUEST_LIMIT:
            raise ValueError("no request line in time")
        connection.settimeout(left)
        chunk = connection.recv(65536)
        if not chunk or b"\n" in chunk[:-1]:
            raise ValueError("not one request line")
        data += chunk
    return data


def stop(control: JobControl) -> None:
    """What the command's own Ctrl-C does to its job: the job is over, its connections closed (the node stops
    what runs there with them)."""
    control.abort(GONE)
    control.close_transports()


def _send(connection: socket.socket, message: dict[str, object]) -> bool:
    try:
        connection.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


class SocketReport:
    """:class:`mutualbackup.jobs.foreground.Report` for a command that handed its run over: each line it would
    have printed, sent to it."""

    def __init__(self, served: Served, request: Request) -> None:
        self.served, self.request = served, request

    def note(self, text: str) -> None:
        self.served.send({"err": text + "\n"})

    @contextlib.contextmanager
    def backing_up(self, source: str, target: str) -> Iterator[Callable[[borg.CreateProgress], None] | None]:
        if not self.request.progress:
            yield None
            return
        self.served.send({"started": [source, target]})
        last = [0.0]

        def progress(shown: borg.CreateProgress) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                self.served.send({"progress": [shown.files, shown.original_bytes, shown.deduplicated_bytes]})

        try:
            yield progress
        finally:
            self.served.send({"ended": True})

    def outcome(self, outcome: Outcome) -> None:
        from mutualbackup.report.text import print_backup

        self.served.send({"outcome": outcome.__dict__})
        if not self.request.json:
            out, err = io.StringIO(), io.StringIO()
            print_backup(outcome, out, err)
            self.served.send({key: text for key, text in (("out", out.getvalue()), ("err", err.getvalue())) if text})
