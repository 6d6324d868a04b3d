"""The Transport contract, on both backends: the fake of the unit tests (the node's own request code,
in-process) and SSH to a joined lab node (the forced ``mutualbackup-node serve``). Requests, refusals
and hostile arguments mean the same on both; the same test bodies prove it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup.node.protocol import DONE, REFUSED
from mutualbackup.remote.ssh import SSHTransport
from mutualbackup.remote.transport import Transport

from fake import FakeClock, FakeWorld, make_federation
from labkit import alpha_beta


@pytest.fixture(params=["fake", pytest.param("ssh", marks=pytest.mark.lab)])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    """A source node's Transport: the fake, or SSH to a joined lab node."""
    if request.param == "fake":
        federation = make_federation(2, 1)
        yield FakeWorld(federation, FakeClock(0.0)).connect(federation.node("coop0/src0"))
        return
    from lab import federation as labfed

    lab = request.getfixturevalue("lab")
    federation, members = alpha_beta("contract", {"retention": {"daily": 3}})
    fed = labfed.build(lab, federation, members, tmp_path)
    with SSHTransport(fed.nodes["alpha/web"].as_node(), str(lab.coordinator_key)) as opened:
        yield opened


def test_a_node_says_who_it_is(transport: Transport) -> None:
    reply = transport.request("hello", {}, timeout=60)
    assert reply.code == DONE and reply.data["node"] == transport.node_name


def test_a_request_started_early_is_answered_like_any_other(transport: Transport) -> None:
    transport.start()  # the node's program starts before the request is known (`mutualbackup run`)
    assert transport.request("hello", {}, timeout=60).data["node"] == transport.node_name
    assert transport.request("hello", {}, timeout=60).code == DONE  # the next one starts as always


def test_a_request_the_node_does_not_take_is_refused_and_nothing_runs(transport: Transport) -> None:
    reply = transport.request("shell", {"command": "id"}, timeout=60)
    assert reply.code == REFUSED and "does not take a request 'shell'" in (reply.error or "")


@pytest.mark.parametrize("archive", ["x; touch {marker}", "$(touch {marker})", "`touch {marker}`", "../../{marker}",
                                     "web-2025-01-01T00:00:00\ntouch {marker}", "-rf"])
def test_hostile_arguments_are_refused_and_never_executed(transport: Transport, tmp_path: Path, archive: str) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    host = {"name": "beta/store", "address": "127.0.0.1", "port": 22, "user": "mb", "storage": "/srv/mb",
            "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"}
    try:
        reply = transport.request("backup", {"host": host, "archive": archive.format(marker=marker), "timeout": 10,
                                             "backup": {"paths": ["/etc"]}}, timeout=60)
        assert reply.code == REFUSED, reply
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_a_host_with_a_hostile_address_is_refused(transport: Transport) -> None:
    host = {"name": "beta/store", "address": "127.0.0.1 -oProxyCommand=id", "port": 22, "user": "mb",
            "storage": "/srv/mb", "host_key": "ssh-ed25519 AAAA"}
    assert transport.request("list", {"host": host}, timeout=60).code == REFUSED


def test_a_job_that_left_nothing_says_so(transport: Transport) -> None:
    reply = transport.request("leftover", {"role": "src/beta/store"}, timeout=60)
    assert reply.code == DONE and reply.data == {}
