"""Drills by value: which sample, when a drill is due, how a sample is judged, and the
inspection script (run here on a local tree with hostile names)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from mutualbackup.borg import Entry, Item
from mutualbackup.jobs.drill import drills_due
from mutualbackup.plan.drill_sample import (
    MISSING, Observation, choose_sample, inspect_argv, parse_inspection, top_level_paths, verify_sample,
)
from mutualbackup.state.history import History
from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node
from mutualbackup.report.status import drill_state, source_drill

DAY = 86400.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"


def files(root: str, count: int, size: int = 10) -> list[Entry]:
    return [Entry("-", size, f"{root}/f{i:03d}") for i in range(count)]


# --- the sample -------------------------------------------------------------------------


def test_top_level_paths_are_the_backup_paths_in_archive_form() -> None:
    assert top_level_paths(["/etc", "/srv/www/"]) == ["etc", "srv/www"]


def test_successive_drills_put_each_top_level_path_first_in_turn() -> None:
    entries = files("etc", 3) + files("srv/www", 3) + files("var/mail", 3)
    roots = ["etc", "srv/www", "var/mail"]
    firsts = [choose_sample(entries, roots, n, max_files=2)[0] for n in range(6)]
    assert firsts == ["etc", "srv/www", "var/mail", "etc", "srv/www", "var/mail"]
    top, sample = choose_sample(entries, roots, 1, max_files=2)
    assert [e.path for e in sample] == ["srv/www/f000", "srv/www/f001"]


def test_each_turn_of_a_path_continues_where_the_previous_one_stopped_so_every_file_gets_drilled() -> None:
    entries = files("etc", 7) + files("srv", 2)
    roots = ["etc", "srv"]
    seen: set[str] = set()
    for n in range(0, 8, 2):  # the drills where etc comes first
        _, sample = choose_sample(entries, roots, n, max_files=3)
        seen |= {e.path for e in sample if e.path.startswith("etc/")}
    assert seen == {e.path for e in files("etc", 7)}


def test_the_budget_bounds_the_sample_and_fills_from_the_next_paths() -> None:
    entries = [Entry("-", 600, "etc/big"), Entry("-", 300, "etc/mid"), Entry("-", 100, "srv/a"), Entry("-", 100, "srv/b")]
    top, sample = choose_sample(entries, ["etc", "srv"], 0, max_bytes=500)
    assert top == "etc"
    assert [e.path for e in sample] == ["etc/mid", "srv/a", "srv/b"]
    assert sum(e.size for e in sample) <= 500


def test_a_path_whose_files_are_all_too_big_still_gets_its_smallest_file_alone_when_first() -> None:
    entries = [Entry("-", 900, "etc/b"), Entry("-", 800, "etc/a"), Entry("-", 10, "srv/x")]
    top, sample = choose_sample(entries, ["etc", "srv"], 0, max_bytes=100)
    assert [e.path for e in sample] == ["etc/a"]


def test_only_files_and_symlinks_are_sampled_and_paths_outside_every_root_come_last() -> None:
    entries = [Entry("d", 0, "etc"), Entry("h", 0, "etc/hardlink"), Entry("c", 0, "etc/tty"), Entry("l", 9, "etc/link"),
               Entry("-", 1, "etc/file"), Entry("-", 1, "elsewhere/x")]
    top, sample = choose_sample(entries, ["etc"], 0)
    assert [e.path for e in sample] == ["etc/file", "etc/link", "elsewhere/x"]
    assert choose_sample([Entry("d", 0, "etc")], ["etc"], 0) == ("", [])


def test_a_file_belongs_to_the_longest_matching_root_and_not_to_a_sibling_prefix() -> None:
    entries = [Entry("-", 1, "srv/www2/x"), Entry("-", 1, "srv/www/y"), Entry("-", 1, "srv/z")]
    top, sample = choose_sample(entries, ["srv", "srv/www"], 1, max_files=1)
    assert (top, [e.path for e in sample]) == ("srv/www", ["srv/www/y"])


# --- when a drill is due ----------------------------------------------------------------


def federation(drill_every: float = 30 * DAY) -> Federation:
    node = Node(member="coop", slug="web1", address="127.0.0.1", port=22, user="root", host_key=KEY,
                backup=Backup(paths=("/etc",), drill_every=int(drill_every)))
    return Federation(name="f", coordinator=Coordinator(ssh_key="/k", state="/s"),
                      members=(Member(name="coop", contact="x@y", site="s", nodes=(node,)),))


def record(history: History, kind: str, started: float, result: str, target: str = "h/1") -> None:
    run = history.start_run(kind, "coop/web1", target, started=started)
    history.finish_run(run, result, ended=started + 10, error=None if result == "success" else "boom")


@pytest.mark.parametrize(
    "runs, now, due",
    [
        ([], 100 * DAY, []),  # no backup yet: nothing to drill
        ([("backup", 0, "failure")], 100 * DAY, []),
        ([("backup", 0, "success")], 1 * DAY, ["coop/web1"]),  # never drilled: as soon as there is a backup
        ([("backup", 0, "success"), ("drill", 1 * DAY, "success")], 30 * DAY, []),
        ([("backup", 0, "success"), ("drill", 1 * DAY, "success")], 31 * DAY + 1, ["coop/web1"]),
        ([("backup", 0, "success"), ("drill", 1 * DAY, "success"), ("drill", 32 * DAY, "failure")], 32 * DAY + 3600, []),
        ([("backup", 0, "success"), ("drill", 1 * DAY, "success"), ("drill", 32 * DAY, "failure")], 32.3 * DAY, ["coop/web1"]),
    ],
)
def test_drills_are_due_every_drill_every_and_a_failed_one_is_retried_after_six_hours(
    tmp_path: Path, runs: list[tuple[str, float, str]], now: float, due: list[str]
) -> None:
    history = History(tmp_path)
    for kind, started, result in runs:
        record(history, kind, started, result)
    assert drills_due(federation(), history, now) == due


@pytest.mark.parametrize(
    "last_success, failed, first_backup, now, state",
    [
        (None, False, None, 0, "never"),
        (None, False, 0, 29 * DAY, "never"),
        (None, False, 0, 31 * DAY, "overdue"),
        (10 * DAY, False, 0, 39 * DAY, "ok"),
        (10 * DAY, False, 0, 41 * DAY, "overdue"),
        (10 * DAY, True, 0, 11 * DAY, "failed"),
    ],
)
def test_the_drill_state_of_a_source(last_success, failed, first_backup, now, state) -> None:  # noqa: ANN001
    assert drill_state(last_success, failed, first_backup, 30 * DAY, now) == state


def test_status_reports_the_last_drill_and_its_error(tmp_path: Path) -> None:
    history = History(tmp_path)
    record(history, "backup", 0, "success")
    record(history, "drill", DAY, "success", target="h/1")
    record(history, "drill", 2 * DAY, "failure", target="h/2")
    status = source_drill(history, "coop/web1", 30 * DAY, 3 * DAY)
    assert (status.state, status.last_drill, status.last_success, status.target, status.error) == (
        "failed", 2 * DAY, DAY, "h/2", "boom"
    )


# --- judging a sample -------------------------------------------------------------------


SHA = hashlib.sha256(b"data").hexdigest()
FILE = Item("etc/a", "-", "-rw-r--r--", 4, 1000.5, sha256=SHA)
LINK = Item("etc/l", "l", "lrwxrwxrwx", 1, 1000.0, linktarget="a")
GOOD = Observation("f", 0o644, 4, 1000.5, "", SHA)


def test_a_sample_matching_the_archive_and_the_live_files_passes() -> None:
    verdict = verify_sample([FILE, LINK], {"etc/a": GOOD, "etc/l": Observation("l", 0o777, 1, 0, "a", "")},
                            {"etc/a": GOOD, "etc/l": Observation("l", 0o777, 1, 0, "a", "")})
    assert (verdict.problems, verdict.live_checked, verdict.live_changed) == ([], 2, 0)


def test_a_live_file_changed_since_the_archive_is_not_compared() -> None:
    changed = Observation("f", 0o644, 5, 2000.0, "", "other")
    verdict = verify_sample([FILE], {"etc/a": GOOD}, {"etc/a": changed})
    assert (verdict.problems, verdict.live_checked, verdict.live_changed) == ([], 0, 1)
    assert verify_sample([FILE], {"etc/a": GOOD}, {}).live_changed == 1  # deleted since


@pytest.mark.parametrize(
    "extracted, live, problem",
    [
        ({}, {}, "not extracted"),
        ({"etc/a": Observation("f", 0o644, 4, 1000.5, "", "bad")}, {}, "does not match the archive's checksum"),
        ({"etc/a": Observation("f", 0o600, 4, 1000.5, "", SHA)}, {}, "extracted with mode 600"),
        ({"etc/a": GOOD}, {"etc/a": Observation("f", 0o644, 4, 1000.500001, "", "bad")}, "live file has the archived size and mtime"),
    ],
)
def test_a_sample_that_differs_fails_with_the_path_and_why(extracted, live, problem) -> None:  # noqa: ANN001
    verdict = verify_sample([FILE], extracted, live)
    assert len(verdict.problems) == 1 and problem in verdict.problems[0] and "etc/a" in verdict.problems[0]


def test_a_symlink_restored_to_another_target_fails() -> None:
    verdict = verify_sample([LINK], {"etc/l": Observation("l", 0o777, 1, 0, "b", "")}, {})
    assert verdict.problems == ["etc/l: the extracted symlink does not point to 'a'"]


# --- the inspection script, for real ----------------------------------------------------------


def test_the_inspection_script_reports_extracted_and_live_files_with_hostile_names(tmp_path: Path) -> None:
    live_root = tmp_path / "live"
    scratch = tmp_path / "scratch"
    names = ["a b", "new\nline", "-rf", "$(touch pwned)", "été"]
    for name in names:
        (live_root / name).parent.mkdir(parents=True, exist_ok=True)
        (live_root / name).write_bytes(name.encode())
        os.chmod(live_root / name, 0o640)
    (live_root / "link").symlink_to("a b")
    archive_paths = [str(live_root / n).lstrip("/") for n in [*names, "link", "missing"]]
    for path in archive_paths[:-2]:
        (scratch / path).parent.mkdir(parents=True, exist_ok=True)
        (scratch / path).write_bytes(b"x")
    done = subprocess.run(inspect_argv(str(scratch), archive_paths), capture_output=True)
    assert done.returncode == 0, done.stderr
    extracted, live = parse_inspection(done.stdout, archive_paths)
    for name, path in zip(names, archive_paths):
        assert live[path].kind == "f" and live[path].size == len(name.encode()) and live[path].mode == 0o640
        assert live[path].sha256 == hashlib.sha256(name.encode()).hexdigest()
        assert abs(live[path].mtime - (live_root / name).stat().st_mtime) < 1e-6
        assert extracted[path].sha256 == hashlib.sha256(b"x").hexdigest()
    assert (live[archive_paths[-2]].kind, live[archive_paths[-2]].link) == ("l", "a b")
    assert extracted[archive_paths[-2]] == MISSING and live[archive_paths[-1]] == MISSING
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_drills_due_takes_an_aware_datetime_too(tmp_path: Path) -> None:
    import datetime as dt

    history = History(tmp_path)
    record(history, "backup", 0, "success")
    assert drills_due(federation(), history, dt.datetime.fromtimestamp(DAY, dt.timezone.utc)) == ["coop/web1"]
