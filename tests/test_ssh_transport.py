"""SSHTransport against a real sshd of the lab: quoting, streams, timeouts, files, host keys."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup.errors import HostKeyMismatch, OperationFailed, TransportError
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


def test_hostile_arguments_arrive_unchanged_and_nothing_is_executed(transport: SSHTransport) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    words = [
        "two words",
        "it's",
        'say "hi"',
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"x; touch {marker}",
        f"x && touch {marker} || touch {marker}",
        "first line\nsecond line",
        "-n",
        "--help",
        "héllo wörld ✓ 日本",
        "",
        "$HOME ${PATH} ~ * ? [a]",
        "back\\slash",
        "a|b&c>d<e",
        "  leading and trailing  ",
        "tab\there",
    ]
    try:
        result = transport.run([PYTHON, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *words])
        assert result.ok, result.stderr
        assert json.loads(result.stdout) == words
        result = transport.run(["printf", "%s\\0", *words])
        assert result.ok, result.stderr
        assert result.stdout.split(b"\0")[:-1] == [word.encode() for word in words]
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_env_values_and_a_cwd_with_spaces_arrive_unchanged(transport: SSHTransport, tmp_path: Path) -> None:
    cwd = tmp_path / "dir with spaces 'and' \"quotes\" $(x)"
    cwd.mkdir()
    env = {"MB_ONE": "value with spaces 'q' \"dq\" $(touch x) ; `y` \\", "MB_TWO": "", "MB_THREE": "é\nnext"}
    script = "import json, os; print(json.dumps([os.getcwd()] + [os.environ[n] for n in ('MB_ONE', 'MB_TWO', 'MB_THREE')]))"
    result = transport.run([PYTHON, "-c", script], env=env, cwd=str(cwd))
    assert result.ok, result.stderr
    assert json.loads(result.stdout) == [str(cwd), env["MB_ONE"], env["MB_TWO"], env["MB_THREE"]]
    assert os.listdir(cwd) == []


def test_stdin_is_delivered_and_then_closed(transport: SSHTransport) -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\0end"
    result = transport.run(["sh", "-c", "cat; echo done"], stdin=data, timeout=30)
    assert result.ok, result.stderr
    assert result.stdout == data + b"done\n"


def test_without_stdin_the_command_reads_end_of_file_at_once(transport: SSHTransport) -> None:
    result = transport.run(["cat"], timeout=10)
    assert (result.exit_code, result.stdout) == (0, b"")


def test_twenty_megabytes_of_stdout_with_interleaved_stderr_do_not_deadlock(transport: SSHTransport) -> None:
    script = (
        "import sys\n"
        "for i in range(320):\n"
        "    sys.stdout.buffer.write(bytes([i % 256]) * 65536)\n"
        "    sys.stderr.write(f'progress {i} ' + 'e' * 6000 + '\\n')\n"
        "    sys.stderr.flush()\n"
    )
    lines: list[str] = []
    result = transport.run([PYTHON, "-c", script], timeout=120, on_stderr_line=lines.append)
    assert result.ok, result.stderr_tail()
    assert len(result.stdout) == 320 * 65536
    assert result.stdout[-1] == 319 % 256
    assert [line.split()[1] for line in lines] == [str(i) for i in range(320)]
    assert len(result.stderr.splitlines()) == 320


def test_stderr_lines_reach_the_callback_as_they_arrive(transport: SSHTransport) -> None:
    seen: list[tuple[str, float]] = []
    started = time.monotonic()
    result = transport.run(
        ["sh", "-c", "echo first >&2; sleep 2; echo second >&2; printf 'no newline' >&2"],
        on_stderr_line=lambda line: seen.append((line, time.monotonic() - started)),
    )
    assert result.ok
    assert [line for line, _ in seen] == ["first", "second", "no newline"]
    assert seen[1][1] - seen[0][1] > 1.5  # the first line came before the command went on
    assert result.stderr == b"first\nsecond\nno newline"


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


@pytest.mark.parametrize("code", [0, 1, 2, 42, 127, 255])
def test_exit_codes_pass_through(transport: SSHTransport, code: int) -> None:
    result = transport.run(["sh", "-c", 'exit "$1"', "sh", str(code)])
    assert result.exit_code == code


def test_a_command_killed_by_a_signal_exits_128_plus_the_signal_number(transport: SSHTransport) -> None:
    result = transport.run(["sh", "-c", "kill -TERM $$"])
    assert result.exit_code == 128 + 15


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


def test_concurrent_commands_share_one_transport(transport: SSHTransport) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: transport.run(["sh", "-c", 'sleep 0.3; echo "$1"', "sh", str(i)]), range(8)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(8)]


def test_after_the_node_restarts_the_transport_reconnects(lab: Lab, node: LabNode, transport: SSHTransport) -> None:
    assert transport.run(["true"]).ok
    lab.restart(node)
    assert transport.run(["echo", "back"]).stdout == b"back\n"


def test_write_then_read_round_trips_with_mode_0600_in_a_new_private_directory(
    transport: SSHTransport, tmp_path: Path
) -> None:
    target = tmp_path / "new dir $(x)" / "sub" / "it's a file"
    transport.write_file(str(target), b"secret\n\0binary")
    assert transport.read_file(str(target)) == b"secret\n\0binary"
    assert target.stat().st_mode & 0o7777 == 0o600
    assert target.parent.stat().st_mode & 0o7777 == 0o700
    assert (tmp_path / "new dir $(x)").stat().st_mode & 0o7777 == 0o700


def test_write_file_replaces_atomically_with_the_requested_mode(transport: SSHTransport, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    target = tmp_path / "keys" / "authorized_keys"
    target.write_text("old\n")
    target.chmod(0o644)
    before = target.stat().st_ino
    transport.write_file(str(target), b"new\n", mode=0o640)
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_ino != before  # renamed over, not rewritten in place
    assert target.stat().st_mode & 0o7777 == 0o640
    assert os.listdir(target.parent) == ["authorized_keys"]  # no temporary file left behind


def test_read_file_of_a_missing_file_is_none(transport: SSHTransport, tmp_path: Path) -> None:
    assert transport.read_file(str(tmp_path / "absent")) is None
    assert transport.read_file(str(tmp_path / "no such dir" / "absent")) is None


def test_read_file_of_a_directory_is_an_operation_failure(transport: SSHTransport, tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match="cannot read"):
        transport.read_file(str(tmp_path))


def test_write_file_that_cannot_be_written_is_an_operation_failure(transport: SSHTransport, tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(OperationFailed, match="cannot write"):
        transport.write_file(str(blocker / "below a file"), b"x")


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
