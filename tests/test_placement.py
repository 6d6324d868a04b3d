"""Placement as a table: inventory + recorded placement + measured sizes → replicas or problems."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage, Where
from mutualbackup.plan.placement import diff, place
from bench.plain_placement import plain_place as reference_place

GiB = 1024**3
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"


def node(member: str, slug: str, site: str, *, source: int | None = None, replicas: int = 2, host: int | None = None) -> Node:
    """A node; ``source`` is its estimate in GiB, ``host`` its capacity in GiB."""
    return Node(
        member=member, slug=slug, address="127.0.0.1", port=22, user="mb", host_key=KEY, site=site,
        backup=Backup(paths=("/srv",), estimate=source * GiB, replicas=replicas) if source is not None else None,
        storage=Storage(path="/srv/mb", capacity=host * GiB) if host is not None else None,
        where=Where(f"members/{member}.yml", 4),
    )


def federation(*nodes: Node) -> Federation:
    by_member: dict[str, list[Node]] = {}
    for n in nodes:
        by_member.setdefault(n.member, []).append(n)
    members = tuple(Member(m, "", ns[0].site, tuple(ns)) for m, ns in sorted(by_member.items()))
    return Federation("f", Coordinator("/k", "/s"), members)


CASES = [
    pytest.param(
        [node("a", "web", "paris", source=10), node("b", "st", "lyon", host=100), node("c", "st", "nantes", host=100)],
        {}, {},
        {"a/web": ("b/st", "c/st")},
        id="two other members, two replicas",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, host=100), node("b", "st", "lyon", host=100), node("c", "st", "nantes", host=100)],
        {}, {},
        {"a/web": ("b/st", "c/st")},
        id="never on the source's own member, even when it lends storage",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, replicas=1), node("b", "st1", "paris", host=100), node("c", "st", "lyon", host=100)],
        {}, {},
        {"a/web": ("c/st",)},
        id="avoids the source's site when the federation allows it",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, replicas=1), node("b", "st", "paris", host=100)],
        {}, {},
        {"a/web": ("b/st",)},
        id="uses the source's site when nothing else exists",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, replicas=1), node("b", "big", "lyon", host=1000), node("c", "small", "nantes", host=20)],
        {}, {},
        {"a/web": ("b/big",)},
        id="prefers the least filled host",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, replicas=1), node("b", "big", "lyon", host=1000), node("c", "small", "nantes", host=20)],
        {"a/web": ("c/small",)}, {},
        {"a/web": ("c/small",)},
        id="sticky: an existing valid replica stays",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10, replicas=1), node("b", "big", "lyon", host=1000), node("c", "small", "nantes", host=20)],
        {"a/web": ("c/small",)}, {"a/web": 50 * GiB},
        {"a/web": ("b/big",)},
        id="a replica that outgrew its host moves, using the measured size",
    ),
    pytest.param(
        [node("a", "web", "paris", source=10), node("b", "st1", "lyon", host=100), node("b", "st2", "lille", host=100),
         node("c", "st", "nantes", host=100)],
        {}, {},
        {"a/web": ("b/st1", "c/st")},
        id="replicas on distinct members even when one member has two hosts",
    ),
]


@pytest.mark.parametrize("nodes, current, sizes, expected", CASES)
def test_placement_follows_the_rules(nodes, current, sizes, expected) -> None:
    result = place(federation(*nodes), current, sizes)
    assert result.problems == []
    assert {s: tuple(sorted(h)) for s, h in result.replicas.items()} == {s: tuple(sorted(h)) for s, h in expected.items()}


def test_an_unplaceable_source_is_reported_with_where_and_why() -> None:
    fed = federation(node("a", "web", "paris", source=10, replicas=2), node("b", "st", "lyon", host=100))
    result = place(fed)
    assert len(result.problems) == 1
    text = str(result.problems[0])
    assert text.startswith("members/a.yml:4: ")
    assert "a/web" in text and "needs 2 replica(s)" in text and "distinct member" in text


def test_a_full_federation_says_which_hosts_are_full() -> None:
    fed = federation(node("a", "web", "paris", source=500, replicas=1), node("b", "st", "lyon", host=100))
    result = place(fed)
    assert "full: b/st" in str(result.problems[0])


def test_placement_is_deterministic_and_spreads_load() -> None:
    nodes = [node(f"m{i}", "src", f"site{i}", source=10) for i in range(6)]
    nodes += [node("h1", "st", "x", host=100), node("h2", "st", "y", host=100), node("h3", "st", "z", host=100)]
    first = place(federation(*nodes))
    second = place(federation(*reversed(nodes)))
    assert first.replicas == second.replicas
    assert sorted(first.used.values()) == [40 * GiB, 40 * GiB, 40 * GiB]


def test_adding_a_member_moves_nothing_that_is_still_valid() -> None:
    nodes = [node(f"m{i}", "src", f"site{i}", source=10) for i in range(4)]
    nodes += [node("h1", "st", "x", host=1000), node("h2", "st", "y", host=1000)]
    before = place(federation(*nodes))
    after = place(federation(*nodes, node("h3", "st", "z", host=1000)), before.replicas)
    assert after.replicas == before.replicas
    assert diff(before.replicas, after.replicas) == []


def test_diff_names_new_removed_and_moved_replicas() -> None:
    changes = diff({"a/x": ("b/1", "c/1"), "z/z": ("b/1",)}, {"a/x": ("b/1", "d/1"), "n/n": ("c/1",)})
    assert [(c.kind, c.source, c.target, c.previous) for c in changes] == [
        ("~", "a/x", "d/1", "c/1"),
        ("+", "n/n", "c/1", ""),
        ("-", "z/z", "b/1", ""),
    ]


FAIRNESS = [
    node("p", "src", "paris", source=50, replicas=1), node("p", "st", "lille", host=1000),  # p consumes 50, lends 0
    node("q", "st", "lyon", host=55),  # holds p's replica (q lends 50), and has no room for more
    node("r", "st", "nantes", host=200),  # r neither lends nor consumes
    node("a", "web", "brest", source=10, replicas=1),
]


def test_fairness_prefers_a_member_in_credit_to_a_less_filled_host_of_a_member_in_debt() -> None:
    result = place(federation(*FAIRNESS), {"p/src": ("q/st",)})
    assert result.replicas["a/web"] == ("r/st",)  # p/st is the least filled (1 %), but p consumes more than it lends
    assert result.replicas["p/src"] == ("q/st",)  # stickiness first: fairness never moves a valid replica
    assert place(federation(*FAIRNESS)).replicas["a/web"] == ("p/st",)  # from scratch nobody is in debt


def test_fairness_never_overrides_the_site_rules() -> None:
    nodes = [*FAIRNESS[:3], node("r", "st", "brest", host=200), FAIRNESS[4]]  # r is now at the source's site
    assert place(federation(*nodes), {"p/src": ("q/st",)}).replicas["a/web"] == ("p/st",)


def random_federation(seed: int) -> tuple[Federation, dict, dict]:
    """A random federation, a random recorded placement (some of it no longer valid), and random sizes."""
    rng = random.Random(seed)
    sites = [f"s{i}" for i in range(rng.randint(1, 6))]
    capacities = [rng.choice((50, 100, 200, 500)) for _ in range(4)] if rng.random() < 0.7 else None
    nodes = []
    for m in range(rng.randint(2, 14)):
        for n in range(rng.randint(1, 3)):
            is_source, is_host = rng.random() < 0.7, rng.random() < 0.5
            nodes.append(node(f"m{m}", f"n{n}", rng.choice(sites),
                              source=rng.randint(0, 60) if is_source or not is_host else None,
                              replicas=rng.randint(1, 3),
                              host=(rng.choice(capacities) if capacities else rng.randint(1, 600)) if is_host else None))
    fed = federation(*nodes)
    hosts = [h.name for h in fed.hosts()]
    current = {s.name: tuple(rng.sample(hosts, min(len(hosts), rng.randint(0, 2)))) for s in fed.sources()
               if hosts and rng.random() < 0.5}
    sizes = {s.name: rng.randint(0, 80) * GiB for s in fed.sources() if rng.random() < 0.3}
    if rng.random() < 0.3 and hosts:
        drained = fed.node(rng.choice(hosts))
        current = {**current}
        fed = federation(*[dataclasses.replace(n, storage=dataclasses.replace(n.storage, draining=True))
                           if n is drained else n for n in nodes])
    return fed, current, sizes


@pytest.mark.parametrize("seed", range(300))
def test_the_indexed_placement_decides_exactly_as_the_plain_search(seed: int) -> None:
    fed, current, sizes = random_federation(seed)
    down = {h.name for h in fed.hosts()[:1]} if seed % 5 == 0 else set()
    ours, reference = place(fed, current, sizes, down), reference_place(fed, current, sizes, down)
    assert ours.replicas == reference.replicas
    assert ours.used == reference.used
    assert [str(p) for p in ours.problems] == [str(p) for p in reference.problems]


@pytest.mark.parametrize("nodes, current, sizes, expected", CASES)
def test_the_table_decides_the_same_with_the_plain_search(nodes, current, sizes, expected) -> None:
    assert place(federation(*nodes), current, sizes).replicas == reference_place(federation(*nodes), current, sizes).replicas
