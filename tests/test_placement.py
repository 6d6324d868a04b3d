"""Placement as a table: inventory + recorded placement + measured sizes → replicas or problems."""

from __future__ import annotations

import pytest

from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage, Where
from mutualbackup.plan.placement import diff, place

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
