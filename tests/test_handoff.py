"""``mutualbackup run`` handed to the daemon serving its inventory (mutualbackup/handoff): the command prints what
it would have printed running the jobs itself, and the daemon's socket serves no one else and nothing else.

The daemon is the real :class:`~mutualbackup.daemon.Daemon` and its real :class:`HandoffServer` on a Unix socket in
its state directory, over a fake federation (tests/fake.py); the command's side is the real client, in this
process. Another user is played by a child process of user :data:`STRANGER`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mutualbackup import __version__, cli
from mutualbackup.handoff import SOCKET, client, trusted
from mutualbackup.handoff.server import HandoffServer

from fake import Harness, failing, make_federation

START = 1_750_000_000.0
STRANGER = 4242  # another local user (not the overflow user, whom nobody trusts anyway)
CLI_LOG = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")  # cli.setup_logging's


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
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as the daemon's logging (cli.setup_logging): the jobs' INFO records exist
    yield h
    root.setLevel(level)
    server.close()


def state(h: Harness) -> str:
    return str(h.history.path.parent)


def argv(h: Harness, *words: str) -> list[str]:
    return ["--inventory", h.federation.directory, "--state", state(h), "run", *words]


@contextlib.contextmanager
def logging_to_stderr() -> Iterator[None]:
    """This thread's log records on stderr as the command's own logging writes them (cli.setup_logging)."""
    import sys as system

    handler = logging.StreamHandler(system.stderr)
    handler.setFormatter(CLI_LOG)
    handler.addFilter(lambda record: record.thread == threading.get_ident())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], *words: str, json_out: bool = False,
               replica: str | None = None, script=None) -> tuple[int, str, str]:  # noqa: ANN001
    """What the command prints running the same jobs itself, on a federation of its own in the same state."""
    h = harness(tmp_path, "itself")
    if script is not None:
        h.world.script(script)
    try:
        with logging_to_stderr():
            code = cli._run(argparse.Namespace(sources=list(words), replica=replica, json=json_out), h.ctx)
    except cli.MutualBackupError as exc:
        print(f"mutualbackup: {exc}", file=sys.stderr)
        code = exc.exit_code
    out, err = capsys.readouterr()
    return code, out, err


def handed(h: Harness, capsys: pytest.CaptureFixture[str], *words: str) -> tuple[int | None, str, str]:
    code = client.hand_off(argv(h, *words), {}, os.getcwd(), state(h))
    out, err = capsys.readouterr()
    return code, out, err


def same(printed: tuple[int | None, str, str]) -> tuple[int | None, str, str]:
    """What was printed, but for the times (the archive's name, a log line's) and the job's duration (both runs
    read the real clock)."""
    code, out, err = printed
    times = re.compile(r"(\d{4}-\d\d-\d\dT)?\d\d:\d\d:\d\d")
    durations = re.compile(r'"duration": [0-9.e-]+|\d+\.\ds\b')
    return code, durations.sub("D", times.sub("TIME", out)), durations.sub("D", times.sub("TIME", err))


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
    assert client.hand_off(argv(h), {}, os.getcwd(), state(h)) is None


def test_a_daemon_that_has_not_read_the_inventory_as_it_is_now_declines_until_it_has(
    capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    members = Path(served.federation.directory) / "members"
    original = members / "coop0.yml"
    text, stat = original.read_text(), original.stat()
    edits = {
        "a stray entry the loader refuses": lambda: (members / "coop3.yaml").write_text("member: coop3\n"),
        "a member file replaced with its old times (cp -p)": lambda: (
            original.write_text(text + "# edited\n"), os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns))),
        "a directory in members/": lambda: (members / "old").mkdir(),
    }
    for what, edit in edits.items():
        edit()
        assert served.daemon.inventory_as_it_is() is None, what
        assert handed(served, capsys, "coop0/src0") == (None, "", ""), what
        assert not served.history.runs(kind="backup"), what
        for extra in (members / "coop3.yaml", members / "old"):
            if extra.is_dir():
                extra.rmdir()
            elif extra.exists():
                extra.unlink()
        original.write_text(text)
    served.daemon.reload_if_changed()  # its next tick reads the files as they are (back as they were)
    assert served.daemon.inventory_as_it_is() is served.daemon.ctx
    assert handed(served, capsys, "coop0/src0")[0] == 0


def test_a_daemon_whose_inventory_path_now_leads_elsewhere_declines(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    h = harness(tmp_path)
    real = Path(h.federation.directory)
    other = tmp_path / "v2"
    shutil.copytree(real, other)
    link = tmp_path / "current"
    link.symlink_to(real)
    import dataclasses

    h.daemon.ctx.federation = dataclasses.replace(h.federation, directory=str(link))  # started on the link
    h.daemon.reload_if_changed(asked=True)
    server = HandoffServer(h.daemon)
    assert server.start()
    try:
        assert h.daemon.inventory_as_it_is() is not None
        link.unlink()
        link.symlink_to(other)  # the link now leads to another inventory: the daemon has not read that one
        assert h.daemon.inventory_as_it_is() is None
        words = ["--inventory", str(real), "--state", state(h), "run"]
        assert client.hand_off(words, {}, os.getcwd(), state(h)) is None
        assert not h.history.runs(kind="backup")
    finally:
        server.close()


def test_a_daemon_of_another_state_or_another_inventory_declines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    words = ["--inventory", served.federation.directory, "--state", str(elsewhere), "run"]
    assert client.hand_off(words, {}, os.getcwd(), str(elsewhere)) is None  # no daemon there
    assert exchange(served, request(served, inventory=str(tmp_path))) == [
        {"refused": "this daemon serves another inventory"}]
    assert exchange(served, request(served, state=str(elsewhere))) == [
        {"refused": "this daemon uses another state directory"}]
    assert exchange(served, request(served, version="0.0.1")) == [
        {"refused": f"this daemon is mutualbackup {__version__}, the command 0.0.1"}]
    assert not served.history.runs(kind="backup")


def request(h: Harness, version: str = __version__, **changed: object) -> dict[str, object]:
    fields = {"sources": [], "replica": None, "json": False, "progress": False, "journal": False,
              "inventory": h.federation.directory, "state": state(h), "state_named": True}
    return {"protocol": 2, "version": version, "run": {**fields, **changed}}


def exchange(h: Harness, message: object, raw: bytes | None = None) -> list[object]:
    """What the daemon answers to one request line (or ``raw`` bytes), until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(os.path.join(state(h), SOCKET))
        connection.sendall(raw if raw is not None else json.dumps(message).encode() + b"\n")
        connection.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: connection.recv(65536), b""))
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("name, raw", [
    ("not JSON", b"run everything\n"),
    ("another protocol", json.dumps({"protocol": 1, "run": {}}).encode() + b"\n"),
    ("a field more", None),
    ("a source that is not a name", None),
    ("a flag that is not a flag", None),
    ("no end of line", json.dumps({"protocol": 2}).encode()),
    ("two lines", b'{"protocol": 2}\n{"protocol": 2}\n'),
    ("nested too deep", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    ("longer than a request can be", b'{"protocol": 2, "run": {"sources": ["' + b"a" * (1 << 20) + b'"]}}\n'),
])
def test_a_hostile_request_is_refused_and_runs_nothing(served: Harness, name: str, raw: bytes | None) -> None:
    message = request(served)
    fields = message["run"]
    assert isinstance(fields, dict)
    if name == "a field more":
        fields["command"] = "rm -rf /"
    if name == "a source that is not a name":
        fields["sources"] = [{"$ne": ""}]
    if name == "a flag that is not a flag":
        fields["json"] = "yes"
    assert exchange(served, message, raw) == [{"refused": "not a request this daemon reads"}]
    assert not served.history.runs() and not served.world.requests


def test_ctrl_c_while_the_daemon_connects_to_the_source_asks_the_node_nothing(served: Harness) -> None:
    """The command goes away while the daemon is still connecting: the job is stopped there, before its request."""
    from mutualbackup.jobs.foreground import back_up_now
    from mutualbackup.handoff.server import stop

    connect = served.ctx.connector
    controls: list = []

    def slow_connect(node):  # noqa: ANN001, ANN202
        for control in controls:
            stop(control)  # what the watcher does when the command's end closes, here mid-connect
        return connect(node)

    @contextlib.contextmanager
    def claim(source: str, target: str):  # noqa: ANN202
        from mutualbackup.jobs.control import JobControl

        controls.append(JobControl())
        yield controls[-1], None

    served.ctx.connector = slow_connect

    class Quiet:
        def note(self, text: str) -> None: ...
        def outcome(self, outcome) -> None: ...  # noqa: ANN001
        backing_up = staticmethod(lambda source, target: contextlib.nullcontext())

    [outcome, _other] = back_up_now(served.ctx, ["coop0/src0"], None, Quiet(), claim)
    assert outcome.result == "interrupted" and "aborted" in outcome.error
    assert not [r for r in served.world.requests if r[1] == "backup"]  # the node was asked nothing


def test_a_closed_stdout_or_stderr_keeps_the_run_in_the_command(served: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    for stream in ("stdout", "stderr"):
        with monkeypatch.context() as patched:
            patched.setattr(sys, stream, None)  # `mutualbackup run >&-` in a cron line
            assert client.hand_off(argv(served), {}, os.getcwd(), state(served)) is None
    assert not served.history.runs()


def test_the_overflow_user_is_nobody_to_trust() -> None:
    assert trusted(os.geteuid())
    assert not trusted(65534)  # whom a user namespace shows for a user it does not map


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory every user may enter (the test's own tmp_path is 0700)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="handoff-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: another user's process is played by a child of another user id")


def as_stranger(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` (Python) run by user :data:`STRANGER`, its output read as text: another user's process."""
    return subprocess.Popen([sys.executable, "-c", script, *args], user=STRANGER, group=STRANGER, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


ASK = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
    connection.settimeout(10)
    try:
        connection.connect(sys.argv[1])
    except PermissionError:
        print("no permission to connect")
        sys.exit()
    try:
        connection.sendall(sys.argv[2].encode() + b"\\n")
        answer = connection.recv(65536)
    except OSError:
        answer = b""
print("closed unanswered" if answer == b"" else answer)
"""


def test_the_daemon_serves_no_other_user(reachable: Path) -> None:
    needs_root()
    served = harness(reachable)
    server = HandoffServer(served.daemon)
    assert server.start()
    try:
        answered_no_other_user(served)
    finally:
        server.close()


def answered_no_other_user(served: Harness) -> None:
    (Path(state(served)).parent).chmod(0o755)
    where = os.path.join(state(served), SOCKET)
    line = json.dumps(request(served, sources=["coop0/src0"]))
    asked = as_stranger(ASK, where, line)
    assert asked.communicate(timeout=30)[0].strip() == "no permission to connect"  # the state directory is 0700
    os.chmod(state(served), 0o755)  # a state directory opened up, and the socket too: the daemon still refuses
    os.chmod(where, 0o777)
    asked = as_stranger(ASK, where, line)
    assert asked.communicate(timeout=30)[0].strip() == "closed unanswered"
    assert not served.history.runs() and not served.world.requests


IMPOSTOR = """
import os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
    listener.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o777)
    listener.listen(1)
    print("ready", flush=True)
    listener.settimeout(float(sys.argv[2]))
    try:
        connection, _ = listener.accept()
    except OSError:
        print("nobody came", flush=True)
        sys.exit()
    connection.settimeout(2)
    try:
        connection.sendall(b'{"accepted": 1}\\n{"exit": 0}\\n')
        heard = connection.recv(65536)
    except OSError:
        heard = b""
    print("heard a request" if heard else "heard nothing", flush=True)
"""


def test_the_command_talks_to_no_other_users_socket(reachable: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_root()
    tmp_path = reachable
    h = harness(tmp_path)  # no daemon: another user's impostor says "accepted", then makes up an exit code
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, STRANGER, STRANGER)
    impostor = as_stranger(IMPOSTOR, str(theirs / SOCKET), "1")
    try:
        assert impostor.stdout.readline() == "ready\n"
        words = ["--inventory", h.federation.directory, "--state", str(theirs), "run"]
        assert client.hand_off(words, {}, os.getcwd(), str(theirs)) is None  # their directory: not even asked
        assert impostor.communicate(timeout=30)[0] == "nobody came\n"
    finally:
        if impostor.poll() is None:
            impostor.kill()
            impostor.wait()
    monkeypatch.setattr(client, "private_directory", lambda path: True)  # past the directory: the user itself
    (theirs / SOCKET).unlink()
    impostor = as_stranger(IMPOSTOR, str(theirs / SOCKET), "10")
    try:
        assert impostor.stdout.readline() == "ready\n"
        began = time.monotonic()
        assert client.hand_off(words, {}, os.getcwd(), str(theirs)) is None  # the command runs it itself
        assert time.monotonic() - began < 1.5
        assert impostor.communicate(timeout=30)[0] == "heard nothing\n"  # it never sent its request
    finally:
        if impostor.poll() is None:
            impostor.kill()
            impostor.wait()


def test_a_second_daemon_of_the_same_state_does_not_take_the_socket(served: Harness) -> None:
    assert not HandoffServer(served.daemon).start()
    assert os.path.exists(os.path.join(state(served), SOCKET))  # the first one's is still there, and answers
    assert exchange(served, request(served, version="0"))[0]["refused"].startswith("this daemon is")


def test_a_socket_left_by_a_killed_daemon_is_replaced_and_a_long_state_path_works(tmp_path: Path) -> None:
    h = harness(tmp_path / ("long-" * 20))
    assert len(os.path.join(state(h), SOCKET)) > 108  # longer than a socket's address
    first = HandoffServer(h.daemon)
    assert first.start()
    first.listener.shutdown(socket.SHUT_RDWR)  # killed: its socket file stays, nobody answers
    first.listener.close()
    first.listener = None
    assert os.path.exists(os.path.join(state(h), SOCKET))
    second = HandoffServer(h.daemon)
    assert second.start()
    try:
        assert client.hand_off(argv(h, "coop0/src0"), {}, os.getcwd(), state(h)) == 0
        assert stat_mode(os.path.join(state(h), SOCKET)) == 0o600
    finally:
        second.close()
    assert not os.path.exists(os.path.join(state(h), SOCKET))  # removed on a clean stop


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def test_a_request_that_does_not_come_in_time_is_refused(served: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from mutualbackup.handoff import server

    monkeypatch.setattr(server, "READ_SECONDS", 0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(os.path.join(state(served), SOCKET))
        connection.sendall(b'{"protocol": 2, ')  # and then nothing, the connection kept open
        began = time.monotonic()
        answer = connection.recv(65536)
    assert json.loads(answer) == {"refused": "not a request this daemon reads"}
    assert time.monotonic() - began < 5


def test_a_command_that_stops_reading_loses_progress_lines_then_counts_as_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-Z, or a pipe nobody reads: the daemon never waits on it for a progress line, and waits at most
    SEND_SECONDS for any other before it stops the job as if the command had gone."""
    from types import SimpleNamespace

    from mutualbackup.handoff import server
    from mutualbackup.jobs.control import JobControl

    monkeypatch.setattr(server, "SEND_SECONDS", 0.3)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(server.SEND_SECONDS)
        served = server.Served(SimpleNamespace(daemon=None), ours)  # type: ignore[arg-type]
        served.current = control = JobControl()
        began = time.monotonic()
        for _ in range(20_000):  # far more than the socket holds: the rest are dropped, never waited for
            served.send({"progress": [1, 2, 3]}, droppable=True)
        assert time.monotonic() - began < 0.3 * 3 and not served.gone.is_set()
        served.send({"out": "a line the command must get\n"})  # waits SEND_SECONDS, then: gone
        assert served.gone.is_set() and control.is_aborted and control.reason == server.GONE
        assert time.monotonic() - began < 5


def test_once_the_daemon_has_accepted_the_command_never_runs_the_jobs_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A daemon that goes away, or says something the command does not read: the jobs were taken, the command
    says so and exits 1 (None would run them a second time)."""
    h = harness(tmp_path)
    for said in (b'{"accepted": 7}\n', b'{"accepted": 7}\n{"log": 5}\n', b'{"accepted": 7}\n["exit", 0]\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(os.path.join(state(h), SOCKET))
            listener.listen(1)

            def answer() -> None:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    connection.sendall(said)

            answering = threading.Thread(target=answer)
            answering.start()
            assert client.hand_off(argv(h), {}, os.getcwd(), state(h)) == 1, said
            answering.join()
        os.unlink(os.path.join(state(h), SOCKET))
        assert "the daemon (process 7)" in capsys.readouterr().err


def real_inventory(tmp_path: Path) -> Path:
    """A copy of a valid inventory (the daemon reloads it for real)."""
    inventory = tmp_path / "inventory"
    shutil.copytree(Path(__file__).parent / "inventories" / "three-members", inventory)
    return inventory


def test_the_stamp_follows_a_linked_federation_file_and_is_taken_before_the_daemon_reads(tmp_path: Path) -> None:
    from mutualbackup.daemon import inventory_stamp

    inventory = real_inventory(tmp_path)
    elsewhere = tmp_path / "federation.yml"
    (inventory / "federation.yml").rename(elsewhere)
    (inventory / "federation.yml").symlink_to(elsewhere)  # a file kept elsewhere (a checkout, a ConfigMap)
    before = inventory_stamp(str(inventory))
    elsewhere.write_text(elsewhere.read_text() + "# edited where the link leads\n")
    assert inventory_stamp(str(inventory)) != before


def test_a_reloaded_inventory_that_names_another_key_gets_a_connector_with_that_key(tmp_path: Path) -> None:
    from mutualbackup.context import Context, ssh_connector
    from mutualbackup.daemon import Daemon, inventory_stamp
    from mutualbackup.inventory.load import load_inventory
    from mutualbackup.state.history import History

    inventory = real_inventory(tmp_path)
    read_at = inventory_stamp(str(inventory))  # as cmd_daemon takes it: before the inventory is read
    federation = load_inventory(str(inventory))
    daemon = Daemon(Context(federation, History(str(tmp_path / "state")), ssh_connector(federation)),
                    read_at=read_at)
    assert daemon.inventory_as_it_is() is daemon.ctx
    text = (inventory / "federation.yml").read_text()
    assert "ssh_key: /etc/mutualbackup/id_ed25519" in text
    (inventory / "federation.yml").write_text(text.replace("/etc/mutualbackup/id_ed25519", "/etc/mutualbackup/new_key"))
    assert daemon.inventory_as_it_is() is None  # not before it has read it
    daemon.reload_if_changed()
    assert daemon.inventory_as_it_is() is daemon.ctx
    assert daemon.ctx.connector.key_file == "/etc/mutualbackup/new_key"  # type: ignore[attr-defined]
    stale = Daemon(daemon.ctx, read_at=read_at)  # started from a reading older than the files: reads them again
    assert stale.inventory_as_it_is() is None


def test_a_daemon_whose_state_directory_others_may_write_takes_no_run(tmp_path: Path) -> None:
    h = harness(tmp_path)
    os.chmod(state(h), 0o777)
    assert not HandoffServer(h.daemon).start()
    assert not os.path.exists(os.path.join(state(h), SOCKET))


def test_a_command_the_daemon_could_not_serve_leaves_the_next_one_served(served: Harness,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Thread.start
    failures = []

    def no_thread(self):  # noqa: ANN001, ANN202
        if self.name == "handed-off run" and not failures:
            failures.append(self)
            raise RuntimeError("can't start new thread")
        return started(self)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert client.hand_off(argv(served, "coop0/src0"), {}, os.getcwd(), state(served)) is None  # runs it itself
    assert client.hand_off(argv(served, "coop0/src0"), {}, os.getcwd(), state(served)) == 0  # the daemon still serves
    assert failures


def test_a_daemon_stopping_during_a_handed_off_run_starts_none_of_its_next_jobs_and_says_so(
    capsys: pytest.CaptureFixture[str], served: Harness,
) -> None:
    """SIGTERM while a handed-off run goes on: the job under way ends as the daemon's own do; the next ones are
    not started, each says why, and the command exits 1 (it ran them all, or says which it did not)."""
    from mutualbackup.jobs import backup

    real = backup.run_backup
    calls: list[str] = []

    def then_sigterm(*args, **options):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[2].name)
        outcome = real(*args, **options)
        served.daemon.stop.set()  # SIGTERM arrives while the first backup runs
        return outcome

    backup.run_backup = then_sigterm  # type: ignore[assignment]
    try:
        code, out, err = handed(served, capsys)  # every source: six backups
    finally:
        backup.run_backup = real  # type: ignore[assignment]
    assert code == 1 and len(calls) == 1
    assert len(out.splitlines()) == 1 and " success " in out
    assert err.count("not started: the daemon is stopping; run it again once that ends") == 5, err
    assert not served.daemon.running
