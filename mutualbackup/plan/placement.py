"""Where each source's replicas go. Pure: inventory + current placement + sizes in, plan out.

Rules (SPEC.md "Placement"):

- hard: a replica lives on a host of *another* member; the replicas of one source
  are on hosts of *distinct* members; a host has room for it (capacity minus what
  is already placed there, using the measured repository size, else ``estimate``);
- soft: avoid the source's site, then the sites of the replicas already chosen,
  when the federation allows it;
- fairness: then prefer hosts of members who lend as much as they consume, or more, to hosts of
  members in debt (:func:`members_in_debt`);
- among valid hosts, prefer the least filled (fraction of capacity used after
  placing), then the name, so the result is deterministic;
- sticky: an existing replica stays where it is while it is still valid.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from mutualbackup.inventory.model import Federation, Node


@dataclass(frozen=True)
class Problem:
    """A source that could not get all its replicas, and why."""

    source: str
    message: str
    where: str = ""  # FILE:LINE of the source node, when known

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.message}"


@dataclass(frozen=True)
class Change:
    kind: str  # "+" new, "-" removed, "~" moved
    source: str
    target: str
    previous: str = ""  # for "~": the host it moves away from


@dataclass
class Placement:
    """The replicas of every source (``source -> hosts``), in choice order."""

    replicas: dict[str, tuple[str, ...]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)  # host -> bytes placed on it
    problems: list[Problem] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (source, host) replica, sorted."""
        return sorted((s, h) for s, hosts in self.replicas.items() for h in hosts)


def source_size(source: Node, sizes: Mapping[str, int]) -> int:
    """Measured size when known (largest replica), else the estimate, else 0."""
    if source.name in sizes:
        return sizes[source.name]
    assert source.backup is not None
    return source.backup.estimate or 0


def place(
    federation: Federation,
    current: Mapping[str, Sequence[str]] | None = None,
    sizes: Mapping[str, int] | None = None,
    unavailable: Collection[str] = (),
) -> Placement:
    """Choose hosts for every source's replicas.

    ``current`` is the placement recorded in the state (source -> hosts); ``sizes``
    maps a source to its measured repository size in bytes. Sources are placed
    largest first (then by name), which packs better and keeps the result stable.
    Never raises for an unsatisfiable placement: it returns ``problems``. A host that is draining, or
    in ``unavailable`` (unreachable for longer than its ``host_down_after``), takes no replica, and
    the replicas it holds are not kept.
    """
    current = current or {}
    sizes = sizes or {}
    hosts = {h.name: h for h in federation.hosts() if h.name not in unavailable and not _draining(h)}
    result = Placement(used={name: 0 for name in hosts})
    sources = sorted(federation.sources(), key=lambda s: (-source_size(s, sizes), s.name))
    kept = keep_valid(sources, current, hosts, sizes, result.used)
    index = _Index(hosts, result.used, members_in_debt(federation, kept, sizes))
    for source in sources:
        assert source.backup is not None
        size = source_size(source, sizes)
        chosen = kept[source.name]
        while len(chosen) < source.backup.replicas:
            best = index.best(source, chosen, size)
            if best is None:
                result.problems.append(_explain(source, hosts, chosen, size, result.used))
                keep_what_it_has(source, current, hosts, chosen, size, result.used, index.add)
                break
            chosen.append(best)
            index.add(best, size)
        result.replicas[source.name] = tuple(chosen)
    return result


def keep_valid(sources: Sequence[Node], current: Mapping[str, Sequence[str]], hosts: Mapping[str, Node],
               sizes: Mapping[str, int], used: dict[str, int]) -> dict[str, list[str]]:
    """The first pass: every still-valid recorded replica is kept (and its size counted on its host) before
    anything new is chosen, so that stickiness never depends on the order in which sources are visited."""
    kept: dict[str, list[str]] = {}
    for source in sources:
        assert source.backup is not None
        size = source_size(source, sizes)
        chosen: list[str] = []
        for name in current.get(source.name, ()):
            host = hosts.get(name)
            if host is None or len(chosen) >= source.backup.replicas:
                continue
            if _refusal(source, host, chosen, hosts, size, used) is None:
                chosen.append(name)
                used[name] += size
        kept[source.name] = chosen
    return kept


def keep_what_it_has(source: Node, current: Mapping[str, Sequence[str]], hosts: Mapping[str, Node],
                     chosen: list[str], size: int, used: dict[str, int],
                     count: Callable[[str, int], None] | None = None) -> None:
    """A source that cannot be placed keeps the recorded replicas refused only for room, until a valid host
    exists: it never loses a replica because the federation changed."""
    assert source.backup is not None
    for name in current.get(source.name, ()):
        if name in hosts and name not in chosen and len(chosen) < source.backup.replicas:
            chosen.append(name)
            if count is not None:
                count(name, size)
            else:
                used[name] += size


def members_in_debt(federation: Federation, kept: Mapping[str, Sequence[str]], sizes: Mapping[str, int]) -> set[str]:
    """Members whose sources use more room on others' hosts than their own hosts give others, counting the
    replicas placement keeps (the ledger's balance, with placement's sizes): their hosts come after the
    hosts of members who lend as much as they consume, or more (fairness; see ARCHITECTURE.md)."""
    balance: dict[str, int] = {}
    for source_name, held in kept.items():
        if not held:
            continue
        source = federation.node(source_name)
        size = source_size(source, sizes)
        for host in held:
            lender = federation.node(host).member
            balance[lender] = balance.get(lender, 0) + size
            balance[source.member] = balance.get(source.member, 0) - size
    return {member for member, value in balance.items() if value < 0}


def _draining(host: Node) -> bool:
    return bool(host.storage is not None and getattr(host.storage, "draining", False))


def _refusal(
    source: Node, host: Node, chosen: Sequence[str], hosts: Mapping[str, Node], size: int, used: Mapping[str, int]
) -> str | None:
    """Why ``host`` cannot take a replica of ``source`` (None when it can)."""
    assert host.storage is not None
    if host.member == source.member:
        return "own member"
    if any(hosts[c].member == host.member for c in chosen):
        return "member already holds a replica"
    if used[host.name] + size > host.storage.capacity:
        return "full"
    return None


class _Index:
    """The valid hosts, indexed so that each choice looks at a handful of them, not at all of them.

    The preference (SPEC: avoid the source's site, then the chosen replicas' sites; then fairness; then the
    least filled after placing, then the name) is a key ``(site tier, in debt, (used + size) / capacity,
    name)``. Hosts are grouped by (in debt, capacity): inside a group, the fill after placing orders exactly
    as ``used`` does, so each group is a list sorted by (used, name). A choice walks each group from its
    least used host, skipping the few it may not use (the source's member, the members already chosen) and
    those of a worse site tier than the best the group has, and stops at the first full one (all after it
    are full too). Cost per choice: the number of distinct (in debt, capacity) pairs, plus what it skips —
    people write capacities as ``500G`` or ``2T``, so a federation has a few of them; one where every host
    has its own capacity costs a scan of every host per choice, as a plain search would.
    """

    def __init__(self, hosts: Mapping[str, Node], used: dict[str, int], debt: Collection[str]) -> None:
        self.hosts, self.used = hosts, used
        self.group_of: dict[str, tuple[bool, int]] = {}
        self.groups: dict[tuple[bool, int], list[tuple[int, str]]] = {}
        self.sites: dict[tuple[bool, int], dict[str, int]] = {}  # hosts per site, per group
        for name, host in hosts.items():
            assert host.storage is not None
            group = (host.member in debt, host.storage.capacity)
            self.group_of[name] = group
            self.groups.setdefault(group, []).append((used[name], name))
            sites = self.sites.setdefault(group, {})
            sites[host.site] = sites.get(host.site, 0) + 1
        for entries in self.groups.values():
            entries.sort()

    def add(self, name: str, size: int) -> None:
        """Count a replica of ``size`` bytes on ``name``."""
        entries = self.groups[self.group_of[name]]
        del entries[bisect.bisect_left(entries, (self.used[name], name))]
        self.used[name] += size
        bisect.insort(entries, (self.used[name], name))

    def best(self, source: Node, chosen: Sequence[str], size: int) -> str | None:
        """The preferred valid host for one more replica of ``source`` (None: none is valid)."""
        excluded_members = {source.member, *(self.hosts[c].member for c in chosen)}
        chosen_sites = {self.hosts[c].site for c in chosen}
        best: tuple[tuple[bool, bool], bool, float, str] | None = None
        for (in_debt, capacity), entries in self.groups.items():
            found = self._best_in_group(entries, self.sites[(in_debt, capacity)], source.site, chosen_sites,
                                        excluded_members, capacity, size)
            if found is None:
                continue
            tier, used, name = found
            key = (tier, in_debt, (used + size) / capacity if capacity else 1.0, name)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def _best_in_group(self, entries: Sequence[tuple[int, str]], sites: Mapping[str, int], own_site: str,
                       chosen_sites: Collection[str], excluded_members: Collection[str], capacity: int,
                       size: int) -> tuple[tuple[bool, bool], int, str] | None:
        """The group's preferred valid host: (site tier, used, name)."""
        goal = _best_tier(sites, own_site, chosen_sites)
        best: tuple[tuple[bool, bool], int, str] | None = None
        for used, name in entries:
            if used + size > capacity:
                break  # the group is sorted by used: every host after this one is full too
            host = self.hosts[name]
            if host.member in excluded_members:
                continue
            tier = (host.site == own_site, host.site in chosen_sites)
            if best is None or tier < best[0]:
                best = (tier, used, name)
                if tier == goal:
                    break  # none after it can be better: same tier, more used (or the same, and a later name)
        return best


def _best_tier(sites: Mapping[str, int], own_site: str, chosen_sites: Collection[str]) -> tuple[bool, bool]:
    """The best site tier any host of a group has: (at the source's site, at a chosen replica's site)."""
    if len(sites) > len({own_site, *chosen_sites} & sites.keys()):
        return (False, False)
    present = [(site == own_site, site in chosen_sites) for site in {own_site, *chosen_sites} & sites.keys()]
    return min(present)


def _explain(source: Node, hosts: Mapping[str, Node], chosen: Sequence[str], size: int, used: Mapping[str, int]) -> Problem:
    assert source.backup is not None
    wanted = source.backup.replicas
    reasons: dict[str, list[str]] = {}
    for host in hosts.values():
        if host.name in chosen:
            continue
        why = _refusal(source, host, chosen, hosts, size, used)
        if why:
            reasons.setdefault(why, []).append(host.name)
    other_members = {h.member for h in hosts.values() if h.member != source.member}
    detail = "; ".join(f"{why}: {', '.join(sorted(names))}" for why, names in sorted(reasons.items()))
    if len(other_members) < wanted:
        hint = (
            f"only {len(other_members)} other member(s) lend storage, and each replica needs a distinct member: "
            "lower `replicas` or add a host of another member"
        )
    else:
        hint = "the hosts of other members are full: lower `estimate`, raise a host's `capacity`, or add a host"
    message = (
        f"cannot place {source.name}: it needs {wanted} replica(s) but only {len(chosen)} host(s) qualify "
        f"({hint}){'; refused ' + detail if detail else ''}"
    )
    return Problem(source=source.name, message=message, where=str(source.where) if source.where else "")


def diff(old: Mapping[str, Sequence[str]], new: Mapping[str, Sequence[str]]) -> list[Change]:
    """What changes from ``old`` to ``new``: ``+`` new, ``-`` removed, ``~`` moved."""
    changes: list[Change] = []
    for source in sorted(set(old) | set(new)):
        before = [h for h in old.get(source, ()) if h not in new.get(source, ())]
        after = [h for h in new.get(source, ()) if h not in old.get(source, ())]
        while before and after:
            changes.append(Change("~", source, after.pop(0), previous=before.pop(0)))
        changes += [Change("+", source, h) for h in after]
        changes += [Change("-", source, h) for h in before]
    return changes


def known_placement(federation: Federation, placement: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """``placement`` restricted to sources and hosts of ``federation``."""
    sources = {n.name for n in federation.sources()}
    hosts = {n.name for n in federation.hosts()}
    return {s: tuple(t for t in targets if t in hosts) for s, targets in placement.items() if s in sources}
