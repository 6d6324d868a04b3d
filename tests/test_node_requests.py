"""The node program's requests on this machine (no sshd): what a host's authorized_keys becomes, how a
restore's line is held and withdrawn, how secrets are sealed, how commands are supervised, and that
``serve`` answers one JSON line whatever it is sent."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mutualbackup import borg
from mutualbackup.node.config import Admin, NodeConfig, write_config
from mutualbackup.node.protocol import DONE, FAILED, REFUSED
from mutualbackup.node.requests import Session, handle
from mutualbackup.node.restore import open_sealed, seal_for_node
from mutualbackup.node.serve import import_handlers
from mutualbackup.node.system import LocalSystem

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def config(tmp_path: Path, **changes: Any) -> NodeConfig:
    for sub in ("work", "state", "storage", "keys"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    values = dict(member="coop", node="store", user="root", authorized_keys=str(tmp_path / "keys" / "authorized_keys"),
                  work=str(tmp_path / "work"), state=str(tmp_path / "state"), borg="borg",
                  storage=str(tmp_path / "storage"), admins=(Admin("alice", KEY),))
    values.update(changes)
    return NodeConfig(**values)


class Conversation:
    """A request answered here, its events kept, its further lines fed from a list (or a blocking queue)."""

    def __init__(self, node: NodeConfig, lines: list[bytes] | None = None):
        import queue

        self.events: list[tuple[str, dict]] = []
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        for line in lines or []:
            self.lines.put(line)
        import_handlers()
        self.session = Session(node, LocalSystem(), lambda event, fields: self.events.append((event, dict(fields))),
                               lambda timeout: self.lines.get(timeout=timeout))

    def ask(self, kind: str, args: dict):  # noqa: ANN201
        return handle(kind, json.loads(json.dumps(args)), self.session, self.session.config.name)


# --- the host's authorized_keys ------------------------------------------------------------------


def test_authorize_writes_one_confined_line_per_replica_and_keeps_every_other_line(tmp_path: Path) -> None:
    node = config(tmp_path)
    Path(node.authorized_keys).write_text("command=\"mutualbackup-node serve\",restrict ssh-ed25519 C x\n# mine\n")
    reply = Conversation(node).ask("authorize", {"replicas": [{"source": "other/web1", "public_key": KEY, "quota": 10 ** 10}]})
    assert reply.code == DONE and reply.data == {"changed": True, "lines": 1}
    text = Path(node.authorized_keys).read_text()
    assert text.startswith('command="mutualbackup-node serve",restrict ssh-ed25519 C x\n# mine\n')
    [line] = borg.managed_lines(text)
    assert f"--restrict-to-repository {tmp_path}/storage/other/web1 --append-only" in line
    assert line.endswith(f"{KEY} mutualbackup:other/web1") and ",restrict " in line
    assert Conversation(node).ask("authorize", {"replicas": [{"source": "other/web1", "public_key": KEY,
                                                              "quota": 10 ** 10}]}).data["changed"] is False


@pytest.mark.parametrize("replica, why", [
    ({"source": "coop/web1", "public_key": KEY, "quota": 1}, "own member"),
    ({"source": "other/web1", "public_key": "ssh-rsa AAAA", "quota": 1}, "not an ed25519 public key"),
    ({"source": "other/web1", "public_key": KEY + "\ncommand=\"sh\" " + OTHER, "quota": 1}, "not an ed25519 public key"),
    ({"source": "../../etc", "public_key": KEY, "quota": 1}, "MEMBER/NODE"),
    ({"source": "other/web1", "public_key": KEY, "quota": -1}, "whole number"),
])
def test_authorize_refuses_what_would_open_more_than_one_repository_of_another_member(
    tmp_path: Path, replica: dict, why: str
) -> None:
    node = config(tmp_path)
    reply = Conversation(node).ask("authorize", {"replicas": [replica]})
    assert reply.code == REFUSED and why in (reply.error or ""), reply
    assert not Path(node.authorized_keys).exists()


def test_a_replica_whose_source_was_not_reached_keeps_its_line(tmp_path: Path) -> None:
    node = config(tmp_path)
    ask = Conversation(node).ask
    ask("authorize", {"replicas": [{"source": "other/web1", "public_key": KEY, "quota": 10 ** 10}]})
    before = Path(node.authorized_keys).read_text()
    assert ask("authorize", {"replicas": [{"source": "other/web1", "public_key": None, "quota": 1}]}).code == DONE
    assert Path(node.authorized_keys).read_text() == before


# --- a restore's line on the host ------------------------------------------------------------------


def grant_args() -> dict:
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), "beef")
    return {"source": "other/web1", "public_key": OTHER, "restore_id": restore_id}


@pytest.mark.parametrize("ending", [b"withdraw\n", None], ids=["withdrawn", "the coordinator went away"])
def test_a_grant_holds_the_line_until_withdrawn_or_the_session_ends(tmp_path: Path, ending: bytes | None) -> None:
    node = config(tmp_path)
    Path(node.authorized_keys).write_bytes(b"mine \xff not utf-8\n")
    talk = Conversation(node)
    answered: list = []
    thread = threading.Thread(target=lambda: answered.append(talk.ask("grant", grant_args())))
    thread.start()
    for _ in range(200):
        if talk.events:
            break
        time.sleep(0.01)
    assert talk.events == [("added", {})]
    [line] = borg.managed_lines(Path(node.authorized_keys).read_text(errors="surrogateescape"))
    assert "mutualbackup-restore:other/web1:" in line and 'expiry-time="' in line and "--storage-quota 10M" in line
    talk.lines.put(ending)
    thread.join(10)
    assert answered[0].code == DONE
    assert borg.managed_lines(Path(node.authorized_keys).read_text(errors="surrogateescape")) == []
    assert Path(node.authorized_keys).read_bytes().startswith(b"mine \xff not utf-8\n")


def test_a_grant_on_a_damaged_block_changes_nothing(tmp_path: Path) -> None:
    node = config(tmp_path)
    Path(node.authorized_keys).write_text(f"{borg.BEGIN}\n{borg.BEGIN}\n{borg.END}\n")
    reply = Conversation(node, [b"withdraw\n"]).ask("grant", grant_args())
    assert reply.code == FAILED and "damaged" in (reply.error or "")
    assert Path(node.authorized_keys).read_text() == f"{borg.BEGIN}\n{borg.BEGIN}\n{borg.END}\n"


# --- secrets ---------------------------------------------------------------------------------------


def identity(node: NodeConfig) -> str:
    from pyrage import x25519

    made = x25519.Identity.generate()
    Path(node.identity_file).write_text(str(made) + "\n")
    return str(made.to_public())


def test_a_passphrase_sealed_for_a_node_opens_only_with_that_nodes_identity(tmp_path: Path) -> None:
    mine, theirs = config(tmp_path / "a"), config(tmp_path / "b")
    for node in (mine, theirs):
        Path(node.state).mkdir(parents=True, exist_ok=True)
    sealed = seal_for_node(identity(mine), {"passphrase": "s3cret"})
    identity(theirs)
    assert "s3cret" not in sealed
    assert open_sealed(Conversation(mine).session, sealed) == {"passphrase": "s3cret"}
    with pytest.raises(Exception) as refused:
        open_sealed(Conversation(theirs).session, sealed)
    assert "not sealed for this node" in str(refused.value) and "s3cret" not in str(refused.value)


def test_a_source_seals_its_passphrase_for_its_own_members_nodes_only(tmp_path: Path) -> None:
    node = config(tmp_path, node="web1")
    Path(node.state, "passphrase").write_text("s3cret")
    other = config(tmp_path / "o")
    Path(other.state).mkdir(parents=True, exist_ok=True)
    node_key = identity(other)
    ask = Conversation(node).ask
    refused = ask("seal", {"node": "mallory/laptop", "node_key": node_key})
    assert refused.code == REFUSED and "member's own nodes only" in (refused.error or "")
    sealed = ask("seal", {"node": "coop/store", "node_key": node_key})
    assert sealed.code == DONE and "s3cret" not in json.dumps(sealed.data)
    assert open_sealed(Conversation(other).session, sealed.data["sealed"])["passphrase"] == "s3cret"


def test_a_restore_onto_a_non_empty_directory_is_refused_before_borg_runs(tmp_path: Path) -> None:
    node = config(tmp_path, node="web1")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "precious").write_text("x")
    host = {"name": "other/store", "address": "127.0.0.1", "port": 22, "user": "mb", "storage": "/srv/mb",
            "host_key": OTHER}
    reply = Conversation(node).ask("extract", {"host": host, "source": "coop/web1", "target": str(tmp_path / "target"),
                                               "paths": []})
    assert reply.code == FAILED and (reply.error or "").startswith("target not empty")


# --- supervision ----------------------------------------------------------------------------------


def test_a_supervised_command_writes_its_pidfile_and_is_stopped_when_the_coordinator_goes(tmp_path: Path) -> None:
    system = LocalSystem()
    pidfile = tmp_path / "run" / "src.other.store.pid"
    result: list = []
    waits = (sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\ntime.sleep(60)\n")
    thread = threading.Thread(target=lambda: result.append(system.run(waits, pidfile=str(pidfile), run_id=7)))
    thread.start()
    for _ in range(500):
        if pidfile.exists():
            break
        time.sleep(0.01)
    info = system.pidfile(str(pidfile))
    assert info is not None and info.run_id == 7 and info.started
    system.gone.set()
    thread.join(20)
    assert result[0].exit_code == -1 and b"went away" in result[0].stderr
    assert not pidfile.exists()


def test_stop_signals_only_the_process_that_was_started_never_a_reused_pid(tmp_path: Path) -> None:
    system = LocalSystem()
    pidfile = tmp_path / "p.pid"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{sleeper.pid}\n1\n12345\n")  # another start time: not that process
        assert system.stop(str(pidfile), 1, 1) == (True, "not running")
        assert sleeper.poll() is None
        from mutualbackup.node.system import process_start

        pidfile.write_text(f"{sleeper.pid}\n1\n{process_start(sleeper.pid)}\n")
        assert system.stop(str(pidfile), 1, 1, owner="nobody") == (False, f"pid {sleeper.pid} is not nobody's: not signalled")
        stopped, said = system.stop(str(pidfile), 5, 5)
        assert stopped and said == "stopped by SIGINT"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_timeout_stops_the_command_and_says_so(tmp_path: Path) -> None:
    started = time.monotonic()
    result = LocalSystem().run(("sleep", "30"), timeout=0.5)
    assert result.exit_code == -1 and b"timed out after 0.5s" in result.stderr
    assert time.monotonic() - started < 10


# --- serve ---------------------------------------------------------------------------------------------


def serve(tmp_path: Path, kind: str, stdin: bytes, **environment: str) -> tuple[int, list[dict]]:
    node = config(tmp_path)
    write_config(node, str(tmp_path / "etc"))
    done = subprocess.run([sys.executable, "-m", "mutualbackup.node.cli", "serve", kind, "--config", str(tmp_path / "etc")],
                          input=stdin, capture_output=True, env={**os.environ, **environment}, timeout=60)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("stdin", [b"", b"not json\n", b'{"protocol": 1, "request": "other", "node": "coop/store", "args": {}}\n',
                                   b'{"protocol": 9, "request": "leftover", "node": "coop/store", "args": {}}\n',
                                   b'{"protocol": 1, "request": "leftover", "args": {}}\n', b"[1, 2]\n"],
                         ids=["nothing", "not JSON", "another request than asked", "another protocol", "no node named",
                              "not an object"])
def test_serve_answers_a_bad_request_with_one_refusal_line(tmp_path: Path, stdin: bytes) -> None:
    code, lines = serve(tmp_path, "leftover", stdin)
    assert code == REFUSED and len(lines) == 1 and lines[0]["event"] == "result" and lines[0]["code"] == REFUSED


def test_serve_answers_a_request_with_its_result(tmp_path: Path) -> None:
    code, lines = serve(tmp_path, "leftover",
                        b'{"protocol": 1, "request": "leftover", "node": "coop/store", "args": {"role": "src/a/b"}}\n')
    assert code == 0 and lines == [{"event": "result", "ok": True, "code": 0, "error": None, "data": {}}]


def test_a_request_meant_for_another_node_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """The inventory gave another member's node this server's address: the server knows whose it is."""
    code, lines = serve(tmp_path, "prepare",
                        b'{"protocol": 1, "request": "prepare", "node": "mallory/mine", "args": {"hosts": []}}\n')
    assert code == REFUSED and len(lines) == 1
    assert "this server is coop/store (pinned when it joined)" in lines[0]["error"]
    assert "meant for mallory/mine" in lines[0]["error"]
    assert not any((tmp_path / "state").iterdir())  # no key, no passphrase made for the claimant


def test_the_table_of_kinds_names_every_request_with_its_side_and_module_and_nothing_else() -> None:
    from mutualbackup.node import kinds
    from mutualbackup.node.requests import REQUESTS

    import_handlers()
    assert {name: (r.side, r.handler.__module__) for name, r in REQUESTS.items()} == {
        name: (side, f"mutualbackup.node.{module}") for name, (side, module) in kinds.KINDS.items()}
    assert {name for name in kinds.KINDS if kinds.needs_root(name)} == {
        name for name, r in REQUESTS.items() if r.side == "source"}


def test_serve_imports_only_the_module_that_answers_the_request(tmp_path: Path) -> None:
    """The node program's start is paid by every request: a hello must not import borg's layers, drills or restores."""
    node = config(tmp_path)
    write_config(node, str(tmp_path / "etc"))
    probe = ("import sys, io; from mutualbackup.node import serve; "
             "serve.serve('hello', sys.argv[1], io.BytesIO(b'{\"protocol\":1,\"request\":\"hello\",\"node\":\"coop/store\",\"args\":{\"borg\":false}}\\n'), "
             "io.BytesIO()); print(sorted(m for m in sys.modules if m.startswith('mutualbackup.node.')))")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "etc")], capture_output=True, text=True, check=True)
    loaded = set(eval(done.stdout))  # noqa: S307 - our own printed list
    assert "mutualbackup.node.source" in loaded
    assert not loaded & {"mutualbackup.node.drill", "mutualbackup.node.restore", "mutualbackup.node.host"}
