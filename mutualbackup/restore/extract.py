"""``mutualbackup restore``: extract an archive onto any node of the federation.

Borg always runs on the node that receives the files (the *destination*) and reads the
repository on a replica's host over SSH: plaintext never passes through the host or the
coordinator. Onto the source itself borg uses the source's own key; onto any other node (or
with ``--recovery``) a key made for this restore, and the passphrase sealed for that node
(:mod:`~mutualbackup.restore.sealed`; the whole story is in ARCHITECTURE.md, "Restores"). The request is checked first
(:mod:`~mutualbackup.restore.request`), then each replica is tried in turn
(:mod:`~mutualbackup.restore.attempt`).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory.model import Node
from mutualbackup.node.restore import seal_for_node
from mutualbackup.restore.attempt import RestoreJob, RestoreResult
from mutualbackup.restore.kit import RecoveryFile
from mutualbackup.restore.request import checked_request
from mutualbackup.restore.sealed import Seal, sealed_by_source

log = logging.getLogger("mutualbackup.restore.extract")


def restore(
    ctx: Context,
    source: Node | str,
    destination: Node,
    directory: str,
    *,
    archive: str | None = None,
    paths: Sequence[str] = (),
    replica: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_other_member: bool = False,
    recovery: RecoveryFile | None = None,
    requested_by: str = "",
    on_progress: Callable[[ExtractProgress], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Extract ``archive`` (default: the latest) of ``source`` into ``directory`` on ``destination``.

    ``source`` is a Node, or only its name when it is gone from the inventory (then ``recovery``,
    the opened recovery kit, is required). Raises UsageError (exit 2) for a refused request (see
    :mod:`~mutualbackup.restore.request`; a non-empty target without ``force``) and
    OperationFailed when the restore fails; the history records every attempted restore, with who asked.
    """
    source_name = source if isinstance(source, str) else source.name
    source_node = source if isinstance(source, Node) else None
    sealed = recovery is not None or destination.name != source_name
    if not sealed:  # its program starts, and its borg on that word, while the request is checked here
        ctx.start(destination, kind="extract")
    try:
        hosts, _path = checked_request(ctx, source_name, source_node, destination, directory, replica, recovery,
                                       allow_other_member)
        other_member = destination.member != source_name.split("/", 1)[0]
        detail: dict[str, object] = {
            "to": f"{destination.name}:{directory}", "paths": list(paths), "dry_run": dry_run,
            "requested_by": requested_by, "other_member": other_member, "recovery": recovery is not None,
            "access": "sealed passphrase" if sealed else "source key",
        }
        seal = _sealing(ctx, source_node, destination, recovery) if sealed else None
        job = RestoreJob(ctx, source_name, destination, directory, hosts, archive, tuple(paths), dry_run, force, detail,
                         recovery, seal, on_progress, on_line)
        return job.run()
    finally:
        ctx.close_started()  # what a restore started early and did not need (sealed.SealedRestore)


def _sealing(ctx: Context, source: Node | None, destination: Node, recovery: RecoveryFile | None
             ) -> Callable[[Node], Seal]:
    """How each replica's restore gets the passphrase sealed for ``destination``: from the kit an admin opened
    here (with that repository's key, for a repository that lost its own), else sealed by the source itself."""
    if not destination.node_key:
        raise UsageError(f"{destination.name} has no node_key in the inventory: a passphrase travels only sealed for "
                         "the node that uses it. Join the node (`mutualbackup-node join`) and paste its node_key")
    if recovery is None and source is None:
        raise OperationFailed("a source gone from the inventory is restored with its recovery kit")
    # No node is reached for a refused request. The destination starts first, its borg on that word (the critical
    # path); the source and the host once its session is up.
    ctx.start(destination, kind="extract")
    if recovery is not None:
        def from_kit(host: Node) -> Seal:
            entry = recovery.repository(host.name)
            secret = {"passphrase": recovery.passphrase, "key": entry.key if entry is not None else ""}
            return lambda: seal_for_node(destination.node_key, secret)

        return from_kit
    assert source is not None
    cached: list[str] = []
    ctx.start(source, after=destination)  # the seal is asked as soon as the destination's session is up

    def by_source() -> str:
        if not cached:
            cached.append(sealed_by_source(ctx, source, destination))
        return cached[0]

    return lambda host: by_source
