"""How much moves when the federation changes: MEMBERS members × 3 nodes (a host each, SOURCES_PER sources
each, 2 replicas), placed from scratch; then one member joins, and placement runs again from the recorded
placement (sticky). Prints how many replicas moved (goal: at most 2 %), and the time of each placement.
Then one member's host drains: only its replicas move. Pure: no state, no node. Usage::

    .venv/bin/python bench/placement_bench.py [--members 1000] [--sources-per 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage
from mutualbackup.plan.moves import plan_moves
from mutualbackup.plan.placement import place

GIB = 1024**3
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"


def member(index: int, sources_per: int) -> Member:
    name = f"m{index:04d}"
    site = f"site-{index % 97}"
    nodes = [Node(member=name, slug="store", address="192.0.2.1", port=22, user="mb", host_key=KEY, site=site,
                  storage=Storage(path="/srv/mb", capacity=(200 + index % 7 * 50) * GIB))]
    nodes += [Node(member=name, slug=f"src{j}", address="192.0.2.1", port=22, user="mb", host_key=KEY, site=site,
                   backup=Backup(paths=("/srv",), estimate=(5 + (index * 7 + j) % 40) * GIB, replicas=2))
              for j in range(sources_per)]
    return Member(name, "", site, tuple(nodes))


def federation(members: int, sources_per: int) -> Federation:
    return Federation("bench", Coordinator("/k", "/s"), tuple(member(i, sources_per) for i in range(members)))


@dataclass
class Figures:
    members: int
    sources: int
    replicas: int
    first_seconds: float
    again_seconds: float
    moved_after_join: int
    moved_percent: float
    drained_replicas: int
    moves_after_drain: int

    def lines(self) -> str:
        return (f"{self.members} members, {self.sources} sources, {self.replicas} replicas\n"
                f"  placed from scratch in {self.first_seconds:.2f} s; again after one member joined in "
                f"{self.again_seconds:.2f} s\n"
                f"  moved after the join: {self.moved_after_join} ({self.moved_percent:.2f} %; goal: at most 2 %)\n"
                f"  one host draining held {self.drained_replicas} replica(s): {self.moves_after_drain} move(s)")


def run(members: int, sources_per: int) -> Figures:
    fed = federation(members, sources_per)
    started = time.perf_counter()
    first = place(fed).replicas
    first_seconds = time.perf_counter() - started
    grown = replace(fed, members=(*fed.members, member(members, sources_per)))
    started = time.perf_counter()
    again = place(grown, first).replicas
    again_seconds = time.perf_counter() - started
    moved = sum(len(set(hosts) - set(again.get(source, ()))) for source, hosts in first.items())
    total = sum(len(hosts) for hosts in first.values())
    drained = fed.members[0].nodes[0]
    drained_members = tuple(replace(m, nodes=(replace(drained, storage=replace(drained.storage, draining=True)),
                                              *m.nodes[1:])) if m is fed.members[0] else m for m in fed.members)
    _placement, moves = plan_moves(replace(fed, members=drained_members), first, {}, {}, set())
    held = sum(1 for hosts in first.values() if drained.name in hosts)
    return Figures(members, len(first), total, first_seconds, again_seconds, moved, 100.0 * moved / max(1, total),
                   held, len(moves))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--sources-per", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.members, args.sources_per)
    print(json.dumps(asdict(figures), indent=2) if args.json else figures.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
