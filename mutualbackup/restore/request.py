"""Who may restore what, where: a restore request checked before anything is touched.

A destination of another member receives the plaintext and the passphrase, which unlocks the
repository key for good: refused without ``--allow-other-member``, and refused outright when that
member also holds a replica of the source. A recovery file never chooses a repository's path.
"""

from __future__ import annotations

import posixpath

import logging
from typing import Callable

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import UsageError
from mutualbackup.inventory.model import Node
from mutualbackup.restore import recovery_file
from mutualbackup.restore.kit import RecoveryFile
from mutualbackup.restore.replicas import choose_replica

log = logging.getLogger("mutualbackup.restore")


def checked_request(
    ctx: Context, source_name: str, source_node: Node | None, destination: Node, directory: str,
    replica: str | None, recovery: RecoveryFile | None, allow_other_member: bool,
) -> tuple[list[Node], Callable[[Node], str]]:
    """The replicas to try and where each holds the repository, once the request is checked (UsageError)."""
    if not directory.startswith("/"):
        raise UsageError(f"the target directory must be absolute, got {directory!r}")
    if posixpath.normpath(directory) in ("/", "//"):
        raise UsageError(f"a restore goes into a new directory ({destination.name}:/srv/restore, say), never over "
                         "the live system (/): restore there, then copy back what you need")
    if recovery is not None and recovery.source != source_name:
        raise UsageError(f"the recovery file is for {recovery.source}, not {source_name}")
    if source_node is None and recovery is None:
        raise UsageError(f"{source_name} is not in the inventory: restore it with --recovery FILE")
    if destination.member != source_name.split("/", 1)[0]:
        check_other_member(ctx, source_name, destination, recovery, allow_other_member)
    if recovery is None:
        assert source_node is not None
        return choose_replica(ctx, source_name, replica), lambda host: borg.repository_path(source_node, host)
    among, skipped = recovery_file.usable_hosts(recovery, ctx.federation)
    for name in skipped:
        log.warning("%s (in the recovery file) is no longer in the inventory: skipping its repository", name)
    # computed from the inventory: the file's path was only compared with it
    return choose_replica(ctx, source_name, replica, among), lambda host: recovery_file.repository_path(source_name, host)


def check_other_member(
    ctx: Context, source: str, destination: Node, recovery: RecoveryFile | None, allowed: bool
) -> None:
    """Refuse, or warn about, a restore onto a node of another member than the source's.

    That member sees the plaintext, and its node receives the passphrase, which unlocks
    the repository key for good. Refused outright when that member also holds (or is
    planned to hold) a replica of the source: it would have both the ciphertext and the
    passphrase. Otherwise refused without ``allowed`` (``--allow-other-member``), and
    logged as a warning with it.
    """
    source_member = source.split("/", 1)[0]
    holding = sorted(
        {*ctx.replicas_of(source), *ctx.placement.replicas.get(source, ()),
         *(r.host for r in (recovery.repositories if recovery is not None else ()))}
    )
    theirs = [host for host in holding if host.split("/", 1)[0] == destination.member]
    consequence = (
        f"{destination.member} could decrypt every archive of {source}, past and future, from now on: the passphrase "
        "unlocks the repository key for good, and rotating the passphrase does not undo it"
    )
    if theirs:
        raise UsageError(
            f"refusing to restore {source} onto {destination.name}: {destination.member} hosts a replica of {source} "
            f"({', '.join(theirs)}), and this restore would show it {source_member}'s plaintext and send it the "
            f"passphrase too; holding both the encrypted repository and the passphrase, {consequence}.\n"
            f"--allow-other-member does not lift this: restore onto a node of {source_member}, or of a member that "
            f"holds no replica of {source}."
        )
    if not allowed:
        raise UsageError(
            f"restoring {source} onto {destination.name} would show {source_member}'s plaintext to {destination.member} "
            f"and send it {source}'s passphrase: {consequence}.\n"
            f"Add --allow-other-member only once {source_member} agreed; the history records it and who asked."
        )
    if recovery is None:
        raise UsageError(
            f"restoring {source} onto {destination.name}, a node of another member, needs {source_member}'s recovery "
            f"kit opened by one of its admins: bring the kit (made by `mutualbackup keys export {source}`) and an "
            f"admin's SSH key, and add --recovery KIT --identity KEY. {source_member}'s nodes never send their "
            "passphrase to another member's node by themselves."
        )
    log.warning(
        "restoring %s onto %s (--allow-other-member): %s sees the plaintext and receives the passphrase; %s",
        source, destination.name, destination.member, consequence,
    )
