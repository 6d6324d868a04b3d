"""Which replicas move, and why: the federation changed under the recorded placement (pure).

A replica stops being valid when its host left the inventory, is ``draining``, has no room left
for it, or has not been reached for longer than its ``host_down_after``. Placement (sticky) then
chooses a new host for it; the daemon makes the new replica, backs it up, and only once it is
healthy gives the old one up (make before break: ``jobs/moves.py``). A source for which no valid
host is left keeps the replica it has (placement reports it), and nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from mutualbackup.inventory.model import Federation
from mutualbackup.plan.placement import Placement, place


@dataclass(frozen=True)
class Move:
    source: str
    old: str  # the replica given up once the new one is healthy
    new: str
    reason: str  # "left", "draining", "unreachable", "full"


def hosts_down(federation: Federation, last_contact: Mapping[str, float], failed_since: Mapping[str, float],
               now: float) -> set[str]:
    """Hosts not reached for longer than their ``host_down_after`` while something tried to: the last
    successful contact (``last_contact``) is older than that, and an attempt failed after it
    (``failed_since``: the newest failed attempt per host). A host never reached yet is not down."""
    down = set()
    for host in federation.hosts():
        assert host.storage is not None
        contact, failed = last_contact.get(host.name), failed_since.get(host.name)
        tried_since = contact is not None and failed is not None and failed > contact
        if tried_since and now - contact > host.storage.host_down_after:  # type: ignore[operator]
            down.add(host.name)
    return down


def plan_moves(
    federation: Federation,
    recorded: Mapping[str, Sequence[str]],
    moving: Mapping[tuple[str, str], str],
    sizes: Mapping[str, int],
    down: set[str],
) -> tuple[Placement, list[Move]]:
    """The placement the federation wants now, and the moves that get there from ``recorded``.

    ``moving`` maps (source, old host) to the new host of each move in progress: the old replica is
    no longer kept by placement, the new one is. Only replicas that stopped being valid move; a
    source that cannot be placed any more keeps what it has.
    """
    hosts = {h.name: h for h in federation.hosts()}
    current = {source: [h for h in held if (source, h) not in moving] for source, held in recorded.items()}
    for (source, _old), target in moving.items():  # a move under way keeps the host it chose
        if source in current and target not in current[source]:
            current[source].append(target)
    placement = place(federation, current, sizes, unavailable=down)
    moves = []
    for source, held in sorted(recorded.items()):
        wanted = placement.replicas.get(source)
        if wanted is None:
            continue  # the source left the inventory: apply's business, never a move
        gone = [h for h in held if h not in wanted and (source, h) not in moving]
        flying = {target for (s, _old), target in moving.items() if s == source}
        new = [h for h in wanted if h not in held and h not in flying]
        for old, target in zip(gone, new):
            moves.append(Move(source, old, target, _why(hosts.get(old), old in down)))
    return placement, moves


def _why(host, down: bool) -> str:  # noqa: ANN001 - Node | None
    if host is None:
        return "left"
    if host.storage is not None and host.storage.draining:
        return "draining"
    if down:
        return "unreachable"
    return "full"
