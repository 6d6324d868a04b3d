"""What a node obeys: its member's file, signed by an admin the node pinned at join.

A request that depends on what the member decided (what to back up and how, what to keep, where
a passphrase may go) carries ``signed``: the member file's bytes, its signature, and the
federation's ``federation.yml`` (for the defaults the member file leaves to it). The node
verifies the signature against the admins it pinned (``ssh-keygen -Y verify``), reads the file as
the coordinator's ``check`` reads it, and acts only on its own entry there. ``before:`` and
``exclude`` come only from the member's file, never from the federation's defaults; a retention
left to the defaults must keep at least a week. A file signed by a pinned admin that names other
admins re-pins them: admins rotate by signing, never by the coordinator.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

from mutualbackup.inventory.model import Backup, Member, Node, Retention
from mutualbackup.node.config import NodeConfig
from mutualbackup.node.requests import Refused, Session

WEEK_SECONDS = 7 * 86400


class NotSigned(Refused):
    """The request has no valid signed member file, or disagrees with it: nothing ran."""


@dataclass(frozen=True)
class Signed:
    """This node's member file, verified: the member, this node's entry, and what the file itself says."""

    member: Member
    node: Node
    own_keys: frozenset[str]  # the keys of this node's backup: section written in the member's file itself
    signer: str  # SHA256 fingerprint of the admin's key that signed

    @property
    def backup(self) -> Backup:
        """What this node backs up, and how: the member's file, never the federation's defaults for commands
        and exclusions."""
        if self.node.backup is None:
            raise NotSigned(f"{self.member.name}'s signed file does not make {self.node.name} a source: nothing was done")
        backup = self.node.backup
        return replace(backup, before=backup.before if "before" in self.own_keys else (),
                       exclude=backup.exclude if "exclude" in self.own_keys else ())

    @property
    def retention(self) -> Retention:
        retention = self.backup.retention
        if "retention" not in self.own_keys and not keeps_a_week(retention):
            raise NotSigned(f"the federation's default retention keeps less than a week, and {self.member.name}'s "
                            "signed file sets none for this node: sign a retention in it; nothing was pruned")
        return retention


def keeps_a_week(retention: Retention) -> bool:
    """Whether ``retention`` keeps at least the last week of backups (a floor for defaults the member did not sign)."""
    return (retention.daily >= 7 or retention.hourly >= 168 or retention.weekly >= 1 or retention.monthly >= 1
            or retention.yearly >= 1)


def verified(session: Session, args: Mapping[str, Any]) -> Signed:
    """The signed member file this request carries, verified against the admins this node pinned; NotSigned
    when there is none, or it does not verify, or it is not this node's member's."""
    config = session.config
    material = args.get("signed")
    if not isinstance(material, dict) or not all(isinstance(material.get(k), str)
                                                 for k in ("file", "signature", "federation")):
        raise NotSigned(f"the request carries no signed member file: {config.member}'s nodes act only on what "
                        "its admins signed; nothing was done")
    memo = _memo(material, config)
    signed = _VERIFIED.get(memo) or _remembered(config.state, memo)
    if signed is None:
        from mutualbackup.inventory.signatures import SignatureError, verify

        text = material["file"].encode("utf-8")
        try:
            signer = verify(text, material["signature"].encode("utf-8"), config.member,
                            tuple(a.key for a in config.admins))
        except SignatureError as exc:
            raise NotSigned(f"{config.member}'s member file is refused: {exc} (this node accepts only the admins "
                            f"pinned at join: {', '.join(a.name for a in config.admins) or 'none'}); "
                            "nothing was done") from None
        member = _load(config.member, text, material["federation"].encode("utf-8"))
        _refuse_unusable_admins(config.member, member)
        nodes = [n for n in member.nodes if n.slug == config.node]
        if not nodes:
            raise NotSigned(f"{config.member}'s signed file has no node {config.node}: nothing was done")
        signed = Signed(member, nodes[0], _own_backup_keys(text, config.node), signer)
        _remember(config.state, memo, signed)
    if len(_VERIFIED) >= 64:
        _VERIFIED.clear()
    _VERIFIED[memo] = signed
    _repin(session, signed.member)
    return signed


# What this process verified already (a serve process answers one request; a test's fake nodes answer many).
_VERIFIED: dict[tuple[object, ...], Signed] = {}


def _memo(material: Mapping[str, str], config: NodeConfig) -> tuple[object, ...]:
    """Everything a reading of the signed file depends on."""
    return (material["file"], material["signature"], material["federation"], config.member, config.node,
            tuple(a.key for a in config.admins))


VERIFIED_DIRECTORY = "verified"  # in the node's root-only state: member files this node verified, as it read them
VERIFIED_KEPT = 8  # a member file changes rarely: the last few are enough for every request between two changes


def _memo_file(state: str, memo: tuple[object, ...]) -> str:
    """Where the reading of ``memo`` is kept. The name only spreads readings over files (CRC-32 of everything the
    reading depends on: the file, its signature, the federation's file, the node, the pinned admins, this program's
    version); the file holds the whole of that too, and a reading is used only when all of it is equal."""
    import zlib

    spread = zlib.crc32(repr(_memo_key(memo)).encode("utf-8", "surrogateescape"))
    return os.path.join(state, VERIFIED_DIRECTORY, f"{spread:08x}.pickle")


def _memo_key(memo: tuple[object, ...]) -> tuple[object, ...]:
    """``memo``, and what says which program read it: its version, and when its model and this file were
    installed (an upgrade that changes the classes a reading holds makes every reading a new one)."""
    from mutualbackup import __version__
    from mutualbackup.inventory import model

    installed = tuple(os.stat(module).st_mtime_ns for module in (model.__file__, __file__))
    return (__version__, installed, *memo)


def _remembered(state: str, memo: tuple[object, ...]) -> Signed | None:
    """This node's own earlier reading of the same signed file for the same pinned admins (the signature check,
    ``ssh-keygen``, and the YAML reading are the node program's largest fixed cost before borg starts), or None.

    Only root's process reads it, and only from a directory and a file that root owns and nobody else may write
    (the state holds the source's key and passphrase already: whoever writes there has them)."""
    if os.geteuid() != 0 or not state:
        return None
    path = _memo_file(state, memo)
    try:
        if not all(_only_roots(os.lstat(p)) for p in (state, os.path.dirname(path))):
            return None  # (lstat: a directory, not a link to one)
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
            if not _only_roots(os.fstat(handle.fileno())):
                return None
            import pickle

            key, signed = pickle.load(handle)
    except Exception:  # noqa: BLE001 - absent, unreadable, or from a program whose classes changed: verify again
        return None
    return signed if key == _memo_key(memo) and isinstance(signed, Signed) else None


def _remember(state: str, memo: tuple[object, ...], signed: Signed) -> None:
    """Keep ``signed`` for the next requests (as root, in the root-only state; the oldest readings dropped).
    A failure to keep it costs only the next request's time."""
    if os.geteuid() != 0 or not state:
        return
    import pickle
    import tempfile
    import time

    path = _memo_file(state, memo)
    directory = os.path.dirname(path)
    temporary = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".tmp.", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            pickle.dump((_memo_key(memo), signed), handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
        temporary = None
        entries = list(os.scandir(directory))
        kept = sorted((entry for entry in entries if entry.name.endswith(".pickle")),
                      key=lambda entry: entry.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
        left = [e for e in entries if e.name.startswith(".tmp.") and time.time() - e.stat().st_mtime > 600]
        for entry in kept[VERIFIED_KEPT:] + left:
            os.unlink(entry.path)  # the oldest readings, and what an interrupted one left
    except (OSError, pickle.PicklingError):
        pass
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _only_roots(status: os.stat_result) -> bool:
    return status.st_uid == 0 and not status.st_mode & 0o022


def _load(member: str, text: bytes, federation: bytes) -> Member:
    """The member file read as ``check`` reads it (the federation's defaults under it)."""
    from mutualbackup.errors import InventoryError
    from mutualbackup.inventory.load import load_inventory

    import tempfile

    with tempfile.TemporaryDirectory(prefix="mutualbackup-signed-") as scratch:
        os.makedirs(os.path.join(scratch, "members"))
        with open(os.path.join(scratch, "federation.yml"), "wb") as handle:
            handle.write(federation)
        with open(os.path.join(scratch, "members", f"{member}.yml"), "wb") as handle:
            handle.write(text)
        try:
            loaded = load_inventory(scratch)
        except InventoryError as exc:
            problems = "; ".join(p.replace(scratch + os.sep, "") for p in exc.problems[:3])
            raise NotSigned(f"{member}'s signed file does not read: {problems}; nothing was done") from None
    return next(m for m in loaded.members if m.name == member)


def _own_backup_keys(text: bytes, slug: str) -> frozenset[str]:
    import yaml

    document = yaml.safe_load(text)
    for entry in document.get("nodes") or []:
        if isinstance(entry, dict) and entry.get("name") == slug and isinstance(entry.get("backup"), dict):
            return frozenset(entry["backup"])
    return frozenset()


def _refuse_unusable_admins(name: str, member: Member) -> None:
    """NotSigned when the file names an admin whose key no private key makes: pinned, it would let anyone sign."""
    from mutualbackup.inventory.value_checks import unusable_admin

    unusable = unusable_admin(member.admins)
    if unusable is not None:
        raise NotSigned(f"{name}'s signed file is refused: {unusable}; nothing was done")


def _repin(session: Session, member: Member) -> None:
    """The admins of a file a pinned admin signed become the pinned ones (as root; a host's login cannot)."""
    from mutualbackup.node.config import Admin, write_config

    config = session.config
    admins = tuple(Admin(a.name, a.key) for a in member.admins)
    if admins == config.admins or os.geteuid() != 0 or not config.directory:
        return
    updated = replace(config, admins=admins)
    write_config(updated, config.directory)
    session.config = updated
    session.emit("repinned", admins=[a.name for a in admins])


def must_match(signed: Signed, what: str, asked: object, signed_value: object) -> None:
    if asked != signed_value:
        raise NotSigned(f"the request disagrees with {signed.member.name}'s signed file on {what} "
                        f"(asked {asked!r}, signed {signed_value!r}): nothing was done")
