"""SSHTransport against a real sshd of the lab: quoting, streams, timeouts, files, host keys."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup.errors import HostKeyMismatch, TransportError
from lab.nodes import Lab, LabNode
from mutualbackup.remote.ssh import SSHTransport

from labkit import wait_for

pytestmark = pytest.mark.lab

PYTHON = sys.executable  # the same machine: the node can run this interpreter too


@pytest.fixture
def node(lab: Lab) -> LabNode:
    started = lab.add_node("coop", "web1")
    lab.start(started)
    return started


@pytest.fixture
def transport(lab: Lab, node: LabNode) -> Iterator[SSHTransport]:
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as opened:
        yield opened


def commands_of(lab: Lab, node: LabNode, name: str) -> list[int]:
    """PIDs of the node's processes whose command name is ``name``."""
    found = []
    for pid in lab.processes(node):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


def ssh_keygen_fingerprint(public_key_file: Path) -> str:
    """The SHA256 fingerprint as OpenSSH itself prints it."""
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(public_key_file)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


def test_a_timeout_returns_minus_one_promptly_and_ends_the_remote_command(
    lab: Lab, node: LabNode, transport: SSHTransport
) -> None:
    started = time.monotonic()
    result = transport.run(["sleep", "30"], timeout=1)
    elapsed = time.monotonic() - started
    assert result.exit_code == -1
    assert result.stderr.decode().splitlines()[-1].endswith("timed out after 1s")
    assert elapsed < 4
    wait_for(lambda: not commands_of(lab, node, "sleep"), seconds=8)
    assert transport.run(["true"]).ok  # the connection is still usable


def test_one_connection_is_reused_for_many_commands(node: LabNode, transport: SSHTransport) -> None:
    for _ in range(3):
        assert transport.run(["true"]).ok
    assert transport.home() == os.path.expanduser("~root")
    assert node.sshd_log.read_text().count("Accepted publickey") == 1


def test_the_live_connection_sends_small_packets_at_once(transport: SSHTransport) -> None:
    assert transport.run(["true"]).ok
    assert transport._client is not None
    live = transport._client.get_transport()
    assert live is not None
    assert live.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert live.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000


def test_after_the_node_restarts_the_transport_reconnects(lab: Lab, node: LabNode, transport: SSHTransport) -> None:
    assert transport.run(["true"]).ok
    lab.restart(node)
    assert transport.run(["echo", "back"]).stdout == b"back\n"


def test_a_changed_host_key_is_refused_naming_both_fingerprints(lab: Lab, node: LabNode) -> None:
    pinned = node.as_node()
    expected = ssh_keygen_fingerprint(node.host_key_file.with_suffix(".pub"))
    lab.change_host_key(node)
    presented = ssh_keygen_fingerprint(node.host_key_file.with_suffix(".pub"))
    assert expected != presented
    with SSHTransport(pinned, str(lab.coordinator_key)) as transport:
        with pytest.raises(HostKeyMismatch) as raised:
            transport.run(["touch", str(node.data / "should-not-exist")])
    message = str(raised.value)
    assert expected in message and presented in message
    assert "coop/web1" in message and f"127.0.0.1:{node.port}" in message
    assert "nothing was sent" in message
    assert not (node.data / "should-not-exist").exists()
    assert "Accepted publickey" not in node.sshd_log.read_text().split("Server listening")[-1]


def test_the_pinned_key_type_is_the_one_negotiated_when_the_node_has_several(lab: Lab, node: LabNode) -> None:
    ecdsa = lab.add_host_key(node, "ecdsa")  # paramiko would otherwise prefer ed25519
    for pinned in (ecdsa, node.host_key):
        with SSHTransport(dataclasses.replace(node.as_node(), host_key=pinned), str(lab.coordinator_key)) as transport:
            assert transport.run(["true"]).ok


def test_an_unreachable_port_is_a_transport_error_at_once(lab: Lab, node: LabNode) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = dataclasses.replace(node.as_node(), port=closed_port)
    started = time.monotonic()
    with SSHTransport(unreachable, str(lab.coordinator_key), connect_timeout=5) as transport:
        with pytest.raises(TransportError) as raised:
            transport.run(["true"])
    assert time.monotonic() - started < 3
    assert not isinstance(raised.value, HostKeyMismatch)
    assert f"coop/web1 (127.0.0.1:{closed_port})" in str(raised.value)
    assert "refused" in str(raised.value)


def test_a_node_dying_mid_command_returns_minus_one_with_lost_in_stderr(
    lab: Lab, node: LabNode, transport: SSHTransport
) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(transport.run, ["sleep", "30"])
        wait_for(lambda: commands_of(lab, node, "sleep"))
        lab.kill(node)
        killed = time.monotonic()
        result = future.result(timeout=10)
    assert time.monotonic() - killed < 3
    assert result.exit_code == -1
    assert result.stderr.decode().splitlines()[-1] == f"mutualbackup: connection to coop/web1 (127.0.0.1:{node.port}) lost"
