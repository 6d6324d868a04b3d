"""Context.start: a session begun early (its node's program started while the coordinator prepares the
request) is the one the next connection to that node takes; what went wrong is raised there, never by start."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mutualbackup.context import Context
from mutualbackup.errors import TransportError
from mutualbackup.inventory.model import Node
from mutualbackup.state.history import History

from fake import FakeClock, FakeTransport, FakeWorld, make_federation


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld(make_federation(2, 1), FakeClock(0.0))


def context(tmp_path: Path, world: FakeWorld, connector=None) -> Context:  # noqa: ANN001
    return Context(world.federation, History(str(tmp_path / "state")), connector or world.connect)


def test_the_next_connection_takes_the_started_session_and_only_the_next(tmp_path: Path, world: FakeWorld) -> None:
    ctx = context(tmp_path, world)
    node = world.federation.node("coop0/src0")
    ctx.start(node)
    first = ctx.connect(node)
    assert isinstance(first, FakeTransport) and first.started
    second = ctx.connect(node)
    assert second is not first and not second.started
    assert first.request("hello", {}).data["node"] == "coop0/src0"


def test_start_never_raises_and_the_connection_that_needs_it_raises_what_it_met(tmp_path: Path, world: FakeWorld) -> None:
    def refusing(node: Node) -> FakeTransport:
        raise TransportError(f"cannot connect to {node.name}: connection refused")

    ctx = context(tmp_path, world, refusing)
    node = world.federation.node("coop0/src0")
    ctx.start(node)
    with pytest.raises(TransportError, match="coop0/src0: connection refused"):
        ctx.connect(node)


def test_a_started_session_no_request_used_is_closed(tmp_path: Path, world: FakeWorld) -> None:
    made: list[FakeTransport] = []
    ctx = context(tmp_path, world, lambda node: made.append(world.connect(node)) or made[-1])
    ctx.start(world.federation.node("coop0/src0"))
    ctx.start(world.federation.node("coop1/src0"))
    ctx.connect(world.federation.node("coop0/src0"))
    ctx.close_started()
    assert [t.closed for t in made] == [False, True]  # the one taken is its job's to close


def test_closing_does_not_wait_for_a_session_still_connecting(tmp_path: Path, world: FakeWorld) -> None:
    """An unreachable node takes its whole connect timeout: the command ends without waiting for it."""
    release = threading.Event()
    made: list[FakeTransport] = []

    def slow(node: Node) -> FakeTransport:
        release.wait(30)
        made.append(world.connect(node))
        return made[-1]

    ctx = context(tmp_path, world, slow)
    ctx.start(world.federation.node("coop0/src0"))
    ctx.close_started()  # returns at once
    assert not made
    release.set()
    for _ in range(500):
        if made and made[0].closed:
            break
        threading.Event().wait(0.01)
    assert made and made[0].closed


def test_a_started_session_is_told_the_request_to_come_when_it_is_known(tmp_path: Path, world: FakeWorld) -> None:
    ctx = context(tmp_path, world)
    node = world.federation.node("coop0/src0")
    ctx.start(node, kind="extract")  # a restore of the node onto itself: its borg starts on that word
    assert ctx.connect(node).started == "extract"


def test_a_restore_onto_the_source_itself_starts_it_early_telling_it_an_extract_comes(tmp_path: Path,
                                                                                     world: FakeWorld) -> None:
    from mutualbackup.errors import MutualBackupError
    from mutualbackup.restore.extract import restore

    made: list[FakeTransport] = []
    ctx = context(tmp_path, world, lambda node: made.append(world.connect(node)) or made[-1])
    source = world.federation.node("coop0/src0")
    with pytest.raises(MutualBackupError):  # nothing was ever backed up here: refused, after the early start
        restore(ctx, source, source, "/restore")
    assert made and made[0].node.name == "coop0/src0" and made[0].started == "extract" and made[0].closed


def test_a_session_started_after_another_connects_only_once_that_one_has(tmp_path: Path, world: FakeWorld) -> None:
    """A restore onto another node starts the destination first: the source's and the host's handshakes, in the
    same process, wait for it rather than slow it down."""
    first_may_connect = threading.Event()
    order: list[str] = []

    def connector(node: Node) -> FakeTransport:
        if node.name == "coop0/src0":
            assert first_may_connect.wait(30)
        order.append(node.name)
        return world.connect(node)

    ctx = context(tmp_path, world, connector)
    first, second = world.federation.node("coop0/src0"), world.federation.node("coop1/src0")
    ctx.start(first)
    ctx.start(second, after=first)
    threading.Event().wait(0.2)
    assert order == []  # the second waits for the first, which is still connecting
    first_may_connect.set()
    assert ctx.connect(second).started and ctx.connect(first).started
    assert order == ["coop0/src0", "coop1/src0"]


def test_a_session_started_after_one_that_failed_still_starts(tmp_path: Path, world: FakeWorld) -> None:
    def connector(node: Node) -> FakeTransport:
        if node.name == "coop0/src0":
            raise TransportError("cannot connect to coop0/src0: connection refused")
        return world.connect(node)

    ctx = context(tmp_path, world, connector)
    first, second = world.federation.node("coop0/src0"), world.federation.node("coop1/src0")
    ctx.start(first)
    ctx.start(second, after=first)
    assert ctx.connect(second).started
    with pytest.raises(TransportError, match="connection refused"):
        ctx.connect(first)
