"""Remote commands that die with the coordinator's session and can be stopped on request.

Closing an SSH channel does not signal a command that has no terminal: a borg
left behind by a killed coordinator would run on, holding the repository lock.
So long commands (``before:`` commands, borg create, prune, check, compact) run
under a small POSIX ``sh`` wrapper on the node that

- starts the command in the background and writes ``PID``, the coordinator's
  run id and the process start time (``ps -o lstart``) to a pidfile;
- sends an empty line to stderr every few seconds; when the write fails (the
  session is gone: the coordinator died or the connection dropped) it stops
  the command: SIGINT (borg writes a checkpoint), then SIGTERM, then SIGKILL;
- waits for the command, removes the pidfile and exits with its status.

:func:`stop_remote` stops such a command through a new connection (the
daemon's abort on SIGTERM, or the clean-up of a run left by a dead
coordinator); it signals the pid only while it is still the process that was
started (same start time), never a reused pid.

Argv builders and the pidfile parser are pure; :func:`run_supervised` and
:func:`stop_remote` go through a :class:`~mutualbackup.remote.transport.Transport`.
"""

from __future__ import annotations

import posixpath
import threading
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from mutualbackup.inventory.model import Node
from mutualbackup.remote.transport import Result, Transport

HEARTBEAT_SECONDS = 2
"""How often the wrapper checks that the coordinator's session is still there."""

ORPHAN_INT_SECONDS = 60
"""When the session is gone: how long the wrapper waits after SIGINT before SIGTERM."""

RUN_DIR = "run"
"""Under a node's workdir: pidfiles of supervised commands."""

_SUPERVISE = r"""pidfile=$1 run=$2 beat=$3 grace=$4
shift 4
mkdir -p -m 700 -- "${pidfile%/*}" 2>/dev/null
"$@" &
pid=$!
started=$(ps -o lstart= -p "$pid" 2>/dev/null)
printf '%s\n%s\n%s\n' "$pid" "$run" "$started" > "$pidfile.tmp" && mv -f -- "$pidfile.tmp" "$pidfile"
(
  trap '' PIPE
  while kill -0 "$pid" 2>/dev/null; do
    sleep "$beat" </dev/null >/dev/null 2>&1
    printf '\n' >&2 || break
  done
  n=0
  for sig in INT TERM KILL; do
    kill -0 "$pid" 2>/dev/null || exit 0
    kill -"$sig" "$pid" 2>/dev/null
    n=0
    while kill -0 "$pid" 2>/dev/null && [ "$n" -lt "$grace" ]; do
      sleep 1 </dev/null >/dev/null 2>&1; n=$((n + 1))
    done
    grace=10
  done
) </dev/null >/dev/null &
watchdog=$!
wait "$pid"
code=$?
kill "$watchdog" 2>/dev/null
rm -f -- "$pidfile"
exit "$code"
"""

_STOP = r"""pidfile=$1
{ read -r pid; read -r run; read -r started; } < "$pidfile" 2>/dev/null || exit 0
case $pid in ''|*[!0-9]*) rm -f -- "$pidfile"; exit 0 ;; esac
same() { kill -0 "$pid" 2>/dev/null && [ "$(ps -o lstart= -p "$pid" 2>/dev/null)" = "$started" ]; }
gone() { n=0; while same && [ "$n" -lt "$1" ]; do sleep 1; n=$((n + 1)); done; ! same; }
if ! same; then rm -f -- "$pidfile"; echo "not running"; exit 0; fi
kill -INT "$pid" 2>/dev/null; if gone "$2"; then echo "stopped by SIGINT"; exit 0; fi
kill -TERM "$pid" 2>/dev/null; if gone "$3"; then echo "stopped by SIGTERM"; exit 0; fi
kill -KILL "$pid" 2>/dev/null; if gone 5; then echo "stopped by SIGKILL"; exit 0; fi
echo "pid $pid does not die"
exit 1
"""


def pidfile_path(workdir: str, peer: str) -> str:
    """The pidfile of the supervised job of this node with ``peer`` (``MEMBER/NODE``).

    ``.`` cannot occur in a slug, so ``MEMBER.NODE`` names the peer unambiguously.
    """
    return posixpath.join(workdir, RUN_DIR, peer.replace("/", ".") + ".pid")


def supervised_argv(
    pidfile: str, run_id: int, argv: Sequence[str], *, heartbeat: int = HEARTBEAT_SECONDS, grace: int = ORPHAN_INT_SECONDS
) -> tuple[str, ...]:
    """``argv`` wrapped so that it writes ``pidfile`` and dies with the session (see the module notes)."""
    return ("sh", "-c", _SUPERVISE, "sh", pidfile, str(run_id), str(heartbeat), str(grace), *argv)


def unwrap(argv: Sequence[str]) -> tuple[tuple[str, ...], str | None, int | None]:
    """(inner argv, pidfile, run id) of a supervised argv; (argv, None, None) for any other argv."""
    argv = tuple(argv)
    if len(argv) >= 8 and argv[:4] == ("sh", "-c", _SUPERVISE, "sh"):
        return argv[8:], argv[4], int(argv[5])
    return argv, None, None


def stop_argv(pidfile: str, int_seconds: int, term_seconds: int) -> tuple[str, ...]:
    """Stop the command of ``pidfile``: SIGINT, then SIGTERM after ``int_seconds``, SIGKILL after ``term_seconds`` more.

    Exit 0 when nothing of it is left running (stdout says how it ended), 1 when it does not die.
    """
    return ("sh", "-c", _STOP, "sh", pidfile, str(int_seconds), str(term_seconds))


def is_stop(argv: Sequence[str]) -> bool:
    return len(argv) >= 3 and tuple(argv[:3]) == ("sh", "-c", _STOP)


@dataclass(frozen=True)
class PidFile:
    pid: int
    run_id: int | None
    started: str


def parse_pidfile(data: bytes) -> PidFile | None:
    """The content of a pidfile, or None when it is empty or garbled."""
    lines = data.decode("utf-8", "replace").split("\n")
    if not lines or not lines[0].strip().isdigit():
        return None
    run = lines[1].strip() if len(lines) > 1 else ""
    return PidFile(int(lines[0]), int(run) if run.isdigit() else None, lines[2].strip() if len(lines) > 2 else "")


def without_heartbeats(result: Result) -> Result:
    """``result`` with the wrapper's empty heartbeat lines removed from stderr."""
    lines = [line for line in result.stderr.split(b"\n") if line.strip()]
    return replace(result, stderr=b"\n".join(lines) + (b"\n" if lines else b""))


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
        with self._lock:
            self._transports.append(transport)

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


def run_supervised(
    transport: Transport,
    node: Node,
    pidfile: str,
    run_id: int,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    control: JobControl | None = None,
) -> Result:
    """Run ``argv`` on ``node`` under the wrapper; the Result has no heartbeat lines.

    Raises what :meth:`Transport.run` raises (TransportError when the node cannot be reached).
    """
    if control is not None:
        control.running_on(node, pidfile)
    try:
        result = transport.run(supervised_argv(pidfile, run_id, argv), env=env, cwd=cwd, timeout=timeout)
    finally:
        if control is not None:
            control.running_on(None)
    return replace(without_heartbeats(result), argv=tuple(argv))


def stop_remote(transport: Transport, pidfile: str, *, int_seconds: int = 20, term_seconds: int = 10) -> Result:
    """Stop the supervised command of ``pidfile`` on the transport's node; see :func:`stop_argv`."""
    return transport.run(stop_argv(pidfile, int_seconds, term_seconds), timeout=int_seconds + term_seconds + 30)
