"""Who lends what to whom: the federation's ledger, from the placement and measured sizes (pure).

Used by ``mutualbackup ledger`` and by the metrics (``mutualbackup_storage_*``,
``mutualbackup_member_*``), so that both always show the same numbers.

Per member:

- ``capacity_bytes``: the capacity its hosts lend (sum of their ``storage.capacity``);
- ``lent_bytes``: bytes of *other* members' repositories on its hosts (used by others);
- ``consumed_bytes``: bytes of its sources' repositories on other members' hosts
  (used elsewhere);
- ``balance_bytes``: ``lent_bytes - consumed_bytes``.

Per host: its capacity, the bytes of all repositories on it, and how many it holds.

Sizes are the *measured* ones (``repository_bytes`` recorded by the last backup or
prune of each replica); a replica never measured counts 0 bytes. Only replicas whose
source and host are both in the inventory count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from mutualbackup.inventory.model import Federation


@dataclass(frozen=True)
class MemberLedger:
    member: str
    capacity_bytes: int
    lent_bytes: int
    consumed_bytes: int

    @property
    def balance_bytes(self) -> int:
        return self.lent_bytes - self.consumed_bytes


@dataclass(frozen=True)
class HostUsage:
    host: str
    member: str
    capacity_bytes: int
    used_bytes: int
    repositories: int


@dataclass(frozen=True)
class Ledger:
    members: tuple[MemberLedger, ...]
    hosts: tuple[HostUsage, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "members": [{**asdict(m), "balance_bytes": m.balance_bytes} for m in self.members],
            "hosts": [asdict(h) for h in self.hosts],
        }


def compute_ledger(
    federation: Federation, placement: Mapping[str, Sequence[str]], sizes: Mapping[tuple[str, str], int]
) -> Ledger:
    """The ledger of ``federation``.

    ``placement`` maps a source to its hosts (the recorded placement); ``sizes`` maps
    ``(source, host)`` to the measured repository size in bytes. Members and hosts come
    out in inventory order; entries of ``placement`` naming unknown nodes are ignored.
    """
    member_of = {node.name: node.member for node in federation.nodes()}
    hosts = {node.name for node in federation.hosts()}
    sources = {node.name for node in federation.sources()}
    used: dict[str, int] = {}
    count: dict[str, int] = {}
    lent: dict[str, int] = {}
    consumed: dict[str, int] = {}
    for source, targets in placement.items():
        if source not in sources:
            continue
        for host in targets:
            if host not in hosts:
                continue
            size = int(sizes.get((source, host)) or 0)
            used[host] = used.get(host, 0) + size
            count[host] = count.get(host, 0) + 1
            owner, lender = member_of[source], member_of[host]
            if owner != lender:
                lent[lender] = lent.get(lender, 0) + size
                consumed[owner] = consumed.get(owner, 0) + size
    members = tuple(
        MemberLedger(
            member=member.name,
            capacity_bytes=sum(node.storage.capacity for node in member.nodes if node.storage is not None),
            lent_bytes=lent.get(member.name, 0),
            consumed_bytes=consumed.get(member.name, 0),
        )
        for member in federation.members
    )
    host_usage = tuple(
        HostUsage(node.name, node.member, node.storage.capacity, used.get(node.name, 0), count.get(node.name, 0))
        for node in federation.hosts()
        if node.storage is not None
    )
    return Ledger(members, host_usage)
