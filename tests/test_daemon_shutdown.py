"""The daemon stopping cleanly, and the jobs it must not start: drills under job control, no new
remote work after SIGTERM, busy replicas, timeouts, windows. Fast tests on the fake transport."""

from __future__ import annotations

from mutualbackup import borg

import datetime as dt
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from mutualbackup.plan import schedule
from mutualbackup.plan.schedule import WINDOW_MARGIN
from mutualbackup.plan.windows import clear_of_window
from mutualbackup.daemon import FIRST_RUN_TIMEOUT
from mutualbackup.inventory.model import Backup, Retention, Window
from mutualbackup.remote.transport import Result

from fake import GIB, Harness, is_stop, make_federation

START = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp()  # a Monday, 14:00 in Paris
HOUR = 3600.0
PARIS = ZoneInfo("Europe/Paris")


def harness(tmp_path: Path, **options: object) -> Harness:
    backup = options.pop("backup", None)
    return Harness(make_federation(3, 1, backup=backup), str(tmp_path / "state"), START, **options)  # type: ignore[arg-type]


def backed_up(tmp_path: Path, **options: object) -> Harness:
    """Every replica backed up once; nothing running."""
    h = harness(tmp_path, **options)
    h.run_until(START + 3 * HOUR)
    h.finish()
    return h


def blocking(*words: str, on: str = "coop0/src0") -> tuple[threading.Event, threading.Event, object]:
    """A rule: a command with ``words`` in its argv on node ``on`` blocks until a stop command comes (then exits 130)."""
    entered, release = threading.Event(), threading.Event()

    def rule(node, argv, world):
        if node.name == on and all(w in argv for w in words):
            entered.set()
            release.wait(30)
            return Result(argv, 130, b"", b"Got Ctrl-C / SIGINT.\n")
        if is_stop(argv):
            release.set()
            return Result(argv, 0, b"stopped by SIGINT\n", b"")
        return None

    return entered, release, rule


# --- drills ---------------------------------------------------------------------------------


def test_a_drills_borg_runs_supervised_and_sigterm_stops_it_and_records_the_drill_interrupted(tmp_path: Path) -> None:
    h = backed_up(tmp_path, grace=3.0)
    entered, _release, rule = blocking(borg.CATALOGUE_FORMAT)
    h.world.script(rule)
    h.daemon.drills_enabled = True
    h.daemon.maintenance_enabled = False
    started = h.daemon.step(h.now())
    assert [j.kind for j in started] == ["drill"] * 3
    assert entered.wait(10)
    h.daemon.stop.set()
    began = time.monotonic()
    assert h.daemon.shutdown() == 0
    assert time.monotonic() - began < 3.0
    listing = h.world.commands(borg.CATALOGUE_FORMAT)
    assert listing and all(c.pidfile and "/run/drill-" in c.pidfile for c in listing)
    assert [c.node for c in h.world.calls if is_stop(c.argv)] == ["coop0/src0"]
    drill = h.history.runs(kind="drill", source="coop0/src0")[0]
    assert drill.result == "interrupted" and "aborted" in drill.error
    assert not h.history.runs(result="running")


def test_a_crashing_drill_is_recorded_as_a_failure_and_not_left_running(tmp_path: Path) -> None:
    h = backed_up(tmp_path)

    def explode(node, argv, world):
        if borg.CATALOGUE_FORMAT in argv:
            raise RuntimeError("a bug")
        return None

    h.world.script(explode)
    h.daemon.drills_enabled = True
    h.daemon.maintenance_enabled = False
    h.step()
    h.finish()
    drills = h.history.runs(kind="drill")
    assert len(drills) == 3 and {r.result for r in drills} == {"failure"}
    assert all("internal error" in r.error for r in drills)
    assert not h.history.runs(result="running")


def test_a_running_drill_occupies_the_replica_it_reads_from_so_no_backup_of_its_source_is_selected(tmp_path: Path) -> None:
    h = backed_up(tmp_path)
    entered, release, rule = blocking(borg.CATALOGUE_FORMAT)
    h.world.script(rule)
    h.daemon.drills_enabled = True
    h.daemon.maintenance_enabled = False
    drill = next(j for j in h.daemon.step(h.now()) if j.source == "coop0/src0")
    assert entered.wait(10)
    assert drill.target in h.placement["coop0/src0"]
    states = h.daemon.job_states()
    assert states[("coop0/src0", drill.target)].running  # counts against that host and the global cap
    tz = ZoneInfo(h.federation.coordinator.timezone)
    later = h.now() + dt.timedelta(days=2)  # every replica overdue
    jobs = schedule.select_jobs(h.federation, h.placement, states, later, tz, global_limit=8, max_per_source=1)
    assert "coop0/src0" not in {j.source for j in jobs}
    release.set()
    h.daemon.stop.set()
    assert h.daemon.shutdown() == 0


# --- no new remote work once stopping ---------------------------------------------------------


def test_once_stopping_the_daemon_starts_no_job(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.clock.advance_to(START + HOUR - 1)  # every first-run slot of the hour has come
    h.daemon.stop.set()
    assert h.daemon.step(h.now()) == []
    assert h.daemon._start("backup", "coop0/src0", h.placement["coop0/src0"][0], "due", 0.0) is None
    assert not h.daemon.running and not h.world.calls


def test_a_backup_that_ends_after_sigterm_is_not_followed_by_a_prune(tmp_path: Path) -> None:
    h = harness(tmp_path, grace=5.0)
    entered, release = threading.Event(), threading.Event()

    def slow_create(node, argv, world):
        if "create" in argv:
            entered.set()
            release.wait(30)
        return None  # then the fake's ordinary borg create

    h.world.script(slow_create)
    h.world.duration = lambda source, target: 0.0
    h.clock.advance_to(START + HOUR - 1)
    assert h.daemon.step(h.now())
    assert entered.wait(10)
    h.daemon.stop.set()
    release.set()
    assert h.daemon.shutdown() == 0
    assert {r.result for r in h.history.runs(kind="backup")} == {"success"}
    assert not h.world.commands("prune") and not h.history.runs(kind="prune")


def test_a_check_that_ends_after_sigterm_is_not_followed_by_a_compaction(tmp_path: Path) -> None:
    h = backed_up(tmp_path, grace=5.0)
    entered, release = threading.Event(), threading.Event()

    def slow_check(node, argv, world):
        if "check" in argv:
            entered.set()
            release.wait(30)
        return None

    h.world.script(slow_check)
    h.daemon.drills_enabled = False
    h.clock.advance_to(START + 40 * 24 * HOUR)  # every check is due (and every backup)
    job = h.daemon._start("maintenance", "coop0/src0", h.placement["coop0/src0"][0], "check_every", 0.0)
    assert job is not None and entered.wait(10)
    h.daemon.stop.set()
    release.set()
    assert h.daemon.shutdown() == 0
    assert h.history.runs(kind="check") and not h.history.runs(kind="compact")
    assert not h.world.commands("compact")


def test_shutdown_returns_0_even_when_the_history_cannot_be_written(tmp_path: Path, monkeypatch) -> None:
    h = harness(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h.history, "interrupt_own_runs", broken)
    h.daemon.stop.set()
    assert h.daemon.shutdown() == 0


# --- timeouts and windows ---------------------------------------------------------------------


def test_a_first_backup_gets_a_generous_timeout_and_later_ones_three_times_the_last_success(tmp_path: Path) -> None:
    h = harness(tmp_path, timeout_for=lambda estimate: 1800.0)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    assert h.daemon.job_timeout_for(source, target, 60.0) == FIRST_RUN_TIMEOUT
    h.history.finish_run(h.history.start_run("backup", source, target, started=START - 6 * HOUR), "success",
                         ended=START - HOUR)
    assert h.daemon.job_timeout_for(source, target, 60.0) == 15 * HOUR
    h.history.finish_run(h.history.start_run("backup", source, target, started=START - 600), "success", ended=START - 300)
    assert h.daemon.job_timeout_for(source, target, 60.0) == 1800.0  # the estimate-based one when longer


def test_maintenance_and_drills_keep_clear_of_a_backup_window_about_to_open() -> None:
    backup = Backup(paths=("/etc",), estimate=GIB, window=Window(60, 360), retention=Retention(daily=2))  # 01:00-06:00

    def at(hour: int, minute: int = 0) -> dt.datetime:
        return dt.datetime(2025, 6, 2, hour, minute, tzinfo=PARIS).astimezone(dt.timezone.utc)

    assert clear_of_window(backup, PARIS, at(23, 30), WINDOW_MARGIN)  # opens in 1.5 h
    assert not clear_of_window(backup, PARIS, at(0, 30), WINDOW_MARGIN)  # opens within the hour
    assert not clear_of_window(backup, PARIS, at(2), WINDOW_MARGIN)  # open
    assert clear_of_window(backup, PARIS, at(7), WINDOW_MARGIN)
    windowless = Backup(paths=("/etc",), estimate=GIB, retention=Retention(daily=2))
    assert clear_of_window(windowless, PARIS, at(0, 30), WINDOW_MARGIN)
