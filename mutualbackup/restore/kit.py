"""The recovery kit's contents: everything needed to read a source's backups when the source is gone.

YAML under a comment header that says what it is and how to use it, with borg alone too: the
passphrase, and for each replica the host, the repository path and URL, the repository id and
the ``borg key export`` of that repository (each ``borg init`` makes its own key; all share the
passphrase). The source writes it and seals it for its member's admins (age format, their SSH
keys as recipients); only an admin's key opens it (``age -d -i ~/.ssh/id_ed25519 KIT``). Pure.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from mutualbackup.errors import UsageError
from mutualbackup.inventory.units import quote
from mutualbackup.inventory.value_checks import check_slug


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
