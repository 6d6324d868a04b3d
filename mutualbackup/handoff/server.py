"""The daemon's side: it runs the jobs of a ``mutualbackup run`` handed to it and sends back what to print.

A request is accepted only when the daemon would do exactly what the command would: the same version of
mutualbackup, the same inventory directory read as its files are now and found valid, the same state directory.
Otherwise it declines, saying why, and the command runs the jobs itself. The jobs then run in the daemon's
process, each in the daemon's own slot for its replica (so its scheduler does not start that replica meanwhile,
and its shutdown stops them as its own), through :func:`mutualbackup.jobs.foreground.back_up_now` as the command
runs them; the job's log records go to the command too, as its own logging would have printed them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from mutualbackup import __version__
from mutualbackup.errors import MutualBackupError
from mutualbackup.handoff import PROTOCOL, REQUEST_LIMIT, SOCKET, address, peer_user, private_directory, trusted
from mutualbackup.jobs.control import JobControl

if TYPE_CHECKING:
    from mutualbackup import borg
    from mutualbackup.context import Context
    from mutualbackup.daemon import Daemon
    from mutualbackup.jobs.backup import Outcome

log = logging.getLogger("mutualbackup.handoff")

READ_SECONDS = 5.0
"""How long a connected command may take to send its request."""
SEND_SECONDS = 30.0
"""How long a line may wait for a command that stopped reading (Ctrl-Z, a full pipe) before it counts as gone."""
MAX_CLIENTS = 32
"""Commands served at once; more are declined (they run their jobs themselves)."""
PROGRESS_EVERY = 0.2
"""Seconds between two progress messages (the command's progress line is drawn at most five times a second)."""
REFUSALS_LOGGED_EVERY = 60.0
"""A refused user's connections are logged once in this many seconds."""
GONE = "the operator's `mutualbackup run` ended (interrupted) before this backup did"


class Request:
    """What a command asks, checked field by field: anything else is declined."""

    FIELDS = {"sources": list, "replica": (str, type(None)), "json": bool, "progress": bool, "journal": bool,
              "inventory": str, "state": str, "state_named": bool}

    def __init__(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except RecursionError:
            raise ValueError("nested too deep") from None
        if not isinstance(message, dict) or set(message) != {"protocol", "version", "run"} \
                or message["protocol"] != PROTOCOL:
            raise ValueError("not a request of this protocol")
        self.version = message["version"]
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
        self.journal: bool = fields["journal"]
        self.inventory: str = fields["inventory"]
        self.state: str = fields["state"]
        self.state_named: bool = fields["state_named"]


class HandoffServer:
    """Listens on the state directory's :data:`~mutualbackup.handoff.SOCKET`; one thread per command."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.state = os.path.realpath(daemon.ctx.history.path.parent)
        self.listener: socket.socket | None = None
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._refusals_logged: dict[int, float] = {}

    def start(self) -> bool:
        """Listen (and accept in a thread); False, logged, when another daemon of this state answers there (or
        the socket cannot be made): runs are then not handed to this one, nothing else changes."""
        if not trusted(os.geteuid()):
            log.warning("`mutualbackup run` will run its jobs itself: this daemon's user is the overflow user")
            return False
        if not private_directory(self.state):
            log.warning("`mutualbackup run` will run its jobs itself, not in this daemon: its state directory %s is "
                        "not its own or others may write it (chmod 700 it)", self.state)
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with address(self.state) as where:
                if _answers(where):
                    raise OSError(f"another daemon of this state answers on {SOCKET}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(where)  # a socket left by a daemon that was killed
                listener.bind(where)
                os.chmod(where, 0o600)  # before anyone can connect (listen)
                listener.listen(16)
        except OSError as exc:
            listener.close()
            log.warning("`mutualbackup run` will run its jobs itself, not in this daemon: %s", exc)
            return False
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="handoff", daemon=True).start()
        return True

    def close(self) -> None:
        """Accept no more commands (those being served finish with the daemon's jobs); the socket is removed."""
        listener, self.listener = self.listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError), address(self.state) as where:
            os.unlink(where)
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                connection, _ = listener.accept()
            except OSError as exc:
                if self.listener is not listener:
                    return  # closed
                log.warning("cannot accept a handed-off `mutualbackup run`: %s", exc)
                time.sleep(0.5)  # out of file descriptors, say: try again
                continue
            try:
                self._take(connection)
            except Exception:  # noqa: BLE001 - no thread to be had (TasksMax), say: this command runs its jobs itself
                log.exception("cannot serve a handed-off `mutualbackup run`")
                connection.close()

    def _take(self, connection: socket.socket) -> None:
        """One command's connection: refused, or served in a thread of its own."""
        try:
            uid = peer_user(connection)
        except OSError:
            connection.close()
            return
        if not trusted(uid):
            self._log_refusal(uid)
            connection.close()
            return
        if not self.clients.acquire(blocking=False):
            _send(connection, {"refused": f"the daemon serves {MAX_CLIENTS} commands already"})
            connection.close()
            return
        try:
            threading.Thread(target=self._serve, args=(connection,), name="handed-off run", daemon=True).start()
        except BaseException:
            self.clients.release()
            raise

    def _log_refusal(self, uid: int) -> None:
        now = time.monotonic()
        if now - self._refusals_logged.get(uid, -REFUSALS_LOGGED_EVERY) >= REFUSALS_LOGGED_EVERY:
            self._refusals_logged[uid] = now
            log.warning("a process of user %d asked this daemon to run a backup: refused (only its own user and root "
                        "may; logged once a minute)", uid)

    def _serve(self, connection: socket.socket) -> None:
        served = Served(self, connection)
        try:
            served.serve()
        except Exception:  # a bug here must not stop the daemon
            log.exception("serving a handed-off `mutualbackup run` failed")
        finally:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)  # wakes the watcher
            served.finished.set()
            if served.watcher is not None:
                served.watcher.join()
            connection.close()
            self.clients.release()
            self.daemon.wake.set()

    def accepts(self, request: Request) -> tuple[Context | None, str | None]:
        """The context to run ``request`` in, when the daemon would do what the command would; else why not."""
        if request.version != __version__:
            return None, f"this daemon is mutualbackup {__version__}, the command {request.version}"
        if os.path.realpath(request.state) != self.state:
            return None, "this daemon uses another state directory"
        ctx = self.daemon.inventory_as_it_is()
        if self.daemon.stop.is_set():
            return None, "the daemon is stopping"
        if ctx is None:
            return None, "the daemon has not read the inventory as it is now (or found it invalid)"
        if request.inventory != os.path.realpath(ctx.federation.directory):
            return None, "this daemon serves another inventory"
        if not request.state_named and os.path.realpath(ctx.federation.coordinator.state) != self.state:
            return None, "the inventory names another state directory"
        return ctx, None


class Served:
    """One command's request, from its reading to the exit code sent back."""

    def __init__(self, server: HandoffServer, connection: socket.socket) -> None:
        self.server, self.connection = server, connection
        self.daemon = server.daemon
        self.gone = threading.Event()  # the command closed its end (interrupted), or stopped reading
        self.finished = threading.Event()
        self.watcher: threading.Thread | None = None
        self.current: JobControl | None = None
        self.lock = threading.Lock()
        self.sending = threading.Lock()

    def serve(self) -> None:
        try:
            request: Request | None = Request(_request_line(self.connection))
        except (OSError, ValueError):
            request = None
        self.connection.settimeout(SEND_SECONDS)
        if request is None:
            self.send({"refused": "not a request this daemon reads"})
            return
        ctx, refused = self.server.accepts(request)
        if ctx is None:
            self.send({"refused": refused})
            return
        self.send({"accepted": os.getpid()})
        if self.gone.is_set():
            return  # the command gave up waiting (and runs its jobs itself)
        log.info("running a `mutualbackup run` handed to the daemon: %s", f"{len(request.sources)} source(s)"
                 if request.sources else "every source")
        self.watcher = threading.Thread(target=self._watch, name="handed-off run's command", daemon=True)
        self.watcher.start()
        from mutualbackup.jobs.foreground import back_up_now, exit_code

        forward = _Forward(self, threading.get_ident(), request.journal)
        logging.getLogger().addHandler(forward)
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
        finally:
            logging.getLogger().removeHandler(forward)
        self.send({"exit": exit_code(outcomes)})

    def _watch(self) -> None:
        """The command sends nothing after its request: anything, or its end, means it is gone."""
        poller = select.poll()  # not select(): a descriptor above 1024 is fine
        poller.register(self.connection, select.POLLIN)
        while not self.finished.is_set():
            try:
                if poller.poll(1000) and not self.finished.is_set():
                    self.connection.recv(1, socket.MSG_DONTWAIT)
                    break
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                break
        if not self.finished.is_set():
            self.gone_now()

    def gone_now(self) -> None:
        """The command is gone: its job is stopped, and no other starts."""
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

    def send(self, message: dict[str, object], *, droppable: bool = False) -> None:
        """One message to the command; nothing once it is gone. A ``droppable`` one (progress) is dropped
        rather than waited for when the command is not reading; any other waits at most :data:`SEND_SECONDS`,
        then the command counts as gone."""
        if self.gone.is_set():
            return
        line = json.dumps(message).encode() + b"\n"
        with self.sending:
            if droppable:
                poller = select.poll()
                poller.register(self.connection, select.POLLOUT)
                if not poller.poll(0):
                    return  # the command is not reading now: this progress is dropped, the next one will do
            ok = _send_rest(self.connection, line)
        if not ok:
            self.gone_now()


class _Forward(logging.Handler):
    """The job's log records (its thread's, INFO and up), sent to the command for its stderr. Other threads'
    records are filtered out before the handler's lock is taken: a command slow to read holds up its own job's
    logging only, never the daemon's."""

    def __init__(self, served: Served, thread: int, journal: bool) -> None:
        from mutualbackup.cli import log_formatter

        super().__init__(logging.INFO)
        self.served, self.thread = served, thread
        self.addFilter(lambda record: record.thread == self.thread and record.name != log.name)
        self.setFormatter(log_formatter(journal=journal))  # as the command's own logging would write them

    def emit(self, record: logging.LogRecord) -> None:
        self.served.send({"log": self.format(record)})


def stop(control: JobControl) -> None:
    """What the command's own Ctrl-C does to its job: the job is over, its connections closed (the node stops
    what runs there with them)."""
    control.abort(GONE)
    control.close_transports()


def _answers(where: str) -> bool:
    """Whether a daemon listens at ``where`` now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(where)
        except OSError:
            return False
    return True


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


def _send(connection: socket.socket, message: dict[str, object]) -> bool:
    connection.settimeout(SEND_SECONDS)
    return _send_rest(connection, json.dumps(message).encode() + b"\n")


def _send_rest(connection: socket.socket, line: bytes) -> bool:
    try:
        connection.sendall(line)
    except OSError:  # gone, or not reading for SEND_SECONDS (socket.timeout)
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
                self.served.send({"progress": [shown.files, shown.original_bytes, shown.deduplicated_bytes]},
                                 droppable=True)

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
