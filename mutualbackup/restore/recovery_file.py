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

import contextlib
import datetime as dt
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory.value_checks import check_slug
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.inventory.units import quote

FORMAT = "mutualbackup-recovery 1"


@dataclass(frozen=True)
class RecoveryRepository:
    host: str  # MEMBER/NODE
    path: str  # the repository's path on the host
    url: str  # as it was when exported (the inventory's address wins when restoring)
    repository_id: str
    key: str  # borg key export output, "BORG_KEY <id>\n…"


@dataclass(frozen=True)
class RecoveryFile:
    """The content of a recovery file. ``repr`` hides the passphrase."""

    source: str
    federation: str
    exported: str
    passphrase: str
    repositories: tuple[RecoveryRepository, ...]

    def __repr__(self) -> str:
        return f"RecoveryFile(source={self.source!r}, repositories={[r.host for r in self.repositories]!r}, passphrase=<hidden>)"

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


def render(recovery: RecoveryFile) -> str:
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


def parse(text: str, where: str = "the recovery file") -> RecoveryFile:
    """A recovery file's content; UsageError (exit 2) saying what is wrong.

    Every field's type is checked; the source and host names must be ``MEMBER/NODE``
    slugs. A message never quotes the file's text (it holds the passphrase): a YAML
    error is reported as YAML's problem and a line number only.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{where} is not a mutualbackup recovery file (not YAML: {_yaml_problem(exc, text)})") from None
    except (ValueError, RecursionError):  # an impossible date, nesting too deep for the parser
        raise UsageError(f"{where} is not a mutualbackup recovery file (not YAML: a value cannot be read)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{where} is not a mutualbackup recovery file (no 'format: {FORMAT}')")
    problems: list[str] = []
    source = _name(data, "source", "'source'", problems)
    passphrase = _text(data, "passphrase", "'passphrase'", problems)
    federation, exported = (_text(data, key, f"'{key}'", problems, required=False) for key in ("federation", "exported"))
    _text(data, "encryption", "'encryption'", problems, required=False)
    entries = data.get("repositories")
    if not entries:
        problems.append("'repositories' is missing")
        entries = []
    elif not isinstance(entries, list):
        problems.append("'repositories' must be a list of repositories")
        entries = []
    repositories: list[RecoveryRepository] = []
    for index, entry in enumerate(entries, 1):
        repository = _repository(entry, f"repository #{index}", problems)
        if repository is not None and any(r.host == repository.host for r in repositories):
            problems.append(f"repository #{index}: host {repository.host} appears twice")
        elif repository is not None:
            repositories.append(repository)
    if problems:
        raise UsageError(f"{where} is damaged: " + "; ".join(problems))
    return RecoveryFile(source=source, federation=federation, exported=exported, passphrase=passphrase,
                    repositories=tuple(repositories))


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """What YAML found wrong and on which line, without the file's text (never ``str(exc)``).

    A problem may quote the file (an alias name, a tag): quoted fragments longer than a
    character or two are elided, except YAML's own token names like ``'<stream end>'``.
    """
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        character = f"#x{ord(exc.character):04x}" if isinstance(exc.character, str) else "a byte"
        return f"a character YAML does not accept ({character}) at line {line}"
    problem = _QUOTED.sub(_elide, str(getattr(exc, "problem", None) or "cannot be parsed"))
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" r'|"(?:[^"\\]|\\.)*"')
"""A fragment quoted by ``repr`` in a YAML problem (single or double quotes, backslash escapes)."""


def _elide(match: re.Match[str]) -> str:
    """A quoted fragment kept when it is a character or two (``'\\t'``) or a YAML token (``'<stream end>'``)."""
    inner = match.group(0)[1:-1]
    return match.group(0) if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"


def _text(data: Mapping[Any, Any], key: str, what: str, problems: list[str], *, required: bool = True) -> str:
    """``data[key]`` as a non-empty string; a problem (never quoting the value) otherwise."""
    value = data.get(key)
    if value is None or value == "":
        if required:
            problems.append(f"{what} is missing")
        return ""
    if isinstance(value, (dt.date, dt.datetime)) and key == "exported":
        return value.isoformat()
    if not isinstance(value, str):
        problems.append(f"{what} must be text, not {type(value).__name__}")
        return ""
    return value


def _name(data: Mapping[Any, Any], key: str, what: str, problems: list[str]) -> str:
    """``data[key]`` as a ``MEMBER/NODE`` name whose both parts follow the slug rule."""
    value = _text(data, key, what, problems)
    if value:
        try:
            split_name(value)
        except ValueError as exc:
            problems.append(f"{what}: {exc}")
            return ""
    return value


def split_name(name: str) -> tuple[str, str]:
    """``MEMBER/NODE`` as (member, node), each checked with the slug rule; ValueError otherwise."""
    member, sep, node = name.partition("/")
    if not sep:
        raise ValueError(f"{quote(name)} is not a MEMBER/NODE name")
    return check_slug(member), check_slug(node)


def _repository(entry: object, what: str, problems: list[str]) -> RecoveryRepository | None:
    """One entry of ``repositories``, or None (with problems) when it is not usable."""
    if not isinstance(entry, dict):
        problems.append(f"{what} needs host, path and key")
        return None
    if not all(entry.get(k) for k in ("host", "path", "key")):
        problems.append(f"{what} needs host, path and key")
        return None
    before = len(problems)
    host = _name(entry, "host", f"{what}: host", problems)
    path = _text(entry, "path", f"{what}: path", problems)
    key = _text(entry, "key", f"{what}: key", problems)
    url = _text(entry, "url", f"{what}: url", problems, required=False)
    repository_id = _text(entry, "repository_id", f"{what}: repository_id", problems, required=False)
    if path and not path.startswith("/"):
        problems.append(f"{what}: path must be absolute")
    if len(problems) > before:
        return None
    return RecoveryRepository(host=host, path=path, url=url, repository_id=repository_id, key=key)


def repository_path(source: str, host: Node) -> str:
    """Where ``source`` (``MEMBER/NODE``, possibly gone from the inventory) keeps its repository on ``host``.

    STORAGE/MEMBER/NODE with the inventory's ``storage.path`` of ``host``: the rule of
    :func:`mutualbackup.borg.repository_path`, from the source's name alone.
    """
    if host.storage is None:
        raise ValueError(f"{host.name} is not a host (no storage: section)")
    member, node = split_name(source)
    return posixpath.join(host.storage.path, member, node)


def usable_hosts(recovery: RecoveryFile, federation: Federation) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(hosts of ``recovery`` to restore from, hosts skipped because they left the inventory).

    The file never chooses a path: each repository must be where the inventory puts
    it (:func:`repository_path` of the inventory's host), and its host must be a host
    there. UsageError (exit 2) when a path differs, when a host is a node without
    ``storage:``, or when no host of the file is left in the inventory.
    """
    nodes = {node.name: node for node in federation.nodes()}
    usable: list[str] = []
    skipped: list[str] = []
    for entry in recovery.repositories:
        host = nodes.get(entry.host)
        if host is None:
            skipped.append(entry.host)
            continue
        if host.storage is None:
            raise UsageError(
                f"the recovery file names {entry.host} as a host of {recovery.source}, but it is not a host in the inventory "
                "(no storage: section); refusing to use this file"
            )
        expected = repository_path(recovery.source, host)
        if entry.path != expected:
            raise UsageError(
                f"the recovery file puts the repository of {recovery.source} on {entry.host} at {quote(entry.path, 120)}, "
                f"but the inventory puts it at {quote(expected, 120)}; a recovery file never chooses the path, so nothing was done.\n"
                "If the file was altered, do not use it; if the host's storage path changed, fix the inventory or export the keys again"
            )
        usable.append(entry.host)
    if not usable:
        raise UsageError(
            f"none of the hosts in the recovery file ({', '.join(r.host for r in recovery.repositories)}) is in the inventory; "
            "nothing was done"
        )
    return tuple(usable), tuple(skipped)


def read_recovery(path: str) -> RecoveryFile:
    """Read and parse a recovery file the operator holds; UsageError when absent or invalid."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read the recovery file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a mutualbackup recovery file (not UTF-8 text: byte {exc.start + 1})") from None
    return parse(text, path)


def write_private(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 and ``text``; refuses to replace an existing file.

    On any failure (a full disk, an interruption…) the file just created is removed:
    a partial secret file is never left behind.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; choose another --out (a recovery file is never overwritten)") from None
    except OSError as exc:
        raise OperationFailed(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(fd, 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise OperationFailed(f"cannot write {path} (nothing was kept): {exc.strerror}") from None
        raise


def export_keys(
    ctx: Context, source: Node, out: str, *, now: dt.datetime | None = None, say: Callable[[str], None] = print
) -> RecoveryFile:
    """Write the recovery file of ``source`` to ``out`` (locally, 0600); return what it holds.

    Reads the passphrase and runs ``borg key export`` on the source for each
    recorded replica. Raises OperationFailed when the source or a replica's key
    cannot be read (nothing is written then).
    """
    if not ctx.replicas_of(source.name):
        raise OperationFailed(f"{source.name} has no provisioned replica: run `mutualbackup apply` first")
    hosts = ctx.replica_hosts(source.name)
    if not hosts:
        raise OperationFailed(
            f"none of the recorded replicas of {source.name} ({', '.join(ctx.replicas_of(source.name))}) "
            "is a host in the inventory any more: run `mutualbackup apply` first"
        )
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
            result = transport.run(borg.key_export_argv(source.borg, url), env=borg.client_env(paths), timeout=300)
            try:
                if not borg.succeeded(result.exit_code):
                    raise ValueError(f"borg key export exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}")
                repository_id, key = borg.parse_key_export(result.stdout)
            except ValueError as exc:
                problems.append(f"{host.name}: {exc}")
                continue
            repositories.append(RecoveryRepository(host.name, borg.repository_path(source, host), url, repository_id, key))
    finally:
        transport.close()
    if problems:
        raise OperationFailed(f"cannot export the keys of {source.name}; nothing was written:\n" + "\n".join(problems))
    when = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    recovery = RecoveryFile(
        source=source.name, federation=ctx.federation.name, exported=f"{when:%Y-%m-%dT%H:%M:%SZ}",
        passphrase=passphrase, repositories=tuple(repositories),
    )
    write_private(out, render(recovery))
    return recovery


WARNING = (
    "WARNING: {out} holds the passphrase of every backup of {source}: whoever has it can read them all.\n"
    "Move it OFFLINE now (print it, or an encrypted USB key in the member's safe), then delete it here."
)


def summary(recovery: RecoveryFile, out: str) -> Mapping[str, Any]:
    """What ``keys export --json`` prints: never the passphrase nor the keys."""
    return {
        "source": recovery.source,
        "out": out,
        "mode": "0600",
        "repositories": [{"host": r.host, "path": r.path, "repository_id": r.repository_id} for r in recovery.repositories],
    }

