"""Where each source's replicas go. Pure: inventory + current placement + sizes in, plan out.

Rules (SPEC.md "Placement"):

- hard: a replica lives on a host of *another* member; the replicas of one source
  are on hosts of *distinct* members; a host has room for it (capacity minus what
  is already placed there, using the measured repository size, else ``estimate``);
- soft: avoid the source's site, then the sites of the replicas already chosen,
  when the federation allows it;
- among valid hosts, prefer the least filled (fraction of capacity used after
  placing), then the name, so the result is deterministic;
- sticky: an existing replica stays where it is while it is still valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

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

    # First pass: keep every still-valid existing replica, so stickiness never
    # depends on the order in which sources are visited.
    kept: dict[str, list[str]] = {}
    for source in sources:
        assert source.backup is not None
        size = source_size(source, sizes)
        chosen: list[str] = []
        for name in current.get(source.name, ()):
            host = hosts.get(name)
            if host is None or len(chosen) >= source.backup.replicas:
                continue
            if _refusal(source, host, chosen, hosts, size, result.used) is None:
                chosen.append(name)
                result.used[name] += size
        kept[source.name] = chosen

    for source in sources:
        assert source.backup is not None
        size = source_size(source, sizes)
        chosen = kept[source.name]
        while len(chosen) < source.backup.replicas:
            best = _best_host(source, hosts, chosen, size, result.used)
            if best is None:
                result.problems.append(_explain(source, hosts, chosen, size, result.used))
                # what it has, it keeps: a recorded replica refused only for room stays until a valid one exists
                for name in current.get(source.name, ()):
                    if name in hosts and name not in chosen and len(chosen) < source.backup.replicas:
                        chosen.append(name)
                        result.used[name] += size
                break
            chosen.append(best)
            result.used[best] += size
        result.replicas[source.name] = tuple(chosen)
    return result


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


def _best_host(
    source: Node, hosts: Mapping[str, Node], chosen: Sequence[str], size: int, used: Mapping[str, int]
) -> str | None:
    candidates = [h for h in hosts.values() if h.name not in chosen and _refusal(source, h, chosen, hosts, size, used) is None]
    if not candidates:
        return None
    chosen_sites = {hosts[c].site for c in chosen}

    def preference(host: Node) -> tuple[int, int, float, str]:
        assert host.storage is not None
        fill = (used[host.name] + size) / host.storage.capacity if host.storage.capacity else 1.0
        return (host.site == source.site, host.site in chosen_sites, fill, host.name)

    return min(candidates, key=preference).name


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
