"""borg started while the request is checked: its start (about 0.15 s of imports) overlaps the node program's own.

``serve`` knows, before it has imported its handlers or verified the member's signed file, that a request will
run borg as a source runs it, and which borg with which environment (the node's configuration alone says). It
starts borg's own Python on ``scripts/borg_preload.py`` then: that process imports borg, says it is ready, and
waits at a gate, a pipe only this process writes. When the handler runs borg with that program and that
environment (and nothing else: no stdin, no extra descriptor), :class:`~mutualbackup.node.system.LocalSystem`
waits for it to be ready and hands it the command line and the working directory through the gate, and
supervises it as it would a new process (the pidfile names it: it *is* borg from then on). A restore onto
another node runs borg with another environment, in the keys borg reads only once it runs (:data:`AT_RUN`: its
ssh command, its base directory, where its passphrase comes from), and its passphrase on a pipe: the gate then
carries that environment too, stays open, and the passphrase written to the pipe is relayed onto it (borg reads
it there, ``BORG_PASSPHRASE_FD``). A preloader that
could not import borg (a memory limit, a broken install) is never handed anything: borg is started as before.
When no run fits (the request was refused, or runs no borg) it is killed: it ran nothing.

Only borg's console script as pip and Debian write it (``#!/path/to/pythonX.Y`` then ``from borg.archiver
import main``) is started this way; any other ``borg`` (a single-file binary, a shell wrapper, pip's ``/bin/sh``
launcher for long paths) is run as before.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: all this runs before borg may start
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

HINT = "SSH_ORIGINAL_COMMAND"
"""What the coordinator asked sshd to run (``mutualbackup-node serve KIND``, kept by the node's sudo rule): a hint
of the request to come, before it is read. Only ever a hint: the request itself decides everything."""
HINTED = {"backup": "create", "extract": "extract"}
"""The requests whose borg starts on the hint."""
READY_SECONDS = 120.0  # borg imports in a fraction of a second; a node this slow starts borg as before
AT_RUN = frozenset({"BORG_RSH", "BORG_BASE_DIR", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD"})
"""The environment borg 1.4 (the borg this product requires) reads only once it runs, never while it imports: a
run may change these. What borg reads while it imports (``BORG_EXIT_CODES``, ``BORG_WORKAROUNDS``,
``BORG_HOST_ID``, ``LD_PRELOAD``) must never be added here."""
_SCRIPT_LIMIT = 4096
_PYTHON = re.compile(r"python[0-9.]*")


class Preloaded:
    """One borg started early, waiting at its gate."""

    def __init__(self, program: str, env: Mapping[str, str], process: subprocess.Popen[bytes], gate: int,
                 ready: int, command: str = "create") -> None:
        self.program = program
        self.command = command  # borg's, as `ps` shows it
        self.env = dict(env)
        self.process = process
        self._gate: int | None = gate
        self._ready = ready

    def fits(self, argv: Sequence[str], env: Mapping[str, str], stdin: bytes | None, pass_fds: Sequence[int]) -> bool:
        """Whether running ``argv`` so would be what this process was started for: the same program and environment,
        no stdin, no descriptor; or, for an extract, an environment that differs only in :data:`AT_RUN` and one
        descriptor, the passphrase's (``BORG_PASSPHRASE_FD``)."""
        if self._gate is None or not argv or argv[0] != self.program or stdin is not None:
            return False
        env = dict(env)
        if env == self.env:
            return not pass_fds
        changed = {name for name in env.keys() | self.env.keys() if env.get(name) != self.env.get(name)}
        return (self.command == "extract" and changed <= AT_RUN and len(pass_fds) == 1
                and env.get("BORG_PASSPHRASE_FD") == str(pass_fds[0]))

    def release(self, argv: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
                pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes] | None:
        """Once it has imported borg, open the gate with ``argv`` (run in ``cwd``): the process becomes that borg.
        None (and the process ended) when it could not import borg: the caller starts borg itself. ``env`` and
        ``pass_fds``: a run that :meth:`fits` with another environment and its passphrase's pipe, whose content is
        relayed onto the gate."""
        ready, _, _ = select.select([self._ready], [], [], READY_SECONDS)
        if not ready or os.read(self._ready, 1) != b"r":
            self.discard()
            return None
        other = env is not None and dict(env) != self.env
        try:
            relayed = os.dup(pass_fds[0]) if other and pass_fds else None  # the caller closes its own
        except OSError:
            self.discard()
            return None
        gate, self._gate = self._gate, None
        assert gate is not None
        header = json.dumps({"argv": list(argv), "cwd": cwd, "env": dict(env) if other else None,  # type: ignore[arg-type]
                             "passphrase_on_gate": relayed is not None}).encode()
        data = b"%08x" % len(header) + header
        try:
            while data:  # it reads the header at once: a long command line never blocks for long
                data = data[os.write(gate, data):]
        except OSError:  # it died since: what it said is what the run reports
            pass
        finally:
            os.close(self._ready)
            if relayed is None:
                os.close(gate)
        if relayed is not None:
            import threading

            threading.Thread(target=_relay, args=(relayed, gate), name="passphrase relay", daemon=True).start()
        return self.process

    def discard(self) -> None:
        """Not needed: end it (it has run nothing of borg) and close the gate."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        os.close(gate)
        os.close(self._ready)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _relay(source: int, gate: int) -> None:
    """What is written to the passphrase's pipe, onto the gate (borg reads it there), then the gate closed."""
    try:
        while chunk := os.read(source, 1 << 16):
            while chunk:
                chunk = chunk[os.write(gate, chunk):]
    except OSError:  # borg ended without reading it
        pass
    finally:
        os.close(source)
        os.close(gate)


def command_for(kind: str, args: Mapping[str, object], node: str) -> str | None:
    """borg's command when the request ``kind`` (its arguments as sent, not yet checked) will run borg on
    ``node``: a backup, and a restore onto ``node`` (of itself, as a source runs it; of another node, with a
    sealed passphrase, the environment changed at the gate). None for every other request."""
    if kind == "backup":
        return "create"
    if kind == "extract" and (args.get("sealed") or args.get("source") == node):
        return "extract"
    return None


def on_hint(config_dir: str | None) -> Preloaded | None:
    """borg started now, before the request is read, when the coordinator's SSH command says a backup or a restore
    comes (:data:`HINT`, then removed from this process's environment): from ``node.json`` alone, as root, before
    the node program imports anything else. The request decides later whether it is used."""
    hint = os.environ.pop(HINT, "").split()
    command = HINTED.get(hint[2]) if len(hint) == 3 and hint[:2] == ["mutualbackup-node", "serve"] else None
    if os.geteuid() != 0 or command is None:
        return None
    from mutualbackup.node.config_file import ConfigError, borg_program, config_directory, read_config

    try:
        data = read_config(config_directory(config_dir))
    except ConfigError:
        return None  # serve says what is wrong, once the request is read
    state = data.get("state")
    return for_source(borg_program(data), state, command) if isinstance(state, str) else None


def for_source(program: str, workdir: str, command: str) -> Preloaded | None:
    """borg ``program`` started early for its ``command``, with the environment of borg run by a source whose
    state is ``workdir`` (see :func:`start`)."""
    from mutualbackup import borg

    return start(program, {**base_environment(), **borg.client_env(borg.SourcePaths(workdir=workdir))}, command)


def base_environment() -> dict[str, str]:
    """A child's environment: the node's PATH and HOME, nothing the coordinator could have set."""
    keep = ("PATH", "HOME", "USER", "LOGNAME")
    base = {name: os.environ[name] for name in keep if name in os.environ}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return base


def start(program: str, env: Mapping[str, str], command: str) -> Preloaded | None:
    """borg ``program`` started with ``env`` and waiting at its gate; None when ``program`` is not borg's console
    script (it then runs as before), or it could not be started. ``command`` (borg's, e.g. ``create``) only
    ends the process's command line, for whoever looks at ``ps``: ``PYTHON -I …/borg_preload.py GATE READY
    /usr/bin/borg create``."""
    found = console_script(program, env.get("PATH", os.defpath))
    if found is None:
        return None
    script, python = found
    from mutualbackup.scripts import path

    gate_read, gate = os.pipe()
    ready, ready_write = os.pipe()
    try:
        process = subprocess.Popen(
            [python, "-I", path("borg_preload.py"), str(gate_read), str(ready_write), script, command],
            env=dict(env), cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, pass_fds=(gate_read, ready_write),
        )
    except OSError:
        os.close(gate)
        os.close(ready)
        return None
    finally:
        os.close(gate_read)
        os.close(ready_write)
    return Preloaded(program, env, process, gate, ready, command)


def console_script(program: str, path: str) -> tuple[str, str] | None:
    """(its absolute path, its Python) when ``program`` (found on ``path`` as ``Popen`` would find it) is borg's
    console script; None otherwise."""
    if os.sep in program:
        found: str | None = program
    else:
        import shutil

        found = shutil.which(program, path=path)
    if found is None or not os.path.isabs(found):
        return None
    try:
        with open(found, "rb") as handle:
            head = handle.read(_SCRIPT_LIMIT)
    except OSError:
        return None
    first, _, rest = head.partition(b"\n")
    python = first[2:].strip().decode("utf-8", "replace") if first.startswith(b"#!") else ""
    if (not python.startswith("/") or " " in python or not _PYTHON.fullmatch(os.path.basename(python))
            or b"from borg.archiver import main" not in rest):
        return None
    return (found, python) if os.access(python, os.X_OK) else None
