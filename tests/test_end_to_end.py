"""The walking skeleton end to end, on real sshd nodes and real borg.

One federation of three members (five nodes) is set up per test module or test,
from the inventory alone: apply, run, status, restore.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from lab import federation as labfed
from lab.nodes import Lab
from lab.federation import LabFederation
from mutualbackup.borg import BEGIN, END
from labkit import AWKWARD_PATH, mb, mb_json, same_tree, three_members, wait_for, write_tree

pytestmark = pytest.mark.lab


def make_federation(root: Path, borg: str, **layout: object) -> tuple[Lab, LabFederation]:
    lab = Lab(root / "lab", borg=borg)
    fed_doc, members = three_members(**layout)  # type: ignore[arg-type]
    fed = labfed.build(lab, fed_doc, members, root)
    write_tree(fed.data_path("coopcycle/web1", "/etc"))
    write_tree(fed.data_path("coopcycle/web1", AWKWARD_PATH), seed=1)
    write_tree(fed.data_path("ouvaton/mail1", "/var/mail"), seed=2)
    write_tree(fed.data_path("picasoft/app1", "/srv/app"), seed=3)
    return lab, fed


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    lab, fed = make_federation(tmp_path_factory.mktemp("e2e"), borg_path)
    with lab:
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        code, out, err = mb(fed, "run")
        assert code == 0, out + err
        yield fed


def authorized_keys_snapshot(fed: LabFederation) -> dict[str, bytes]:
    return {name: Path(node.authorized_keys).read_bytes() for name, node in fed.nodes.items()}


def test_after_apply_and_run_every_replica_is_ok(federation: LabFederation) -> None:
    code, rows = mb_json(federation, "status")
    assert code == 0
    assert len(rows) == 6  # three sources × two replicas
    assert {row["state"] for row in rows} == {"ok"}
    assert {(r["source"], r["target"]) for r in rows if r["source"] == "picasoft/app1"} == {
        ("picasoft/app1", "coopcycle/web1"),
        ("picasoft/app1", "ouvaton/mail1"),
    }


def test_placement_keeps_replicas_off_the_own_member_and_on_distinct_members(federation: LabFederation) -> None:
    code, plan = mb_json(federation, "plan")
    assert code == 0
    for source, targets in plan["replicas"].items():
        members = [t.split("/")[0] for t in targets]
        assert source.split("/")[0] not in members
        assert len(set(members)) == len(members) == 2
    assert plan["changes"] == []


def test_a_second_apply_changes_nothing(federation: LabFederation) -> None:
    before = authorized_keys_snapshot(federation)
    code, out, err = mb(federation, "apply")
    assert code == 0, err
    assert "nothing to change" in out
    assert authorized_keys_snapshot(federation) == before


def test_apply_writes_one_restricted_line_per_replica_inside_the_managed_block(federation: LabFederation) -> None:
    text = Path(federation.nodes["coopcycle/web1"].authorized_keys).read_text()
    lines = text.splitlines()
    assert "mutualbackup-coordinator" in lines[0]  # the coordinator's own line, untouched, outside the block
    block = lines[lines.index(BEGIN) + 1 : lines.index(END)]
    assert len(block) == 2  # ouvaton/mail1 and picasoft/app1 keep a replica here
    for line in block:
        assert line.startswith('command="')
        assert "serve --restrict-to-repository" in line and "--append-only --storage-quota" in line
        assert '",restrict ssh-ed25519 ' in line


def test_apply_keeps_lines_it_does_not_manage(federation: LabFederation) -> None:
    path = Path(federation.nodes["picasoft/store1"].authorized_keys)
    original = path.read_text()
    path.write_text("# a member's own comment\n" + original + "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwn admin@laptop\n")
    try:
        code, out, err = mb(federation, "apply")
        assert code == 0, err
        text = path.read_text()
        assert text.startswith("# a member's own comment\n")
        assert text.endswith("admin@laptop\n")
    finally:
        path.write_text(original)


def test_restore_gives_byte_identical_files_including_an_awkward_path(federation: LabFederation, tmp_path: Path) -> None:
    target = tmp_path / "restored here"
    code, out, err = mb(federation, "restore", "coopcycle/web1", "--to", f"coopcycle/web1:{target}")
    assert code == 0, err
    for path in ("/etc", AWKWARD_PATH):
        original = federation.data_path("coopcycle/web1", path)
        copy = Path(str(target) + str(original))
        assert copy.is_dir(), f"{copy} was not restored"
        assert same_tree(original, copy, ignore=(".cache",)) == []
        assert not (copy / "skip.cache").exists()  # excluded by the inventory


def test_restore_of_one_path_restores_only_that_path(federation: LabFederation, tmp_path: Path) -> None:
    original = federation.data_path("coopcycle/web1", AWKWARD_PATH) / "it's a \"quoted\" name — été.txt"
    code, out, err = mb(federation, "restore", "coopcycle/web1", "--to", f"coopcycle/web1:{tmp_path}/one", "--path", str(original))
    assert code == 0, err
    restored = [p for p in (tmp_path / "one").rglob("*") if p.is_file()]
    assert [p.name for p in restored] == [original.name]
    assert restored[0].read_bytes() == original.read_bytes()


def test_restore_refuses_a_non_empty_directory_without_force(federation: LabFederation, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious").write_text("keep me")
    code, out, err = mb(federation, "restore", "coopcycle/web1", "--to", f"coopcycle/web1:{tmp_path}/busy")
    assert code == 2
    assert "not empty" in err and "--force" in err
    assert (tmp_path / "busy" / "precious").read_text() == "keep me"


def test_restore_dry_run_writes_nothing(federation: LabFederation, tmp_path: Path) -> None:
    code, out, err = mb(federation, "restore", "ouvaton/mail1", "--to", f"ouvaton/mail1:{tmp_path}/dry", "--dry-run")
    assert code == 0, err
    assert "plain.txt" in out
    assert not (tmp_path / "dry").exists()


def test_a_second_run_creates_new_archives_that_deduplicate(federation: LabFederation) -> None:
    code, first = mb_json(federation, "archives", "ouvaton/mail1")
    assert code == 0
    newest = max(dt.datetime.fromisoformat(a["time"]).timestamp() for a in first["archives"])
    wait_for(lambda: time.time() >= int(newest) + 1, what="the next second (archive names carry the second)")
    code, outcomes = mb_json(federation, "run", "ouvaton/mail1")
    assert code == 0
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome["result"] == "success"
        assert outcome["original_bytes"] > 300_000
        assert outcome["deduplicated_bytes"] < outcome["original_bytes"] / 10
    code, second = mb_json(federation, "archives", "ouvaton/mail1")
    assert len(second["archives"]) == len(first["archives"]) + 1


def test_no_passphrase_reaches_the_state_output_metrics_or_process_arguments(federation: LabFederation) -> None:
    files = [node.state / "passphrase" for node in federation.nodes.values() if (node.state / "passphrase").exists()]
    passphrases = [path.read_bytes().strip() for path in files]
    assert len(passphrases) == 3 and all(len(p) >= 32 for p in passphrases)
    for path in files:  # root's alone, in the root-only state directory: not even the node's login reads it
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
        assert path.parent.stat().st_mode & 0o777 == 0o700 and path.parent.stat().st_uid == 0
    assert not any(passphrase in p.read_bytes() for node in federation.nodes.values()
                   for p in Path(node.workdir).rglob("*") if p.is_file() for passphrase in passphrases)

    seen_args: list[bytes] = []
    stop = threading.Event()

    def watch_processes() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        seen_args.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                    except OSError:
                        pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_processes)
    watcher.start()
    try:
        code, out, err = mb(federation, "run", "coopcycle/web1", "-v")
    finally:
        stop.set()
        watcher.join()
    assert code == 0, err
    assert any(b"borg" in args and b"create" in args for args in seen_args), "the watcher saw no borg create"

    db = federation.state / "history.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
    state_bytes = b"".join(p.read_bytes() for p in federation.state.iterdir() if p.is_file())
    metrics = _scrape_metrics_once(federation)
    for secret in passphrases:
        assert secret not in state_bytes
        assert secret.decode() not in out + err
        assert not any(secret in args for args in seen_args)
        assert secret.decode() not in metrics
    assert "/srv" not in metrics and str(federation.lab.root) not in metrics


def _scrape_metrics_once(fed: LabFederation) -> str:
    import sys

    daemon = subprocess.Popen(
        [sys.executable, "-m", "mutualbackup.cli", "--inventory", str(fed.inventory), "daemon", "--tick", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert daemon.poll() is None, daemon.stderr.read().decode() if daemon.stderr else ""
            try:
                with opener.open(f"http://127.0.0.1:{fed.metrics_port}/metrics", timeout=2) as response:
                    return response.read().decode()
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the daemon never served /metrics")
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0


# --- isolation between members on one host ------------------------------------------


@pytest.fixture
def fresh_federation(tmp_path: Path, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    lab, fed = make_federation(tmp_path, borg_path)
    with lab:
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        yield fed


def borg_as(fed: LabFederation, source: str, *args: str, base_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run borg on this machine exactly as ``source`` would: its key, its pinned hosts, its passphrase."""
    work = fed.nodes[source].state
    env = dict(os.environ)
    env.update(
        BORG_RSH=f"ssh -o BatchMode=yes -o IdentitiesOnly=yes -i {work}/id_ed25519 -o UserKnownHostsFile={work}/known_hosts "
        "-o StrictHostKeyChecking=yes",
        BORG_PASSCOMMAND=f"cat {work}/passphrase",
        BORG_BASE_DIR=str(base_dir or work / "borg"),
        BORG_EXIT_CODES="modern",
        BORG_DELETE_I_KNOW_WHAT_I_AM_DOING="YES",
    )
    return subprocess.run([fed.lab.borg, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def repo_url(fed: LabFederation, source: str, host: str) -> str:
    member, slug = source.split("/")
    node = fed.nodes[host]
    return f"ssh://{node.user}@127.0.0.1:{node.port}{node.storage}/{member}/{slug}"


def test_a_sources_key_cannot_list_or_delete_another_members_repository(fresh_federation: LabFederation) -> None:
    fed = fresh_federation
    assert mb(fed, "run")[0] == 0
    # coopcycle/web1 hosts replicas of ouvaton/mail1 and picasoft/app1: use app1's key on mail1's repository.
    victim = repo_url(fed, "ouvaton/mail1", "coopcycle/web1")
    listed = borg_as(fed, "picasoft/app1", "list", victim)
    assert listed.returncode != 0
    deleted = borg_as(fed, "picasoft/app1", "delete", victim)
    assert deleted.returncode != 0
    still_there = borg_as(fed, "ouvaton/mail1", "list", "--short", victim)
    assert still_there.returncode == 0, still_there.stderr
    assert still_there.stdout.strip() != ""


def test_deleting_its_own_archive_through_the_append_only_key_is_recoverable(fresh_federation: LabFederation, tmp_path: Path) -> None:
    fed = fresh_federation
    assert mb(fed, "run", "coopcycle/web1")[0] == 0
    code, listing = mb_json(fed, "archives", "coopcycle/web1", "--replica", "picasoft/store1") if _holds(
        fed, "coopcycle/web1", "picasoft/store1") else mb_json(fed, "archives", "coopcycle/web1")
    host = listing["replica"]
    archive = listing["archives"][-1]["name"]
    url = repo_url(fed, "coopcycle/web1", host)
    repo_dir = Path(url.split(str(fed.nodes[host].port), 1)[1])
    last_good = _last_transaction(repo_dir)

    deleted = borg_as(fed, "coopcycle/web1", "delete", f"{url}::{archive}")
    assert deleted.returncode == 0, deleted.stderr  # append-only: the delete "succeeds"...
    gone = borg_as(fed, "coopcycle/web1", "list", "--short", url)
    assert archive not in gone.stdout  # ...and the archive is hidden

    # ...but nothing was freed: roll the repository back to the transaction before the delete,
    # as the host's operator would (borg docs, "Append-only mode"): drop newer segments and indexes.
    for segment in (repo_dir / "data").rglob("*"):
        if segment.is_file() and segment.name.isdigit() and int(segment.name) > last_good:
            segment.unlink()
    for name in ("index", "hints", "integrity"):
        for path in repo_dir.glob(f"{name}.*"):
            if int(path.name.split(".")[1]) > last_good:
                path.unlink()
    fresh_cache = tmp_path / "borg-after-rollback"
    back = borg_as(fed, "coopcycle/web1", "list", "--short", url, base_dir=fresh_cache)
    assert back.returncode == 0, back.stderr
    assert archive in back.stdout.split()
    out = tmp_path / "extracted"
    out.mkdir()
    work = fed.nodes["coopcycle/web1"].state
    env = dict(os.environ, BORG_RSH=f"ssh -o BatchMode=yes -i {work}/id_ed25519 -o UserKnownHostsFile={work}/known_hosts",
               BORG_PASSCOMMAND=f"cat {work}/passphrase", BORG_BASE_DIR=str(fresh_cache))
    extracted = subprocess.run([fed.lab.borg, "extract", f"{url}::{archive}"], cwd=out, env=env,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert extracted.returncode == 0, extracted.stderr
    original = fed.data_path("coopcycle/web1", "/etc")
    assert same_tree(original, Path(str(out) + str(original)), ignore=(".cache",)) == []


def _holds(fed: LabFederation, source: str, host: str) -> bool:
    code, plan = mb_json(fed, "plan")
    return host in plan["replicas"][source]


def _last_transaction(repo_dir: Path) -> int:
    """The number of the newest committed transaction (the highest index.N)."""
    return max(int(p.name.split(".")[1]) for p in repo_dir.glob("index.*"))


# --- host keys -------------------------------------------------------------------------


def test_a_changed_host_key_on_a_source_refuses_the_run_with_a_clear_message(fresh_federation: LabFederation) -> None:
    fed = fresh_federation
    fed.lab.change_host_key(fed.nodes["picasoft/app1"])
    code, out, err = mb(fed, "run", "picasoft/app1")
    assert code == 1
    assert "host key" in (out + err).lower()
    assert "picasoft/app1" in out + err
    code, rows = mb_json(fed, "status")
    assert all(r["state"] == "never" for r in rows if r["source"] == "picasoft/app1")


def test_a_changed_host_key_on_a_host_fails_that_replica_only_and_pins_stay_unchanged(fresh_federation: LabFederation) -> None:
    fed = fresh_federation
    code, plan = mb_json(fed, "plan")
    host = next(t for t in plan["replicas"]["coopcycle/web1"] if t.startswith("picasoft/"))
    known_hosts = fed.nodes["coopcycle/web1"].state / "known_hosts"
    pinned = known_hosts.read_bytes()
    fed.lab.change_host_key(fed.nodes[host])
    code, out, err = mb(fed, "run", "coopcycle/web1")
    assert code == 1
    assert f"coopcycle/web1 → {host}  FAILED" in err
    assert "ouvaton/mail1  success" in out
    assert known_hosts.read_bytes() == pinned  # never updated by itself
