"""What a crash, a Ctrl-C or a failed prune leaves in the history, and how the next run reads it."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from mutualbackup.node.system import pidfile_path
from mutualbackup.jobs.backup import run_backup
from mutualbackup.plan.compaction_rules import UNCERTAIN_END_CAP, run_window
from mutualbackup.state.history import History, Run
from mutualbackup.state.processes import process_identity, run_owner_alive
from mutualbackup.jobs.maintenance import check_replica
from mutualbackup.jobs.prune import prune_replica
from mutualbackup.inventory.model import Backup, Retention
from mutualbackup.jobs.crash_cleanup import host_role, clean_up_pair, source_role
from mutualbackup.remote.transport import Result

from fake import GIB, Harness, is_stop, make_federation

START = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp()
HOUR = 3600.0
DAY = 24 * HOUR


def harness(tmp_path: Path) -> Harness:
    fed = make_federation(3, 1, backup=lambda m, j: Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=3),
                                                           check_every=30 * DAY))
    return Harness(fed, str(tmp_path / "state"), START)


def set_owner(history: History, run_id: int, pid: int, owner: str | None) -> None:
    history._db.execute("UPDATE runs SET pid = ?, owner = ? WHERE id = ?", (pid, owner, run_id))


# --- 1. whose run is running ---------------------------------------------------------------


def test_a_run_left_by_an_earlier_process_with_the_same_pid_is_marked_interrupted(tmp_path: Path) -> None:
    history = History(tmp_path)
    earlier = history.start_run("backup", "m/a", "m/b", started=1000.0)
    set_owner(history, earlier, os.getpid(), f"{os.getpid()}:1")  # a container's daemon: PID 1 at every start
    legacy = history.start_run("backup", "m/a", "m/c", started=1000.0)
    set_owner(history, legacy, os.getpid(), None)  # written by a version without owners
    mine = history.start_run("backup", "m/a", "m/d", started=1000.0)
    other = history.start_run("backup", "m/a", "m/e", started=1000.0)
    set_owner(history, other, os.getppid(), process_identity(os.getppid()))  # a live `mutualbackup run`
    marked = {run.id for run in history.mark_interrupted(now=5000.0)}
    assert marked == {earlier, legacy}
    assert history.run_by_id(mine).result == "running" and history.run_by_id(other).result == "running"
    run = history.run_by_id(earlier)
    assert run.result == "interrupted" and json.loads(run.detail) == {"end_uncertain": True}


def test_a_live_pid_with_another_start_time_is_not_the_runs_owner(tmp_path: Path) -> None:
    history = History(tmp_path)
    run_id = history.start_run("backup", "m/a", "m/b")
    set_owner(history, run_id, os.getppid(), f"{os.getppid()}:1")  # the pid was reused since
    assert not run_owner_alive(history.run_by_id(run_id))


def test_an_old_database_gains_the_owner_column(tmp_path: Path) -> None:
    history = History(tmp_path)
    history._db.execute("ALTER TABLE runs DROP COLUMN owner")
    history.close()
    reopened = History(tmp_path)
    run_id = reopened.start_run("backup", "m/a", "m/b")
    assert reopened.run_by_id(run_id).owner


def test_a_backup_stopped_by_ctrl_c_is_recorded_interrupted_and_the_interrupt_goes_on(tmp_path: Path) -> None:
    h = harness(tmp_path)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]

    def ctrl_c(node, argv, world):
        if "create" in argv:
            raise KeyboardInterrupt
        return None

    h.world.script(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_backup(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    [run] = h.history.runs(kind="backup", source=source, target=target)
    assert run.result == "interrupted" and "KeyboardInterrupt" in run.error


def test_recovery_stops_the_command_of_a_run_of_this_process_unless_the_caller_still_runs_it(tmp_path: Path) -> None:
    h = harness(tmp_path)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    run_id = h.history.start_run("backup", source, target, started=START - 60)  # a thread that died
    pidfile = pidfile_path("/home/fake/.mutualbackup", source_role(target))
    h.world.files[(source, pidfile)] = f"4242\n{run_id}\nx\n".encode()
    nodes = h.federation.node(source), h.federation.node(target)
    assert clean_up_pair(h.ctx, *nodes, clock=h.clock.time, active={run_id}).busy
    assert not [c for c in h.world.calls if is_stop(c.argv)]
    assert clean_up_pair(h.ctx, *nodes, clock=h.clock.time).busy is None
    assert [c.argv[1] for c in h.world.calls if is_stop(c.argv)] == [pidfile]


# --- 4. one pidfile per role ------------------------------------------------------------------


def test_a_node_that_is_source_and_host_of_the_same_peer_has_one_pidfile_per_role(tmp_path: Path) -> None:
    assert pidfile_path("/w", source_role("coop-a/web-1")) == "/w/run/src.coop-a.web-1.pid"
    assert pidfile_path("/w", host_role("coop-a/web-1")) == "/w/run/repo.coop-a.web-1.pid"
    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    prunes = h.world.commands("prune")
    assert prunes and all(c.pidfile.startswith("/home/fake/.mutualbackup/run/src.") for c in prunes)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    check_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    repo_checks = h.world.commands("--repository-only")
    assert repo_checks and all(c.pidfile.startswith("/home/fake/.mutualbackup/run/repo.") for c in repo_checks)


# --- 2. the window of a run whose end is unknown -----------------------------------------------


def run(result: str, started: float, ended: float | None, detail: dict | None = None) -> Run:
    return Run(1, "backup", "m/a", "m/b", started, ended, result, None, None, None, None, None, None, None, None, 1,
               json.dumps(detail) if detail else None)


@pytest.mark.parametrize(
    ("the_run", "window"),
    [
        (run("success", 100.0, 200.0), (100.0, 200.0)),
        (run("interrupted", 100.0, 200.0), (100.0, 200.0)),  # stopped by a live coordinator: its end is known
        (run("interrupted", 100.0, 100.0 + 5 * DAY, {"end_uncertain": True}), (100.0, 100.0 + UNCERTAIN_END_CAP)),
        (run("interrupted", 100.0, 100.0 + HOUR, {"end_uncertain": True}), (100.0, 100.0 + HOUR)),
        (run("running", 100.0, None), (100.0, 100.0 + UNCERTAIN_END_CAP)),
    ],
)
def test_a_crashed_or_running_run_covers_foreign_writes_for_at_most_twelve_hours(the_run: Run, window) -> None:
    assert run_window(the_run, now=100.0 + 10 * DAY) == window


# --- 3. a prune that did not finish ------------------------------------------------------------


def add_old_archive(h: Harness, source: str, target: str) -> str:
    """An archive the retention (3 daily) deletes, recorded by the coordinator: the oldest of four days."""
    repo = h.world.repo(source, target)
    for day in (1, 2, 3, 4):
        name = f"{h.federation.node(source).slug}-2025-05-0{day}T00:00:00"
        repo.archives[name] = dt.datetime(2025, 5, day, tzinfo=dt.timezone.utc).timestamp()
        h.history.record_archives(source, target, [(name, repo.archives[name], repo.archive_id(name))])
    return f"{h.federation.node(source).slug}-2025-05-01T00:00:00"


def test_a_prune_that_fails_halfway_marks_what_it_removed_of_its_plan(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    old = add_old_archive(h, source, target)
    repo = h.world.repo(source, target)

    def half(node, argv, world):
        if "prune" in argv and node.name == source:
            repo.archives.pop(old, None)
            return Result(argv, 2, b"", b"Connection closed by remote host\n")
        return None

    h.world.script(half)
    outcome = prune_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert outcome.result == "failure"
    assert h.history.known_archives(source, target)[old][1] is not None
    last = h.history.last_run("prune", source, target)
    assert old in json.loads(last.detail)["plan_delete"]


def test_archives_removed_by_a_prune_that_crashed_are_explained_by_its_saved_plan(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    old = add_old_archive(h, source, target)
    crashed = h.history.start_run("prune", source, target, started=h.clock.time())
    h.history.set_detail(crashed, {"plan_delete": [old]})  # committed before borg prune ran
    set_owner(h.history, crashed, os.getpid(), f"{os.getpid()}:1")  # then the coordinator was killed
    h.world.repo(source, target).archives.pop(old)  # borg prune had removed it
    assert [r.id for r in h.history.mark_interrupted()] == [crashed]
    outcome = prune_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert outcome.ok and outcome.detail["verified"] is True
    assert h.history.known_archives(source, target)[old][1] is not None
    assert not [a for a in h.history.alerts() if a["kind"] == "prune-unexplained"]


# --- 5, 6. interrupted runs are not failures; a finished run stays finished --------------------


def test_interrupted_runs_are_not_counted_as_consecutive_failures(tmp_path: Path) -> None:
    history = History(tmp_path)
    for started, result in ((100.0, "success"), (200.0, "failure"), (300.0, "interrupted"), (400.0, "interrupted")):
        history.finish_run(history.start_run("backup", "m/a", "m/b", started=started), result, ended=started + 10)
    assert history.consecutive_failures("backup", "m/a", "m/b") == 1


def test_a_run_marked_interrupted_at_shutdown_is_not_overwritten_by_its_late_thread(tmp_path: Path) -> None:
    history = History(tmp_path)
    run_id = history.start_run("backup", "m/a", "m/b", started=100.0)
    history.interrupt_own_runs("aborted: the daemon was stopped", now=200.0)
    assert history.finish_run(run_id, "success", ended=300.0) is False
    run = history.run_by_id(run_id)
    assert run.result == "interrupted" and run.ended == 200.0


def test_a_maintenance_step_stopped_by_ctrl_c_is_recorded_interrupted(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]

    def ctrl_c(node, argv, world):
        if "--repository-only" in argv:
            raise KeyboardInterrupt
        return None

    h.world.script(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        check_replica(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert h.history.last_run("repo-check", source, target).result == "interrupted"
    assert not h.history.running()


def test_status_does_not_call_a_replica_failing_for_interrupted_runs(tmp_path: Path) -> None:
    from mutualbackup.report.status import compute_status

    h = harness(tmp_path)
    h.run_until(START + 3 * HOUR)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    for n, result in enumerate(("failure", "interrupted", "interrupted")):
        started = h.clock.time() + n
        h.history.finish_run(h.history.start_run("backup", source, target, started=started), result, ended=started)
    [row] = [r for r in compute_status(h.federation, h.placement, h.history, now=h.clock.time() + 10)
             if (r.source, r.target) == (source, target)]
    assert row.consecutive_failures == 1 and row.state == "ok"
