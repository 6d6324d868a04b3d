"""``mutualbackup keys export``: the recovery file a member keeps in its offline safe.

The file is YAML under a comment header that says what it is and how to use it.
It holds everything needed to read a source's backups when the source node is
gone: the passphrase (read from the source's 0600 file), and for each replica the
host, the repository path and URL, the repository id and the ``borg key export``
of that repository (each ``borg init`` makes its own key; all share the
passphrase). The repository key is also stored inside each repository (repokey
mode), so the passphrase alone opens an intact repository; the exported key is
for a repository whose key was damaged (``restore --recovery`` imports it then).

The coordinator writes this file only where the operator asked (``--out``),
created with mode 0600 and never over an existing file. It stores nothing of it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

from . import borg, borg_restore
from .context import Context
from .errors import OperationFailed, UsageError
from .model import Node

FORMAT = "mutualbackup-recovery 1"


@dataclass(frozen=True)
class RecoveryRepository:
    host: str  # MEMBER/NODE
    path: str  # the repository's path on the host
    url: str  # as it was when exported (the inventory's address wins when restoring)
    repository_id: str
    key: str  # borg key export output, "BORG_KEY <id>\n…"


@dataclass(frozen=True)
class Recovery:
    """The content of a recovery file. ``repr`` hides the passphrase."""

    source: str
    federation: str
    exported: str
    passphrase: str
    repositories: tuple[RecoveryRepository, ...]

    def __repr__(self) -> str:
        return f"Recovery(source={self.source!r}, repositories={[r.host for r in self.repositories]!r}, passphrase=<hidden>)"

    def repository(self, host: str) -> RecoveryRepository | None:
        for repository in self.repositories:
            if repository.host == host:
                return repository
        return None


def header(source: str) -> str:
    return f"""\
# ============================================================================
#  MUTUALBACKUP RECOVERY FILE for {source} -- SECRET
# ============================================================================
#  This file holds the passphrase and the keys of every backup of {source}.
#  Anyone who has it and can log in to one of the hosts below can read all
#  of that data. Keep it OFFLINE: printed in the member's safe, or on an
#  encrypted USB key. Never commit it, mail it or leave it on a server.
#
#  When {source} is lost, restore its data onto any node of the federation:
#      mutualbackup restore {source} --to MEMBER/NODE:/some/dir --recovery THIS_FILE
#
#  With borg alone (on a machine whose SSH key the host accepts for the
#  repository): put the passphrase in a 0600 file P, then
#      BORG_PASSCOMMAND="cat P" borg list URL
#      BORG_PASSCOMMAND="cat P" borg extract URL::ARCHIVE
#  and only if borg says the repository key is missing or damaged:
#      borg key import URL KEYFILE     (KEYFILE: the "key" text of that repository)
# ============================================================================
"""


def render(recovery: Recovery) -> str:
    """The recovery file's text (header + YAML)."""
    document = {
        "format": FORMAT,
        "federation": recovery.federation,
        "source": recovery.source,
        "exported": recovery.exported,
        "encryption": "repokey-blake2",
        "passphrase": recovery.passphrase,
        "repositories": [
            {"host": r.host, "path": r.path, "url": r.url, "repository_id": r.repository_id, "key": r.key}
            for r in recovery.repositories
        ],
    }
    return header(recovery.source) + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000)


def parse(text: str, where: str = "the recovery file") -> Recovery:
    """A recovery file's content; UsageError (exit 2) saying what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{where} is not a mutualbackup recovery file (not YAML: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{where} is not a mutualbackup recovery file (no 'format: {FORMAT}')")
    problems = [f"'{key}' is missing" for key in ("source", "passphrase", "repositories") if not data.get(key)]
    repositories = []
    for index, entry in enumerate(data.get("repositories") or [], 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k) for k in ("host", "path", "key")):
            problems.append(f"repository #{index} needs host, path and key")
            continue
        if not entry["path"].startswith("/"):
            problems.append(f"repository #{index}: path must be absolute")
            continue
        repositories.append(
            RecoveryRepository(
                host=entry["host"], path=entry["path"], url=str(entry.get("url", "")),
                repository_id=str(entry.get("repository_id", "")), key=entry["key"],
            )
        )
    if problems:
        raise UsageError(f"{where} is damaged: " + "; ".join(problems))
    return Recovery(
        source=str(data["source"]), federation=str(data.get("federation", "")), exported=str(data.get("exported", "")),
        passphrase=str(data["passphrase"]), repositories=tuple(repositories),
    )


def read_recovery(path: str) -> Recovery:
    """Read and parse a recovery file the operator holds; UsageError when absent or invalid."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read the recovery file {path}: {exc.strerror}") from None
    return parse(text, path)


def write_private(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 and ``text``; refuses to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; choose another --out (a recovery file is never overwritten)") from None
    except OSError as exc:
        raise OperationFailed(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OperationFailed(f"cannot write {path}: {exc.strerror}") from None


def export_keys(
    ctx: Context, source: Node, out: str, *, now: dt.datetime | None = None, say: Callable[[str], None] = print
) -> Recovery:
    """Write the recovery file of ``source`` to ``out`` (locally, 0600); return what it holds.

    Reads the passphrase and runs ``borg key export`` on the source for each
    recorded replica. Raises OperationFailed when the source or a replica's key
    cannot be read (nothing is written then).
    """
    hosts = [ctx.node(name) for name in ctx.replicas_of(source.name)]
    if not hosts:
        raise OperationFailed(f"{source.name} has no provisioned replica: run `mutualbackup apply` first")
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; choose another --out (a recovery file is never overwritten)")
    transport = ctx.connect(source)
    try:
        paths = ctx.source_paths(transport, source)
        read = transport.run(("cat", "--", paths.passphrase), timeout=60)
        if not read.ok or not read.stdout.strip():
            raise OperationFailed(
                f"cannot read the passphrase file {paths.passphrase} on {source.name} (exit {read.exit_code}): "
                f"{read.stderr_tail(3)}; was `mutualbackup apply` run?"
            )
        passphrase = read.stdout.decode("utf-8").rstrip("\n")
        repositories = []
        problems = []
        for host in hosts:
            url = borg.repository_url(source, host)
            result = transport.run(borg_restore.key_export_argv(source.borg, url), env=borg.client_env(paths), timeout=300)
            try:
                if result.exit_code not in (0, 1):
                    raise ValueError(f"borg key export exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}")
                repository_id, key = borg_restore.parse_key_export(result.stdout)
            except ValueError as exc:
                problems.append(f"{host.name}: {exc}")
                continue
            repositories.append(RecoveryRepository(host.name, borg.repository_path(source, host), url, repository_id, key))
    finally:
        transport.close()
    if problems:
        raise OperationFailed(f"cannot export the keys of {source.name}; nothing was written:\n" + "\n".join(problems))
    when = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    recovery = Recovery(
        source=source.name, federation=ctx.federation.name, exported=f"{when:%Y-%m-%dT%H:%M:%SZ}",
        passphrase=passphrase, repositories=tuple(repositories),
    )
    write_private(out, render(recovery))
    return recovery


WARNING = (
    "WARNING: {out} holds the passphrase of every backup of {source}: whoever has it can read them all.\n"
    "Move it OFFLINE now (print it, or an encrypted USB key in the member's safe), then delete it here."
)


def summary(recovery: Recovery, out: str) -> Mapping[str, Any]:
    """What ``keys export --json`` prints: never the passphrase nor the keys."""
    return {
        "source": recovery.source,
        "out": out,
        "mode": "0600",
        "repositories": [{"host": r.host, "path": r.path, "repository_id": r.repository_id} for r in recovery.repositories],
    }

