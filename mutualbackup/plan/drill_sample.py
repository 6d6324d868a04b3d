"""What a restore drill samples, and how it judges what it extracted. Pure.

Each drill puts a different top-level backup path first, in turn, and walks on through its
files from where the previous turn stopped (:func:`choose_sample`), so successive drills
exercise every path, then every file. The extracted sample is compared with the archive
(type, permissions, size, sha256, symlink target) and, for files unchanged since the archive,
with the live files too (:func:`verify_sample`); the facts come from a small ``sh`` program run on
the source (:func:`inspect_argv`, :func:`parse_inspection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mutualbackup import borg
from mutualbackup.borg import Entry, Item


SAMPLE_BYTES = 64 * 1024**2
"""At most this much file data per drill (except a lone file larger than that, see choose_sample)."""

SAMPLE_FILES = 200
"""At most this many files and symlinks per drill."""

MTIME_TOLERANCE = 5e-6
"""borg lists mtimes to the microsecond; a live file within this of the archive's mtime (and of the same size) is unchanged."""


def top_level_paths(paths: Sequence[str]) -> list[str]:
    """A source's backup paths in archive form (no leading slash), in inventory order."""
    return [borg.archive_path(p).rstrip("/") for p in paths]


def _root_of(path: str, roots: Sequence[str]) -> str:
    """The longest top-level path holding ``path`` ('' when none does)."""
    best = ""
    for root in roots:
        if (path == root or path.startswith(root + "/") or root == "") and len(root) >= len(best):
            best = root
    return best


def _encodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def choose_sample(
    entries: Sequence[Entry],
    roots: Sequence[str],
    drill_number: int,
    *,
    max_bytes: int = SAMPLE_BYTES,
    max_files: int = SAMPLE_FILES,
) -> tuple[str, list[Entry]]:
    """The top-level path this drill exercises first, and the sampled files and symlinks.

    Drill ``n`` puts the ``n mod k``-th top-level path that has files first (``k``
    of them), starting in its sorted file list where its previous turn stopped
    (``(n div k) × max_files``, wrapping), and fills the budget (``max_bytes``,
    ``max_files``) from it, then from the next paths. Files larger than what is
    left of the budget are skipped, except that the first path always gets one
    file: its smallest, alone, when none fits. Hardlinks to earlier files,
    directories and devices are not sampled. Pure and deterministic.
    """
    groups: dict[str, list[Entry]] = {}
    order = list(roots) + [""]
    for entry in entries:
        if entry.kind not in ("-", "l") or not _encodable(entry.path):
            continue
        groups.setdefault(_root_of(entry.path, roots), []).append(entry)
    turns = [root for root in dict.fromkeys(order) if groups.get(root)]
    if not turns:
        return "", []
    first = drill_number % len(turns)
    rounds = drill_number // len(turns)
    chosen: list[Entry] = []
    used = 0
    for position in range(len(turns)):
        root = turns[(first + position) % len(turns)]
        files = sorted(groups[root], key=lambda e: e.path)
        start = (rounds * max_files) % len(files) if position == 0 else 0
        rotated = files[start:] + files[:start]
        taken = 0
        for entry in rotated:
            if len(chosen) >= max_files:
                break
            size = entry.size if entry.kind == "-" else 0
            if used + size <= max_bytes:
                chosen.append(entry)
                used += size
                taken += 1
        if position == 0 and taken == 0:
            smallest = min(files, key=lambda e: (e.size, e.path))
            chosen.append(smallest)
            used += smallest.size
    return turns[first], chosen


@dataclass(frozen=True)
class Observation:
    """What the node says about one path: find's type letter ('-' when absent), mode bits, size, mtime, link, sha256."""

    kind: str
    mode: int
    size: int
    mtime: float
    link: str
    sha256: str


MISSING = Observation("-", 0, 0, 0.0, "", "")


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    live_checked: int = 0  # live files unchanged since the archive, and compared
    live_changed: int = 0  # live files changed (or gone) since the archive: not compared


def verify_sample(items: Sequence[Item], extracted: dict[str, Observation], live: dict[str, Observation]) -> Verdict:
    """Compare each sampled item with its extracted copy and, when unchanged since the archive, its live file."""
    verdict = Verdict()
    for item in items:
        got = extracted.get(item.path, MISSING)
        now = live.get(item.path, MISSING)
        if item.type == "-":
            if got.kind != "f":
                verdict.problems.append(f"{item.path}: not extracted")
                continue
            if not item.sha256:
                verdict.problems.append(f"{item.path}: borg gave no checksum")
            elif got.sha256 != item.sha256 or got.size != item.size:
                verdict.problems.append(f"{item.path}: the extracted file does not match the archive's checksum")
            if got.mode != item.permissions:
                verdict.problems.append(f"{item.path}: extracted with mode {got.mode:o}, the archive says {item.permissions:o}")
            unchanged = now.kind == "f" and now.size == item.size and abs(now.mtime - item.mtime) <= MTIME_TOLERANCE
            if unchanged:
                verdict.live_checked += 1
                if now.sha256 != item.sha256:
                    verdict.problems.append(
                        f"/{item.path}: the live file has the archived size and mtime but different content "
                        "(silent corruption on the source, or in the backup)"
                    )
            else:
                verdict.live_changed += 1
        elif item.type == "l":
            target = item.linktarget or item.source
            if got.kind != "l" or got.link != target:
                verdict.problems.append(f"{item.path}: the extracted symlink does not point to {target!r}")
            if now.kind == "l" and now.link == target:
                verdict.live_checked += 1
            else:
                verdict.live_changed += 1
    return verdict




def inspect_argv(scratch: str, paths: Sequence[str]) -> tuple[str, ...]:
    from mutualbackup import scripts

    return ("sh", "-c", scripts.text("drill_inspect.sh"), "sh", scratch, *paths)


def parse_inspection(stdout: bytes, paths: Sequence[str]) -> tuple[dict[str, Observation], dict[str, Observation]]:
    """(extracted, live) observations per archive path from ``scripts/drill_inspect.sh``'s output."""
    fields = stdout.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) != 12 * len(paths):
        raise ValueError(f"the inspection printed {len(fields)} fields for {len(paths)} path(s)")

    def observation(chunk: list[bytes]) -> Observation:
        kind = chunk[0].decode()
        if kind == "-":
            return MISSING
        return Observation(
            kind=kind, mode=int(chunk[1] or b"0", 8), size=int(chunk[2] or b"0"), mtime=float(chunk[3] or b"0"),
            link=chunk[4].decode("utf-8", "surrogateescape"), sha256=chunk[5].decode(),
        )

    extracted, live = {}, {}
    for index, path in enumerate(paths):
        chunk = fields[12 * index : 12 * index + 12]
        extracted[path] = observation(chunk[:6])
        live[path] = observation(chunk[6:])
    return extracted, live
