"""``keys export`` and ``restore --recovery``: the recovery kit on the coordinator's side.

The source makes the kit and seals it for its member's admins pinned at join (:mod:`~mutualbackup.node.restore`);
the coordinator only writes the ciphertext where the operator asked (``--out``, mode 0600, never over
an existing file) and stores nothing of it. ``restore --recovery KIT --identity KEY`` opens it here,
with an admin's SSH key: restoring from a kit needs a member's admin at the keyboard.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.inventory.units import quote
from mutualbackup.node.requests import host_ref
from mutualbackup.restore.kit import RecoveryFile, parse, split_name


def repository_path(source: str, host: Node) -> str:
    """Where ``source`` (``MEMBER/NODE``, possibly gone from the inventory) keeps its repository on ``host``.

    STORAGE/MEMBER/NODE with the inventory's ``storage.path`` of ``host``: the rule of
    :func:`mutualbackup.borg.repository_path`, from the source's name alone.
    """
    if host.storage is None:
        raise ValueError(f"{host.name} is not a host (no storage: section)")
    member, node = split_name(source)
    return posixpath.join(host.storage.path, member, node)


def usable_hosts(recovery: RecoveryFile, federation: Federation) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(hosts of ``recovery`` to restore from, hosts skipped because they left the inventory).

    The file never chooses a path: each repository must be where the inventory puts
    it (:func:`repository_path` of the inventory's host), and its host must be a host
    there. UsageError (exit 2) when a path differs, when a host is a node without
    ``storage:``, or when no host of the file is left in the inventory.
    """
    nodes = {node.name: node for node in federation.nodes()}
    usable: list[str] = []
    skipped: list[str] = []
    for entry in recovery.repositories:
        host = nodes.get(entry.host)
        if host is None:
            skipped.append(entry.host)
            continue
        if host.storage is None:
            raise UsageError(
                f"the recovery file names {entry.host} as a host of {recovery.source}, but it is not a host in the inventory "
                "(no storage: section); refusing to use this file"
            )
        expected = repository_path(recovery.source, host)
        if entry.path != expected:
            raise UsageError(
                f"the recovery file puts the repository of {recovery.source} on {entry.host} at {quote(entry.path, 120)}, "
                f"but the inventory puts it at {quote(expected, 120)}; a recovery file never chooses the path, so nothing was done.\n"
                "If the file was altered, do not use it; if the host's storage path changed, fix the inventory or export the keys again"
            )
        usable.append(entry.host)
    if not usable:
        raise UsageError(
            f"none of the hosts in the recovery file ({', '.join(r.host for r in recovery.repositories)}) is in the inventory; "
            "nothing was done"
        )
    return tuple(usable), tuple(skipped)


def write_private(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 and ``text``; refuses to replace an existing file.

    On any failure (a full disk, an interruption…) the file just created is removed:
    a partial secret file is never left behind.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; choose another --out (a recovery file is never overwritten)") from None
    except OSError as exc:
        raise OperationFailed(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(fd, 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise OperationFailed(f"cannot write {path} (nothing was kept): {exc.strerror}") from None
        raise




def export_keys(ctx: Context, source: Node, out: str) -> KitSummary:
    """Ask ``source`` for its recovery kit (sealed there for its admins) and write it to ``out`` (0600, never over
    a file); what it holds, without any secret. OperationFailed when the source cannot make it."""
    if not ctx.replicas_of(source.name):
        raise OperationFailed(f"{source.name} has no provisioned replica: run `mutualbackup apply` first")
    hosts = ctx.replica_hosts(source.name)
    if not hosts:
        raise OperationFailed(
            f"none of the recorded replicas of {source.name} ({', '.join(ctx.replicas_of(source.name))}) "
            "is a host in the inventory any more: run `mutualbackup apply` first"
        )
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; choose another --out (a recovery kit is never overwritten)")
    with ctx.session(source) as transport:
        reply = transport.request("export_kit", {"hosts": [host_ref(h) for h in hosts], "federation": ctx.federation.name},
                                  timeout=900)
    if not reply.ok:
        raise OperationFailed(f"cannot export the keys of {source.name}; nothing was written:\n{reply.error}")
    write_private(out, str(reply.data["kit"]))
    return KitSummary(source.name, out, tuple(reply.data.get("admins", [])), tuple(reply.data.get("repositories", [])))


@dataclass(frozen=True)
class KitSummary:
    """What ``keys export`` wrote: never the passphrase nor the keys (the coordinator never had them)."""

    source: str
    out: str
    admins: tuple[str, ...]
    repositories: tuple[Mapping[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "out": self.out, "mode": "0600", "sealed_for": list(self.admins),
                "repositories": [dict(r) for r in self.repositories]}


def open_kit(path: str, identity: str) -> RecoveryFile:
    """The kit at ``path`` opened with the admin's SSH private key ``identity``; UsageError saying what is wrong.

    A key protected by a passphrase is opened by Debian's ``age`` (it asks for the passphrase on the terminal).
    """
    try:
        with open(path, "rb") as handle:
            sealed = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read the recovery kit {path}: {exc.strerror}") from None
    if not (sealed.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----") or sealed.startswith(b"age-encryption.org/")):
        raise UsageError(f"{path} is not a recovery kit (an age-encrypted file made by `mutualbackup keys export`)")
    text = _decrypt(sealed, path, identity)
    try:
        return parse(text.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise UsageError(f"{path} does not hold a recovery kit (not UTF-8 inside)") from None


def _decrypt(sealed: bytes, path: str, identity: str) -> bytes:
    import pyrage
    from pyrage import ssh

    try:
        with open(identity, "rb") as handle:
            key = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read the identity {identity}: {exc.strerror}") from None
    try:
        return pyrage.decrypt(sealed, [ssh.Identity.from_buffer(key)])
    except Exception:  # noqa: BLE001 - an encrypted key, or the wrong one: let age say which
        pass
    if shutil.which("age") is None:
        raise UsageError(f"{identity} does not open {path}: it is not the key of one of the admins the kit is sealed for "
                         "(or it is protected by a passphrase: install `age` to be asked for it)")
    opened = subprocess.run(["age", "--decrypt", "-i", identity, path], capture_output=True)
    if opened.returncode != 0:
        raise UsageError(f"{identity} does not open {path}: {opened.stderr.decode('utf-8', 'replace').strip()}")
    return opened.stdout


WARNING = (
    "{out} is {source}'s recovery kit, sealed for {admins}: only their SSH keys open it "
    "(`age -d -i ~/.ssh/id_ed25519 {out}`).\nKeep a copy offline, away from the federation's servers."
)
