"""A repository's archives as the coordinator reads them from the source, against what it recorded.

Used by the prune and by the compaction guard (SPEC promise 3): every archive seen is
recorded with its borg id, and what disappeared is judged against those records.
"""

from __future__ import annotations

from typing import Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.runs import RunFailed
from mutualbackup.node.requests import host_ref
from mutualbackup.remote.transport import Result, Transport, reply_result


LIST_TIMEOUT = 900


def borg_ok(result: Result, what: str, *, strict: bool = False) -> None:
    """Raise unless borg succeeded; ``strict``: a warning fails too (``borg check`` exits 1 when it finds errors)."""
    verdict = borg.classify_exit(result.exit_code)
    if verdict != "success" and (strict or verdict != "warning"):
        if strict and verdict == "warning":
            raise RunFailed(f"{what} found errors (exit {result.exit_code}):\n{result.stderr_tail()}".strip(), result.exit_code,
                          alert="repository-damaged")
        raise RunFailed(f"{what} exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail()}".strip(),
                      result.exit_code)


def list_archives(transport: Transport, host: Node) -> list[borg.ArchiveEntry]:
    """The archives of the source (the transport's node) in its repository on ``host``."""
    result = reply_result(transport.request("list", {"host": host_ref(host)}, timeout=LIST_TIMEOUT + 60))
    borg_ok(result, "borg list")
    return borg.parse_list_json(result.stdout)


def live_bytes(transport: Transport, host: Node) -> int | None:
    """The repository's live size (``borg info``), or None when borg cannot tell."""
    result = reply_result(transport.request("info", {"host": host_ref(host)}, timeout=LIST_TIMEOUT + 60))
    if not borg.succeeded(result.exit_code):
        return None
    try:
        return borg.parse_info_repository_bytes(result.stdout)
    except (ValueError, KeyError):
        return None


def recorded_archives(ctx: Context, source: Node, host: Node) -> dict[str, tuple[str | None, float | None]]:
    """name -> (recorded archive id, pruned) of the archives the coordinator recorded in this repository."""
    ids = ctx.history.archive_ids(source.name, host.name)
    return {name: (ids.get(name), pruned) for name, (_created, pruned) in ctx.history.known_archives(source.name, host.name).items()}


def archive_entries(archives: Sequence[borg.ArchiveEntry]) -> list[tuple[str, float, str | None]]:
    return [(a.name, a.time.timestamp(), a.id or None) for a in archives if not borg.is_checkpoint(a.name)]
