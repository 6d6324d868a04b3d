"""A simulated week: 50 sources × 2 replicas on 10 hosts, driven by select_jobs.

A fake clock advances in whole minutes; it skips the minutes in which nothing can
change (no job finishes and next_wakeup says no job becomes startable), and a
probe in each skipped stretch checks that select_jobs indeed has nothing to start
there. Jobs run for a time derived from their size and the host's bandwidth;
about 5 % of attempts fail, drawn from a seeded generator, and are retried.

The assertions are computed from the log of attempts, independently of the
scheduler: daily successes inside each window, per-host and global concurrency,
back-off between retries, and spread of start times.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo

import pytest

from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage, Window
from mutualbackup.plan.due import JobState
from mutualbackup.plan.schedule import next_wakeup, select_jobs

PARIS = ZoneInfo("Europe/Paris")
UTC = dt.timezone.utc
MINUTE = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)
GIB = 1024**3
MBIT = 1_000_000
SEED = 20250330
FAILURE_RATE = 0.05
GLOBAL_LIMIT = 8
NIGHT = "01:00-06:00"
EVENING = "22:00-04:00"
WINDOWS = {NIGHT: Window(60, 360), EVENING: Window(22 * 60, 4 * 60), None: None}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@dataclass(frozen=True)
class Attempt:
    source: str
    target: str
    reason: str
    start: dt.datetime
    end: dt.datetime
    ok: bool
    failures_before: int


@dataclass
class World:
    federation: Federation
    placements: dict[str, list[str]]
    window_of: dict[str, str | None]
    every_of: dict[str, dt.timedelta]
    size_of: dict[str, int | None]
    max_concurrent: dict[str, int]
    bandwidth: dict[str, int]


def build_world() -> World:
    """10 members on 5 sites; each lends one host and has 5 sources."""
    members, placements, window_of, every_of, size_of = [], {}, {}, {}, {}
    max_concurrent, bandwidth = {}, {}
    for m in range(10):
        member = f"coop{m}"
        host_name = f"{member}/store"
        max_concurrent[host_name] = 2 + m % 2
        bandwidth[host_name] = (100, 200, 500, 1000)[m % 4] * MBIT
        nodes = [Node(member=member, slug="store", address=f"192.0.2.{m}", port=22, user="mutualbackup",
                      host_key=HOST_KEY, site=f"site-{m % 5}",
                      storage=Storage(path="/srv/mutualbackup", capacity=2000 * GIB,
                                      max_concurrent=max_concurrent[host_name], bandwidth=bandwidth[host_name]))]
        for j in range(5):
            k = m * 5 + j
            name = f"{member}/src{j}"
            window_text = NIGHT if k % 10 < 7 else EVENING if k % 10 < 9 else None
            every = dt.timedelta(hours=6) if name in ("coop1/src4", "coop3/src4") else DAY
            size = None if k % 8 == 3 else ((k * 7) % 12 + 1) * GIB
            nodes.append(Node(member=member, slug=f"src{j}", address=f"198.51.100.{k}", port=22,
                              user="mutualbackup", host_key=HOST_KEY, site=f"site-{m % 5}",
                              backup=Backup(paths=("/etc", "/srv"), estimate=size,
                                            every=int(every.total_seconds()), window=WINDOWS[window_text])))
            placements[name] = [f"coop{(m + 1 + j) % 10}/store", f"coop{(m + 5 + j) % 10}/store"]
            window_of[name], every_of[name], size_of[name] = window_text, every, size
        members.append(Member(name=member, contact=f"ops@{member}.example", site=f"site-{m % 5}",
                              nodes=tuple(nodes)))
    federation = Federation(
        name="plateformes-en-communs",
        coordinator=Coordinator(ssh_key="/etc/mutualbackup/id_ed25519", state="/var/lib/mutualbackup",
                                timezone="Europe/Paris"),
        members=tuple(members),
    )
    return World(federation, placements, window_of, every_of, size_of, max_concurrent, bandwidth)


def run_minutes(size: int | None, bandwidth: int) -> int:
    """How long a job really takes in the simulation: size over bandwidth, 10 min when unknown."""
    if size is None:
        return 10
    return max(1, math.ceil(size * 8 / bandwidth / 60))


def ceil_minute(instant: dt.datetime) -> dt.datetime:
    floor = instant.replace(second=0, microsecond=0)
    return floor if floor == instant else floor + MINUTE


def simulate(world: World, t0: dt.datetime, until: dt.datetime) -> tuple[list[Attempt], int]:
    """Drive select_jobs from t0 to until; returns the attempts and the number of select_jobs calls."""
    rng = random.Random(SEED)
    states: dict[tuple[str, str], JobState] = {}
    finishing: dict[tuple[str, str], tuple[dt.datetime, bool]] = {}
    attempts: list[Attempt] = []
    fed, placements = world.federation, world.placements
    now, calls = t0, 0
    while now < until:
        for key, (end, ok) in sorted(finishing.items()):
            if end <= now:
                state = states[key]
                if ok:
                    states[key] = replace(state, running=False, last_success=state.last_attempt,
                                          consecutive_failures=0)
                else:
                    states[key] = replace(state, running=False,
                                          consecutive_failures=state.consecutive_failures + 1)
                del finishing[key]
        calls += 1
        for job in select_jobs(fed, placements, states, now, PARIS, global_limit=GLOBAL_LIMIT):
            key = (job.source, job.target)
            state = states.get(key) or JobState(*key)
            assert not state.running
            minutes = run_minutes(world.size_of[job.source], world.bandwidth[job.target])
            ok = rng.random() >= FAILURE_RATE
            if not ok:
                minutes = max(1, minutes // 2)
            end = now + minutes * MINUTE
            finishing[key] = (end, ok)
            attempts.append(Attempt(job.source, job.target, job.reason, now, end, ok, state.consecutive_failures))
            states[key] = replace(state, running=True, last_attempt=now)
        wake = next_wakeup(fed, placements, states, now, PARIS)
        events = [end for end, _ in finishing.values()] + ([wake] if wake else [])
        following = max(now + MINUTE, ceil_minute(min(events, default=until)))
        if following - now > MINUTE:
            probe = now + (following - now) // 2
            probe = probe.replace(second=0, microsecond=0)
            calls += 1
            assert select_jobs(fed, placements, states, probe, PARIS, global_limit=GLOBAL_LIMIT) == [], probe
        now = following
    return attempts, calls


def local(date: dt.date, hour: int) -> dt.datetime:
    return dt.datetime(date.year, date.month, date.day, hour, tzinfo=PARIS).astimezone(UTC)


def opening(date: dt.date, window_text: str) -> tuple[dt.datetime, dt.datetime]:
    """The UTC bounds of a window opened on a local date (neither 01, 06, 22 nor 04 h falls in a DST gap)."""
    if window_text == NIGHT:
        return local(date, 1), local(date, 6)
    return local(date, 22), local(date + DAY, 4)


def max_overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _, step in events:  # ends sort before starts at the same instant: a slot freed is reusable
        level += step
        peak = max(peak, level)
    return peak


WEEKS = {
    "the week clocks spring forward": dt.datetime(2025, 3, 24, tzinfo=PARIS),
    "the week clocks fall back": dt.datetime(2025, 10, 20, tzinfo=PARIS),
}


@pytest.fixture(scope="module", params=list(WEEKS), ids=list(WEEKS))
def week(request):
    world = build_world()
    t0 = WEEKS[request.param].astimezone(UTC)
    attempts, calls = simulate(world, t0, t0 + 7 * DAY + dt.timedelta(hours=6))
    return world, t0, attempts, calls


def successes(attempts: list[Attempt]) -> dict[tuple[str, str], list[Attempt]]:
    by_job: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        if attempt.ok:
            by_job[(attempt.source, attempt.target)].append(attempt)
    return by_job


def test_every_replica_of_a_windowed_source_succeeds_once_in_each_of_the_seven_windows(week):
    world, t0, attempts, _ = week
    by_job = successes(attempts)
    first_date = t0.astimezone(PARIS).date()
    missing, doubled = [], []
    for source, targets in world.placements.items():
        window_text = world.window_of[source]
        if window_text is None:
            continue
        for target in targets:
            for day in range(7):
                start, end = opening(first_date + day * DAY, window_text)
                inside = [a for a in by_job[(source, target)] if start <= a.start and a.end <= end]
                if not inside:
                    missing.append((source, target, first_date + day * DAY))
                if len(inside) > 1:
                    doubled.append((source, target, first_date + day * DAY))
    assert missing == []
    assert doubled == []


def test_every_window_started_run_starts_inside_its_window(week):
    world, _, attempts, _ = week
    for attempt in attempts:
        window_text = world.window_of[attempt.source]
        if window_text is None:
            continue
        date = (attempt.start.astimezone(PARIS) - dt.timedelta(hours=12 if window_text == EVENING else 0)).date()
        start, end = opening(date, window_text)
        assert start <= attempt.start < end, attempt


def test_every_replica_of_a_source_without_window_succeeds_every_day_and_never_early(week):
    world, t0, attempts, _ = week
    by_job = successes(attempts)
    for source, targets in world.placements.items():
        if world.window_of[source] is not None:
            continue
        every = world.every_of[source]
        for target in targets:
            starts = [a.start for a in by_job[(source, target)]]
            for day in range(7):
                assert any(t0 + day * DAY <= s < t0 + (day + 1) * DAY for s in starts), (source, target, day)
            gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
            assert min(gaps) >= every, (source, target)
            assert max(gaps) <= every + dt.timedelta(hours=1), (source, target)


def test_no_host_ever_runs_more_jobs_than_its_max_concurrent_and_the_limit_is_reached(week):
    world, _, attempts, _ = week
    by_host: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for attempt in attempts:
        by_host[attempt.target].append((attempt.start, attempt.end))
    peaks = {host: max_overlap(intervals) for host, intervals in by_host.items()}
    assert all(peaks[host] <= world.max_concurrent[host] for host in peaks), peaks
    assert any(peaks[host] == world.max_concurrent[host] for host in peaks), peaks


def test_the_global_cap_is_never_exceeded_and_is_reached(week):
    _, _, attempts, _ = week
    assert max_overlap([(a.start, a.end) for a in attempts]) == GLOBAL_LIMIT


def test_the_same_source_and_target_never_runs_twice_at_once(week):
    _, _, attempts, _ = week
    by_job: dict[tuple[str, str], list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for attempt in attempts:
        by_job[(attempt.source, attempt.target)].append((attempt.start, attempt.end))
    assert max(max_overlap(intervals) for intervals in by_job.values()) == 1


def test_about_five_percent_of_attempts_fail_and_are_retried_no_earlier_than_the_backoff(week):
    _, _, attempts, _ = week
    failures = [a for a in attempts if not a.ok]
    assert 0.02 <= len(failures) / len(attempts) <= 0.10
    by_job: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        by_job[(attempt.source, attempt.target)].append(attempt)
    retried = 0
    for history in by_job.values():
        for failed, following in zip(history, history[1:]):
            if failed.ok:
                continue
            n = failed.failures_before + 1
            assert following.failures_before == n
            assert following.reason == "retry"
            assert following.start - failed.start >= dt.timedelta(seconds=min(4 * 3600, 300 * 2 ** (n - 1)))
            retried += 1
    assert retried >= len(failures) - len(by_job)  # only a job's very last attempt may be unanswered
    assert retried >= 10


def test_start_times_are_spread_over_the_night_window_after_the_first_night(week):
    world, t0, attempts, _ = week
    first_date = t0.astimezone(PARIS).date()
    capacity = sum(world.max_concurrent.values())
    for day in range(1, 7):
        start, end = opening(first_date + day * DAY, NIGHT)
        starts = sorted(a.start for a in attempts
                        if world.window_of[a.source] == NIGHT and a.reason == "due" and start <= a.start < end)
        assert len(starts) >= 60
        assert sum(1 for s in starts if s < start + MINUTE) <= min(capacity, GLOBAL_LIMIT)
        assert sum(1 for s in starts if s < start + dt.timedelta(minutes=30)) <= 0.4 * len(starts)
        assert starts[-1] - starts[0] >= dt.timedelta(minutes=90)


def test_the_simulation_only_calls_select_jobs_when_something_can_change(week):
    _, _, attempts, calls = week
    assert calls < 10 * 24 * 60 // 4
    assert len(attempts) > 700
