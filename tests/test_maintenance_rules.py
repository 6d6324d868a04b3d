"""Pure decisions of maintenance and recovery, as tables: when a check is due, when a lock is
stale, what the compaction guard refuses, how long a job may run."""

from __future__ import annotations

import pytest

from mutualbackup.borg import LockHolder
from mutualbackup.daemon import job_timeout
from mutualbackup.history import PairSummary
from mutualbackup.maintenance import guard_problems, maintenance_due
from mutualbackup.model import Backup
from mutualbackup.recovery import judge_lock

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
        ([holder("store1@5254", 100), holder("store1@5254", 101)], {101}, False, "live process(es) 101"),
        ([holder("store1@5254", 100)], {100}, False, "live"),
        ([holder("laptop.example@99", 100)], set(), False, "another machine"),  # cannot check its pids
    ],
)
def test_a_repository_lock_is_broken_only_when_every_holder_is_a_dead_process_of_the_host(holders, alive, stale, words) -> None:
    verdict = judge_lock("store1", holders, alive)
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
