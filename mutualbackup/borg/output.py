"""What borg prints, parsed: ``--json`` of create, list and info, ``--log-json`` lines, item
listings, progress, key exports, and the informative end of its errors. Pure."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ArchiveStats:
    name: str
    original_bytes: int
    compressed_bytes: int
    deduplicated_bytes: int
    nfiles: int
    repository_bytes: int | None
    id: str | None = None  # borg's archive id (hex)


def parse_create_json(stdout: bytes) -> ArchiveStats:
    """The stats of ``borg create --json``; ValueError when the output is not that."""
    data = _load_json(stdout)
    archive = data["archive"]
    stats = archive["stats"]
    cache = data.get("cache", {}).get("stats", {})
    return ArchiveStats(
        name=archive["name"],
        original_bytes=int(stats["original_size"]),
        compressed_bytes=int(stats["compressed_size"]),
        deduplicated_bytes=int(stats["deduplicated_size"]),
        nfiles=int(stats.get("nfiles", 0)),
        repository_bytes=int(cache["unique_csize"]) if "unique_csize" in cache else None,
        id=str(archive["id"]) if archive.get("id") else None,
    )


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    time: dt.datetime  # UTC
    id: str


def parse_list_json(stdout: bytes) -> list[ArchiveEntry]:
    """Archives of ``borg list --json``, oldest first (a stable sort on the start time: archives
    started in the same instant stay in borg's order, which its prune uses too). borg runs with TZ=UTC."""
    data = _load_json(stdout)
    entries = []
    for item in data.get("archives", []):
        when = dt.datetime.fromisoformat(item.get("start") or item["time"])
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        entries.append(ArchiveEntry(name=item.get("archive") or item["name"], time=when, id=item.get("id", "")))
    return sorted(entries, key=lambda e: e.time)


def parse_info_repository_bytes(stdout: bytes) -> int:
    """The repository's real size on disk from ``borg info --json`` (cache.stats.unique_csize)."""
    return int(_load_json(stdout)["cache"]["stats"]["unique_csize"])


@dataclass(frozen=True)
class BorgLog:
    """What borg said on stderr with ``--log-json``: its messages as plain lines, and the files it skipped."""

    messages: tuple[str, ...]
    unreadable: tuple[str, ...]  # paths of files borg could not read (a warning: the archive lacks them)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.messages[-lines:])


UNREADABLE_PREFIX = "Backup"
"""borg 1.4's ``msgid`` of a file it could not read starts so (BackupPermissionError, BackupOSError...)."""


def parse_log(stderr: bytes) -> BorgLog:
    """The JSON lines of ``--log-json`` as plain messages (``LEVEL: text``; non-JSON lines kept as they are).

    A warning whose ``msgid`` starts with :data:`UNREADABLE_PREFIX` names a file borg skipped
    (``PATH: open: [Errno 13] Permission denied``): its path is collected in ``unreadable``.
    """
    messages: list[str] = []
    unreadable: list[str] = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or event.get("type") != "log_message":
            if not isinstance(event, dict):
                messages.append(line)
            continue
        level, text = str(event.get("levelname", "")), str(event.get("message", ""))
        messages.append(f"{level}: {text}" if level not in ("", "INFO") else text)
        if level == "WARNING" and str(event.get("msgid", "")).startswith(UNREADABLE_PREFIX):
            unreadable.append(text.split(": ", 1)[0])
    return BorgLog(tuple(messages), tuple(unreadable))


def _load_json(stdout: bytes) -> dict[str, Any]:
    try:
        data = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"borg did not print JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("borg printed JSON that is not an object")
    return data


@dataclass(frozen=True)
class Item:
    """One item of ``borg list --json-lines``."""

    path: str  # archive form: no leading slash
    type: str  # "-" file, "d" directory, "l" symlink, "h" hardlink, ...
    mode: str  # "-rw-r--r--"
    size: int
    mtime: float  # seconds since the epoch (borg ran with TZ=UTC)
    linktarget: str = ""
    source: str = ""  # hardlink master, or symlink target
    sha256: str = ""

    @property
    def permissions(self) -> int:
        """The permission bits (with setuid, setgid and sticky) of ``mode``."""
        return mode_bits(self.mode)


def parse_items(stdout: bytes) -> list[Item]:
    """Items of ``borg list --json-lines``; ValueError when a line is not an item."""
    items = []
    for number, raw in enumerate(stdout.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw.decode("utf-8"))
            when = dt.datetime.fromisoformat(data["mtime"])
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            items.append(
                Item(
                    path=data["path"],
                    type=data["type"],
                    mode=data["mode"],
                    size=int(data.get("size") or 0),
                    mtime=when.timestamp(),
                    linktarget=data.get("linktarget") or "",
                    source=data.get("source") or "",
                    sha256=data.get("sha256") or "",
                )
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"borg list printed an unexpected line {number}: {exc}") from None
    return items


@dataclass(frozen=True)
class Entry:
    """One item of :func:`catalogue_argv`: ``kind`` is the first letter of its mode."""

    kind: str  # "-" file, "d" directory, "l" symlink, "h" hardlink to an earlier file, ...
    size: int
    path: str


def parse_catalogue(stdout: bytes) -> list[Entry]:
    """Entries of :func:`catalogue_argv`'s output; ValueError when it does not parse."""
    fields = stdout.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 3:
        raise ValueError("borg list printed an incomplete item list")
    entries = []
    for i in range(0, len(fields), 3):
        mode, size, path = fields[i : i + 3]
        try:
            entries.append(Entry(mode[:1].decode("ascii"), int(size), path.decode("utf-8", "surrogateescape")))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"borg list printed an unexpected item: {fields[i:i + 3]!r}") from None
    return entries


def mode_bits(mode: str) -> int:
    """``-rwsr-x--T`` → 0o5754: the permission bits of an ``ls``-style mode string."""
    if len(mode) != 10:
        raise ValueError(f"not a mode string: {mode!r}")
    bits = 0
    for index, char in enumerate(mode[1:]):
        shift = 8 - index
        if char in "rwxst":
            bits |= 1 << shift
    special = {3: 0o4000, 6: 0o2000, 9: 0o1000}
    for index, flag in special.items():
        if mode[index] in "sStT":
            bits |= flag
    return bits


@dataclass
class CreateProgress:
    """What ``borg create --log-json --progress`` has said so far (fed line by line): files read, bytes read,
    bytes new to the repository (what is sent). Never the path it is at: the node leaves it out."""

    files: int = 0
    original_bytes: int = 0
    deduplicated_bytes: int = 0

    def feed(self, line: str) -> bool:
        """Take one stderr line; True when it was a progress report."""
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(event, dict) or event.get("type") != "archive_progress" or event.get("finished"):
            return False
        self.files = int(event.get("nfiles") or 0)
        self.original_bytes = int(event.get("original_size") or 0)
        self.deduplicated_bytes = int(event.get("deduplicated_size") or 0)
        return True


@dataclass
class ExtractProgress:
    """What ``borg extract --log-json --list --progress`` has said so far (fed line by line)."""

    files: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    listed: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # borg's own log lines (warnings, errors), and non-JSON lines
    keep_listed: bool = False
    opened: bool = False  # borg reported on the archive: its connection to the repository is up

    def feed(self, line: str) -> bool:
        """Take one stderr line; True when it changed the progress (files or bytes)."""
        if not line.strip():
            return False
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.messages.append(line)
            return False
        if not isinstance(event, dict):
            self.messages.append(line)
            return False
        kind = event.get("type")
        if kind == "log_message" and event.get("name") == "borg.output.list":
            self.opened = True
            self.files += 1
            if self.keep_listed:
                self.listed.append(str(event.get("message", "")))
            return True
        if kind == "progress_percent":
            self.opened = True
            if event.get("total"):
                self.bytes_total = int(event["total"])
            if event.get("current") is not None:
                self.bytes_done = int(event["current"])
            if event.get("finished") and self.bytes_total:
                self.bytes_done = self.bytes_total
                return True
            return event.get("current") is not None
        if kind == "log_message":
            level = event.get("levelname", "")
            self.messages.append(f"{level}: {event.get('message', '')}" if level not in ("INFO", "") else str(event.get("message", "")))
            return False
        if kind in ("progress_message",):
            return False
        self.messages.append(line)
        return False

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.messages[-lines:])


def parse_key_export(stdout: bytes) -> tuple[str, str]:
    """(repository id, key text) of ``borg key export``; ValueError when it is not one."""
    text = stdout.decode("utf-8", "replace")
    first = text.splitlines()[0] if text.strip() else ""
    parts = first.split()
    if len(parts) != 2 or parts[0] != "BORG_KEY" or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
        raise ValueError("borg key export did not print a key (expected a first line 'BORG_KEY <repository id>')")
    return parts[1], text if text.endswith("\n") else text + "\n"


def error_lines(text: str, lines: int = 6) -> str:
    """The informative end of borg's stderr: no traceback frames, no platform report, no argv dump."""
    kept: list[str] = []
    for line in text.splitlines():
        if line.startswith("Platform: "):
            break  # borg's report after an error: platform, versions, PID, CWD, sys.argv...
        stripped = line.strip()
        if not stripped or line.startswith(("Traceback ", "  File ", "    ")) or stripped.startswith("^"):
            continue
        kept.append(stripped)
    return "\n".join(kept[-lines:])
