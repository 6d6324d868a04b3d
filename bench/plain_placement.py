"""The placement algorithm as it was before it was indexed (issue 16): every choice rescans every host.

Kept here, outside the package, as the obviously-correct reference: tests/test_placement.py compares the
product's indexed ``place`` with it, decision for decision, on the table's cases and on random federations,
and bench/scale_bench.py times both side by side.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from mutualbackup.inventory.model import Federation, Node
from mutualbackup.plan.placement import (Placement, _draining, _explain, _refusal, keep_valid, keep_what_it_has,
                                         members_in_debt, source_size)


def plain_place(
    federation: Federation,
    current: Mapping[str, Sequence[str]] | None = None,
    sizes: Mapping[str, int] | None = None,
    unavailable: Collection[str] = (),
) -> Placement:
    """``plan.placement.place`` as it was: the same rules, every choice a scan of every valid host."""
    current = current or {}
    sizes = sizes or {}
    hosts = {h.name: h for h in federation.hosts() if h.name not in unavailable and not _draining(h)}
    result = Placement(used={name: 0 for name in hosts})
    sources = sorted(federation.sources(), key=lambda s: (-source_size(s, sizes), s.name))

    kept = keep_valid(sources, current, hosts, sizes, result.used)
    debt = members_in_debt(federation, kept, sizes)
    for source in sources:
        assert source.backup is not None
        size = source_size(source, sizes)
        chosen = kept[source.name]
        while len(chosen) < source.backup.replicas:
            best = _best_host(source, hosts, chosen, size, result.used, debt)
            if best is None:
                result.problems.append(_explain(source, hosts, chosen, size, result.used))
                keep_what_it_has(source, current, hosts, chosen, size, result.used)
                break
            chosen.append(best)
            result.used[best] += size
        result.replicas[source.name] = tuple(chosen)
    return result


def _best_host(
    source: Node, hosts: Mapping[str, Node], chosen: Sequence[str], size: int, used: Mapping[str, int],
    debt: Collection[str],
) -> str | None:
    candidates = [h for h in hosts.values() if h.name not in chosen and _refusal(source, h, chosen, hosts, size, used) is None]
    if not candidates:
        return None
    chosen_sites = {hosts[c].site for c in chosen}

    def preference(host: Node) -> tuple[bool, bool, bool, float, str]:
        assert host.storage is not None
        fill = (used[host.name] + size) / host.storage.capacity if host.storage.capacity else 1.0
        return (host.site == source.site, host.site in chosen_sites, host.member in debt, fill, host.name)

    return min(candidates, key=preference).name


