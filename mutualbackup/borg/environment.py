"""The environment of every borg the coordinator starts: no prompts, modern exit codes, UTC, and
an ssh that accepts only pinned host keys. Pure; nothing here is secret."""

from __future__ import annotations

import posixpath
import shlex

from mutualbackup.borg.repository import BASE_DIR, SourcePaths


def base_env() -> dict[str, str]:
    """Environment for every borg run: no prompts, modern exit codes, UTC, UTF-8."""
    return {
        "BORG_EXIT_CODES": "modern",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
        "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO",
        "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "NO",
        "BORG_DISPLAY_PASSPHRASE": "no",
    }


def client_env(paths: SourcePaths) -> dict[str, str]:
    """Environment for borg run on a source as a client of its repositories.

    Nothing here is secret: the passphrase is read by borg itself from the 0600
    file through ``BORG_PASSCOMMAND``; it never crosses the coordinator.
    """
    rsh = ssh_command(paths.key, paths.known_hosts)
    env = base_env()
    env.update(
        {
            "BORG_RSH": rsh,
            "BORG_PASSCOMMAND": shlex.join(["cat", paths.passphrase]),
            "BORG_BASE_DIR": paths.base_dir,
        }
    )
    return env


def host_env(workdir: str) -> dict[str, str]:
    """Environment for borg run on a host, on its own repositories (no key needed)."""
    env = base_env()
    env["BORG_BASE_DIR"] = posixpath.join(workdir, BASE_DIR)
    return env


def ssh_command(key: str, known_hosts: str) -> str:
    """``BORG_RSH``: ssh with only ``key``, only the pinned ``known_hosts``, and no config files.

    ``-F /dev/null`` keeps a user's or the system's ssh_config out (ControlMaster could
    reuse an unrestricted connection; UpdateHostKeys or KnownHostsCommand could accept
    what a server presents). borg splits the value with shlex, ssh splits option
    values on spaces unless double-quoted: both are handled here.
    """
    return shlex.join(ssh_words(key, known_hosts))


def ssh_words(key: str, known_hosts: str) -> list[str]:
    """The words of :func:`ssh_command`."""
    return (
        [
            "ssh",
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-i", key,
            "-o", f'UserKnownHostsFile="{known_hosts}"',
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UpdateHostKeys=no",
            "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=30",
            "-o", "ConnectTimeout=20",
        ]
    )
