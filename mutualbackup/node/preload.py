"""borg started while the request is checked: its start (about 0.15 s of imports) overlaps the node program's own.

``serve`` knows, before it has imported its handlers or verified the member's signed file, that a request is a
backup and which borg and environment it will run (the node's configuration alone says). It starts borg's own
Python on ``scripts/borg_preload.py`` then: that process imports borg and waits at a gate, a pipe only this
process writes. When the handler runs borg with that program and that environment (and nothing else: no
stdin, no extra descriptor), :class:`~mutualbackup.node.system.LocalSystem` hands the command line (and the
working directory) through the gate and supervises that process as it would a new one (the pidfile names it: it
*is* borg from then on). Otherwise the gate is closed empty and the process killed: it ran nothing.

Only borg's console script as pip and Debian write it (``#!PYTHON`` then ``from borg.archiver import main``)
is started this way; any other ``borg`` (a single-file binary, a wrapper) is run as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: all this runs before borg may start
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_SCRIPT_LIMIT = 4096


class Preloaded:
    """One borg started early, waiting at its gate."""

    def __init__(self, program: str, env: Mapping[str, str], process: subprocess.Popen[bytes], gate: int) -> None:
        self.program = program
        self.env = dict(env)
        self.process = process
        self._gate: int | None = gate

    def fits(self, argv: Sequence[str], env: Mapping[str, str], stdin: bytes | None, pass_fds: Sequence[int]) -> bool:
        """Whether running ``argv`` so would be what this process was started for."""
        return (self._gate is not None and bool(argv) and argv[0] == self.program and dict(env) == self.env
                and stdin is None and not pass_fds)

    def release(self, argv: Sequence[str], cwd: str | None = None) -> subprocess.Popen[bytes]:
        """Open the gate with ``argv`` (run in ``cwd``): the process becomes that borg."""
        gate, self._gate = self._gate, None
        assert gate is not None
        try:
            os.write(gate, json.dumps({"argv": list(argv), "cwd": cwd}).encode())  # far below a pipe's buffer
        finally:
            os.close(gate)
        return self.process

    def discard(self) -> None:
        """Not needed: end it (it has run nothing of borg) and close the gate."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        os.close(gate)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def command_for(kind: str, args: Mapping[str, object]) -> str | None:
    """borg's command when the request ``kind`` (its arguments as sent, not yet checked) will run borg as a source
    runs it, with the source's own environment: a backup, and a restore onto the source itself (a restore onto
    another node runs borg with a passphrase on a pipe: another environment). None for every other request."""
    if kind == "backup":
        return "create"
    if kind == "extract" and not args.get("sealed"):
        return "extract"
    return None


def base_environment() -> dict[str, str]:
    """A child's environment: the node's PATH and HOME, nothing the coordinator could have set."""
    keep = ("PATH", "HOME", "USER", "LOGNAME")
    base = {name: os.environ[name] for name in keep if name in os.environ}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return base


def start(program: str, env: Mapping[str, str], command: str) -> Preloaded | None:
    """borg ``program`` started with ``env`` and waiting at its gate; None when ``program`` is not borg's console
    script (it then runs as before), or it could not be started. ``command`` (borg's, e.g. ``create``) only
    ends the process's command line, for whoever looks at ``ps``: ``PYTHON -I …/borg_preload.py GATE
    /usr/bin/borg create``."""
    python = python_of(program, env.get("PATH", os.defpath))
    if python is None:
        return None
    from mutualbackup.scripts import path

    read, write = os.pipe()
    try:
        process = subprocess.Popen(
            [python, "-I", path("borg_preload.py"), str(read), program, command], env=dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            pass_fds=(read,),
        )
    except OSError:
        os.close(write)
        return None
    finally:
        os.close(read)
    return Preloaded(program, env, process, write)


def python_of(program: str, path: str) -> str | None:
    """The interpreter of borg's console script ``program`` (found on ``path`` as ``Popen`` would find it), or
    None when it is not one."""
    import shutil

    found = shutil.which(program, path=path) if os.sep not in program else program
    if found is None:
        return None
    try:
        with open(found, "rb") as handle:
            head = handle.read(_SCRIPT_LIMIT)
    except OSError:
        return None
    first, _, rest = head.partition(b"\n")
    python = first[2:].strip().decode("utf-8", "replace") if first.startswith(b"#!") else ""
    if not python.startswith("/") or " " in python or b"from borg.archiver import main" not in rest:
        return None
    return python if os.access(python, os.X_OK) else None
