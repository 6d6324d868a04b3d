"""SSHTransport against a real sshd of the lab, asking a joined node's program: timeouts, connections, host keys."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup import borg
from mutualbackup.errors import HostKeyMismatch, TransportError
from lab.nodes import Lab, LabNode
from mutualbackup.remote.sockets import open_socket
from mutualbackup.remote.ssh import SSHTransport

from labkit import wait_for

pytestmark = pytest.mark.lab

@pytest.fixture
def node(lab: Lab) -> LabNode:
    joined = lab.add_node("coop", "web1")
    lab.join_alone(joined)
    lab.start(joined)
    return joined


@pytest.fixture
def transport(lab: Lab, node: LabNode) -> Iterator[SSHTransport]:
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as opened:
        yield opened


def commands_of(lab: Lab, node: LabNode, name: str) -> list[int]:
    """PIDs of the node's processes whose command name starts with ``name`` (the kernel keeps 15 characters)."""
    found = []
    for pid in lab.processes(node):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name[:15]:
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


def ssh_keygen_fingerprint(public_key_file: Path) -> str:
    """The SHA256 fingerprint as OpenSSH itself prints it."""
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(public_key_file)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


def grant_args(lab: Lab) -> dict[str, str]:
    """A restore's temporary line: a request the node holds until the coordinator withdraws it or goes."""
    key = Path(f"{lab.admin_key('other')}.pub").read_text().split()
    return {"source": "other/web1", "public_key": f"{key[0]} {key[1]}",
            "restore_id": borg.new_restore_id(dt.datetime.now(dt.timezone.utc), os.urandom(4).hex())}


def hello_ok(transport: SSHTransport) -> bool:
    return transport.request("hello", {}, timeout=30).ok


def test_a_timeout_answers_promptly_and_ends_the_request_on_the_node(
    lab: Lab, node: LabNode, transport: SSHTransport
) -> None:
    started = time.monotonic()
    reply = transport.request("grant", grant_args(lab), timeout=1)
    elapsed = time.monotonic() - started
    assert not reply.ok and "timed out after 1s" in (reply.error or "")
    assert elapsed < 4
    wait_for(lambda: not commands_of(lab, node, "mutualbackup-node"), seconds=8)
    assert "restore" not in node.authorized_keys.read_text()  # the node took its line away when the coordinator went
    assert hello_ok(transport)  # the connection is still usable


def test_one_connection_is_reused_for_many_requests(node: LabNode, transport: SSHTransport) -> None:
    for _ in range(3):
        assert hello_ok(transport)
    assert node.sshd_log.read_text().count("Accepted publickey") == 1


def test_the_live_connection_sends_small_packets_at_once(transport: SSHTransport) -> None:
    assert hello_ok(transport)
    assert transport._client is not None
    live = transport._client.get_transport()
    assert live is not None
    assert live.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert live.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000


def test_after_the_node_restarts_the_transport_reconnects(lab: Lab, node: LabNode, transport: SSHTransport) -> None:
    assert hello_ok(transport)
    lab.restart(node)
    assert transport.request("hello", {}, timeout=30).data["node"] == "coop/web1"


def test_a_changed_host_key_is_refused_naming_both_fingerprints(lab: Lab, node: LabNode) -> None:
    pinned = node.as_node()
    expected = ssh_keygen_fingerprint(node.host_key_file.with_suffix(".pub"))
    lab.change_host_key(node)
    presented = ssh_keygen_fingerprint(node.host_key_file.with_suffix(".pub"))
    assert expected != presented
    before = node.authorized_keys.read_text()
    with SSHTransport(pinned, str(lab.coordinator_key)) as transport:
        with pytest.raises(HostKeyMismatch) as raised:
            transport.request("grant", grant_args(lab), timeout=30)
    message = str(raised.value)
    assert expected in message and presented in message
    assert "coop/web1" in message and f"127.0.0.1:{node.port}" in message
    assert "nothing was sent" in message
    assert node.authorized_keys.read_text() == before
    assert "Accepted publickey" not in node.sshd_log.read_text().split("Server listening")[-1]


def test_the_pinned_key_type_is_the_one_negotiated_when_the_node_has_several(lab: Lab, node: LabNode) -> None:
    ecdsa = lab.add_host_key(node, "ecdsa")  # paramiko would otherwise prefer ed25519
    for pinned in (ecdsa, node.host_key):
        with SSHTransport(dataclasses.replace(node.as_node(), host_key=pinned), str(lab.coordinator_key)) as transport:
            assert hello_ok(transport)


def test_an_unreachable_port_is_a_transport_error_at_once(lab: Lab, node: LabNode) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = dataclasses.replace(node.as_node(), port=closed_port)
    started = time.monotonic()
    with SSHTransport(unreachable, str(lab.coordinator_key), connect_timeout=5) as transport:
        with pytest.raises(TransportError) as raised:
            transport.request("hello", {})
    assert time.monotonic() - started < 3
    assert not isinstance(raised.value, HostKeyMismatch)
    assert f"coop/web1 (127.0.0.1:{closed_port})" in str(raised.value)
    assert "refused" in str(raised.value)


def test_a_request_started_early_raises_what_the_start_met_and_tries_nothing_twice(lab: Lab, node: LabNode) -> None:
    pinned = node.as_node()
    lab.change_host_key(node)
    with SSHTransport(pinned, str(lab.coordinator_key)) as transport:
        transport.start()  # never raises
        logins = node.sshd_log.read_text().count("Connection from")
        with pytest.raises(HostKeyMismatch):
            transport.request("hello", {}, timeout=30)
        assert node.sshd_log.read_text().count("Connection from") == logins  # the start's refusal, not a second try


def test_a_tcp_connection_opened_before_the_transport_is_the_one_its_first_connection_uses(lab: Lab, node: LabNode) -> None:
    logins = node.sshd_log.read_text().count("Connection from")
    opened = open_socket("127.0.0.1", node.port, timeout=5)
    with SSHTransport(node.as_node(), str(lab.coordinator_key), opened=opened) as transport:
        assert transport.request("hello", {}, timeout=30).data["node"] == "coop/web1"
        assert opened.fileno() != -1  # paramiko's connection runs on it
    assert opened.fileno() == -1 and node.sshd_log.read_text().count("Connection from") == logins + 1


def test_a_tcp_connection_that_could_not_be_opened_early_is_the_first_requests_error_and_nothing_is_tried_again(
    lab: Lab, node: LabNode,
) -> None:
    logins = node.sshd_log.read_text().count("Connection from")
    refused = ConnectionRefusedError(111, "Connection refused")
    with SSHTransport(node.as_node(), str(lab.coordinator_key), opened=refused) as transport:
        transport.start()
        with pytest.raises(TransportError, match="refused"):
            transport.request("hello", {}, timeout=30)
        assert node.sshd_log.read_text().count("Connection from") == logins
        assert transport.request("hello", {}, timeout=30).ok  # the next connection is a new one


def test_a_tcp_connection_opened_early_and_never_used_is_closed_with_the_transport(lab: Lab, node: LabNode) -> None:
    opened = open_socket("127.0.0.1", node.port, timeout=5)
    SSHTransport(node.as_node(), str(lab.coordinator_key), opened=opened).close()
    assert opened.fileno() == -1


def test_a_started_program_that_ended_meanwhile_is_replaced(lab: Lab, node: LabNode, transport: SSHTransport) -> None:
    transport.start()
    started = transport._started
    assert isinstance(started, tuple)
    started[1].shutdown_write()  # its stdin ends before any request: serve refuses and exits
    wait_for(lambda: started[1].exit_status_ready(), what="the started serve to exit")
    assert transport.request("hello", {}, timeout=30).data["node"] == "coop/web1"


def test_a_started_program_never_used_ends_with_the_connection(lab: Lab, node: LabNode) -> None:
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
        transport.start()
        wait_for(lambda: commands_of(lab, node, "mutualbackup-node"), what="the started serve")
    wait_for(lambda: not commands_of(lab, node, "mutualbackup-node"), what="the unused serve to end with the connection")


def test_a_node_dying_mid_request_answers_at_once_that_the_connection_was_lost(
    lab: Lab, node: LabNode, transport: SSHTransport
) -> None:
    events: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(transport.request, "grant", grant_args(lab), timeout=60,
                             on_event=lambda event: events.append(event["event"]))
        wait_for(lambda: "added" in events)
        lab.kill(node)
        killed = time.monotonic()
        reply = future.result(timeout=10)
    assert time.monotonic() - killed < 3
    assert not reply.ok and reply.data.get("lost")
    assert reply.error.startswith("coop/web1: grant: the connection was lost")
