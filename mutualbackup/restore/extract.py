"""``mutualbackup restore``: extract an archive onto any node of the federation.

Borg always runs on the node that receives the files (the *destination*) and reads the
repository on a replica's host over SSH: plaintext never passes through the host or the
coordinator. Onto the source itself borg uses the source's own key; onto any other node (or
with ``--recovery``) a temporary key (:mod:`~mutualbackup.restore.temporary_key`; the whole
story is in ARCHITECTURE.md, "Restores"). The request is checked first
(:mod:`~mutualbackup.restore.request`), then each replica is tried in turn
(:mod:`~mutualbackup.restore.attempt`).
"""

from __future__ import annotations


import contextlib
import datetime as dt
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.borg import ExtractProgress
from mutualbackup.context import Context
from mutualbackup.restore.recovery_file import RecoveryFile
from mutualbackup.inventory.model import Node
from mutualbackup.restore.attempt import RestoreResult, RestoreJob
from mutualbackup.restore.request import checked_request
from mutualbackup.restore.temporary_key import (
    Access, Delegated, EarlyGrant, HostGrant, authorised, expanded, new_restore_key,
    read_source_passphrase, remove_temporary,
)
from mutualbackup.remote.transport import Transport

log = logging.getLogger("mutualbackup.restore.extract")


# --- choosing a replica ---------------------------------------------------------------


# --- restore --------------------------------------------------------------------------


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

    ``source`` is a Node, or only its name when it is gone from the inventory
    (then ``recovery`` is required). Raises UsageError (exit 2) for a refused
    request (another member without ``allow_other_member``, or one that hosts a
    replica of the source, see :func:`~mutualbackup.restore.request.check_other_member`; a recovery file that
    disagrees with the inventory, see :func:`mutualbackup.restore.recovery_file.usable_hosts`; a
    non-empty target without ``force``; a relative directory) and OperationFailed
    when the restore fails; the history records every attempted restore, with who asked.
    """
    source_name = source if isinstance(source, str) else source.name
    source_node = source if isinstance(source, Node) else None
    hosts, repository_path = checked_request(ctx, source_name, source_node, destination, directory, replica,
                                              recovery, allow_other_member)
    other_member = destination.member != source_name.split("/", 1)[0]
    delegated = recovery is not None or destination.name != source_name
    detail: dict[str, object] = {
        "to": f"{destination.name}:{directory}", "paths": list(paths), "dry_run": dry_run,
        "requested_by": requested_by, "other_member": other_member, "recovery": recovery is not None,
        "access": "temporary key" if delegated else "source key",
    }
    job = RestoreJob(ctx, source_name, destination, directory, hosts, repository_path, archive, tuple(paths), dry_run,
               detail, recovery, on_progress, on_line)
    transport = ctx.connect(destination)
    try:
        if not delegated:
            assert source_node is not None
            workdir = expanded(transport, source_node.workdir)
            access = Access(env=borg.client_env(borg.SourcePaths(workdir)), prepare=None if dry_run else (directory, force))
            try:
                return job.run(transport, access)
            finally:
                job.release()
        return _restore_delegated(job, transport, source_node, force)
    finally:
        transport.close()


def _restore_delegated(job: "RestoreJob", transport: Transport, source_node: Node | None, force: bool) -> RestoreResult:
    """The temporary-key restore: borg extract starts as soon as the destination is connected.

    A key pair is made in memory; then, all at once, the first replica's host
    accepts its public half, the passphrase is read from the source, and borg
    extract starts on the destination with the private key on its stdin; its
    ssh waits (the gate of :func:`node_commands.delegated_argv`) until the host's
    line is in and the passphrase has followed on stdin. The same round trip
    checks the target and removes the temporary directory. The host's line is
    withdrawn in the background as soon as borg reports on the archive (its
    connection is up): when all goes well, nothing is left to do once borg ends.
    """
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), secrets.token_hex(4))
    key = new_restore_key(borg.restore_comment(job.source, restore_id))
    with contextlib.ExitStack() as cleanup, ThreadPoolExecutor(max_workers=3, thread_name_prefix="restore") as pool:
        first = job.hosts[0]
        early = EarlyGrant(pool, authorised(job.ctx, first, job.source, job.repository_path(first), key.public_key, restore_id))
        cleanup.callback(early.close)
        workdir = pool.submit(_connected_workdir, transport, job.destination)
        if job.recovery is None and source_node is not None:
            secret = pool.submit(read_source_passphrase, job.ctx, source_node)
            passphrase: Callable[[], bytes] = secret.result
        else:
            assert job.recovery is not None
            known = job.recovery.passphrase.encode("utf-8")
            passphrase = lambda: known  # noqa: E731
        delegated = Delegated.under(workdir.result(), restore_id, job.hosts, key)

        def grant(host: Node, path: str) -> contextlib.AbstractContextManager[HostGrant]:
            if host is first:
                return early.take()
            return authorised(job.ctx, host, job.source, path, key.public_key, restore_id)

        access = Access(env={}, passphrase=passphrase, grant=grant, name="temporary key",
                        prepare=None if job.dry_run else (job.directory, force), delegated=delegated)
        try:
            return job.run(transport, access)
        finally:
            revoked = pool.submit(job.release)
            if delegated.left_behind:
                remove_temporary(transport, job.destination, delegated.tmp)
            revoked.result()


def _connected_workdir(transport: Transport, destination: Node) -> str:
    """The destination's workdir, ``~`` expanded; the connection is opened either way."""
    transport.connect()
    return expanded(transport, destination.workdir)


