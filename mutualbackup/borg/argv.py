"""Every borg command line, as an argv tuple: the only place one is built.

Pure: nothing here starts a process; tests assert the exact argv. Client commands run on a
source (or a restore's destination) with a URL; host commands run on the host with the
repository's path and need no key.
"""

from __future__ import annotations

from typing import Sequence

from mutualbackup.borg.repository import path_pattern
from mutualbackup.inventory.model import Backup, Retention


LOCK_WAIT = 600  # seconds; longer than the ssh keepalive (10 s x 30)


def init_argv(borg: str, url: str) -> tuple[str, ...]:
    return (borg, "init", "--encryption=repokey-blake2", url)


def create_argv(borg: str, url: str, archive: str, backup: Backup, *, progress: bool = False) -> tuple[str, ...]:
    """``progress``: borg also reports on stderr as it goes (JSON ``archive_progress`` lines, for a terminal)."""
    argv: list[str] = [
        borg, "create", "--json", "--log-json", *(["--progress"] if progress else []), "--lock-wait", str(LOCK_WAIT),
        "--compression", backup.compression,
    ]
    for pattern in backup.exclude:
        argv += ["--exclude", pattern]
    argv.append(f"{url}::{archive}")
    argv.append("--")
    argv += list(backup.paths)
    return tuple(argv)


def list_argv(borg: str, url: str) -> tuple[str, ...]:
    return (borg, "list", "--json", "--lock-wait", str(LOCK_WAIT), url)


def info_argv(borg: str, url: str) -> tuple[str, ...]:
    return (borg, "info", "--json", "--lock-wait", str(LOCK_WAIT), url)


def extract_argv(
    borg: str,
    url: str,
    archive: str,
    paths: Sequence[str] = (),
    *,
    dry_run: bool = False,
    progress: bool = True,
    exact: bool = False,
) -> tuple[str, ...]:
    """``borg extract`` into the current directory, logging JSON lines on stderr.

    ``--list`` names every item (counted as files), ``--progress`` reports bytes.
    ``paths`` are absolute or archive paths, passed as literal patterns.
    """
    argv: list[str] = [borg, "extract", "--lock-wait", str(LOCK_WAIT), "--log-json", "--list"]
    if dry_run:
        argv.append("--dry-run")
    if progress:
        argv.append("--progress")
    argv.append(f"{url}::{archive}")
    if paths:
        argv.append("--")
        argv += [path_pattern(p, exact=exact) for p in paths]
    return tuple(argv)


CATALOGUE_FORMAT = "{mode}{NUL}{size}{NUL}{path}{NUL}"

HASH_FORMAT = "{type}{mode}{path}{size}{mtime}{linktarget}{source}{sha256}"


def catalogue_argv(borg: str, url: str, archive: str) -> tuple[str, ...]:
    """``borg list`` of every item as NUL-separated ``mode size path`` (compact, any file name)."""
    return (borg, "list", "--lock-wait", str(LOCK_WAIT), "--format", CATALOGUE_FORMAT, f"{url}::{archive}")


def hashes_argv(borg: str, url: str, archive: str, paths: Sequence[str]) -> tuple[str, ...]:
    """``borg list --json-lines`` of exactly ``paths``, with each file's sha256.

    Hashing reads (and authenticates) the files' data from the repository, so it
    is asked only for a drill's bounded sample.
    """
    return (
        borg, "list", "--lock-wait", str(LOCK_WAIT), "--json-lines", "--format", HASH_FORMAT, f"{url}::{archive}",
        "--", *(path_pattern(p, exact=True) for p in paths),
    )


def key_export_argv(borg: str, url: str) -> tuple[str, ...]:
    """``borg key export`` to stdout: the repository key, still encrypted by the passphrase."""
    return (borg, "key", "export", url)


def key_import_argv(borg: str, url: str) -> tuple[str, ...]:
    """``borg key import`` from stdin: restores a damaged repository key from an export."""
    return (borg, "key", "import", url, "-")


def prune_argv(borg: str, url: str, retention: Retention, glob: str) -> tuple[str, ...]:
    """``borg prune`` of the archives matching ``glob`` with the ``--keep-*`` rules of ``retention``."""
    return (borg, "prune", "--lock-wait", str(LOCK_WAIT), "--glob-archives", glob, *retention.prune_flags(), url)


def check_argv(borg: str, location: str, *, repository_only: bool = False, archives_only: bool = False) -> tuple[str, ...]:
    """``borg check`` of a repository (a path on the host, or a URL from the source)."""
    if repository_only and archives_only:
        raise ValueError("repository_only and archives_only exclude each other")
    argv = [borg, "check", "--lock-wait", str(LOCK_WAIT)]
    if repository_only:
        argv.append("--repository-only")
    if archives_only:
        argv.append("--archives-only")
    argv.append(location)
    return tuple(argv)


def compact_argv(borg: str, path: str) -> tuple[str, ...]:
    """``borg compact`` of the repository at ``path``, run on the host (frees what deletions left)."""
    return (borg, "compact", "--lock-wait", str(LOCK_WAIT), path)


def break_lock_argv(borg: str, path: str) -> tuple[str, ...]:
    """``borg break-lock`` of the repository at ``path``, run on the host. Only when no borg holds it."""
    return (borg, "break-lock", path)
