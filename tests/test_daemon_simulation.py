"""A simulated week of the real daemon: 50 sources x 2 replicas on 10 hosts.

Unlike test_schedule_simulation.py (select_jobs alone), this drives the real
:class:`mutualbackup.daemon.Daemon` -- its step(), job threads, run_backup,
prune, check and compaction, recovery, the SQLite history -- over a
:class:`fake.FakeWorld` whose transports answer borg argv on a fake clock.
``borg create`` lasts size / bandwidth; about 5 % of attempts fail (decided by
a hash of source, target and time, so the week is the same on every run); one
replica is broken for good from the second day on.

The assertions are computed from what the fake nodes saw (sessions of borg
create) and from the history, not from the scheduler's own state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
import time
from collections import defaultdict
from zoneinfo import ZoneInfo

import pytest

from mutualbackup.inventory.model import Backup, Retention, Window
from mutualbackup.plan.due import retry_delay
from mutualbackup.report.status import compute_status
from mutualbackup.remote.transport import Result

from fake import GIB, Harness, make_federation

PARIS = ZoneInfo("Europe/Paris")
UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)
MBIT = 1_000_000
GLOBAL_LIMIT = 8
NIGHT, EVENING = Window(60, 360), Window(22 * 60, 4 * 60)
T0 = dt.datetime(2025, 3, 24, tzinfo=PARIS).astimezone(UTC)  # the week clocks spring forward
BROKEN = ("coop3/src2", None)  # its first replica fails for good from the second day
BROKEN_FROM = T0 + DAY


def max_concurrent(m: int) -> int:
    return 2 + m % 2


def bandwidth(m: int) -> int:
    return (100, 200, 500, 1000)[m % 4] * MBIT


def window_of(k: int) -> Window | None:
    return NIGHT if k % 10 < 7 else EVENING if k % 10 < 9 else None


def backup_of(m: int, j: int) -> Backup:
    k = m * 5 + j
    every = 6 * 3600 if (m, j) in ((1, 4), (3, 4)) else 24 * 3600
    return Backup(
        paths=("/etc", "/srv"), estimate=((k * 7) % 12 + 1) * GIB, every=every, window=window_of(k),
        retention=Retention(daily=3, weekly=1), check_every=(2 if j == 0 else 7) * 24 * 3600,
    )


def flaky(source: str, target: str, when: float) -> bool:
    digest = hashlib.blake2b(f"{source}>{target}@{int(when)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % 100 < 5


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory):
    fed = make_federation(10, 5, backup=backup_of, max_concurrent=max_concurrent, bandwidth=bandwidth)
    # the history is fsynced at every run start and end: keep it in memory when the machine allows
    state = tempfile.mkdtemp(prefix="mb-sim-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    h = Harness(fed, state, T0.timestamp(), global_limit=GLOBAL_LIMIT)
    broken_target = h.placement[BROKEN[0]][0]
    broken_address = fed.node(broken_target).address
    sizes = {n.name: n.backup.estimate for n in fed.sources()}
    bandwidths = {n.name: n.storage.bandwidth for n in fed.hosts()}
    h.world.duration = lambda source, target: max(60.0, sizes[source] * 8 / bandwidths[target])

    def failures(node, argv, world):
        if "create" not in argv:
            return None
        now = world.clock.time()
        url = next(a for a in argv if "::" in a)
        target = next(n.name for n in fed.hosts() if f"@{n.address}:" in url)
        if node.name == BROKEN[0] and f"@{broken_address}:" in url and now >= BROKEN_FROM.timestamp():
            return Result(argv, 14, b"", b"Insufficient free space to complete transaction\n")
        if flaky(node.name, target, now):
            return Result(argv, 80, b"", b"Connection closed by remote host\n")
        return None

    h.world.script(failures)
    began = time.monotonic()
    h.run_until((T0 + 7 * DAY + dt.timedelta(hours=6)).timestamp())
    h.finish()
    yield h, broken_target, time.monotonic() - began
    h.history.close()
    shutil.rmtree(state, ignore_errors=True)


def backups(h: Harness) -> list:
    return sorted((r for r in h.history.runs(kind="backup")), key=lambda r: r.started)


def opening(date: dt.date, window: Window) -> tuple[dt.datetime, dt.datetime]:
    def local(day: dt.date, minutes: int) -> dt.datetime:
        return dt.datetime(day.year, day.month, day.day, minutes // 60, tzinfo=PARIS).astimezone(UTC)

    end_day = date if window.start < window.end else date + DAY
    return local(date, window.start), local(end_day, window.end)


def source_window(h: Harness, source: str) -> Window | None:
    return h.federation.node(source).backup.window


def test_every_windowed_replica_succeeds_once_in_each_of_the_seven_windows(week) -> None:
    h, broken_target, _ = week
    ok = [r for r in backups(h) if r.succeeded]
    missing, doubled = [], []
    for source, targets in h.placement.items():
        window = source_window(h, source)
        if window is None:
            continue
        for target in targets:
            if (source, target) == (BROKEN[0], broken_target):
                continue
            for day in range(7):
                start, end = opening(T0.astimezone(PARIS).date() + day * DAY, window)
                inside = [r for r in ok if r.source == source and r.target == target
                          and start.timestamp() <= r.started and r.ended <= end.timestamp()]
                if not inside:
                    missing.append((source, target, day))
                if len(inside) > 1:
                    doubled.append((source, target, day))
    assert missing == []
    assert doubled == []


def test_every_attempt_of_a_windowed_source_starts_inside_its_window(week) -> None:
    h, _, _ = week
    for run in backups(h):
        window = source_window(h, run.source)
        if window is None:
            continue
        local = dt.datetime.fromtimestamp(run.started, PARIS)
        minute = local.hour * 60 + local.minute
        assert window.contains(minute), (run.source, run.target, local)


def test_sources_without_window_succeed_every_day_never_before_every(week) -> None:
    h, _, _ = week
    for source, targets in h.placement.items():
        node = h.federation.node(source)
        if node.backup.window is not None:
            continue
        for target in targets:
            starts = [r.started for r in backups(h) if r.source == source and r.target == target and r.succeeded]
            for day in range(1, 7):
                lo = (T0 + day * DAY).timestamp()
                assert any(lo <= s < lo + 86400 for s in starts), (source, target, day)
            assert min(b - a for a, b in zip(starts, starts[1:])) >= node.backup.every - 1


def test_no_host_ever_runs_more_borg_sessions_than_max_concurrent_and_some_reach_it(week) -> None:
    h, _, _ = week
    limits = {n.name: n.storage.max_concurrent for n in h.federation.hosts()}
    assert all(h.world.peak[host] <= limits[host] for host in h.world.peak), h.world.peak
    assert any(h.world.peak[host] == limits[host] for host in h.world.peak)


def overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_the_global_cap_is_never_exceeded_and_a_replica_never_runs_twice_at_once(week) -> None:
    h, _, _ = week
    creates = [(s, t, a, b) for kind, s, t, a, b in h.world.sessions if kind == "create"]
    assert overlap([(a, b) for _, _, a, b in creates]) == GLOBAL_LIMIT
    per_pair: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    per_source: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s, t, a, b in creates:
        per_pair[(s, t)].append((a, b))
        per_source[s].append((a, b))
    assert max(overlap(v) for v in per_pair.values()) == 1
    assert max(overlap(v) for v in per_source.values()) == 1  # before: commands never run twice at once


def test_failed_attempts_are_retried_after_an_exponential_back_off_and_recorded(week) -> None:
    h, broken_target, _ = week
    by_pair = defaultdict(list)
    for run in backups(h):
        by_pair[(run.source, run.target)].append(run)
    failures = [r for r in backups(h) if r.result == "failure"]
    assert 0.02 <= sum(1 for r in failures if "exited 80" in r.error) / len(backups(h)) <= 0.10
    retried = 0
    for runs in by_pair.values():
        streak = 0
        for previous, following in zip(runs, runs[1:]):
            streak = streak + 1 if previous.result == "failure" else 0
            if streak:
                assert following.started - previous.started >= retry_delay(streak) - 1e-3, (previous, following)
                retried += 1
    assert retried >= 30
    assert all(r.error and r.ended is not None for r in failures)


def test_the_broken_replica_is_failing_and_nothing_else_is(week) -> None:
    h, broken_target, _ = week
    end = (T0 + 7 * DAY + dt.timedelta(hours=6)).timestamp()
    states = {(r.source, r.target): r for r in compute_status(h.federation, h.placement, h.history, end)}
    broken = states.pop((BROKEN[0], broken_target))
    assert broken.state == "failing" and "disk is full" in broken.last_error and "(exit 14)" in broken.last_error
    assert {r.state for r in states.values()} <= {"ok"}


def test_checks_and_guarded_compactions_ran_and_nothing_stayed_running(week) -> None:
    h, _, _ = week
    checks = h.history.runs(kind="check", result="success")
    assert len({(r.source, r.target) for r in checks}) >= 20  # every check_every=2d replica, several times
    compacted = [r for r in h.history.runs(kind="compact", result="success") if '"compacted": true' in (r.detail or "")]
    assert compacted
    assert not [a for a in h.history.alerts() if a["kind"] == "compaction-refused"]
    assert h.history.runs(result="running") == []
    assert h.history.runs(result="interrupted") == []


def test_the_week_is_simulated_quickly_and_only_ticks_when_something_can_change(week) -> None:
    h, _, seconds = week
    assert len(backups(h)) > 700
    assert h.steps < 10 * 24 * 60 // 4
    assert seconds < 120
