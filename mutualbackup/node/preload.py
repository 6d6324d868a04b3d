"""borg started while the request is checked: its start (about 0.15 s of imports) overlaps the node program's own.

``serve`` knows, before it has imported its handlers or verified the member's signed file, that a request will
run borg as a source runs it, and which borg with which environment (the node's configuration alone says). It
starts borg's own Python on ``scripts/borg_preload.py`` then: that process imports borg, says it is ready, and
waits at a gate, a pipe only this process writes. When the handler runs borg with that program and that
environment (and nothing else: no stdin, no extra descriptor), :class:`~mutualbackup.node.system.LocalSystem`
waits for it to be ready and hands it the command line and the working directory through the gate, and
supervises it as it would a new process (the pidfile names it: it *is* borg from then on). A preloader that
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
"""The requests whose borg starts on the hint (an extract's only fits a restore of this node onto itself)."""
READY_SECONDS = 120.0  # borg imports in a fraction of a second; a node this slow starts borg as before
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
        """Whether running ``argv`` so would be what this process was started for."""
        return (self._gate is not None and bool(argv) and argv[0] == self.program and dict(env) == self.env
                and stdin is None and not pass_fds)

    def release(self, argv: Sequence[str], cwd: str | None = None) -> subprocess.Popen[bytes] | None:
        """Once it has imported borg, open the gate with ``argv`` (run in ``cwd``): the process becomes that borg.
        None (and the process ended) when it could not import borg: the caller starts borg itself."""
        ready, _, _ = select.select([self._ready], [], [], READY_SECONDS)
        if not ready or os.read(self._ready, 1) != b"r":
            self.discard()
            return None
        gate, self._gate = self._gate, None
        assert gate is not None
        data = json.dumps({"argv": list(argv), "cwd": cwd}).encode()
        try:
            while data:  # it reads the gate to its end now: a long command line never blocks for long
                data = data[os.write(gate, data):]
        except OSError:  # it died since: what it said is what the run reports
            pass
        finally:
            os.close(gate)
            os.close(self._ready)
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


def command_for(kind: str, args: Mapping[str, object], node: str) -> str | None:
    """borg's command when the request ``kind`` (its arguments as sent, not yet checked) will run borg on
    ``node`` as a source runs it, with the source's own environment: a backup, and a restore of ``node`` onto
    itself (a restore onto another node runs borg with a passphrase on a pipe: another environment). None for
    every other request."""
    if kind == "backup":
        return "create"
    if kind == "extract" and not args.get("sealed") and args.get("source") == node:
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
