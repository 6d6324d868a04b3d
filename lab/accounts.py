"""What a lab needs of this machine as a real node would have it: an unprivileged login, paths it can reach.

Every lab node's coordinator and peers log in as :data:`LAB_USER` (one account for all nodes: each
node's sshd has its own ``authorized_keys`` file); the node program reaches root through the sudo
rule ``mutualbackup-node join`` installs. When the process ends, the lab removes the sudo rules it
installed. It leaves the account (a system user without password, ``userdel mutualbackup-lab``
removes it) and the traversal bit (o+x) it added to the directories above the lab and the
interpreter: labs of several processes at once (the demo beside the tests) would otherwise pull
them from under each other.
"""

from __future__ import annotations

import atexit
import os
import pwd
import stat
import subprocess
import sys
import threading
from pathlib import Path

LAB_USER = "mutualbackup-lab"
LAB_HOME = "/var/lib/mutualbackup-lab"

_lock = threading.Lock()
_sudoers: set[str] = set()


def lab_account() -> pwd.struct_passwd:
    """The lab's unprivileged login, made once (its password field ``*``: a key login, not a locked account)."""
    with _lock:
        try:
            return pwd.getpwnam(LAB_USER)
        except KeyError:
            pass
        subprocess.run(["useradd", "--system", "--home-dir", LAB_HOME, "--create-home", "--shell", "/bin/sh",
                        "--password", "*", LAB_USER], check=True, capture_output=True)
        return pwd.getpwnam(LAB_USER)


def give(path: Path, mode: int = 0o700) -> None:
    """Make ``path`` (a directory, or a file) belong to the lab's login."""
    account = lab_account()
    os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(path, mode)


def reachable(*paths: Path | str) -> None:
    """Let the lab's login traverse every directory above ``paths`` (adds o+x where missing)."""
    with _lock:
        for path in paths:
            for directory in [Path(path).resolve(), *Path(path).resolve().parents]:
                if not directory.is_dir():
                    continue
                mode = stat.S_IMODE(directory.stat().st_mode)
                if not mode & stat.S_IXOTH:
                    os.chmod(directory, mode | stat.S_IXOTH)


def sudoers_file(name: str) -> str:
    """A path in /etc/sudoers.d for one lab node's rule (no dot: sudo would skip it), removed at exit."""
    path = f"/etc/sudoers.d/mutualbackup-lab-{os.getpid()}-{name}"
    with _lock:
        if not _sudoers:
            _sweep()
        _sudoers.add(path)
    return path


def _sweep() -> None:
    """Remove the rules of lab processes that died without cleaning up (killed): their PID is gone."""
    for path in Path("/etc/sudoers.d").glob("mutualbackup-lab-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


def the_python() -> list[Path]:
    """The interpreter and virtualenv this lab's nodes run (the lab's login must reach them)."""
    return [Path(sys.executable), Path(sys.executable).resolve(), Path(sys.prefix)]


def undo() -> None:
    """Remove the sudo rules this process installed."""
    with _lock:
        for path in sorted(_sudoers):
            Path(path).unlink(missing_ok=True)
        _sudoers.clear()


atexit.register(undo)
