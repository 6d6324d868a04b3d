"""The daemon's executor on a fake federation: the real Daemon, jobs, backup, prune, check,
compaction and recovery code, with a FakeTransport answering borg argv on a fake clock."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from mutualbackup import borg
from mutualbackup.node.system import pidfile_path
from mutualbackup.state.processes import process_identity
from mutualbackup.report.metrics import build_registry
from mutualbackup.inventory.model import Backup, Retention, Window
from mutualbackup.plan.due import retry_delay
from mutualbackup.report.status import compute_status
from mutualbackup.remote.transport import Result

from fake import GIB, Harness, failing, is_stop, make_federation

START = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp()  # a Monday, 14:00 in Paris
HOUR = 3600.0
DAY = 24 * HOUR


def harness(tmp_path: Path, **options: object) -> Harness:
    backup = options.pop("backup", None)
    fed = make_federation(3, 1, backup=backup)  # type: ignore[arg-type]
    return Harness(fed, str(tmp_path / "state"), START, **options)


def test_a_due_backup_runs_borg_create_on_the_source_under_the_supervisor_then_prunes(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)  # first runs spread over the first hour
    creates = h.world.commands("create")
    assert len(creates) == 6  # 3 sources x 2 replicas
    for call in creates:
        assert call.node.startswith("coop") and "/src" in call.node  # borg runs on the source
        assert call.pidfile.startswith("/home/fake/.mutualbackup/run/src.coop") and call.pidfile.endswith(".store.pid")
    prunes = h.world.commands("prune")
    assert len(prunes) == 6
    assert all("--keep-daily=7" in c.argv and c.argv[c.argv.index("--glob-archives") + 1] == "src0-*" for c in prunes)
    runs = h.history.runs(kind="backup")
    assert len(runs) == 6 and {r.result for r in runs} == {"success"}
    assert {r.result for r in h.history.runs(kind="prune")} == {"success"}
    rows = compute_status(h.federation, h.placement, h.history, h.clock.time())
    assert {r.state for r in rows} == {"ok"}


def test_the_next_backup_comes_every_day_and_prune_marks_what_retention_removed(tmp_path: Path) -> None:
    h = harness(tmp_path, backup=lambda m, j: Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=2)))
    h.run_until(START + 4 * DAY + HOUR)
    for repo in h.world.repos.values():
        assert len(repo.archives) == 2  # daily=2
    known = h.history.known_archives("coop0/src0", h.placement["coop0/src0"][0])
    assert len(known) == 5
    assert sum(1 for _, pruned in known.values() if pruned is not None) == 3


def test_one_failing_replica_becomes_failing_while_the_other_stays_ok_and_the_daemon_goes_on(tmp_path: Path) -> None:
    h = harness(tmp_path)
    bad_source = "coop0/src0"
    bad_target = h.placement[bad_source][0]
    bad_host = h.federation.node(bad_target)
    broken_from = START + DAY - HOUR  # after one good day
    h.world.script(failing(80, "Connection closed by remote host", when=lambda node, argv: node.name == bad_source
                           and h.clock.time() >= broken_from and "create" in argv
                           and any(f"@{bad_host.address}:" in a for a in argv)))
    h.run_until(START + DAY + 6 * HOUR)
    attempts = [r for r in h.history.runs(kind="backup", source=bad_source, target=bad_target) if r.started >= broken_from]
    assert len(attempts) >= 3 and {r.result for r in attempts} == {"failure"}
    starts = sorted(r.started for r in attempts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 300 and gaps[1] >= 600  # exponential back-off: 5 min, 10 min, ...
    assert "exited 80" in attempts[0].error and "Connection closed" in attempts[0].error
    states = {(r.source, r.target): r.state for r in compute_status(h.federation, h.placement, h.history, h.clock.time())}
    assert states.pop((bad_source, bad_target)) == "failing"
    assert set(states.values()) == {"ok"}


def test_a_failing_before_command_fails_the_backup_with_its_stderr_and_runs_no_borg(tmp_path: Path) -> None:
    h = harness(tmp_path, backup=lambda m, j: Backup(paths=("/srv",), estimate=GIB, retention=Retention(daily=7),
                                                      before=("pg_dumpall -f /var/backups/pg.sql",) if m == 1 else ()))
    h.world.script(lambda node, argv, world: Result(argv, 2, b"", b"connecting...\npg_dumpall: error: connection refused\n")
                   if argv == ("sh", "-c", "pg_dumpall -f /var/backups/pg.sql") else None)
    h.run_until(START + 3 * HOUR)
    failed = h.history.runs(kind="backup", source="coop1/src0")
    assert len(failed) >= 2 and {r.result for r in failed} == {"failure"}
    assert {r.target for r in failed} == set(h.placement["coop1/src0"])
    assert "before: command failed with exit 2" in failed[0].error
    assert "pg_dumpall: error: connection refused" in failed[0].error
    assert not [c for c in h.world.commands("create") if c.node == "coop1/src0"]
    before = [c for c in h.world.calls if c.argv[:2] == ("sh", "-c") and c.node == "coop1/src0"]
    assert before and all(c.pidfile for c in before)  # supervised: killable, dies with the session
    assert {r.result for r in h.history.runs(kind="backup", source="coop0/src0")} == {"success"}


def test_a_backup_longer_than_its_timeout_is_cut_recorded_and_retried(tmp_path: Path) -> None:
    h = harness(tmp_path, timeout_for=lambda estimate: 1800.0)
    for target in h.placement["coop2/src0"]:  # a past success of 10 min: the timeout stays 1800 s (not a first run's)
        h.history.finish_run(h.history.start_run("backup", "coop2/src0", target, started=START - DAY), "success",
                             ended=START - DAY + 600)
    h.world.duration = lambda source, target: 7200.0 if source == "coop2/src0" else 600.0
    h.run_until(START + 3 * HOUR)
    runs = [r for r in h.history.runs(kind="backup", source="coop2/src0", target=h.placement["coop2/src0"][0])
            if r.result != "running" and r.started >= START]
    assert len(runs) >= 3 and {r.result for r in runs} == {"failure"}
    assert all(r.exit_code == -1 and "timed out after 1800" in r.error for r in runs)
    assert all(abs((r.ended - r.started) - 1800) < 1 for r in runs)
    starts = sorted(r.started for r in runs)
    # the next attempt waits for the job's end and for the back-off counted from its start: 300 s, 600 s, 1200 s, ...
    assert all(b - a >= max(1800, retry_delay(n)) for n, (a, b) in enumerate(zip(starts, starts[1:]), start=1))


def test_an_unreachable_source_fails_its_replicas_only(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.world.unreachable.add("coop1/src0")
    h.run_until(START + 3 * HOUR)
    down = h.history.runs(kind="backup", source="coop1/src0")
    assert down and {r.result for r in down} == {"failure"}
    assert "connection refused" in down[0].error
    assert {r.result for r in h.history.runs(kind="backup") if r.source != "coop1/src0"} == {"success"}


def test_a_crashing_job_is_recorded_as_a_failure_and_the_daemon_goes_on(tmp_path: Path) -> None:
    h = harness(tmp_path)

    def explode(node, argv, world):
        if node.name == "coop0/src0" and "create" in argv:
            raise RuntimeError("a bug in the executor")
        return None

    h.world.script(explode)
    h.run_until(START + 3 * HOUR)
    crashed = h.history.runs(kind="backup", source="coop0/src0")
    assert crashed and {r.result for r in crashed} == {"failure"}
    assert "internal error" in crashed[0].error and "a bug in the executor" in crashed[0].error
    assert not h.history.runs(result="running")
    assert {r.result for r in h.history.runs(kind="backup") if r.source != "coop0/src0"} == {"success"}


def test_no_host_runs_more_jobs_than_max_concurrent_and_excess_jobs_wait(tmp_path: Path) -> None:
    fed = make_federation(4, 4, max_concurrent=lambda m: 1)
    h = Harness(fed, str(tmp_path / "state"), START, global_limit=3)
    h.world.duration = lambda source, target: 1500.0
    h.run_until(START + 10 * HOUR)
    assert max(h.world.peak.values()) == 1
    assert len(h.history.runs(kind="backup", result="success")) == 32  # 16 sources x 2: everyone waited, nobody dropped
    intervals = sorted((start, end) for kind, _s, _h, start, end in h.world.sessions if kind == "create")
    assert max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals) <= 3


def test_the_jobs_log_one_line_at_start_and_one_at_end_with_result_and_duration(tmp_path: Path, caplog) -> None:
    h = harness(tmp_path)
    with caplog.at_level(logging.INFO, logger="mutualbackup"):
        h.run_until(START + 3 * HOUR)
    lines = [r.getMessage() for r in caplog.records if r.name == "mutualbackup.jobs.backup"]
    starts = [line for line in lines if " start " in line]
    ends = [line for line in lines if " end " in line]
    assert len(starts) == len(ends) == 6
    assert all("coop" in line and " -> " in line for line in starts)
    assert all(" success " in line and line.split()[-2].endswith("s") for line in ends)
    assert not any("\x1b[" in line for line in lines)


# --- recovery -------------------------------------------------------------------------


def test_after_an_interrupted_run_a_leftover_command_is_stopped_and_a_stale_lock_is_broken(tmp_path: Path) -> None:
    h = harness(tmp_path)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    host = h.federation.node(target)
    run_id = h.history.start_run("backup", source, target, started=START - 60)
    h.history.mark_interrupted()  # nothing: this process is alive
    h.history.interrupt_own_runs("the coordinator was killed", now=START - 30)
    pidfile = pidfile_path("/home/fake/.mutualbackup", f"src/{target}")
    h.world.files[(source, pidfile)] = f"4242\n{run_id}\nMon Jun  2 13:59:00 2025\n".encode()
    stale = "fakehost.example@123456.999-0"
    h.world.script(lambda node, argv, world: Result(argv, 0, f"fakehost.example@123456\nexclusive {stale}\n".encode(), b"")
                   if node.name == target and argv == borg.lock_listing_argv(borg.repository_path(h.federation.node(source), host))
                   else None)
    h.run_until(START + 3 * HOUR)
    stops = [c for c in h.world.calls if is_stop(c.argv)]
    assert [(c.node, c.argv[1]) for c in stops if c.node == source] == [(source, pidfile)]
    breaks = h.world.commands("break-lock")
    assert [(c.node, c.argv[-1]) for c in breaks] == [(target, "/srv/mutualbackup/coop0/src0")]
    alert = [a for a in h.history.alerts() if a["kind"] == "stale-lock-broken"]
    assert alert and "999" in alert[0]["message"]
    assert h.history.last_run("backup", source, target).result == "success"


@pytest.mark.parametrize(("ps_says", "broken"), [(b"  777 Sl\n", False), (b"  777 Z\n", True), (b"", True)])
def test_a_lock_is_broken_only_when_its_holder_is_gone_or_a_zombie(tmp_path: Path, ps_says: bytes, broken: bool) -> None:
    h = harness(tmp_path)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    h.history.finish_run(h.history.start_run("backup", source, target, started=START - 60), "failure", error="x",
                         ended=START - 50)
    h.world.script(lambda node, argv, world: Result(argv, 0, b"fakehost.example@1\nexclusive fakehost.example@1.777-0\n", b"")
                   if node.name == target and argv[:2] == ("sh", "-c") and "lock.exclusive" in argv[2] else None)
    h.world.script(lambda node, argv, world: Result(argv, 0 if ps_says else 1, ps_says, b"") if argv[:1] == ("ps",) else None)
    h.run_until(START + 3 * HOUR)
    assert bool(h.world.commands("break-lock")) is broken
    assert bool([a for a in h.history.alerts() if a["kind"] == "stale-lock-broken"]) is broken


def test_a_job_whose_last_run_is_still_running_in_a_live_coordinator_is_not_started_twice(tmp_path: Path) -> None:
    h = harness(tmp_path)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    h.history.finish_run(h.history.start_run("backup", source, target, started=START - 120), "failure", error="x",
                         ended=START - 110)
    live_run = h.history.start_run("backup", source, target, started=START - 60)  # e.g. `mutualbackup run` in a shell
    other = os.getppid()  # a live process that is not this one
    h.history._db.execute("UPDATE runs SET pid = ?, owner = ? WHERE id = ?", (other, process_identity(other), live_run))
    h.world.files[(source, pidfile_path("/home/fake/.mutualbackup", f"src/{target}"))] = f"4242\n{live_run}\nx\n".encode()
    h.clock.advance_to(START + 600)  # the retry after the failure is due
    assert (source, target) in [(j.source, j.target) for j in h.step()]
    assert h.daemon.job_states()[(source, target)].running  # held: counted as running, not retried at once
    h.finish()
    assert not [c for c in h.world.calls if is_stop(c.argv)]
    assert [r.id for r in h.history.runs(kind="backup", source=source, target=target)] == [live_run, 1]  # skipped, no failure


# --- maintenance ----------------------------------------------------------------------


def night_backup(m: int, j: int) -> Backup:
    return Backup(paths=("/etc",), estimate=GIB, window=Window(60, 360), retention=Retention(daily=2), check_every=2 * 24 * 3600)


def test_checks_run_every_check_every_outside_the_window_and_compaction_follows_prune(tmp_path: Path) -> None:
    h = harness(tmp_path, backup=night_backup)
    h.run_until(START + 6 * DAY)
    checks = h.history.runs(kind="check")
    repo_checks = h.history.runs(kind="repo-check")
    assert checks and {r.result for r in checks} == {"success"} and len(repo_checks) == len(checks)
    tz = dt.timezone(dt.timedelta(hours=2))  # Paris in June
    assert all(not (1 <= dt.datetime.fromtimestamp(r.started, tz).hour < 6) for r in checks)
    per_pair = {}
    for r in sorted(checks, key=lambda r: r.started):
        per_pair.setdefault((r.source, r.target), []).append(r.started)
    assert len(per_pair) == 6
    assert all(b - a >= 2 * DAY for starts in per_pair.values() for a, b in zip(starts, starts[1:]))
    compactions = [r for r in h.history.runs(kind="compact", result="success") if json.loads(r.detail)["compacted"]]
    assert compactions
    assert all(repo.compactions >= 1 for repo in h.world.repos.values())
    host_side = [c for c in h.world.calls
                 if c.argv[1:2] == ("compact",) or (c.argv[1:2] == ("check",) and "--repository-only" in c.argv)]
    assert host_side and all(c.node.endswith("/store") and c.argv[-1].startswith("/srv/mutualbackup/") for c in host_side)
    from_source = [c for c in h.world.calls if c.argv[1:2] == ("check",) and "--archives-only" in c.argv]
    assert from_source and all("/src" in c.node and c.argv[-1].startswith("ssh://") for c in from_source)
    metrics = _scrape(h)
    assert 'mutualbackup_last_check_success_timestamp_seconds{source="coop0/src0"' in metrics


def _scrape(h: Harness) -> str:
    from prometheus_client import generate_latest

    return generate_latest(build_registry(h.daemon.metrics)).decode()


def test_compaction_refuses_alerts_and_compacts_nothing_when_an_archive_vanished(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = harness(tmp_path, backup=lambda m, j: Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=2),
                                                      check_every=30 * 24 * 3600))
    h.run_until(START + 3 * DAY)
    source, target = "coop1/src0", h.placement["coop1/src0"][1]
    repo = h.world.repo(source, target)
    victim = sorted(repo.archives)[0]
    del repo.archives[victim]  # deleted by hand with the source's key
    outcome = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time, force=True)
    assert outcome.result == "failure"
    assert victim in outcome.error and "nothing was compacted" in outcome.error and "roll" in outcome.error
    assert not h.world.commands("compact")
    alerts = [a for a in h.history.alerts() if a["kind"] == "compaction-refused"]
    assert len(alerts) == 1 and victim in alerts[0]["message"]


def test_compaction_runs_borg_compact_only_when_the_coordinator_pruned_something_since_the_last_one(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = harness(tmp_path, backup=lambda m, j: Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=1),
                                                      check_every=30 * 24 * 3600))
    h.run_until(START + 2 * DAY + 3 * HOUR)  # three backups per replica; prune removed two
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    args = (h.ctx, h.federation.node(source), h.federation.node(target))
    first = compact_replica(*args, clock=h.clock.time)
    assert first.result == "success" and first.detail["compacted"] is True and len(first.detail["pruned"]) == 2
    again = compact_replica(*args, clock=h.clock.time)
    assert again.result == "success" and again.detail["compacted"] is False
    assert len(h.world.commands("compact")) == 1
    assert h.world.repo(source, target).disk_bytes == h.world.repo(source, target).live_bytes


def test_compaction_refuses_when_the_live_size_shrank_without_a_deletion_of_the_coordinator(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop2/src0", h.placement["coop2/src0"][0]
    h.world.script(lambda node, argv, world: Result(argv, 0, b'{"cache": {"stats": {"unique_csize": 10}}}', b"")
                   if "info" in argv else None)
    outcome = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time, force=True)
    assert outcome.result == "failure" and "shrank" in outcome.error
    assert not h.world.commands("compact")


def _retention_harness(tmp_path: Path) -> Harness:
    return harness(tmp_path, backup=lambda m, j: Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=3),
                                                         check_every=30 * 24 * 3600))


def test_an_archive_deleted_and_recreated_under_its_name_is_refused_by_its_changed_id(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica
    from mutualbackup.jobs.prune import prune_replica

    h = _retention_harness(tmp_path)
    h.run_until(START + 2 * DAY + 3 * HOUR)
    source, target = "coop1/src0", h.placement["coop1/src0"][0]
    repo = h.world.repo(source, target)
    victim = sorted(repo.archives)[0]
    repo.ids[victim] = "f" * 64  # borg delete, then borg create --timestamp of a tiny archive with the same name
    repo.commit(h.clock.time())
    h.clock.advance_to(h.clock.time() + HOUR)
    outcome = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time, force=True)
    assert outcome.result == "failure" and victim in outcome.error and "re-created under the same name" in outcome.error
    assert outcome.detail["replaced"] == [victim]
    assert not h.world.commands("compact")
    assert [a["kind"] for a in h.history.alerts()] == ["compaction-refused"]
    # the coordinator's next prune neither marks it pruned nor lends its size as a baseline
    pruned = prune_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert pruned.result == "failure" and victim in pruned.error and pruned.detail["verified"] is False
    assert h.history.known_archives(source, target)[victim][1] is None
    assert h.history.archive_ids(source, target)[victim] != "f" * 64


def test_a_backup_measured_after_a_deletion_never_becomes_the_volume_baseline(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = _retention_harness(tmp_path)
    h.run_until(START + 2 * DAY + 3 * HOUR)  # each backup followed by the coordinator's verified prune
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    repo = h.world.repo(source, target)
    honest = repo.live_bytes
    for name in sorted(repo.archives)[:2]:  # the attacker deletes two archives before the next backup
        del repo.archives[name]
    h.run_until(START + 3 * DAY + 3 * HOUR)  # a backup (measured smaller) and a prune (which finds them gone)
    assert h.history.last_run("backup", source, target).repository_bytes < honest
    assert h.history.last_run("prune", source, target).result == "failure"
    outcome = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time, force=True)
    assert outcome.result == "failure" and outcome.detail["baseline_bytes"] == honest


def test_a_write_on_the_host_outside_the_coordinators_runs_refuses_even_when_the_sources_borg_lies(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = _retention_harness(tmp_path)
    h.run_until(START + 3 * DAY + 3 * HOUR)
    source, target = "coop2/src0", h.placement["coop2/src0"][0]
    repo = h.world.repo(source, target)
    honest = h.world._borg_list(h.federation.node(source), ("borg", "list", borg.repository_url(
        h.federation.node(source), h.federation.node(target))), None)
    h.clock.advance_to(h.clock.time() + 2 * HOUR)
    repo.archives.clear()  # borg delete of everything, at a time the coordinator ran nothing
    repo.commit(h.clock.time())
    h.world.script(lambda node, argv, world: Result(argv, 0, honest.stdout, b"") if "list" in argv else None)  # lying borg
    h.world.script(lambda node, argv, world: Result(argv, 0, b'{"cache": {"stats": {"unique_csize": 9e12}}}', b"")
                   if "info" in argv else None)
    h.clock.advance_to(h.clock.time() + HOUR)
    outcome = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time, force=True)
    assert outcome.result == "failure" and "transactions log" in outcome.error and "/transactions" in outcome.error
    assert outcome.detail["foreign_transactions"] == [repo.transactions[-1][0]]
    assert not h.world.commands("compact")


def test_the_host_side_check_passes_for_the_coordinators_own_writes_and_is_not_repeated(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import compact_replica

    h = _retention_harness(tmp_path)
    h.run_until(START + 4 * DAY + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][1]
    first = compact_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert first.result == "success" and first.detail["compacted"] is True
    assert first.detail["transactions_checked"] == h.world.repo(source, target).transactions[-1][0]


def test_a_prune_that_removes_an_archive_the_retention_keeps_raises_an_alert_and_is_not_marked(tmp_path: Path) -> None:
    from mutualbackup.jobs.prune import prune_replica

    h = harness(tmp_path)
    h.run_until(START + 2 * DAY)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    repo = h.world.repo(source, target)
    newest = max(repo.archives, key=repo.archives.get)

    def greedy(node, argv, world):
        if "prune" in argv and node.name == source:
            repo.archives.pop(newest, None)
            return Result(argv, 0, b"", b"")
        return None

    h.world.script(greedy)
    outcome = prune_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert outcome.result == "failure" and newest in outcome.error
    assert h.history.known_archives(source, target)[newest][1] is None
    assert [a["kind"] for a in h.history.alerts()] == ["prune-unexplained"]


def test_a_host_whose_repository_was_written_before_the_last_backup_fails_its_check(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import check_replica

    h = harness(tmp_path)
    h.run_until(START + 2 * DAY)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    h.world.repo(source, target).last_write = START - 30 * DAY  # restored from an old snapshot
    repo, full = check_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert repo.kind == "repo-check" and repo.result == "failure" and "may have lost data" in repo.error
    assert full.kind == "check" and full.result == "failure"


def test_the_repository_check_needs_no_source_and_says_so_when_the_source_is_down(tmp_path: Path) -> None:
    from mutualbackup.jobs.maintenance import check_replica

    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    h.world.unreachable.add(source)
    repo, full = check_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert repo.ok and repo.detail["segments"] == 1
    assert not full.ok and "cannot reach coop0/src0" in full.error and "passed" in full.error


# --- drills ------------------------------------------------------------------------------


def test_due_drills_run_when_their_source_is_idle_and_hold_its_backups_meanwhile(tmp_path: Path, monkeypatch) -> None:
    from mutualbackup.jobs import drill

    h = harness(tmp_path, drills_enabled=True)
    drills: list[tuple[str, float, float]] = []

    def fake_drill(ctx, source, *, clock, control=None):
        start = clock()
        run_id = ctx.history.start_run("drill", source.name, "", started=start)
        h.clock.sleep_until(start + 5400)  # longer than the gap between a source's two backups
        ctx.history.finish_run(run_id, "success", ended=clock())
        drills.append((source.name, start, clock()))

    monkeypatch.setattr(drill, "run_drill", fake_drill)
    second = h.federation.node(h.placement["coop0/src0"][1])
    failed_once: list[bool] = []

    def fail_once(node, argv, world):  # coop0/src0's second replica fails once: its retry comes during the drill
        if node.name == "coop0/src0" and "create" in argv and any(f"@{second.address}:" in a for a in argv) and not failed_once:
            failed_once.append(True)
            return Result(argv, 80, b"", b"Connection closed by remote host\n")
        return None

    h.world.script(fail_once)
    h.run_until(START + 6 * HOUR)
    assert failed_once
    assert sorted(name for name, _, _ in drills) == ["coop0/src0", "coop1/src0", "coop2/src0"]
    for name, start, end in drills:
        creates = [(a, b) for kind, s, _t, a, b in h.world.sessions if kind == "create" and s == name]
        assert creates and all(b <= start or a >= end for a, b in creates)  # never during its drill
        assert min(a for a, _ in creates) < start  # due once the source has a backup


# --- shutdown -------------------------------------------------------------------------


def test_sigterm_lets_short_jobs_finish_and_aborts_long_ones_through_a_new_connection_within_the_grace(tmp_path: Path) -> None:
    h = harness(tmp_path, grace=3.0)
    entered, release = threading.Event(), threading.Event()

    def slow_create(node, argv, world):
        if "create" in argv and node.name == "coop0/src0":
            entered.set()
            release.wait(30)  # until the daemon stops it
            return Result(argv, 130, b"", b"Got Ctrl-C / SIGINT.\n")
        return None

    def stop(node, argv, world):
        if is_stop(argv):
            release.set()
            return Result(argv, 0, b"stopped by SIGINT\n", b"")
        return None

    h.world.script(slow_create)
    h.world.script(stop)
    h.world.duration = lambda source, target: 0.0
    h.clock.advance_to(START + HOUR - 1)  # every first-run slot of the hour has come
    h.daemon.step(h.now())
    assert entered.wait(10)
    h.daemon.stop.set()
    began = time.monotonic()
    assert h.daemon.shutdown() == 0
    assert time.monotonic() - began < 3.0
    stopped = [c for c in h.world.calls if is_stop(c.argv)]
    assert [c.node for c in stopped] == ["coop0/src0"]
    run = h.history.runs(kind="backup", source="coop0/src0")[0]
    assert run.result == "interrupted" and "aborted" in run.error
    assert not h.history.runs(result="running")
