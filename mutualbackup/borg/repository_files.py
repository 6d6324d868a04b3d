"""What a host reads of a repository's own files, without borg and without any key: size and
last write of its segments, who holds its lock, its ``transactions`` log.

Each is a small POSIX ``sh`` program run on the host (in :mod:`mutualbackup.scripts`; its argv here)
and a pure parser of its output.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Iterable

from mutualbackup import scripts



REPOSITORY_MISSING = 3

REPOSITORY_NOT_BORG = 4


def repository_facts_argv(path: str) -> tuple[str, ...]:
    """Size and last-write time of the segment files of the repository at ``path`` (on the host).

    Exits :data:`REPOSITORY_MISSING` when the directory is gone and
    :data:`REPOSITORY_NOT_BORG` when it holds no borg repository.
    """
    return ("sh", "-c", scripts.text("repository_facts.sh"), "sh", path)


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





def lock_listing_argv(path: str) -> tuple[str, ...]:
    """The host's borg host id, then who holds the lock of the repository at ``path`` (run on the host).

    The id is computed as borg does (``BORG_HOST_ID``, else ``FQDN@uuid.getnode()``); an empty
    line when it cannot be (no ``python3``): then no holder is this host's, and no lock is broken.
    """
    return ("sh", "-c", scripts.text("lock_listing.sh"), "sh", path, scripts.text("host_id.py"))


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




def transactions_argv(path: str) -> tuple[str, ...]:
    """The host's clock, then the ``transactions`` log of the repository at ``path`` (run on the host).

    borg appends ``transaction N, UTC time T`` there at every commit made through an
    ``--append-only`` serve (every write of a source's key); nothing a key holder can
    send removes a line. Exits like :func:`repository_facts_argv` for a missing repository.
    """
    return ("sh", "-c", scripts.text("transactions.sh"), "sh", path)


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


@dataclass(frozen=True)
class LockVerdict:
    stale: bool
    reason: str


def judge_lock(hostname: str, holders: Iterable[LockHolder], alive_pids: set[int]) -> LockVerdict:
    """Whether a repository lock on the host whose borg host id is ``hostname`` may be broken.

    ``hostname`` is the full id borg records (``FQDN@NODE``, or ``BORG_HOST_ID``), computed on
    the host itself: two machines may share a short name. ``holders`` come from the lock files;
    ``alive_pids`` are those of the holders' pids that are alive on the host. Stale only when
    there is at least one holder, every holder was written by this host (same full id), and
    no holder's pid is alive.
    """
    holders = list(holders)
    if not holders:
        return LockVerdict(False, "not locked")
    foreign = sorted({h.host for h in holders if not hostname or h.host != hostname})
    if foreign:
        return LockVerdict(False, f"locked by borg on another machine ({', '.join(foreign)}): cannot tell whether it still runs")
    live = sorted({h.pid for h in holders if h.pid in alive_pids})
    if live:
        return LockVerdict(False, f"locked by live process(es) {', '.join(map(str, live))} on {hostname}")
    gone = ", ".join(str(pid) for pid in sorted({h.pid for h in holders}))
    return LockVerdict(True, f"left by process(es) {gone} of {hostname}, which no longer exist")
