"""Pure decisions of maintenance and recovery, as tables: when a check is due, when a lock is
stale, what the compaction guard refuses, how long a job may run."""

from __future__ import annotations

import pytest

from mutualbackup.borg import LockHolder, Transaction, parse_transactions
from mutualbackup.daemon import job_timeout
from mutualbackup.plan.compaction_rules import archive_changes, baseline_bytes, checked_through, foreign_transactions
from mutualbackup.plan.due import PairSummary
from mutualbackup.state.history import History, Run
from mutualbackup.plan.compaction_rules import guard_problems
from mutualbackup.plan.due import maintenance_due
from mutualbackup.inventory.model import Backup
from mutualbackup.borg import judge_lock

DAY = 86400.0
WEEKLY = Backup(paths=("/etc",), check_every=7 * 86400)


def summary(last_success=None, first_success=None, last_attempt=None, failures=0) -> PairSummary:
    return PairSummary(last_success=last_success, first_success=first_success, last_attempt=last_attempt,
                       last_success_end=last_success, failures=failures)


@pytest.mark.parametrize(
    ("backups", "checks", "due"),
    [
        (None, None, None),  # never backed up: nothing to check yet
        (summary(), None, None),
        (summary(10 * DAY, 1 * DAY, 10 * DAY), None, 8 * DAY),  # first check: a week after the first backup
        (summary(10 * DAY, 1 * DAY, 10 * DAY), summary(9 * DAY, 2 * DAY, 9 * DAY), 16 * DAY),
        # failed checks: not before the back-off after the last attempt (300 s, 600 s, ...)
        (summary(20 * DAY, 1 * DAY, 20 * DAY), summary(2 * DAY, 2 * DAY, 19 * DAY, failures=1), 19 * DAY + 300),
        (summary(20 * DAY, 1 * DAY, 20 * DAY), summary(2 * DAY, 2 * DAY, 19 * DAY, failures=3), 19 * DAY + 1200),
    ],
)
def test_a_replicas_maintenance_is_due_check_every_after_its_last_check(backups, checks, due) -> None:
    assert maintenance_due(WEEKLY, backups, checks) == due


def holder(host: str, pid: int) -> LockHolder:
    return LockHolder(host, pid, 0, "exclusive")


@pytest.mark.parametrize(
    ("holders", "alive", "stale", "words"),
    [
        ([], set(), False, "not locked"),
        ([holder("store1.example@5254", 100)], set(), True, "no longer exist"),
        ([holder("store1.example@5254", 100), holder("store1.example@5254", 101)], {101}, False, "live process(es) 101"),
        ([holder("store1.example@5254", 100)], {100}, False, "live"),
        ([holder("laptop.example@99", 100)], set(), False, "another machine"),  # cannot check its pids
        # the same short name is not the same machine: another domain, or another node id
        ([holder("store1.other@5254", 100)], set(), False, "another machine"),
        ([holder("store1.example@7777", 100)], set(), False, "another machine"),
        ([holder("store1@5254", 100)], set(), False, "another machine"),
    ],
)
def test_a_repository_lock_is_broken_only_when_every_holder_is_a_dead_process_of_the_host(holders, alive, stale, words) -> None:
    verdict = judge_lock("store1.example@5254", holders, alive)
    assert verdict.stale is stale
    assert words in verdict.reason


@pytest.mark.parametrize(
    ("vanished", "baseline", "live", "refused"),
    [
        ([], 10_000_000_000, 10_000_000_000, False),
        ([], 10_000_000_000, 10_500_000_000, False),  # grew: new data, checkpoints
        ([], 10_000_000_000, 9_950_000_000, False),  # within 1 %
        ([], 10_000_000_000, 9_000_000_000, True),  # shrank without our prune
        (["web-2025-01-01T00:00:00"], 10_000_000_000, 10_000_000_000, True),
        ([], None, 1, False),  # nothing to compare with: the archive list decides alone
    ],
)
def test_the_compaction_guard_refuses_vanished_archives_and_shrunk_repositories(vanished, baseline, live, refused) -> None:
    assert bool(guard_problems(vanished, baseline, live)) is refused


@pytest.mark.parametrize(("estimate", "timeout"), [(0, 3600), (600, 3600), (3600, 3 * 3600 + 1800), (40 * 3600, 48 * 3600)])
def test_a_jobs_timeout_grows_with_its_estimated_duration_within_bounds(estimate: float, timeout: float) -> None:
    assert job_timeout(estimate) == timeout


A, B = "web-2025-01-01T00:00:00", "web-2025-01-02T00:00:00"


@pytest.mark.parametrize(
    ("recorded", "listed", "vanished", "replaced"),
    [
        ({A: ("id-a", None)}, {A: "id-a"}, (), ()),
        ({A: ("id-a", None)}, {}, (A,), ()),
        ({A: ("id-a", None)}, {A: "id-evil"}, (), (A,)),  # borg delete + borg create of the same name
        ({A: ("id-a", None)}, {A: ""}, (), (A,)),  # borg no longer vouches for the id
        ({A: ("id-a", 5.0)}, {A: "id-evil"}, (), ()),  # pruned by the coordinator: a new archive of that name is not judged
        ({A: (None, None)}, {A: "id-new"}, (), ()),  # recorded before ids were kept: judged by name only
        ({A: ("id-a", None), B: ("id-b", None)}, {B: "x", "web-other": "y"}, (A,), (B,)),
    ],
)
def test_an_archive_is_the_recorded_one_only_with_the_recorded_id(recorded, listed, vanished, replaced) -> None:
    changes = archive_changes(recorded, listed)
    assert (changes.vanished, changes.replaced) == (vanished, replaced)


def test_the_guard_names_replaced_archives_and_foreign_transactions() -> None:
    [problem] = guard_problems([], None, None, replaced=[A])
    assert A in problem and "re-created under the same name" in problem
    [problem] = guard_problems([], None, None, foreign=[Transaction(7, 1_700_000_000.0)])
    assert "#7 at 2023-11-14 22:13:20 UTC" in problem


WINDOWS = [(1000.0, 2000.0), (5000.0, 5600.0)]  # the coordinator's backups and prunes, its clock


@pytest.mark.parametrize(
    ("transactions", "since", "offset", "foreign"),
    [
        ([(1, 1500.0), (2, 5550.0)], -1, 0.0, []),
        ([(1, 1500.0), (2, 3000.0)], -1, 0.0, [2]),  # a write while the coordinator ran nothing
        ([(1, 1500.0), (2, 3000.0)], 2, 0.0, []),  # already accounted for by a passed guard
        ([(3, 2050.0)], -1, 0.0, []),  # within the slack (60 s) after a window
        ([(3, 2070.0)], -1, 0.0, [3]),
        ([(4, 4500.0)], -1, 0.0, [4]),  # 500 s before the second run
        ([(4, 4500.0)], -1, -600.0, []),  # the host's clock is 10 min behind: its 4500 is 5100 here, inside a run
    ],
)
def test_a_transaction_on_the_host_must_fall_in_a_run_of_the_coordinator(transactions, since, offset, foreign) -> None:
    found = foreign_transactions([Transaction(n, t) for n, t in transactions], since, WINDOWS, offset)
    assert [t.number for t in found] == foreign


def run(kind: str, result: str = "success", size: int | None = 100, detail: str | None = None, started: float = 0.0) -> Run:
    return Run(id=1, kind=kind, source="s", target="t", started=started, ended=started, result=result, exit_code=0,
               archive=None, original_bytes=None, compressed_bytes=None, deduplicated_bytes=None,
               repository_bytes=size, nfiles=None, error=None, pid=None, detail=detail)


@pytest.mark.parametrize(
    ("runs", "baseline"),
    [
        ([run("backup", size=10), run("prune", size=90, detail='{"verified": true}')], 90),  # a backup's size never
        ([run("prune", size=10, detail='{"verified": false}'), run("prune", size=90, detail='{"verified": true}')], 90),
        ([run("prune", "failure", size=None, detail='{"verified": false}'), run("prune", size=90, detail='{"verified": true}')], 90),
        ([run("prune", size=50, detail='{"pruned": []}')], None),  # older prunes, before verification: not a baseline
        ([run("backup", size=10)], None),
        # a member's admin accepted (signed) a refused compaction's live size: the new baseline until the next prune
        ([run("accept-deletion", size=None, detail='{"live_bytes": 40}'), run("prune", size=90, detail='{"verified": true}')], 40),
        ([run("accept-deletion", "failure", size=None, detail='{"live_bytes": 40}')], None),
    ],
)
def test_the_volume_baseline_is_only_a_size_measured_after_a_verified_prune(runs, baseline) -> None:
    assert baseline_bytes(runs) == baseline


def test_a_passed_guard_remembers_the_last_transaction_it_accounted_for() -> None:
    assert checked_through([run("compact", "failure", detail='{"transactions_checked": 9}'),
                            run("compact", detail='{"transactions_checked": 4}')]) == 4
    assert checked_through([run("compact", detail='{"compacted": true}')]) == -1
    assert checked_through([run("accept-deletion", detail='{"transactions_checked": 12}'),
                            run("compact", detail='{"transactions_checked": 4}')]) == 12  # accepted, signed


def test_the_hosts_transactions_log_parses_with_the_hosts_clock() -> None:
    now, found = parse_transactions(b"1700000000\ntransaction 3, UTC time 2023-11-14T22:13:20.123456\n"
                                    b"transaction 5, UTC time 2023-11-14T22:13:21\n")
    assert now == 1_700_000_000.0 and found == [Transaction(3, 1_700_000_000.123456), Transaction(5, 1_700_000_001.0)]
    with pytest.raises(ValueError):
        parse_transactions(b"1700000000\nsomething else\n")


def test_an_older_history_gains_the_archive_id_column_and_keeps_its_archives(tmp_path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "history.sqlite3")
    db.execute("CREATE TABLE archives (source TEXT NOT NULL, target TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL,"
               " seen REAL NOT NULL, pruned REAL, PRIMARY KEY (source, target, name))")
    db.execute("INSERT INTO archives VALUES ('s', 't', ?, 1.0, 2.0, NULL)", (A,))
    db.commit()
    db.close()
    history = History(tmp_path)
    History(tmp_path).close()  # a second open migrates nothing twice
    assert history.known_archives("s", "t") == {A: (1.0, None)}
    assert history.archive_ids("s", "t") == {A: None}
    history.record_archives("s", "t", [(A, 1.0, "id-a"), (B, 3.0)])
    history.record_archives("s", "t", [(A, 1.0, "id-evil")])  # a recorded id is never overwritten
    assert history.archive_ids("s", "t") == {A: "id-a", B: None}


def test_a_lock_is_never_broken_when_the_hosts_own_id_is_unknown() -> None:
    assert not judge_lock("", [holder("store1.example@5254", 100)], set()).stale
