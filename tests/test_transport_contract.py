"""The Transport contract, on both backends: the fake of the unit tests (run locally, as on a node)
and SSHTransport on a real sshd of the lab. Quoting, environment, working directory, streams,
exit codes, timeouts and files mean the same on both; the same test bodies prove it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup.errors import OperationFailed
from mutualbackup.remote.ssh import SSHTransport
from mutualbackup.remote.transport import Transport

from fake import FakeClock, FakeWorld, make_federation

PYTHON = sys.executable  # the same machine: the node can run this interpreter too


@pytest.fixture(params=["fake", pytest.param("ssh", marks=pytest.mark.lab)])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """One node's Transport: the fake (commands run on this machine) or SSH to a lab node."""
    if request.param == "fake":
        federation = make_federation(2, 1)
        world = FakeWorld(federation, FakeClock(0.0))
        world.local = True
        yield world.connect(federation.nodes()[0])
        return
    lab = request.getfixturevalue("lab")
    node = lab.add_node("coop", "web1")
    lab.start(node)
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as opened:
        yield opened


def test_a_timeout_returns_minus_one_promptly_and_the_transport_stays_usable(transport: Transport) -> None:
    started = time.monotonic()
    result = transport.run(["sleep", "30"], timeout=1)
    assert result.exit_code == -1
    assert result.stderr.decode().splitlines()[-1].endswith("timed out after 1s")
    assert time.monotonic() - started < 4
    assert transport.run(["true"]).ok


def test_home_is_the_login_users_absolute_home(transport: Transport) -> None:
    assert transport.home() == os.path.expanduser("~")


def test_hostile_arguments_arrive_unchanged_and_nothing_is_executed(transport: Transport) -> None:
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


def test_env_values_and_a_cwd_with_spaces_arrive_unchanged(transport: Transport, tmp_path: Path) -> None:
    cwd = tmp_path / "dir with spaces 'and' \"quotes\" $(x)"
    cwd.mkdir()
    env = {"MB_ONE": "value with spaces 'q' \"dq\" $(touch x) ; `y` \\", "MB_TWO": "", "MB_THREE": "é\nnext"}
    script = "import json, os; print(json.dumps([os.getcwd()] + [os.environ[n] for n in ('MB_ONE', 'MB_TWO', 'MB_THREE')]))"
    result = transport.run([PYTHON, "-c", script], env=env, cwd=str(cwd))
    assert result.ok, result.stderr
    assert json.loads(result.stdout) == [str(cwd), env["MB_ONE"], env["MB_TWO"], env["MB_THREE"]]
    assert os.listdir(cwd) == []


def test_stdin_is_delivered_and_then_closed(transport: Transport) -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\0end"
    result = transport.run(["sh", "-c", "cat; echo done"], stdin=data, timeout=30)
    assert result.ok, result.stderr
    assert result.stdout == data + b"done\n"


def test_without_stdin_the_command_reads_end_of_file_at_once(transport: Transport) -> None:
    result = transport.run(["cat"], timeout=10)
    assert (result.exit_code, result.stdout) == (0, b"")


def test_twenty_megabytes_of_stdout_with_interleaved_stderr_do_not_deadlock(transport: Transport) -> None:
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


def test_stderr_lines_reach_the_callback_as_they_arrive(transport: Transport) -> None:
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


@pytest.mark.parametrize("code", [0, 1, 2, 42, 127, 255])
def test_exit_codes_pass_through(transport: Transport, code: int) -> None:
    result = transport.run(["sh", "-c", 'exit "$1"', "sh", str(code)])
    assert result.exit_code == code


def test_a_command_killed_by_a_signal_exits_128_plus_the_signal_number(transport: Transport) -> None:
    result = transport.run(["sh", "-c", "kill -TERM $$"])
    assert result.exit_code == 128 + 15


def test_concurrent_commands_share_one_transport(transport: Transport) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: transport.run(["sh", "-c", 'sleep 0.3; echo "$1"', "sh", str(i)]), range(8)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(8)]


def test_write_then_read_round_trips_with_mode_0600_in_a_new_private_directory(
    transport: Transport, tmp_path: Path
) -> None:
    target = tmp_path / "new dir $(x)" / "sub" / "it's a file"
    transport.write_file(str(target), b"secret\n\0binary")
    assert transport.read_file(str(target)) == b"secret\n\0binary"
    assert target.stat().st_mode & 0o7777 == 0o600
    assert target.parent.stat().st_mode & 0o7777 == 0o700
    assert (tmp_path / "new dir $(x)").stat().st_mode & 0o7777 == 0o700


def test_write_file_replaces_atomically_with_the_requested_mode(transport: Transport, tmp_path: Path) -> None:
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


def test_read_file_of_a_missing_file_is_none(transport: Transport, tmp_path: Path) -> None:
    assert transport.read_file(str(tmp_path / "absent")) is None
    assert transport.read_file(str(tmp_path / "no such dir" / "absent")) is None


def test_read_file_of_a_directory_is_an_operation_failure(transport: Transport, tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match="cannot read"):
        transport.read_file(str(tmp_path))


def test_write_file_that_cannot_be_written_is_an_operation_failure(transport: Transport, tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(OperationFailed, match="cannot write"):
        transport.write_file(str(blocker / "below a file"), b"x")
