"""Prune, check, compaction guard, verify and stale locks on real sshd nodes and real borg.

One small federation for the module: alpha/web (a source) backs up onto beta/store
(a host). Archives are made with chosen timestamps (``borg create --timestamp``)
through the source's own key, exactly as the source's borg would.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from mutualbackup import borg
from lab import federation as labfed
from mutualbackup.context import Context, ssh_connector
from mutualbackup.plan.compaction_rules import foreign_transactions
from mutualbackup.state.history import History
from mutualbackup.inventory.load import load_inventory
from lab.nodes import Lab
from lab.federation import LabFederation
from mutualbackup.jobs.maintenance import check_replica, compact_replica
from mutualbackup.jobs.prune import prune_replica
from mutualbackup.jobs.crash_cleanup import clean_up_pair

from labkit import alpha_beta, mb

pytestmark = pytest.mark.lab

SOURCE, HOST = "alpha/web", "beta/store"


def two_members() -> tuple[dict, dict]:
    return alpha_beta("maintenance-lab", {"retention": {"daily": 2, "weekly": 2, "monthly": 2}})


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    root = tmp_path_factory.mktemp("maintenance")
    with Lab(root / "lab", borg=borg_path) as lab:
        federation = labfed.build(lab, *two_members(), root)
        code, out, err = mb(federation, "apply")
        assert code == 0, out + err
        yield federation


def context(fed: LabFederation) -> Context:
    federation = load_inventory(str(fed.inventory))
    return Context(federation, History(fed.state), ssh_connector(federation))


def repo_dir(fed: LabFederation) -> Path:
    return Path(fed.nodes[HOST].storage) / "alpha" / "web"


def borg_as_source(fed: LabFederation, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """borg run on this machine exactly as alpha/web runs it: its key, pinned hosts, passphrase and cache."""
    work = fed.nodes[SOURCE].state
    env = {**os.environ, **borg.client_env(borg.SourcePaths(str(work))), "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"}
    return subprocess.run([fed.lab.borg, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, cwd=cwd)


def url(fed: LabFederation) -> str:
    node = fed.nodes[HOST]
    return f"ssh://{node.user}@127.0.0.1:{node.port}{node.storage}/alpha/web"


def archives(fed: LabFederation) -> list[str]:
    listed = borg_as_source(fed, "list", "--short", url(fed))
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.split()


def create_at(fed: LabFederation, name: str, timestamp: str, *, by_coordinator: bool = True) -> str:
    """An archive called ``name`` dated ``timestamp`` (UTC), holding data no other archive has; its borg id.

    ``by_coordinator``: recorded as run_backup records a backup it ran (a run, and the archive with its id);
    otherwise it is what anyone holding the source's key can do behind the coordinator's back.
    """
    data = fed.data_path(SOURCE, "/srv/data")
    (data / "unique.bin").write_bytes(os.urandom(400_000 if by_coordinator else 1_000))
    ctx = context(fed)
    run_id = ctx.history.start_run("backup", SOURCE, HOST, started=time.time()) if by_coordinator else None
    made = borg_as_source(fed, "create", "--json", "--timestamp", timestamp, f"{url(fed)}::{name}", str(data))
    assert made.returncode == 0, made.stderr
    archive_id = json.loads(made.stdout)["archive"]["id"]
    if run_id is not None:
        ctx.history.finish_run(run_id, "success", exit_code=0, ended=time.time(), archive=name)
        ctx.history.record_archives(SOURCE, HOST, [(name, time.time(), archive_id)])
    return archive_id


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file of a repository: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file() and "lock" not in p.name}


# Chosen so the expected result can be worked out by hand (see the test).
DATED = [
    ("web-2025-01-15T10:00:00", "2025-01-15T10:00:00"),
    ("web-2025-02-10T10:00:00", "2025-02-10T10:00:00"),
    ("web-2025-03-03T10:00:00", "2025-03-03T10:00:00"),
    ("web-2025-03-05T10:00:00", "2025-03-05T10:00:00"),
    ("web-2025-03-10T09:00:00", "2025-03-10T09:00:00"),
    ("web-2025-03-10T18:00:00", "2025-03-10T18:00:00"),
    ("web-2025-03-11T10:00:00", "2025-03-11T10:00:00"),
]


def test_prune_keeps_exactly_what_the_retention_says_and_records_what_it_removed(fed: LabFederation) -> None:
    for name, timestamp in DATED:
        create_at(fed, name, timestamp)
    ctx = context(fed)
    outcome = prune_replica(ctx, ctx.node(SOURCE), ctx.node(HOST))
    assert outcome.result == "success", outcome.error
    # daily=2: 03-11, 03-10 18h.  weekly=2 (ISO weeks): W11 is taken, so 03-05 (W10), 02-10 (W07).
    # monthly=2: March and February are taken, so 01-15 (January); the list ends there.
    expected = {"web-2025-01-15T10:00:00", "web-2025-02-10T10:00:00", "web-2025-03-05T10:00:00",
                "web-2025-03-10T18:00:00", "web-2025-03-11T10:00:00"}
    assert set(archives(fed)) == expected
    assert sorted(outcome.detail["pruned"]) == ["web-2025-03-03T10:00:00", "web-2025-03-10T09:00:00"]
    known = ctx.history.known_archives(SOURCE, HOST)
    assert {name for name, (_, pruned) in known.items() if pruned is not None} == {
        "web-2025-03-03T10:00:00", "web-2025-03-10T09:00:00"}
    prune_run = ctx.history.last_run("prune", SOURCE, HOST)
    assert prune_run.succeeded and prune_run.repository_bytes and prune_run.repository_bytes > 0


def test_compaction_after_the_coordinators_own_prune_frees_space_on_the_host(fed: LabFederation) -> None:
    ctx = context(fed)
    before = sum(size for size, _ in snapshot(repo_dir(fed)).values())
    outcome = compact_replica(ctx, ctx.node(SOURCE), ctx.node(HOST))
    assert outcome.result == "success", outcome.error
    assert outcome.detail["compacted"] is True
    assert outcome.detail["freed_bytes"] > 300_000  # the two pruned archives held 400 kB of their own each
    assert sum(size for size, _ in snapshot(repo_dir(fed)).values()) < before


def test_compaction_refuses_after_a_hand_deletion_with_the_sources_key_and_nothing_is_lost(fed: LabFederation) -> None:
    victim = "web-2025-02-10T10:00:00"
    deleted = borg_as_source(fed, "delete", f"{url(fed)}::{victim}")
    assert deleted.returncode == 0, deleted.stderr  # append-only: the delete "succeeds"
    assert victim not in archives(fed)
    on_disk = snapshot(repo_dir(fed))
    ctx = context(fed)
    outcome = compact_replica(ctx, ctx.node(SOURCE), ctx.node(HOST), force=True)
    assert outcome.result == "failure"
    assert victim in outcome.error
    assert "nothing was compacted" in outcome.error and "roll" in outcome.error and "mutualbackup verify" in outcome.error
    assert snapshot(repo_dir(fed)) == on_disk  # not a byte moved: the deletion can still be rolled back
    alerts = [a for a in ctx.history.alerts() if a["kind"] == "compaction-refused"]
    assert alerts and victim in alerts[0]["message"]
    run = ctx.history.last_run("compact", SOURCE, HOST)
    assert run.result == "failure" and victim in run.error
    code, out, err = mb(fed, "status")  # heard: in status, and exported for the MutualbackupCompactionBlocked alert
    assert code == 1 and "COMPACTION REFUSED" in out and victim in out and "mutualbackup verify" in out
    from mutualbackup.report.metrics import MetricsSource, build_registry
    from prometheus_client import generate_latest

    exported = generate_latest(build_registry(MetricsSource(ctx.history, ctx.federation,
                                                            placement=ctx.history.placement))).decode()
    assert f'mutualbackup_compaction_blocked{{source="{SOURCE}",target="{HOST}"}} 1.0' in exported


def test_compaction_refuses_an_archive_deleted_and_recreated_under_its_name_and_nothing_is_lost(fed: LabFederation) -> None:
    victim = "web-2025-03-11T10:00:00"
    ctx = context(fed)
    recorded = ctx.history.archive_ids(SOURCE, HOST)[victim]
    assert recorded  # run_backup's create --json gave it
    deleted = borg_as_source(fed, "delete", f"{url(fed)}::{victim}")
    assert deleted.returncode == 0, deleted.stderr
    forged = create_at(fed, victim, "2025-03-11T10:00:00", by_coordinator=False)  # tiny, same name, same date
    assert forged != recorded and victim in archives(fed)  # the names alone say nothing happened
    transactions = (repo_dir(fed) / "transactions").read_text()
    on_disk = snapshot(repo_dir(fed))
    outcome = compact_replica(ctx, ctx.node(SOURCE), ctx.node(HOST), force=True)
    assert outcome.result == "failure"
    assert victim in outcome.error and "re-created under the same name" in outcome.error
    assert outcome.detail["replaced"] == [victim]
    assert snapshot(repo_dir(fed)) == on_disk  # nothing compacted: the original archive can still be rolled back
    assert ctx.history.archive_ids(SOURCE, HOST)[victim] == recorded  # the forged id did not replace the record
    alerts = [a for a in ctx.history.alerts() if a["kind"] == "compaction-refused"]
    assert victim in alerts[0]["message"]
    # the host's own log, read without a key, puts every write of the coordinator inside one of its runs, and
    # exactly three outside: the hand deletion of the previous test, this delete and this create
    _, logged = borg.parse_transactions(b"0\n" + transactions.encode())
    windows = [(r.started, r.ended) for r in ctx.history.runs(source=SOURCE, target=HOST) if r.kind in ("backup", "prune")]
    assert len(foreign_transactions(logged, -1, windows, 0.0, slack=0.0)) == 3
    assert len(logged) == len(DATED) + 1 + 3  # creates, the prune, and the three others


def sign_statement(path: Path, key: Path) -> Path:
    """What an admin does on their own machine: sign the statement, in the acceptance's namespace."""
    done = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "mutualbackup-accept-deletion", "-f", str(key), str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return Path(f"{path}.sig")


def test_only_the_members_admin_accepts_a_deliberate_deletion_and_the_next_compaction_frees_it(
        fed: LabFederation, tmp_path: Path) -> None:
    ctx = context(fed)
    refused = ctx.history.last_run("compact", SOURCE, HOST)
    detail = json.loads(refused.detail)
    assert detail["refused"] and detail["vanished"] and detail["replaced"]
    assert "mutualbackup accept-deletion alpha/web" in refused.error and "--statement" in refused.error
    on_disk = snapshot(repo_dir(fed))
    statement = tmp_path / "statement"
    code, out, err = mb(fed, "accept-deletion", SOURCE, "--replica", HOST, "--statement", str(statement))
    assert code == 0, out + err
    text = statement.read_text()
    assert '"web-2025-02-10T10:00:00"' in text and "mutualbackup-accept-deletion" in out
    assert ctx.history.last_run("accept-deletion", SOURCE, HOST) is None  # writing the statement records nothing
    # signed by another member's admin, or by the coordinator's own key: refused, nothing recorded
    for key in (fed.lab.admin_key("beta", "admin"), fed.lab.coordinator_key):
        forged = tmp_path / f"forged-{key.name}"
        forged.write_text(text)
        code, out, err = mb(fed, "accept-deletion", SOURCE, "--replica", HOST, "--signature",
                            str(sign_statement(forged, key)))
        assert code == 1 and "only one of alpha's admins" in err and "nothing recorded" in err, out + err
    edited = tmp_path / "edited"  # the admin's own signature, of a statement that says more than the refusal
    edited.write_text(text.replace('"web-2025-02-10T10:00:00"', '"web-2025-02-10T10:00:00", "web-2025-03-11T10:00:00"'))
    code, out, err = mb(fed, "accept-deletion", SOURCE, "--replica", HOST, "--signature",
                        str(sign_statement(edited, fed.lab.admin_key("alpha", "admin"))))
    assert code == 1 and "nothing recorded" in err
    assert ctx.history.last_run("accept-deletion", SOURCE, HOST) is None
    assert mb(fed, "status")[0] == 1
    code, out, err = mb(fed, "accept-deletion", SOURCE, "--replica", HOST, "--signature",
                        str(sign_statement(statement, fed.lab.admin_key("alpha", "admin"))))
    assert code == 0 and "accepted by admin" in out, out + err
    accepted = ctx.history.last_run("accept-deletion", SOURCE, HOST)
    assert "BEGIN SSH SIGNATURE" in json.loads(accepted.detail)["signature"]  # kept for audit
    code, out, err = mb(fed, "status")
    assert "COMPACTION REFUSED" not in out, out
    code, out, err = mb(fed, "accept-deletion", SOURCE, "--statement", str(tmp_path / "again"))
    assert code == 2 and "nothing to accept" in err
    assert snapshot(repo_dir(fed)) == on_disk  # accepting frees nothing by itself
    outcome = compact_replica(ctx, ctx.node(SOURCE), ctx.node(HOST))
    assert outcome.result == "success", outcome.error
    assert outcome.detail["compacted"] is True and outcome.detail["freed_bytes"] > 0
    # what was not accepted is refused again: a new hand deletion after the acceptance
    victim = archives(fed)[0]
    assert borg_as_source(fed, "delete", f"{url(fed)}::{victim}").returncode == 0
    outcome = compact_replica(ctx, ctx.node(SOURCE), ctx.node(HOST), force=True)
    assert outcome.result == "failure" and victim in outcome.error


def test_verify_checks_the_repository_on_the_host_and_the_archives_from_the_source(fed: LabFederation) -> None:
    code, out, err = mb(fed, "verify")
    assert code == 0, err
    assert f"{SOURCE} → {HOST}  ok" in out
    ctx = context(fed)
    assert ctx.history.last_run("check", SOURCE, HOST).result == "success"
    repo_check = ctx.history.last_run("repo-check", SOURCE, HOST)
    assert repo_check.result == "success" and '"segments"' in repo_check.detail


def test_verify_fails_with_exit_1_on_a_corrupted_segment_even_with_the_source_down(fed: LabFederation) -> None:
    segment = max((p for p in (repo_dir(fed) / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = segment.read_bytes()
    middle = len(original) // 2
    segment.write_bytes(original[:middle] + bytes(b ^ 0xFF for b in original[middle:middle + 64]) + original[middle + 64:])
    fed.lab.stop(fed.nodes[SOURCE])
    try:
        code, out, err = mb(fed, "verify", SOURCE)
        assert code == 1
        assert f"{SOURCE} → {HOST}  FAILED  repo-check" in err
        ctx = context(fed)
        assert ctx.history.last_run("repo-check", SOURCE, HOST).result == "failure"
        assert ctx.history.last_run("check", SOURCE, HOST).result == "failure"
    finally:
        segment.write_bytes(original)
        fed.lab.start(fed.nodes[SOURCE])
    code, out, err = mb(fed, "verify", SOURCE)
    assert code == 0, err


def test_a_stale_lock_of_a_dead_borg_on_the_host_is_broken_and_a_live_one_is_not(fed: LabFederation) -> None:
    ctx = context(fed)
    source, host = ctx.node(SOURCE), ctx.node(HOST)
    from borg.platform import hostid  # the host id borg itself writes into lock files here
    lock = repo_dir(fed) / "lock.exclusive"
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.mkdir()
    (lock / f"{hostid}.{os.getpid()}-0").touch()  # this test process: alive
    try:
        kept = clean_up_pair(ctx, source, host)
        assert lock.exists()
        assert any("live process" in note for note in kept.notes)
    finally:
        for f in lock.iterdir():
            f.unlink()
    (lock / f"{hostid}.{gone.pid}-0").touch()  # a borg that died without unlocking
    owner = repo_dir(fed).stat()
    for path in (lock, *lock.iterdir()):  # as `borg serve` leaves it: the host's login owns it
        os.chown(path, owner.st_uid, owner.st_gid)
    broken = clean_up_pair(ctx, source, host)
    assert not lock.exists()
    assert any("broke a stale lock" in note for note in broken.notes)
    assert [a["kind"] for a in ctx.history.alerts()][:1] == ["stale-lock-broken"]
    repository, archives_check = check_replica(ctx, source, host)
    assert repository.ok and archives_check.ok
