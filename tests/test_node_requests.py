"""The node program's requests on this machine (no sshd): what a host's authorized_keys becomes, how a
restore's line is held and withdrawn, how secrets are sealed, how commands are supervised, and that
``serve`` answers one JSON line whatever it is sent."""

from __future__ import annotations

import dataclasses
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

from fake import admin_key, signed_material
from mutualbackup import borg
from mutualbackup.node import authority
from mutualbackup.node.authority import VERIFIED_DIRECTORY
from mutualbackup.node.config import Admin, NodeConfig, load_config, write_config
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
                  storage=str(tmp_path / "storage"), admins=(Admin("admin", admin_key()[1]),))
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



def made_in(state: str | Path) -> list[str]:
    """What a request left in a node's state, but the member files the node verified (``authority._remember``)."""
    return sorted(p.name for p in Path(state).iterdir() if p.name != VERIFIED_DIRECTORY)

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


def coop_file(store_key: str = "", **backup: Any) -> dict[str, Any]:
    """coop's member file as its admin signs it: a host ``store`` and a source ``web1``."""
    store: dict[str, Any] = {"name": "store", "address": "192.0.2.1", "user": "mb", "host_key": KEY,
                             "storage": {"path": "/srv/mb", "capacity": "10GiB"}}
    if store_key:
        store["node_key"] = store_key
    return {"member": "coop", "site": "here", "admins": [{"name": "admin", "key": admin_key()[1]}],
            "nodes": [store, {"name": "web1", "address": "192.0.2.2", "user": "mb", "host_key": OTHER,
                              "backup": {"paths": ["/etc"], **backup}}]}


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
    signed = signed_material(str(tmp_path / "inv"), coop_file(store_key=node_key))
    unsigned = ask("seal", {"node": "coop/store", "node_key": node_key})
    assert unsigned.code == REFUSED and "no signed member file" in (unsigned.error or "")
    undeclared = ask("seal", {"node": "coop/store", "node_key": identity(config(tmp_path / "u")), "signed": signed})
    assert undeclared.code == REFUSED and "no node store with that node_key" in (undeclared.error or "")
    sealed = ask("seal", {"node": "coop/store", "node_key": node_key, "signed": signed})
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


def sealed_restore(tmp_path: Path, lines: list[bytes]) -> tuple[Conversation, Any, Path]:
    """coop/web2 asked to restore coop/web1 with a sealed passphrase, its borg a script that goes through borg's
    ssh command (the gate, then ssh) and leaves a mark when it starts; (the conversation, the reply, the mark)."""
    mark = tmp_path / "borg-started"
    script = tmp_path / "borg"
    script.write_text(f'#!/bin/sh\ntouch {mark}\neval "$BORG_RSH"\n')
    script.chmod(0o755)
    node = config(tmp_path, node="web2", borg=str(script))
    host = {"name": "other/store", "address": "127.0.0.1", "port": 22, "user": "mb", "storage": "/srv/mb",
            "host_key": OTHER}
    conversation = Conversation(node, lines)
    replies: list[Any] = []
    asking = threading.Thread(target=lambda: replies.append(conversation.ask("extract", {
        "host": host, "source": "coop/web1", "target": str(tmp_path / "target"), "archive": "web1-1", "paths": [],
        "sealed": True})))
    asking.start()
    asking.join(60)
    assert replies, "the restore still waits"
    return conversation, replies[0], mark


def test_a_restore_onto_another_node_starts_borg_while_its_key_is_made_and_borg_waits_at_the_gate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key pair (ssh-keygen) is made while borg starts, not before: borg's ssh waits at the gate, which opens
    only once the coordinator has had the key, the host's line and the passphrase."""
    from mutualbackup.node import restore as node_restore

    made, started_first = node_restore._key_pair, []

    def key_pair(comment: str, state: str) -> tuple[bytes, str]:
        for _ in range(1000):  # borg (the script) starts without waiting for the key
            if (tmp_path / "borg-started").exists():
                break
            time.sleep(0.01)
        started_first.append((tmp_path / "borg-started").exists())
        return made(comment, state)

    monkeypatch.setattr(node_restore, "_key_pair", key_pair)
    conversation, reply, _ = sealed_restore(tmp_path, [b'{"refused": "called off by the test"}\n'])
    assert started_first == [True]
    keys = [fields for event, fields in conversation.events if event == "key"]
    assert len(keys) == 1 and keys[0]["public_key"].startswith("ssh-ed25519 ")
    assert reply.code == FAILED and reply.error == "called off by the test"
    assert not [name for name in made_in(conversation.session.config.state) if name.startswith("restore-")]


def test_a_restore_key_that_cannot_be_made_calls_borg_off_at_once_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mutualbackup.node import restore as node_restore

    def key_pair(comment: str, state: str) -> tuple[bytes, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node_restore, "_key_pair", key_pair)
    conversation, reply, mark = sealed_restore(tmp_path, [])  # no passphrase will ever come: nothing waits for it
    assert mark.exists()
    assert reply.code == FAILED and reply.error == "the restore's key could not be made: [Errno 28] No space left on device"
    assert not [event for event, _ in conversation.events if event == "key"]
    assert not [name for name in made_in(conversation.session.config.state) if name.startswith("restore-")]


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
    assert made_in(tmp_path / "state") == []  # no key, no passphrase made for the claimant


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


# --- the member's signed file is the node's only authority ------------------------------------------------


HOST = {"name": "other/store", "address": "192.0.2.9", "port": 22, "user": "mb", "host_key": KEY, "storage": "/srv/mb"}


def other_key() -> bytes:
    """An OpenSSH private key that is nobody's pinned admin."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def public_of(private: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private, None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def backup_args(signed: dict | None, **spec: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"host": HOST, "archive": "web1-2026-12-06T03:00:00", "timeout": 60, "run_id": 1,
                            "backup": {"paths": ["/etc"], "exclude": [], "compression": "zstd,3", "before": [], **spec}}
    if signed is not None:
        args["signed"] = signed
    return args


@pytest.mark.parametrize("attack, why", [
    ("unsigned", "no signed member file"),
    ("tampered", "signature"),
    ("other key", "signature"),
    ("another member's file", 'says member "other"'),
    ("before added", "disagrees with coop's signed file on before"),
    ("other paths", "disagrees with coop's signed file on paths"),
])
def test_a_backup_that_is_not_what_the_member_signed_is_refused_before_anything_runs(
        tmp_path: Path, attack: str, why: str) -> None:
    node = config(tmp_path, node="web1")
    signed = signed_material(str(tmp_path / "inv"), coop_file())
    spec: dict[str, Any] = {}
    if attack == "unsigned":
        signed = None
    elif attack == "tampered":
        signed["file"] = signed["file"].replace("- /etc", "- /etc\n      before: [touch /tmp/pwned]")
    elif attack == "other key":
        document = coop_file(before=["touch /tmp/pwned"])
        document["admins"] = [{"name": "mallory", "key": public_of(key := other_key())}]
        signed = signed_material(str(tmp_path / "evil"), document, key=key)
    elif attack == "another member's file":
        signed = signed_material(str(tmp_path / "evil"), {**coop_file(), "member": "other"})
    elif attack == "before added":
        spec = {"before": ["touch /tmp/pwned"]}
    elif attack == "other paths":
        spec = {"paths": ["/nonexistent"]}
    conversation = Conversation(node)
    reply = conversation.ask("backup", backup_args(signed, **spec))
    assert reply.code == REFUSED and why in (reply.error or ""), reply.error
    assert reply.data == {"not_signed": True} and "nothing was done" in (reply.error or "")
    assert made_in(node.state) == [] and not conversation.events  # no key, no passphrase, no command


def test_prune_keeps_what_the_member_signed_and_nothing_less(tmp_path: Path) -> None:
    node = config(tmp_path, node="web1")
    signed = signed_material(str(tmp_path / "inv"), coop_file(retention={"daily": 7, "monthly": 6}))
    args = {"host": HOST, "retention": {"daily": 1}, "run_id": 1, "timeout": 60, "signed": signed}
    reply = Conversation(node).ask("prune", args)
    assert reply.code == REFUSED and "disagrees with coop's signed file on retention" in (reply.error or "")
    assert made_in(node.state) == []


def test_a_default_retention_that_keeps_less_than_a_week_is_refused_unless_the_member_signs_it(tmp_path: Path) -> None:
    node = config(tmp_path, node="web1")
    short = "federation: fake-federation\ncoordinator: {ssh_key: /x, state: /x}\ndefaults: {retention: {daily: 1}}\n"
    signed = signed_material(str(tmp_path / "inv"), coop_file(), federation=short)
    args = {"host": HOST, "retention": {"daily": 1}, "run_id": 1, "timeout": 60, "signed": signed}
    reply = Conversation(node).ask("prune", args)
    assert reply.code == REFUSED and "keeps less than a week" in (reply.error or "")
    hidden = short.replace("defaults: {retention: {daily: 1}}", "defaults: {before: [touch /tmp/pwned]}")
    reply = Conversation(node).ask("backup", backup_args(signed_material(str(tmp_path / "i2"), coop_file(),
                                                                         federation=hidden)))
    assert reply.code == REFUSED and 'defaults cannot hold "before"' in (reply.error or "")


def test_admins_rotate_only_by_a_pinned_admins_signature_and_are_pinned_again(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    directory.mkdir()
    write_config(config(tmp_path, node="store"), str(directory))
    node = load_config(str(directory), trusted=False)
    new = other_key()
    rotated = coop_file()
    rotated["admins"] = [{"name": "bob", "key": public_of(new)}]
    by_mallory = signed_material(str(tmp_path / "m"), rotated, key=new)
    assert Conversation(node).ask("prepare", {"hosts": [], "signed": by_mallory}).code == REFUSED
    assert load_config(str(directory), trusted=False).admins == node.admins  # nothing pinned
    by_admin = signed_material(str(tmp_path / "a"), rotated)
    conversation = Conversation(node)
    assert conversation.ask("prepare", {"hosts": [], "signed": by_admin}).code == DONE
    assert [a.name for a in load_config(str(directory), trusted=False).admins] == ["bob"]
    assert ("repinned", {"admins": ["bob"]}) in conversation.events
    again = load_config(str(directory), trusted=False)
    old = signed_material(str(tmp_path / "o"), coop_file())  # the former admin can no longer sign
    assert Conversation(again).ask("prepare", {"hosts": [], "signed": old}).code == REFUSED
    assert Conversation(again).ask("prepare", {"hosts": [], "signed": by_mallory}).code == DONE


def test_a_signed_file_naming_an_admin_key_no_private_key_makes_is_refused_and_nothing_is_pinned(tmp_path: Path) -> None:
    """Signed by the pinned admin, but adding an ed25519 "key" of small order, whose signature holds for any file:
    pinned, it would let anyone sign for the member. The node refuses the file."""
    from signkit import ed25519_key

    directory = tmp_path / "config"
    directory.mkdir()
    write_config(config(tmp_path, node="store"), str(directory))
    node = load_config(str(directory), trusted=False)
    widened = coop_file()
    widened["admins"] = [*widened["admins"], {"name": "anyone", "key": ed25519_key()}]
    conversation = Conversation(node)
    reply = conversation.ask("prepare", {"hosts": [], "signed": signed_material(str(tmp_path / "a"), widened)})
    assert reply.code == REFUSED and "admin anyone" in (reply.error or "") and "not a point any private key makes" in (
        reply.error or "")
    assert load_config(str(directory), trusted=False).admins == node.admins
    assert not [event for event in conversation.events if event[0] == "repinned"]


# --- the member files a node verified, kept between requests --------------------------------------------------------


def counted_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each member (by name) whose file's signature ``ssh-keygen -Y verify`` checks from now on."""
    from mutualbackup.inventory import signatures

    calls: list[str] = []
    real = signatures.verify

    def verify(text: bytes, signature: bytes, member: str, keys: tuple[str, ...]) -> str:
        calls.append(member)
        return real(text, signature, member, keys)

    monkeypatch.setattr(signatures, "verify", verify)
    return calls


def ask_afresh(node: NodeConfig, signed: dict) -> Any:  # noqa: ANN401 - Reply
    """A request as a new ``serve`` process answers it: nothing remembered in memory, only in the node's state."""
    authority._VERIFIED.clear()
    return Conversation(node).ask("prepare", {"hosts": [], "signed": signed})


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the node keeps what it verified only as root")


@needs_root
def test_a_member_file_verified_once_is_read_from_the_nodes_state_by_the_next_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = config(tmp_path, node="web1")
    calls = counted_verifications(monkeypatch)
    signed = signed_material(str(tmp_path / "inv"), coop_file())
    for _ in range(3):
        assert ask_afresh(node, signed).code == DONE
    assert calls == ["coop"]
    [reading] = (Path(node.state) / VERIFIED_DIRECTORY).iterdir()
    assert oct(reading.stat().st_mode & 0o777) == "0o600" and oct(reading.parent.stat().st_mode & 0o777) == "0o700"
    tampered = {**signed, "file": signed["file"].replace("/etc", "/")}
    reply = ask_afresh(node, tampered)
    assert reply.code == REFUSED and "signature" in (reply.error or "") and calls == ["coop", "coop"]
    rotated = dataclasses.replace(node, admins=(Admin("other", public_of(other_key())),))
    reply = ask_afresh(rotated, signed)  # the admin who signed it is no longer pinned: verified again, refused
    assert reply.code == REFUSED and len(calls) == 3


@needs_root
def test_a_reading_of_another_file_put_where_this_files_would_be_is_not_used(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator that could choose what a node finds in its state (it cannot: root's alone) still gets only
    the file it sent read: the reading holds everything it was made of, compared whole."""
    node = config(tmp_path, node="web1")
    good = signed_material(str(tmp_path / "good"), coop_file())
    evil = signed_material(str(tmp_path / "evil"), coop_file(before=["touch /tmp/pwned"]), key=other_key())
    assert ask_afresh(node, good).code == DONE
    [reading] = (Path(node.state) / VERIFIED_DIRECTORY).iterdir()
    os.replace(reading, authority._memo_file(node.state, authority._memo(evil, node)))
    calls = counted_verifications(monkeypatch)
    reply = ask_afresh(node, evil)
    assert reply.code == REFUSED and "signature" in (reply.error or "") and calls == ["coop"]


@needs_root
@pytest.mark.parametrize("loosened", ["directory writable by others", "file owned by another user", "damaged",
                                      "a link to a reading elsewhere"])
def test_a_reading_that_is_not_roots_alone_or_does_not_read_is_verified_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loosened: str,
) -> None:
    node = config(tmp_path, node="web1")
    signed = signed_material(str(tmp_path / "inv"), coop_file())
    assert ask_afresh(node, signed).code == DONE
    [reading] = (Path(node.state) / VERIFIED_DIRECTORY).iterdir()
    if loosened == "directory writable by others":
        os.chmod(reading.parent, 0o777)
    elif loosened == "file owned by another user":
        os.chown(reading, 65534, 65534)
    elif loosened == "damaged":
        reading.write_bytes(reading.read_bytes()[:40])
    else:
        elsewhere = tmp_path / "elsewhere.pickle"
        os.replace(reading, elsewhere)
        reading.symlink_to(elsewhere)
    calls = counted_verifications(monkeypatch)
    assert ask_afresh(node, signed).code == DONE and calls == ["coop"]


def test_a_passphrase_message_nested_too_deep_calls_borg_off_and_says_why(tmp_path: Path) -> None:
    """Whatever the coordinator relays as the passphrase, the gate says yes or no: borg's ssh never waits on."""
    conversation, reply, mark = sealed_restore(tmp_path, [b"[" * 200_000 + b"\n"])
    assert mark.exists()
    assert reply.code == FAILED and reply.error == "the passphrase message could not be read (RecursionError)"
    assert not [name for name in made_in(conversation.session.config.state) if name.startswith("restore-")]


def test_a_restore_onto_another_node_sweeps_what_restores_killed_long_ago_left_and_nothing_else(tmp_path: Path) -> None:
    """A node program killed mid-restore (SIGKILL, a power cut) leaves its directory and key: the next restore
    removes those older than any restore can run, never one that may still be running, nor anything else."""
    state = tmp_path / "state"
    state.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)
    old = state / f"restore-{borg.new_restore_id(now - dt.timedelta(hours=26), 'abcd')}.tmp"
    running = state / f"restore-{borg.new_restore_id(now - dt.timedelta(hours=20), 'ef01')}.tmp"
    for directory in (old, running):
        directory.mkdir()
        (directory / "id_ed25519").write_text("a key")
    (state / "restore-notanid.tmp").mkdir()
    (state / "passphrase").write_text("s3cret")
    conversation, reply, _ = sealed_restore(tmp_path, [b'{"refused": "called off by the test"}\n'])
    assert reply.code == FAILED
    assert not old.exists() and running.is_dir() and (state / "restore-notanid.tmp").is_dir()
    assert (state / "passphrase").read_text() == "s3cret"
