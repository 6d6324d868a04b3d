"""Which replicas move and why (plan/moves.py), as a table: the federation changed under the recorded placement."""

from __future__ import annotations

import dataclasses

from mutualbackup.plan.moves import Move, hosts_down, plan_moves
from test_placement import federation, node

DAY = 86400.0


def three_hosts(**draining: bool):  # noqa: ANN201
    stores = [node(m, "st", f"site-{m}", host=100) for m in ("b", "c", "d")]
    stores = [dataclasses.replace(n, storage=dataclasses.replace(n.storage, draining=draining.get(n.member, False)))
              for n in stores]
    return federation(node("a", "web", "paris", source=10, replicas=1), *stores)


def test_nothing_moves_while_every_replica_is_valid() -> None:
    placement, moves = plan_moves(three_hosts(), {"a/web": ("b/st",)}, {}, {}, set())
    assert moves == [] and placement.replicas["a/web"] == ("b/st",)


def test_a_draining_host_gives_its_replica_to_another() -> None:
    placement, moves = plan_moves(three_hosts(b=True), {"a/web": ("b/st",)}, {}, {}, set())
    assert moves == [Move("a/web", "b/st", placement.replicas["a/web"][0], "draining")]
    assert placement.replicas["a/web"][0] in ("c/st", "d/st")


def test_a_host_that_left_or_is_down_gives_its_replica_to_another() -> None:
    fed = federation(node("a", "web", "paris", source=10, replicas=1), node("c", "st", "x", host=100))
    assert plan_moves(fed, {"a/web": ("b/st",)}, {}, {}, set())[1] == [Move("a/web", "b/st", "c/st", "left")]
    fed = three_hosts()
    down = hosts_down(fed, {"b/st": 0.0, "c/st": 3 * DAY}, {"b/st": 3.5 * DAY, "c/st": 3.5 * DAY}, 3.5 * DAY)
    assert down == {"b/st"}  # c/st fails too, but was reached half a day ago
    assert plan_moves(fed, {"a/web": ("b/st",)}, {}, {}, down)[1][0].reason == "unreachable"


def test_a_host_never_reached_or_not_tried_since_is_not_down() -> None:
    fed = three_hosts()
    assert hosts_down(fed, {}, {"b/st": 10 * DAY}, 10 * DAY) == set()  # never reached: a new host
    assert hosts_down(fed, {"b/st": 0.0}, {}, 10 * DAY) == set()  # nothing tried it since (no backup due)


def test_a_move_under_way_keeps_its_new_host_and_is_not_started_twice() -> None:
    fed = three_hosts(b=True)
    placement, moves = plan_moves(fed, {"a/web": ("b/st",)}, {("a/web", "b/st"): "d/st"}, {}, set())
    assert moves == [] and placement.replicas["a/web"] == ("d/st",)
    placement, moves = plan_moves(fed, {"a/web": ("b/st", "d/st")}, {("a/web", "b/st"): "d/st"}, {}, set())
    assert moves == [] and placement.replicas["a/web"] == ("d/st",)


def test_a_source_with_nowhere_to_go_keeps_its_replica() -> None:
    fed = federation(node("a", "web", "paris", source=10, replicas=1),
                     dataclasses.replace(node("b", "st", "x", host=100),
                                         storage=dataclasses.replace(node("b", "st", "x", host=100).storage,
                                                                     draining=True)))
    placement, moves = plan_moves(fed, {"a/web": ("b/st",)}, {}, {}, set())
    assert moves == [] and placement.problems  # reported, and nothing is given up


def test_apply_keeps_a_replica_it_cannot_move_and_leaves_a_move_to_the_daemon(tmp_path) -> None:  # noqa: ANN001
    """`apply` never breaks before making: a draining host's replica stays while no other host can take it,
    and when one can, the move is recorded and the old replica kept until the daemon made the new one."""
    from mutualbackup.context import Context
    from mutualbackup.jobs.provision import ApplyReport, _targets
    from mutualbackup.state.history import History

    alone = federation(node("a", "web", "paris", source=10, replicas=1),
                       dataclasses.replace(node("b", "st", "x", host=100),
                                           storage=dataclasses.replace(node("b", "st", "x", host=100).storage,
                                                                       draining=True)))
    history = History(tmp_path / "one")
    history.set_placement({"a/web": ("b/st",)})
    assert _targets(Context(alone, history, None), ApplyReport()) == {"a/web": ("b/st",)}  # type: ignore[arg-type]
    assert history.moves() == []
    history = History(tmp_path / "two")
    history.set_placement({"a/web": ("b/st",)})
    report = ApplyReport()
    assert _targets(Context(three_hosts(b=True), history, None), report) == {"a/web": ("b/st",)}  # type: ignore[arg-type]
    assert [(m["source"], m["old"], m["reason"]) for m in history.moves()] == [("a/web", "b/st", "draining")]
    assert any("moving" in line for line in report.changes)
