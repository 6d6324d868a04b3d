"""A replica moves, make before break: the new one is made and backed up, and only once it is healthy is
the old one given up — its key line removed from its host, its repository kept there (an orphan the
owning members decide about). Each step is idempotent and recorded, so a move resumes after a crash.

Which replicas move, and where to, is decided by :mod:`mutualbackup.plan.moves`; the daemon starts at
most a few moves at a time, and the new replica's backups follow the schedule like any other.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Callable

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.provision import ApplyReport, _init_repository, _prepare_host, _prepare_source, quota_size

log = logging.getLogger("mutualbackup.moves")


def new_replica_healthy(ctx: Context, move: sqlite3.Row) -> bool:
    """Whether the move's new replica has a successful backup made since the move began."""
    last = ctx.history.last_run("backup", move["source"], move["new"], successful=True)
    return last is not None and last.started >= move["started"]


def advance(ctx: Context, move: sqlite3.Row, *, clock: Callable[[], float] = time.time) -> str:
    """The move's next step: make the new replica (key, line, repository; then it is recorded and backed
    up by the schedule), or give the old one up once the new one is healthy. Returns what it did."""
    source = ctx.federation.node(move["source"])
    if move["new"] not in ctx.history.placement().get(source.name, ()):
        make_replica(ctx, source, ctx.federation.node(move["new"]))
        ctx.history.add_replica(source.name, move["new"], now=clock())
        log.info("move %s: %s → %s (%s): new replica made; its first backup comes next", source.name,
                 move["old"], move["new"], move["reason"])
        return "made"
    if not new_replica_healthy(ctx, move):
        return "waiting"
    give_up(ctx, source, move["old"])
    size = next((r.repository_bytes for r in ctx.history.runs(kind="backup", source=source.name, target=move["old"],
                                                               limit=20) if r.repository_bytes), None)
    ctx.history.end_move(source.name, move["old"], size=size, now=clock())
    log.info("moved %s from %s to %s (%s); its repository on %s is kept (%s): %s's member decides what becomes "
             "of it", source.name, move["old"], move["new"], move["reason"], move["old"],
             f"{size} bytes" if size else "size unknown", move["old"])
    return "done"


def make_replica(ctx: Context, source: Node, host: Node) -> None:
    """The source's key pinned to the new host too, the host's line for it, and the repository."""
    report = ApplyReport()
    held = [h for h in ctx.history.placement().get(source.name, ()) if _is_host(ctx, h)]
    with ctx.session(source) as transport:
        public_key = _prepare_source(ctx, transport, source, [*held, host.name], report)
    with ctx.session(host) as transport:
        _prepare_host(transport, host, _lines_of(ctx, host, {source.name: public_key}), report)
    with ctx.session(source) as transport:
        _init_repository(transport, source, host, report)


def give_up(ctx: Context, source: Node, old: str) -> None:
    """The old host's line for ``source`` removed (when the host is still there and answers)."""
    if not _is_host(ctx, old):
        return  # gone from the inventory: nothing to reach
    host = ctx.federation.node(old)
    try:
        with ctx.session(host) as transport:
            _prepare_host(transport, host, _lines_of(ctx, host, {}, without=source.name), ApplyReport())
    except MutualBackupError as exc:
        log.warning("%s's line on %s stays until the host answers again (the next `mutualbackup apply` removes "
                    "it): %s", source.name, old, exc)


def _lines_of(ctx: Context, host: Node, keys: dict[str, str], without: str = "") -> list[dict]:
    """The replicas ``host`` holds by the recorded placement (their lines kept as they are), plus ``keys``."""
    assert host.storage is not None
    sizes = ctx.history.repository_sizes()
    names = {s for s, hosts in ctx.history.placement().items() if host.name in hosts} | set(keys)
    replicas = []
    for name in sorted(names - {without}):
        quota = borg.replica_quota(quota_size(ctx.federation.node(name), sizes), host.storage.capacity) \
            if name in keys and _is_source(ctx, name) else 1
        replicas.append({"source": name, "public_key": keys.get(name), "quota": quota})
    return replicas


def _is_host(ctx: Context, name: str) -> bool:
    try:
        return ctx.federation.node(name).is_host
    except KeyError:
        return False


def _is_source(ctx: Context, name: str) -> bool:
    try:
        return ctx.federation.node(name).is_source
    except KeyError:
        return False
