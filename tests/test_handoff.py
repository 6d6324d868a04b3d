"""``mutualbackup run`` handed to the daemon serving its inventory (mutualbackup/handoff): the command prints what
it would have printed running the jobs itself, and the daemon's socket serves no one else and nothing else.

The daemon is the real :class:`~mutualbackup.daemon.Daemon` and its real :class:`HandoffServer` on a Unix socket,
over a fake federation (tests/fake.py); the command's side is the real client, in this process."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mutualbackup import cli
from mutualbackup.handoff import address, client
from mutualbackup.handoff.server import HandoffServer

from fake import Harness, failing, make_federation

START = 1_750_000_000.0
NOBODY = 65534


def harness(tmp_path: Path, name: str = "daemon") -> Harness:
    inventory = tmp_path / name / "inventory"
    inventory.mkdir(parents=True)
    (inventory / "federation.yml").write_text("# the daemon's inventory, as far as its stamp goes\n")
    h = Harness(make_federation(3, 1, directory=str(inventory)), str(tmp_path / name / "state"), START)
    h.world.duration = lambda source, target: 0.0  # borg create ends at once: the clock stands still
    return h


@pytest.fixture
def served(tmp_path: Path):  # noqa: ANN201
    h = harness(tmp_path)
    server = HandoffServer(h.daemon)
    assert server.start()
    yield h
    server.close()


def argv(h: Harness, *words: str) -> list[str]:
    return ["--inventory", h.federation.directory, "--state", str(h.history.path.parent), "run", *words]


def in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], *words: str, json_out: bool = False,
               replica: str | None = None, script=None) -> tuple[int, str, str]:  # noqa: ANN001
    """What the command prints running the same jobs itself, on a federation of its own in the same state."""
    h = harness(tmp_path, "itself")
    if script is not None:
        h.world.script(script)
    try:
        code = cli._run(argparse.Namespace(sources=list(words), replica=replica, json=json_out), h.ctx)
    except cli.MutualBackupError as exc:
        print(f"mutualbackup: {exc}", file=__import__("sys").stderr)
        code = exc.exit_code
    out, err = capsys.readouterr()
    return code, out, err


def handed(h: Harness, capsys: pytest.CaptureFixture[str], *words: str) -> tuple[int | None, str, str]:
    code = client.hand_off(argv(h, *words), {}, os.getcwd())
    out, err = capsys.readouterr()
    return code, out, err


def same(printed: tuple[int | None, str, str]) -> tuple[int | None, str, str]:
    """What was printed, but for the second the archive is named after and the job's duration in JSON (both runs
    read the real clock)."""
    code, out, err = printed
    stamp, duration = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"), re.compile(r'"duration": [0-9.e-]+')
    return code, duration.sub('"duration": D', stamp.sub("TIME", out)), stamp.sub("TIME", err)


CASES = {
    "every source": ((), {}),
    "one source": (("coop1/src0",), {}),
    "one replica": (("coop1/src0", "--replica", "coop0/store"), {"replica": "coop0/store"}),
    "json": (("coop2/src0", "--json"), {"json_out": True}),
    "no such source": (("coop9/src0",), {}),
    "a replica that holds none": (("coop1/src0", "--replica", "coop1/store"), {"replica": "coop1/store"}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_handed_off_run_prints_what_the_command_prints_running_it_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: Harness, case: str,
) -> None:
    words, options = CASES[case]
    sources = tuple(w for w in words if "/" in w and w not in options.values())
    expected = same(in_process(tmp_path, capsys, *sources, **options))
    got = same(handed(served, capsys, *words))
    assert got == expected
    if case == "every source":
        assert expected[0] == 0 and len(expected[1].splitlines()) == 6  # 3 sources x 2 replicas, each a line
        assert len(served.history.runs(kind="backup", result="success")) == 6  # the daemon ran them
        assert not served.daemon.running  # and gave each replica's slot back


def test_a_failed_backup_is_printed_and_exits_1_as_it_would_in_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    rule = failing(2, "Repository does not exist", when=lambda node, argv: "create" in argv)
    served.world.script(rule)
    expected = same(in_process(tmp_path, capsys, "coop0/src0", script=rule))
    got = same(handed(served, capsys, "coop0/src0"))
    assert got == expected
    assert got[0] == 1 and "FAILED" in got[2] and "Repository does not exist" in got[2]


def test_a_replica_whose_job_the_daemon_runs_is_not_started_and_says_so(
    capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    from mutualbackup.daemon import RunningJob

    target = served.placement["coop0/src0"][0]
    served.daemon.running[("coop0/src0", target)] = RunningJob("maintenance", "coop0/src0", target, "check_every")
    code, out, err = handed(served, capsys, "coop0/src0")
    assert code == 1
    assert f"coop0/src0 → {target}  not started: the daemon's maintenance of it is in progress" in err
    assert not [r for r in served.history.runs(kind="backup") if r.target == target]


@pytest.mark.parametrize("words", [
    ["run"], ["run", "a/b", "c/d"], ["run", "--json", "a/b"], ["run", "a/b", "--replica", "h/s", "--json"],
    ["run", "--replica=h/s"], ["--inventory", "inv", "run", "--inventory", "other"], ["--state=st", "run", "x/y"],
    ["run", "a/b", "--json", "c/d"], ["run", "-v"], ["-v", "run"], ["run", "--rep", "h/s"], ["run", "--help"],
    ["run", "--replica"], ["run", "--replica", "--json"], ["--replica", "h/s", "run"], ["--json", "run"],
    ["status"], ["run", "--", "a/b"], ["run", "--log-format", "json"], ["run", "--inventory="],
])
def test_the_command_line_is_handed_off_only_in_forms_argparse_reads_the_same_way(
    tmp_path: Path, words: list[str],
) -> None:
    for directory in ("inv", "other", "inventory"):
        (tmp_path / directory).mkdir(exist_ok=True)
    request = client.parse(words, {}, str(tmp_path))
    if request is None:
        return
    parsed = cli.build_parser().parse_args(words)
    assert parsed.command == "run"
    assert request["sources"] == parsed.sources and request["replica"] == parsed.replica
    assert request["json"] == parsed.json
    assert request["inventory"] == str(tmp_path / getattr(parsed, "inventory", "inventory"))
    state = getattr(parsed, "state", None)
    assert request["state"] == (str(tmp_path / state) if state else None)


def test_forms_argparse_reads_otherwise_are_left_to_the_command(tmp_path: Path) -> None:
    (tmp_path / "inventory").mkdir()
    for words in (["run", "a/b", "--json", "c/d"], ["run", "-v"], ["run", "--rep", "h/s"], ["run", "--help"],
                  ["--replica", "h/s", "run"], ["run", "--", "a/b"], ["status"]):
        assert client.parse(words, {}, str(tmp_path)) is None, words
    assert client.parse(["run"], {}, str(tmp_path / "nowhere")) is None  # no inventory: the command says so
    assert client.parse(["run"], {"MUTUALBACKUP_INVENTORY": str(tmp_path / "inventory")}, "/")["inventory"] == str(
        tmp_path / "inventory")


def test_without_a_daemon_the_command_runs_its_jobs_itself(tmp_path: Path) -> None:
    h = harness(tmp_path)
    assert client.hand_off(argv(h), {}, os.getcwd()) is None


def test_a_daemon_that_has_not_read_the_inventory_as_it_is_now_declines(
    capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    members = Path(served.federation.directory) / "members"
    members.mkdir(exist_ok=True)
    (members / "coop9.yml").write_text("# changed since the daemon read it\n")
    assert handed(served, capsys, "coop0/src0") == (None, "", "")
    assert not served.history.runs(kind="backup")


def test_a_daemon_of_another_state_or_another_inventory_declines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    words = ["--inventory", served.federation.directory, "--state", str(tmp_path / "elsewhere"), "run"]
    assert client.hand_off(words, {}, os.getcwd()) is None
    answer = exchange(served, {"protocol": 1, "run": request_fields(served, inventory=str(tmp_path))})
    assert answer == [{"refused": "this daemon serves another inventory"}]
    assert not served.history.runs(kind="backup")


def request_fields(h: Harness, **changed: object) -> dict[str, object]:
    fields = {"sources": [], "replica": None, "json": False, "progress": False,
              "inventory": h.federation.directory, "state": str(h.history.path.parent)}
    return {**fields, **changed}


def exchange(h: Harness, request: object, raw: bytes | None = None) -> list[object]:
    """What the daemon answers to one request line (or ``raw`` bytes), until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(address(h.federation.directory))
        connection.sendall(raw if raw is not None else json.dumps(request).encode() + b"\n")
        connection.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: connection.recv(65536), b""))
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("name, raw", [
    ("not JSON", b"run everything\n"),
    ("another protocol", json.dumps({"protocol": 2, "run": {}}).encode() + b"\n"),
    ("a field more", None),
    ("a source that is not a name", None),
    ("a flag that is not a flag", None),
    ("no end of line", json.dumps({"protocol": 1}).encode()),
    ("longer than a request can be", b'{"protocol": 1, "run": {"sources": ["' + b"a" * (1 << 20) + b'"]}}\n'),
])
def test_a_hostile_request_is_refused_and_runs_nothing(served: Harness, name: str, raw: bytes | None) -> None:
    fields = request_fields(served)
    if name == "a field more":
        fields["command"] = "rm -rf /"
    if name == "a source that is not a name":
        fields["sources"] = [{"$ne": ""}]
    if name == "a flag that is not a flag":
        fields["json"] = "yes"
    answer = exchange(served, {"protocol": 1, "run": fields}, raw)
    assert answer == [{"refused": "not a request this daemon reads"}]
    assert not served.history.runs() and not served.world.requests


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: another user's process is played by a child that drops to nobody")


def as_nobody(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` (Python) run by user nobody, its output read as text: another user's process."""
    return subprocess.Popen([sys.executable, "-c", script, *args], user=NOBODY, group=NOBODY, extra_groups=[],
                            stdout=subprocess.PIPE, text=True)


ASK = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
    connection.settimeout(10)
    connection.connect("\\0" + sys.argv[1])  # the abstract name (no NUL in an argument)
    try:
        connection.sendall(sys.argv[2].encode() + b"\\n")
        answer = connection.recv(65536)
    except OSError:
        answer = b""
print("closed unanswered" if answer == b"" else answer)
"""


def test_the_daemon_serves_no_other_user(served: Harness) -> None:
    needs_root()
    request = json.dumps({"protocol": 1, "run": request_fields(served, sources=["coop0/src0"])})
    asked = as_nobody(ASK, address(served.federation.directory)[1:], request)
    out, _ = asked.communicate(timeout=30)
    assert out.strip() == "closed unanswered"
    assert not served.history.runs() and not served.world.requests


IMPOSTOR = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
    listener.bind("\\0" + sys.argv[1])
    listener.listen(1)
    print("ready", flush=True)
    connection, _ = listener.accept()
    connection.settimeout(2)
    try:
        connection.sendall(b'{"accepted": 1}\\n{"exit": 0}\\n')
        heard = connection.recv(65536)
    except OSError:
        heard = b""
    print("heard a request" if heard else "heard nothing", flush=True)
"""


def test_the_command_talks_to_no_other_users_socket(tmp_path: Path) -> None:
    needs_root()
    h = harness(tmp_path)  # no daemon: another user holds the name, says "accepted" and makes up an exit code
    impostor = as_nobody(IMPOSTOR, address(h.federation.directory)[1:])
    try:
        assert impostor.stdout.readline() == "ready\n"
        began = time.monotonic()
        assert client.hand_off(argv(h, "coop0/src0"), {}, os.getcwd()) is None  # the command runs it itself
        assert time.monotonic() - began < 1.5
        out, _ = impostor.communicate(timeout=30)
        assert out == "heard nothing\n"  # it never sent its request
    finally:
        if impostor.poll() is None:
            impostor.kill()
            impostor.wait()


def test_a_second_daemon_of_the_same_inventory_does_not_take_the_socket(tmp_path: Path, served: Harness) -> None:
    assert not HandoffServer(served.daemon).start()


def test_a_request_that_does_not_come_in_time_is_refused(served: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from mutualbackup.handoff import server

    monkeypatch.setattr(server, "READ_SECONDS", 0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(address(served.federation.directory))
        connection.sendall(b'{"protocol": 1, ')  # and then nothing, the connection kept open
        began = time.monotonic()
        answer = connection.recv(65536)
    assert json.loads(answer) == {"refused": "not a request this daemon reads"}
    assert time.monotonic() - began < 5
