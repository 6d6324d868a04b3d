"""Borg command lines as argv tuples, borg's environment, exit codes and JSON output.

Pure: nothing here starts a process. Every function returns what a
:class:`~mutualbackup.remote.transport.Transport` will run, so tests assert the exact argv.

Where things live on a source node (``WORKDIR`` is the node's ``workdir``, expanded):

- ``WORKDIR/id_ed25519`` — the source's own SSH key, the one the hosts' forced
  commands accept;
- ``WORKDIR/passphrase`` — the repositories' passphrase, mode 0600, generated there;
- ``WORKDIR/known_hosts`` — the pinned host keys of the source's replica hosts;
- ``WORKDIR/borg`` — ``BORG_BASE_DIR`` (cache, security and config of borg).
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any, Sequence

from mutualbackup.inventory.model import Backup, Node, Retention

KEY_FILE = "id_ed25519"
PASSPHRASE_FILE = "passphrase"
KNOWN_HOSTS_FILE = "known_hosts"
BASE_DIR = "borg"

LOCK_WAIT = 600  # seconds; longer than the ssh keepalive (10 s x 30)


@dataclass(frozen=True)
class SourcePaths:
    """The files of one source node, with ``~`` already expanded."""

    workdir: str

    @property
    def key(self) -> str:
        return posixpath.join(self.workdir, KEY_FILE)

    @property
    def passphrase(self) -> str:
        return posixpath.join(self.workdir, PASSPHRASE_FILE)

    @property
    def known_hosts(self) -> str:
        return posixpath.join(self.workdir, KNOWN_HOSTS_FILE)

    @property
    def base_dir(self) -> str:
        return posixpath.join(self.workdir, BASE_DIR)


def repository_path(source: Node, host: Node) -> str:
    """Where ``source``'s repository lives on ``host``: STORAGE/MEMBER/NODE."""
    assert host.storage is not None
    return posixpath.join(host.storage.path, source.member, source.slug)


def repository_url(source: Node, host: Node) -> str:
    """The ``ssh://`` URL a source's borg uses to reach its repository on ``host``."""
    address = f"[{host.address}]" if ":" in host.address else host.address
    return f"ssh://{host.user}@{address}:{host.port}{repository_path(source, host)}"


def known_hosts_name(node: Node) -> str:
    """The host name as OpenSSH writes it in known_hosts (``[addr]:port`` unless port 22)."""
    return node.address if node.port == 22 else f"[{node.address}]:{node.port}"


def known_hosts_line(node: Node) -> str:
    return f"{known_hosts_name(node)} {node.host_key}"


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


def serve_command(borg: str, repository: str, quota: int) -> str:
    """The forced command of an ``authorized_keys`` line, as the host's shell will run it."""
    return shlex.join(
        [borg, "serve", "--restrict-to-repository", repository, "--append-only", "--storage-quota", str(quota)]
    )


def authorized_keys_line(borg: str, repository: str, quota: int, public_key: str, comment: str) -> str:
    """One ``authorized_keys`` line that lets ``public_key`` reach only ``repository``, append-only.

    Inside ``command="…"`` OpenSSH treats only ``\\"`` specially, so double quotes of
    the (already shell-quoted) command are escaped and nothing else. A control
    character in any part (a newline would start another, unrestricted line) is a
    ValueError.
    """
    from mutualbackup.inventory.value_checks import check_line

    for part in (borg, repository, public_key, comment):
        check_line(part)
    command = serve_command(borg, repository, quota).replace('"', '\\"')
    key_type, key_data = public_key.split()[:2]
    return f'command="{command}",restrict {key_type} {key_data} {comment}'


def archive_name(source: Node, when: dt.datetime) -> str:
    """``NODE-YYYY-MM-DDTHH:MM:SS`` in UTC: sortable, unique per second."""
    return f"{source.slug}-{when.astimezone(dt.timezone.utc):%Y-%m-%dT%H:%M:%S}"


def init_argv(borg: str, url: str) -> tuple[str, ...]:
    return (borg, "init", "--encryption=repokey-blake2", url)


def create_argv(borg: str, url: str, archive: str, backup: Backup) -> tuple[str, ...]:
    argv: list[str] = [
        borg, "create", "--json", "--log-json", "--lock-wait", str(LOCK_WAIT), "--compression", backup.compression,
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
    borg: str, url: str, archive: str, paths: Sequence[str] = (), *, dry_run: bool = False
) -> tuple[str, ...]:
    """``borg extract`` into the current directory; ``paths`` are archive paths (no leading /)."""
    argv: list[str] = [borg, "extract", "--lock-wait", str(LOCK_WAIT)]
    if dry_run:
        argv += ["--dry-run", "--list"]
    argv.append(f"{url}::{archive}")
    if paths:
        argv.append("--")
        argv += [archive_path(p) for p in paths]
    return tuple(argv)


def archive_path(path: str) -> str:
    """Borg stores ``/etc/x`` as ``etc/x``: the form ``extract`` and ``list`` expect."""
    return path.lstrip("/")


# --- exit codes (BORG_EXIT_CODES=modern) ---------------------------------------

def classify_exit(code: int) -> str:
    """``success``, ``warning`` (archive written, something to look at), ``retry`` or ``error``.

    -1 is what the transport reports for a lost connection or a timeout.
    """
    if code == 0:
        return "success"
    if code == 1 or 100 <= code <= 107:  # borg 1.4's warnings; 124-127 come from timeout or the shell
        return "warning"
    if code in (-1, 73, 74, 80, 81, 87):
        return "retry"
    return "error"


MIN_QUOTA = 10 * 1024**3
"""The smallest storage quota of a replica line (see :func:`mutualbackup.jobs.provision.replica_quota`)."""
QUOTA_FACTOR = 2
"""A replica's quota is this many times its size (room to grow)."""
CHECKPOINT_MINUTES = 30
"""borg create's default ``--checkpoint-interval`` (1800 s), which the coordinator keeps."""


EXIT_HINTS: dict[int, str] = {
    -1: "the connection was lost or the command timed out; the next attempt resumes (nothing stored is sent twice)",
    2: "borg reported an error; see its message above",
    13: "the repository does not exist: run `mutualbackup apply`",
    14: "the host's disk is full: free space there or move the replica",
    15: "the repository does not exist: run `mutualbackup apply`",
    20: (f"the storage quota of this replica is exhausted: what this run wrote was not committed (a `.checkpoint` "
         f"archive may remain from a backup that ran over {CHECKPOINT_MINUTES} minutes) and earlier archives are intact. "
         f"Raise the source's `estimate` (the quota is {QUOTA_FACTOR} times the larger of it and the measured size, "
         f"at least {MIN_QUOTA // 1024**3} GiB) and run `mutualbackup apply`; when the quota is already the host's "
         f"whole `capacity`, raise that or move the replica"),
    50: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    51: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    52: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    53: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    62: "the source's borg cache is newer than the repository (was it rolled back?): investigate before going on",
    63: "the source's borg cache is newer than the repository (was it rolled back?): investigate before going on",
    64: "the repository's security data changed (was it replaced?): investigate before going on",
    73: "the repository is locked by another borg; retried later",
    74: "the repository is locked by another borg; retried later",
    80: "the connection to the host was closed (host down or sshd restarted?); retried later",
    81: "the connection to the host broke; retried later",
    83: "the host refused this repository path: re-run `mutualbackup apply`",
    87: "the connection to the host broke; retried later",
    124: "the command timed out on the node",
    126: "borg is not executable on the node: check the inventory's `borg:` path",
    127: "borg was not found on the node: install borg 1.4 or fix the inventory's `borg:` path",
    255: "ssh failed: is the host up, and does its host key match the one pinned in the inventory?",
}


def exit_hint(code: int) -> str:
    if code in EXIT_HINTS:
        return EXIT_HINTS[code]
    if code > 128:
        return f"borg was killed by signal {code - 128}"
    return "see borg's message above"


# --- JSON output ---------------------------------------------------------------


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


def parse_info_repository_bytes(stdout: bytes) -> int:
    """The repository's real size on disk from ``borg info --json`` (cache.stats.unique_csize)."""
    return int(_load_json(stdout)["cache"]["stats"]["unique_csize"])


def _load_json(stdout: bytes) -> dict[str, Any]:
    try:
        data = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"borg did not print JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("borg printed JSON that is not an object")
    return data


# --- maintenance: prune, check, compact, locks (run by the daemon) ---------------
#
# Client-side commands (prune, archives check, list, info) run on the source with
# client_env(); host-side commands (repository check, compact, break-lock, lock
# listing, repository facts) run on the host, as its user, on the repository
# path itself, with host_env(): they need no key and no passphrase.

CHECKPOINT_SUFFIX = re.compile(r"\.checkpoint(\.\d+)?\Z")


def archive_glob(source: Node) -> str:
    """The archives the coordinator creates for ``source`` (see :func:`archive_name`)."""
    return f"{source.slug}-*"


def is_checkpoint(name: str) -> bool:
    """True for borg's partial archives (``NAME.checkpoint``, ``NAME.checkpoint.N``)."""
    return CHECKPOINT_SUFFIX.search(name) is not None


def host_env(workdir: str) -> dict[str, str]:
    """Environment for borg run on a host, on its own repositories (no key needed)."""
    env = base_env()
    env["BORG_BASE_DIR"] = posixpath.join(workdir, BASE_DIR)
    return env


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


_REPOSITORY_FACTS = r"""cd -- "$1" 2>/dev/null || exit 3
[ -f config ] && [ -d data ] || exit 4
exec find data -type f -printf '%T@ %s\n'
"""
REPOSITORY_MISSING = 3
REPOSITORY_NOT_BORG = 4


def repository_facts_argv(path: str) -> tuple[str, ...]:
    """Size and last-write time of the segment files of the repository at ``path`` (on the host).

    Exits :data:`REPOSITORY_MISSING` when the directory is gone and
    :data:`REPOSITORY_NOT_BORG` when it holds no borg repository.
    """
    return ("sh", "-c", _REPOSITORY_FACTS, "sh", path)


@dataclass(frozen=True)
class RepositoryFacts:
    segments: int
    bytes: int
    last_write: float | None  # epoch of the newest segment file; None when there is none


def parse_repository_facts(stdout: bytes) -> RepositoryFacts:
    """Parse the output of :func:`repository_facts_argv`; ValueError when it is not that."""
    count, total, newest = 0, 0, None
    for line in stdout.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        mtime, size = line.split()
        count += 1
        total += int(size)
        newest = max(newest or 0.0, float(mtime))
    return RepositoryFacts(count, total, newest)


# borg's own host id: its patched getfqdn (the canonical name of gethostname(), not
# socket.getfqdn()) and uuid.getnode(), exactly as borg/platform/base.py computes it.
_HOST_ID_PY = (
    "import socket, uuid\n"
    "name = socket.gethostname()\n"
    "try:\n"
    "    addrs = socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM, 0, socket.AI_CANONNAME)\n"
    "except OSError:\n"
    "    addrs = []\n"
    "name = next((a[3] for a in addrs if a[3]), name)\n"
    "print('%s@%d' % (name, uuid.getnode()))\n"
)

_LOCK_LISTING = r"""cd -- "$1" 2>/dev/null || exit 3
printf '%s\n' "${BORG_HOST_ID:-$(python3 -c "$2" 2>/dev/null)}"
for f in lock.exclusive/*; do [ -e "$f" ] && printf 'exclusive %s\n' "${f#lock.exclusive/}"; done
if [ -f lock.roster ]; then printf 'roster '; tr -d '\n' < lock.roster; echo; fi
exit 0
"""


def lock_listing_argv(path: str) -> tuple[str, ...]:
    """The host's borg host id, then who holds the lock of the repository at ``path`` (run on the host).

    The id is computed as borg does (``BORG_HOST_ID``, else ``FQDN@uuid.getnode()``); an empty
    line when it cannot be (no ``python3``): then no holder is this host's, and no lock is broken.
    """
    return ("sh", "-c", _LOCK_LISTING, "sh", path, _HOST_ID_PY)


@dataclass(frozen=True)
class LockHolder:
    host: str  # borg's host id: FQDN@NODE (or BORG_HOST_ID)
    pid: int
    thread: int
    kind: str  # exclusive (lock.exclusive/), or shared/exclusive (lock.roster)

    @property
    def hostname(self) -> str:
        """The short host name part of the host id (what ``uname -n`` says, up to the first dot)."""
        return self.host.split("@", 1)[0].split(".", 1)[0]


def parse_lock_listing(stdout: bytes) -> tuple[str, list[LockHolder]]:
    """(the host's borg host id, holders) from :func:`lock_listing_argv`; ValueError on a malformed lock.

    Lock file names are ``HOSTID.PID-THREAD`` (thread in hex), as borg writes them.
    """
    lines = stdout.decode("utf-8", "replace").splitlines()
    if not lines:
        raise ValueError("the lock listing is empty")
    hostname = lines[0].strip()
    holders: list[LockHolder] = []
    for line in lines[1:]:
        kind, _, rest = line.partition(" ")
        if kind == "exclusive":
            host_pid, _, thread = rest.rpartition("-")
            host, _, pid = host_pid.rpartition(".")
            if not host or not pid.isdigit():
                raise ValueError(f"malformed lock file name {rest!r}")
            holders.append(LockHolder(host, int(pid), int(thread, 16), "exclusive"))
        elif kind == "roster":
            try:
                roster = json.loads(rest or "{}")
            except json.JSONDecodeError:
                continue  # borg itself treats a corrupt roster as empty
            for mode in ("shared", "exclusive"):
                for host, pid, thread in roster.get(mode, []):
                    holders.append(LockHolder(str(host), int(pid), int(thread), f"roster-{mode}"))
    return hostname, holders


_TRANSACTIONS = r"""cd -- "$1" 2>/dev/null || exit 3
[ -f config ] && [ -d data ] || exit 4
date -u +%s
if [ -f transactions ]; then cat transactions; fi
exit 0
"""


def transactions_argv(path: str) -> tuple[str, ...]:
    """The host's clock, then the ``transactions`` log of the repository at ``path`` (run on the host).

    borg appends ``transaction N, UTC time T`` there at every commit made through an
    ``--append-only`` serve (every write of a source's key); nothing a key holder can
    send removes a line. Exits like :func:`repository_facts_argv` for a missing repository.
    """
    return ("sh", "-c", _TRANSACTIONS, "sh", path)


@dataclass(frozen=True)
class Transaction:
    number: int
    time: float  # epoch, by the host's clock


def parse_transactions(stdout: bytes) -> tuple[float, list[Transaction]]:
    """(the host's clock, transactions) from :func:`transactions_argv`; ValueError when it is not that."""
    lines = stdout.decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        raise ValueError("the transactions listing does not start with the host's clock")
    found = []
    for line in lines[1:]:
        if not line.strip():
            continue
        match = _TRANSACTION_LINE.match(line.strip())
        if match is None:
            raise ValueError(f"unexpected line in the repository's transactions log: {line[:80]!r}")
        when = dt.datetime.fromisoformat(match.group(2)).replace(tzinfo=dt.timezone.utc)
        found.append(Transaction(int(match.group(1)), when.timestamp()))
    return float(lines[0]), found


_TRANSACTION_LINE = re.compile(r"transaction (\d+), UTC time (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\Z")
