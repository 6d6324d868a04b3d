"""``mutualbackup doctor``: before trusting the federation with data, each node checked and what to fix said.

Per node: reachable over SSH with its pinned host key, answering as the node it is (its node
program pinned its name at join), the node program's and borg's versions, the clock's skew
against the coordinator's, and on hosts the free space of the storage against what the host
still lends. One ``hello`` request per node, in parallel; nothing changes on any node.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mutualbackup import __version__
from mutualbackup.context import Context
from mutualbackup.errors import HostKeyMismatch, MutualBackupError
from mutualbackup.inventory.model import Node
from mutualbackup.inventory.units import format_size

MAX_SKEW_SECONDS = 60.0  # archive names, retention periods and the daemon's windows read the clocks
HELLO_TIMEOUT = 60.0
PARALLEL = 8


@dataclass
class Checkup:
    """What ``doctor`` found on one node; ``problems`` each say what to do."""

    node: str
    reachable: bool = False
    node_version: str | None = None
    borg_version: str | None = None
    clock_skew_seconds: float | None = None
    storage_free_bytes: int | None = None
    storage_lent_left_bytes: int | None = None
    member_file_signer: str | None = None  # the admin key's fingerprint the node accepted the member file from
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def doctor(ctx: Context, nodes: list[Node]) -> list[Checkup]:
    """Check ``nodes`` (in parallel); one :class:`Checkup` each, in the order given."""
    from mutualbackup.report.metrics import read_ledger

    left = {h.host: max(0, h.capacity_bytes - h.used_bytes) for h in read_ledger(ctx.history, ctx.federation).hosts}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(PARALLEL, max(1, len(nodes)))) as pool:
        return list(pool.map(lambda node: check_node(ctx, node, left.get(node.name)), nodes))


def check_node(ctx: Context, node: Node, lent_left: int | None) -> Checkup:
    found = Checkup(node.name)
    try:
        with ctx.session(node) as transport:
            asked = time.time()
            reply = transport.request("hello", {"signed": ctx.signed(node.member)}, timeout=HELLO_TIMEOUT)
            answered = time.time()
    except HostKeyMismatch as exc:
        found.problems.append(f"{exc}\n→ if the server was reinstalled, check its new key out of band, then put it in "
                              "host_key: in the member file")
        return found
    except MutualBackupError as exc:
        found.problems.append(f"{exc}\n→ is the server up, and does the member file give its address, port and "
                              "user? (`mutualbackup-node join` installs the coordinator's key)")
        return found
    if not reply.ok:
        found.problems.append(f"{node.name}: {reply.error}\n→ run `mutualbackup-node join` on the node as its "
                              "member's admin, or correct the member file")
        return found
    found.reachable = True
    _versions(found, reply.data)
    _member_file(found, node, reply.data)
    _clock(found, reply.data, asked, answered)
    if node.storage is not None:
        _storage(found, reply.data, lent_left)
    return found


def _versions(found: Checkup, data: dict[str, Any]) -> None:
    found.node_version = str(data.get("version") or "") or None
    borg = data.get("borg")
    found.borg_version = str(borg) if borg else None
    if found.node_version != __version__:
        found.problems.append(f"mutualbackup-node {found.node_version} on the node, {__version__} here\n"
                              "→ install the same version on both")
    if not found.borg_version:
        found.problems.append("borg does not run on the node\n→ install borgbackup 1.4 (playbooks/join.yml does it)")
    elif not found.borg_version.split()[-1].startswith("1.4."):
        found.problems.append(f"{found.borg_version} on the node\n→ install borgbackup 1.4")


def _member_file(found: Checkup, node: Node, data: dict[str, Any]) -> None:
    if data.get("member_file"):
        found.member_file_signer = str(data["member_file"])
    elif data.get("member_file_error"):
        found.problems.append(f"{data['member_file_error']}\n→ one of {node.member}'s admins signs members/"
                              f"{node.member}.yml (`mutualbackup sign`); after losing every admin key, run "
                              "`mutualbackup-node join` again on the node")


def _clock(found: Checkup, data: dict[str, Any], asked: float, answered: float) -> None:
    node_time = data.get("time")
    if not isinstance(node_time, (int, float)):
        return
    skew = float(node_time) - (asked + answered) / 2
    found.clock_skew_seconds = round(skew, 3)
    if abs(skew) > MAX_SKEW_SECONDS + (answered - asked) / 2:
        found.problems.append(f"the node's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the "
                              "coordinator's\n→ run NTP on both (systemd-timesyncd or chrony)")


def _storage(found: Checkup, data: dict[str, Any], lent_left: int | None) -> None:
    free = data.get("storage_free")
    if not isinstance(free, int):
        found.problems.append(f"the storage directory cannot be read: {data.get('storage_error') or 'no answer'}\n"
                              "→ run `mutualbackup-node join` again (it makes the directory)")
        return
    found.storage_free_bytes = free
    found.storage_lent_left_bytes = lent_left
    if lent_left is not None and free < lent_left:
        found.problems.append(f"{format_size(free)} free on the storage's disk, and it still lends "
                              f"{format_size(lent_left)} (capacity − what replicas use)\n"
                              "→ free space on that disk, or lower storage.capacity in the member file")
