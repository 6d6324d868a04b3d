"""Which replica a restore, a listing or a drill reads from, best first; and the latest archives there.

A healthy replica (fewer than two failed backups in a row) before a failing one, then the freshest
successful backup first; a replica that cannot be listed passes the turn to the next.
"""

from __future__ import annotations

from typing import Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory.model import Node
from mutualbackup.node.requests import host_ref
from mutualbackup.remote.transport import Transport, reply_result
from mutualbackup.report.status import FAILING_AFTER

LIST_TIMEOUT = 600


def replica_order(ctx: Context, source: str, candidates: Sequence[str]) -> list[str]:
    """``candidates`` best first: healthy before failing, then the freshest successful backup."""

    def key(target: str) -> tuple[bool, float]:
        run = ctx.history.last_run("backup", source, target, successful=True)
        healthy = ctx.history.consecutive_failures("backup", source, target) < FAILING_AFTER
        return (healthy, run.started if run else 0.0)

    return sorted(candidates, key=key, reverse=True)


def choose_replica(ctx: Context, source: Node | str, requested: str | None, among: Sequence[str] | None = None) -> list[Node]:
    """Replicas to try, best first: the requested one, else freshest healthy first.

    ``among`` replaces the recorded replicas (the hosts of a recovery file).
    """
    name = source if isinstance(source, str) else source.name
    if among is not None:
        replicas = tuple(among)
    else:
        recorded = ctx.replicas_of(name)
        if not recorded:
            raise OperationFailed(f"{name} has no provisioned replica: run `mutualbackup apply` first")
        replicas = tuple(host.name for host in ctx.replica_hosts(name))
        if requested is not None and requested in recorded and requested not in replicas:
            raise UsageError(f"{requested} is no longer a host in the inventory: choose another --replica "
                             f"(replicas: {', '.join(replicas) or 'none'})")
        if not replicas:
            raise OperationFailed(f"none of the recorded replicas of {name} ({', '.join(recorded)}) is a host in the "
                                  "inventory any more: run `mutualbackup apply`")
    if requested is not None:
        if requested not in replicas:
            raise UsageError(f"{requested} holds no replica of {name} (replicas: {', '.join(replicas)})")
        return [ctx.node(requested)]
    return [ctx.node(t) for t in replica_order(ctx, name, replicas)]


def latest_listing(
    ctx: Context, transport: Transport, source: Node, *, replica: str | None = None,
    need_archive: bool = False, failure: str = "cannot list the archives of {source}",
) -> tuple[Node, list[borg.ArchiveEntry]]:
    """The archives of ``source`` on the best replica that answers (``borg list`` run through ``transport``).

    Replicas come from :func:`choose_replica` (``replica`` forces one); one that cannot be listed, or
    that holds no archive when ``need_archive``, passes the turn to the next. Raises OperationFailed,
    ``failure`` then each replica's problem, when none serves.
    """
    errors = []
    for host in choose_replica(ctx, source, replica):
        listed = reply_result(transport.request("list", {"host": host_ref(host)}, timeout=LIST_TIMEOUT + 60))
        if not borg.succeeded(listed.exit_code):
            errors.append(f"{host.name}: borg list exited {listed.exit_code}: {borg.exit_hint(listed.exit_code)}\n"
                          f"{borg.error_lines(listed.stderr.decode('utf-8', 'replace'))}")
            continue
        archives = borg.parse_list_json(listed.stdout)
        if need_archive and not archives:
            errors.append(f"{host.name}: no archive yet")
            continue
        return host, archives
    raise OperationFailed(failure.format(source=source.name) + ":\n" + "\n".join(errors))


def list_archives(ctx: Context, source: Node, replica: str | None = None) -> tuple[Node, list[borg.ArchiveEntry]]:
    """The archives of ``source`` on the chosen replica (falls back to the next when one is down)."""
    with ctx.session(source) as transport:
        return latest_listing(ctx, transport, source, replica=replica)
