"""Restores onto any node, end to end on real sshd and borg.

One federation for the module: coopcycle/web1 (the source) and coopcycle/web2 (a
plain node of the same member); its two replicas live on ouvaton/mail1 and
picasoft/store1; libre/desk1 is a plain node of a member that holds no replica.
Tests that stop or kill a node start it again.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup.borg import RESTORE_LINE_LIFETIME, new_restore_id, restore_line
from lab.federation import LabFederation
from mutualbackup.borg import BEGIN, END
from labkit import mb, mb_json, wait_for
from restorekit import (
    backed_up, AWKWARD_DIR, HOSTILE_NAMES, keys_snapshot, node_doc, restore_lines, restored, source, storage, tree_differences, watch_processes,
)

pytestmark = pytest.mark.lab

SOURCE = "coopcycle/web1"
HOSTS = ("ouvaton/mail1", "picasoft/store1")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from backed_up(
        tmp_path_factory.mktemp("restore"),
        borg_path,
        {
            "coopcycle": [node_doc("web1", backup=source(["/etc", AWKWARD_DIR])), node_doc("web2")],
            "ouvaton": [node_doc("mail1", storage=storage())],
            "picasoft": [node_doc("store1", storage=storage())],
            "libre": [node_doc("desk1")],
        },
        source_name=SOURCE,
    )


def originals(fed: LabFederation) -> list[Path]:
    return [fed.data_path(SOURCE, "/etc"), fed.data_path(SOURCE, AWKWARD_DIR)]


def assert_identical(fed: LabFederation, target: Path) -> None:
    for original in originals(fed):
        assert tree_differences(original, restored(target, original)) == []
    assert not (restored(target, originals(fed)[0]) / "skip.cache").exists()  # excluded by the inventory


def temporary_dirs(fed: LabFederation, node: str) -> list[str]:
    """A restore's leftovers on ``node``: its key (in the state directory) or anything in the workdir."""
    return [p.name for d in (fed.nodes[node].state, Path(fed.nodes[node].workdir)) for p in d.glob("restore-*")]


def last_restore_detail(fed: LabFederation) -> tuple[str, str, dict]:
    with sqlite3.connect(fed.state / "history.sqlite3") as db:
        result, target, detail = db.execute(
            "SELECT result, target, detail FROM runs WHERE kind = 'restore' ORDER BY id DESC LIMIT 1"
        ).fetchone()
    return result, target, json.loads(detail)


def test_restore_onto_another_node_of_the_same_member_is_exact_and_leaves_no_authorisation(
    fed: LabFederation, tmp_path: Path
) -> None:
    before = keys_snapshot(fed)
    passphrase = (fed.nodes[SOURCE].state / "passphrase").read_bytes().strip()
    target = tmp_path / "on web2"
    with watch_processes() as seen:
        code, summary = mb_json(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{target}")
    assert code == 0, summary
    assert summary["node"] == "coopcycle/web2" and summary["access"] == "sealed passphrase"
    assert summary["replica"] in HOSTS and summary["files"] > 10 and summary["bytes"] > 600_000
    assert_identical(fed, target)
    assert keys_snapshot(fed) == before  # the temporary line is gone, everything else byte for byte
    assert temporary_dirs(fed, "coopcycle/web2") == []
    assert any(b"extract" in args and b"borg" in args for args in seen), "the watcher saw no borg extract"
    assert not any(passphrase in args for args in seen)  # neither argv nor environment of any process
    result, replica, detail = last_restore_detail(fed)
    assert (result, replica) == ("success", summary["replica"])
    assert detail["to"] == f"coopcycle/web2:{target}" and detail["access"] == "sealed passphrase" and detail["requested_by"]
    with sqlite3.connect(fed.state / "history.sqlite3") as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
    assert not any(passphrase in p.read_bytes() for p in fed.state.iterdir() if p.is_file())
    assert not any(passphrase in p.read_bytes() for p in Path(fed.nodes["coopcycle/web2"].dir).rglob("*") if p.is_file())


def test_restore_onto_another_member_is_refused_without_allow_other_member(fed: LabFederation, tmp_path: Path) -> None:
    before = keys_snapshot(fed)
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"libre/desk1:{tmp_path}/theirs")
    assert code == 2
    assert "--allow-other-member" in err and "plaintext" in err and "decrypt every archive" in err
    assert not (tmp_path / "theirs").exists()
    assert keys_snapshot(fed) == before
    # picasoft hosts a replica: with the passphrase it could decrypt everything, so even the flag is refused
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"picasoft/store1:{tmp_path}/theirs", "--allow-other-member")
    assert code == 2 and "hosts a replica" in err and "rotating the passphrase does not undo it" in err
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"ouvaton/mail1:{tmp_path}/theirs")
    assert code == 2 and "hosts a replica" in err and "plaintext" in err
    assert not (tmp_path / "theirs").exists()
    assert keys_snapshot(fed) == before


def test_restore_onto_another_member_needs_the_kit_opened_by_an_admin_and_is_exact_and_recorded(
    fed: LabFederation, tmp_path: Path
) -> None:
    target = tmp_path / "theirs"
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"libre/desk1:{target}", "--allow-other-member")
    assert code == 2 and "--recovery KIT --identity KEY" in err and "recovery kit" in err
    assert not target.exists()
    kit = tmp_path / "kit.age"
    code, out, err = mb(fed, "keys", "export", SOURCE, "--out", str(kit))
    assert code == 0, err
    code, summary = mb_json(fed, "restore", SOURCE, "--to", f"libre/desk1:{target}", "--allow-other-member",
                            "--recovery", str(kit), "--identity", str(fed.lab.admin_key("coopcycle")))
    assert code == 0, summary
    assert_identical(fed, target)
    result, _, detail = last_restore_detail(fed)
    assert result == "success" and detail["other_member"] is True
    assert "@" in detail["requested_by"]
    assert restore_lines(fed) == []


def test_restore_of_one_hostile_path_restores_exactly_that_file(fed: LabFederation, tmp_path: Path) -> None:
    for name in ("re:not a pattern", "-rf leading dash"):
        original = fed.data_path(SOURCE, "/etc") / name
        target = tmp_path / name
        code, summary = mb_json(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{target}", "--path", str(original))
        assert code == 0, summary
        files = [p for p in target.rglob("*") if p.is_file()]
        assert [p.name for p in files] == [name]
        assert files[0].read_bytes() == original.read_bytes()
    assert set(HOSTILE_NAMES) <= {p.name for p in fed.data_path(SOURCE, "/etc").iterdir()}


def test_dry_run_lists_what_would_be_written_and_writes_nothing(fed: LabFederation, tmp_path: Path) -> None:
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{tmp_path}/dry", "--dry-run")
    assert code == 0, err
    assert "would restore" in out
    assert "re:not a pattern" in out and "été.txt" in out
    assert not (tmp_path / "dry").exists()
    assert restore_lines(fed) == []


def test_a_non_empty_target_is_refused_unless_forced(fed: LabFederation, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep me")
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{busy}")
    assert code == 2 and "not empty" in err and "--force" in err
    assert [p.name for p in busy.iterdir()] == ["precious"]
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{busy}", "--force", "--path", str(originals(fed)[0]))
    assert code == 0, err
    assert (busy / "precious").read_text() == "keep me"
    assert tree_differences(originals(fed)[0], restored(busy, originals(fed)[0])) == []


def test_with_the_preferred_replica_host_down_the_restore_uses_the_other(fed: LabFederation, tmp_path: Path) -> None:
    code, first = mb_json(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{tmp_path}/probe", "--dry-run")
    assert code == 0
    down = fed.nodes[first["replica"]]
    fed.lab.stop(down)
    try:
        code, summary = mb_json(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{tmp_path}/fallback")
    finally:
        fed.lab.start(down)
    assert code == 0, summary
    assert summary["replica"] != first["replica"] and summary["replica"] in HOSTS
    assert_identical(fed, tmp_path / "fallback")
    assert restore_lines(fed) == []


def test_with_the_source_down_a_restore_elsewhere_says_to_use_the_recovery_file(fed: LabFederation, tmp_path: Path) -> None:
    web1 = fed.nodes[SOURCE]
    fed.lab.stop(web1)
    try:
        code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{tmp_path}/no-passphrase")
    finally:
        fed.lab.start(web1)
    assert code == 1, out + err
    assert "passphrase" in err and "cannot be reached" in err and "--recovery KIT --identity KEY" in err
    assert "Traceback" not in err and "once coopcycle/web2 is back" not in err
    assert restore_lines(fed) == [] and temporary_dirs(fed, "coopcycle/web2") == []
    result, _, detail = last_restore_detail(fed)
    assert result == "failure" and detail["to"] == f"coopcycle/web2:{tmp_path}/no-passphrase"
    assert not (tmp_path / "no-passphrase").exists() or not any((tmp_path / "no-passphrase").iterdir())


def test_a_restore_cut_off_by_the_destination_dying_leaves_no_temporary_line(fed: LabFederation, tmp_path: Path) -> None:
    web2 = fed.nodes["coopcycle/web2"]
    killed = threading.Event()

    def kill_when_authorised() -> None:
        wait_for(lambda: restore_lines(fed), seconds=60, step=0.005)
        fed.lab.kill(web2)
        killed.set()

    killer = threading.Thread(target=kill_when_authorised, daemon=True)
    killer.start()
    try:
        code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web2:{tmp_path}/cut")
        killer.join(timeout=60)
        assert killed.is_set()
        assert code == 1, out + err
        assert restore_lines(fed) == []
        result, _, _ = last_restore_detail(fed)
        assert result == "failure"
    finally:
        fed.lab.start(web2)


def test_when_the_coordinators_connection_drops_the_host_removes_the_line_itself(fed: LabFederation) -> None:
    from mutualbackup.remote.ssh import SSHTransport

    host = fed.nodes["picasoft/store1"]
    restore_id = new_restore_id(dt.datetime.now(dt.timezone.utc), "d0d0")
    transport = SSHTransport(host.as_node(), str(fed.lab.coordinator_key))
    added = threading.Event()
    never = threading.Event()

    def until_never() -> Iterator[bytes]:
        never.wait()  # the coordinator never says "withdraw": it dies
        yield b""

    def hold() -> None:
        transport.request("grant", {"source": SOURCE, "public_key": fed.lab.coordinator_public_key,
                                    "restore_id": restore_id}, feed=until_never(), timeout=600,
                          on_event=lambda event: added.set() if event.get("event") == "added" else None)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert added.wait(30)
    assert [line for line in restore_lines(fed) if restore_id in line]
    transport.close()  # the connection drops, as when the coordinator is killed
    wait_for(lambda: restore_lines(fed) == [], seconds=30)
    never.set()


def test_apply_drops_expired_restore_lines_and_keeps_fresh_ones(fed: LabFederation) -> None:
    path = Path(fed.nodes["picasoft/store1"].authorized_keys)
    original = path.read_text()
    key = fed.lab.coordinator_public_key
    now = dt.datetime.now(dt.timezone.utc)
    old = restore_line("borg", "/srv/x", key, SOURCE, new_restore_id(now - RESTORE_LINE_LIFETIME - dt.timedelta(minutes=1), "dead"))
    fresh = restore_line("borg", "/srv/x", key, SOURCE, new_restore_id(now, "beef"))
    lines = original.splitlines()
    end = lines.index(END)
    path.write_text("\n".join(lines[:end] + [old, fresh] + lines[end:]) + "\n")
    try:
        code, out, err = mb(fed, "apply")
        assert code == 0, err
        text = path.read_text()
        assert old not in text and fresh in text
        assert text.splitlines().index(BEGIN) < text.splitlines().index(fresh) < text.splitlines().index(END)
    finally:
        path.write_text(original)
