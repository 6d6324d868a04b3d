"""Schedule tests: tables of backup + history + now → expected, with explicit datetimes.

Local times are written in Europe/Paris and turned into UTC instants here, so a
table row reads like the operator's clock. Nothing reads or patches the clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest

from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage, Window
from mutualbackup.plan.due import JobState, estimate_seconds, next_attempt, next_due, retry_delay
from mutualbackup.plan.schedule import Job, next_wakeup, select_jobs
from mutualbackup.plan.windows import in_window, jitter_seconds, window_occurrence

PARIS = ZoneInfo("Europe/Paris")
UTC = dt.timezone.utc
SRC = "coopcycle/web1"
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0) -> dt.datetime:
    """The UTC instant of a Paris wall-clock time."""
    return dt.datetime(year, month, day, hour, minute, tzinfo=PARIS, fold=fold).astimezone(UTC)


def window(text: str) -> Window:
    start, end = text.split("-")
    minutes = [int(part[:2]) * 60 + int(part[3:]) for part in (start, end)]
    return Window(minutes[0], minutes[1])


def backup(every: str = "24h", window_text: str | None = "01:00-06:00", estimate: int | None = None) -> Backup:
    seconds = int(every[:-1]) * {"h": 3600, "d": 86400}[every[-1]]
    return Backup(
        paths=("/etc",),
        every=seconds,
        window=window(window_text) if window_text else None,
        estimate=estimate,
    )


def slot(opening: dt.datetime, window_text: str, source: str = SRC) -> dt.datetime:
    """Where the contract puts a source in a window: opening + jitter over its first half."""
    span = window(window_text).length * 60 // 2
    return opening + dt.timedelta(seconds=jitter_seconds(source, span))


# ----------------------------------------------------------------------- windows

IN_WINDOW = [
    ("22:00-04:00", paris(2025, 6, 10, 21, 59), False),
    ("22:00-04:00", paris(2025, 6, 10, 22, 0), True),
    ("22:00-04:00", paris(2025, 6, 10, 23, 59), True),
    ("22:00-04:00", paris(2025, 6, 11, 0, 0), True),
    ("22:00-04:00", paris(2025, 6, 11, 3, 59), True),
    ("22:00-04:00", paris(2025, 6, 11, 4, 0), False),
    ("22:00-04:00", paris(2025, 6, 11, 12, 0), False),
    # spring forward, Sunday 30 March 2025: 02:00 CET jumps to 03:00 CEST
    ("01:00-06:00", paris(2025, 3, 30, 0, 59), False),
    ("01:00-06:00", paris(2025, 3, 30, 1, 0), True),
    ("01:00-06:00", paris(2025, 3, 30, 1, 59), True),
    ("01:00-06:00", paris(2025, 3, 30, 3, 0), True),
    ("01:00-06:00", paris(2025, 3, 30, 5, 59), True),
    ("01:00-06:00", paris(2025, 3, 30, 6, 0), False),
    ("22:00-04:00", paris(2025, 3, 29, 23, 30), True),
    ("22:00-04:00", paris(2025, 3, 30, 3, 30), True),
    ("22:00-04:00", paris(2025, 3, 30, 4, 0), False),
    # a window opening in the skipped hour opens at the jump
    ("02:30-05:00", paris(2025, 3, 30, 1, 59), False),
    ("02:30-05:00", paris(2025, 3, 30, 3, 0), True),
    # a window wholly inside the skipped hour opens at the jump, for its length
    ("02:00-02:30", paris(2025, 3, 30, 1, 59), False),
    ("02:00-02:30", paris(2025, 3, 30, 3, 0), True),
    ("02:00-02:30", paris(2025, 3, 30, 3, 29), True),
    ("02:00-02:30", paris(2025, 3, 30, 3, 30), False),
    # fall back, Sunday 26 October 2025: 03:00 CEST goes back to 02:00 CET
    ("01:00-06:00", paris(2025, 10, 26, 2, 30, fold=0), True),
    ("01:00-06:00", paris(2025, 10, 26, 2, 30, fold=1), True),
    ("01:00-06:00", paris(2025, 10, 26, 5, 59), True),
    ("01:00-06:00", paris(2025, 10, 26, 6, 0), False),
    ("22:00-04:00", paris(2025, 10, 26, 2, 30, fold=1), True),
    ("22:00-04:00", paris(2025, 10, 26, 4, 0), False),
]


@pytest.mark.parametrize(("window_text", "when", "expected"), IN_WINDOW)
def test_in_window_follows_the_local_clock_across_midnight_and_dst_changes(window_text, when, expected):
    assert in_window(backup(window_text=window_text), PARIS, when) is expected


@pytest.mark.parametrize(
    "when", [paris(2025, 3, 30, 2, 30), paris(2025, 6, 1, 12, 0), paris(2025, 10, 26, 2, 30, fold=1)]
)
def test_a_backup_without_window_is_always_in_its_window(when):
    assert in_window(backup(window_text=None), PARIS, when) is True


OCCURRENCES = [
    ("01:00-06:00", dt.date(2025, 6, 10), paris(2025, 6, 10, 1), 5),
    ("01:00-06:00", dt.date(2025, 3, 30), paris(2025, 3, 30, 1), 4),
    ("01:00-06:00", dt.date(2025, 10, 26), paris(2025, 10, 26, 1), 6),
    ("02:30-05:00", dt.date(2025, 3, 30), paris(2025, 3, 30, 3), 2),
    ("22:00-04:00", dt.date(2025, 3, 29), paris(2025, 3, 29, 22), 5),
    ("22:00-04:00", dt.date(2025, 10, 25), paris(2025, 10, 25, 22), 7),
    ("22:00-04:00", dt.date(2025, 10, 26), paris(2025, 10, 26, 22), 6),
]


@pytest.mark.parametrize(("window_text", "date", "start", "hours"), OCCURRENCES)
def test_a_window_occurrence_opens_on_its_local_date_and_lasts_its_real_length(window_text, date, start, hours):
    occurrence = window_occurrence(window(window_text), PARIS, date)
    assert (occurrence.start, occurrence.end - occurrence.start) == (start, dt.timedelta(hours=hours))


def test_a_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        in_window(backup(), PARIS, dt.datetime(2025, 6, 1, 2, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_due(SRC, backup(), None, PARIS, dt.datetime(2025, 6, 1, 2, 0))


# ------------------------------------------------------------------------ jitter


def test_jitter_is_the_same_on_every_call():
    assert [jitter_seconds(SRC, 9000) for _ in range(3)] == [jitter_seconds(SRC, 9000)] * 3


@pytest.mark.parametrize("span", [1, 2, 60, 3600, 9000, 86400])
def test_jitter_stays_within_its_span(span):
    values = [jitter_seconds(f"member{i}/node{i}", span) for i in range(200)]
    assert all(0 <= value < span for value in values)


def test_jitter_differs_from_one_source_to_the_next_and_covers_the_span():
    values = [jitter_seconds(f"member{i % 10}/node{i}", 9000) for i in range(50)]
    assert len(set(values)) >= 45
    assert min(values) < 9000 * 0.2 and max(values) > 9000 * 0.8


def test_jitter_refuses_an_empty_span():
    with pytest.raises(ValueError):
        jitter_seconds(SRC, 0)


# ---------------------------------------------------------------------- next_due

NEXT_DUE = [
    # (case, backup, last_success, now, expected)
    ("never backed up inside the window is due since the window opened",
     backup(), None, paris(2025, 6, 10, 3, 12), paris(2025, 6, 10, 1, 0)),
    ("never backed up outside the window is due when the next one opens",
     backup(), None, paris(2025, 6, 10, 12, 0), paris(2025, 6, 11, 1, 0)),
    ("never backed up after midnight in a window that crossed midnight",
     backup(window_text="22:00-04:00"), None, paris(2025, 6, 11, 2, 0), paris(2025, 6, 10, 22, 0)),
    ("never backed up before a window that crosses midnight",
     backup(window_text="22:00-04:00"), None, paris(2025, 6, 10, 21, 0), paris(2025, 6, 10, 22, 0)),
    ("daily after a run at its slot is the slot of the next night",
     backup(), slot(paris(2025, 6, 10, 1), "01:00-06:00"), paris(2025, 6, 10, 12),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("daily after a late run at the end of the window does not skip a night",
     backup(), paris(2025, 6, 10, 5, 50), paris(2025, 6, 10, 12), slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("daily after a manual run in the afternoon keeps the night rhythm",
     backup(), paris(2025, 6, 10, 14, 0), paris(2025, 6, 10, 14, 5), slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("daily after a run just after midnight in a window crossing midnight is the next evening",
     backup(window_text="22:00-04:00"), paris(2025, 6, 11, 3, 0), paris(2025, 6, 11, 12),
     slot(paris(2025, 6, 11, 22), "22:00-04:00")),
    ("daily on the night clocks spring forward",
     backup(), slot(paris(2025, 3, 29, 1), "01:00-06:00"), paris(2025, 3, 29, 12),
     slot(paris(2025, 3, 30, 1), "01:00-06:00")),
    ("daily the night after clocks spring forward",
     backup(), slot(paris(2025, 3, 30, 1), "01:00-06:00"), paris(2025, 3, 30, 12),
     slot(paris(2025, 3, 31, 1), "01:00-06:00")),
    ("daily on the night clocks fall back",
     backup(), slot(paris(2025, 10, 25, 1), "01:00-06:00"), paris(2025, 10, 25, 12),
     slot(paris(2025, 10, 26, 1), "01:00-06:00")),
    ("daily the night after clocks fall back",
     backup(), slot(paris(2025, 10, 26, 1), "01:00-06:00"), paris(2025, 10, 26, 12),
     slot(paris(2025, 10, 27, 1), "01:00-06:00")),
    ("daily crossing midnight over the spring-forward night",
     backup(window_text="22:00-04:00"), paris(2025, 3, 29, 23, 0), paris(2025, 3, 30, 12),
     slot(paris(2025, 3, 30, 22), "22:00-04:00")),
    ("weekly comes back the same weekday a week later, across a DST change",
     backup(every="7d"), slot(paris(2025, 3, 27, 1), "01:00-06:00"), paris(2025, 3, 27, 12),
     slot(paris(2025, 4, 3, 1), "01:00-06:00")),
    ("every 6 hours without a window is six hours after the last success",
     backup(every="6h", window_text=None), paris(2025, 6, 10, 10, 17), paris(2025, 6, 10, 11),
     paris(2025, 6, 10, 16, 17)),
    ("every 2 hours repeats inside the window",
     backup(every="2h"), paris(2025, 6, 10, 1, 30), paris(2025, 6, 10, 2), paris(2025, 6, 10, 3, 30)),
    ("every 2 hours waits for the next night once the window has closed",
     backup(every="2h"), paris(2025, 6, 10, 4, 30), paris(2025, 6, 10, 5),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("every 6 hours with a window shorter than 6 hours runs once a night",
     backup(every="6h"), paris(2025, 6, 10, 2, 0), paris(2025, 6, 10, 3),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
]


@pytest.mark.parametrize(("backup_", "last_success", "now", "expected"), [row[1:] for row in NEXT_DUE],
                         ids=[row[0] for row in NEXT_DUE])
def test_the_next_due_time_is_the_one_in_the_table(backup_, last_success, now, expected):
    assert next_due(SRC, backup_, last_success, PARIS, now) == expected


def test_first_runs_without_window_are_spread_over_the_hour_and_stay_put_within_it():
    hour = paris(2025, 6, 10, 10, 0)
    b = backup(window_text=None)
    names = [f"member{i % 10}/node{i}" for i in range(50)]
    early = [next_due(name, b, None, PARIS, hour) for name in names]
    late = [next_due(name, b, None, PARIS, hour + 59 * MINUTE) for name in names]
    assert early == late
    assert all(hour <= due < hour + HOUR for due in early)
    assert len(set(early)) >= 45


def test_a_slot_stays_inside_a_window_shortened_by_the_spring_forward_jump():
    # 01:30-03:00 lasts 30 min on 30 March 2025 (01:30 CET to the jump), but its
    # jitter spans 45 min: later slots are pulled back inside.
    b = backup(window_text="01:30-03:00")
    names = [f"member{i}/node{i}" for i in range(40)]
    assert any(jitter_seconds(name, 45 * 60) >= 30 * 60 for name in names)
    for name in names:
        due = next_due(name, b, paris(2025, 3, 29, 1, 30), PARIS, paris(2025, 3, 29, 12))
        assert paris(2025, 3, 30, 1, 30) <= due < paris(2025, 3, 30, 3, 0), name


def _occurrence_date(start: dt.datetime, window_text: str) -> dt.date:
    local = start.astimezone(PARIS)
    crosses = window_text.startswith("22")
    return local.date() - DAY if crosses and local.hour < 12 else local.date()


def _window_end(date: dt.date, window_text: str) -> dt.datetime:
    crosses = window_text.startswith("22")
    end_hour = int(window_text[6:8])
    end_date = date + DAY if crosses else date
    return paris(end_date.year, end_date.month, end_date.day, end_hour)


@pytest.mark.parametrize("window_text", ["01:00-06:00", "22:00-04:00"])
@pytest.mark.parametrize("lateness", ["on time", "sometimes delayed", "always at the end of the window"])
def test_a_daily_backup_stays_daily_over_30_days_across_dst(window_text, lateness):
    b = backup(window_text=window_text)
    delays = [dt.timedelta(0), 45 * MINUTE, dt.timedelta(0), 10 * MINUTE, 60 * MINUTE]
    last = None
    now = paris(2025, 3, 14, 12, 0)
    dates, starts = [], []
    for day in range(30):
        due = next_due(SRC, b, last, PARIS, now)
        if lateness == "sometimes delayed":
            start = due + delays[day % len(delays)]
        elif lateness == "always at the end of the window":
            start = _window_end(_occurrence_date(due, window_text), window_text) - 5 * MINUTE
        else:
            start = due
        assert in_window(b, PARIS, start), start
        dates.append(_occurrence_date(start, window_text))
        starts.append(start)
        last, now = start, start + 20 * MINUTE
    first = dates[0]
    assert dates == [first + i * DAY for i in range(30)]
    assert max(b - a for a, b in zip(starts, starts[1:])) <= dt.timedelta(hours=29)


def test_a_weekly_backup_comes_back_every_seven_days_for_eight_weeks():
    b = backup(every="7d")
    last, now, dates = None, paris(2025, 3, 1, 12), []
    for _ in range(8):
        start = next_due(SRC, b, last, PARIS, now)
        dates.append(start.astimezone(PARIS).date())
        last, now = start, start + HOUR
    assert [later - earlier for earlier, later in zip(dates, dates[1:])] == [7 * DAY] * 7


def test_every_six_hours_without_window_runs_four_times_a_day():
    b = backup(every="6h", window_text=None)
    last = paris(2025, 3, 29, 20, 0)
    starts = []
    for _ in range(8):
        last = next_due(SRC, b, last, PARIS, last)
        starts.append(last)
    assert [s - paris(2025, 3, 29, 20, 0) for s in starts] == [dt.timedelta(hours=6 * i) for i in range(1, 9)]


# ----------------------------------------------------------------------- retries


def test_retry_delay_doubles_from_five_minutes_up_to_four_hours():
    assert [retry_delay(n) for n in range(0, 10)] == [0, 300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]


def test_retry_delay_takes_its_base_and_cap_and_survives_huge_failure_counts():
    assert [retry_delay(n, base=60, cap=200) for n in (1, 2, 3, 4)] == [60, 120, 200, 200]
    assert retry_delay(10_000) == 4 * 3600


def test_a_failing_job_is_retried_with_growing_delays_forever():
    b = backup(window_text=None)
    state = JobState(SRC, "b/host", last_success=paris(2025, 6, 9, 1), consecutive_failures=0)
    now = paris(2025, 6, 10, 1)
    gaps = []
    for _ in range(12):
        start = next_attempt(SRC, b, state, PARIS, now)
        if state.last_attempt is not None and state.consecutive_failures:
            gaps.append((start - state.last_attempt).total_seconds())
        state = replace(state, last_attempt=start, consecutive_failures=state.consecutive_failures + 1)
        now = start
    assert gaps == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400, 14400, 14400]


NEXT_ATTEMPT = [
    ("after one failure inside the window it retries five minutes later",
     backup(), JobState(SRC, "b/h", paris(2025, 6, 9, 1, 30), paris(2025, 6, 10, 1, 30), 1),
     paris(2025, 6, 10, 1, 35)),
    ("after three failures it retries twenty minutes later",
     backup(), JobState(SRC, "b/h", paris(2025, 6, 9, 1, 30), paris(2025, 6, 10, 2, 0), 3),
     paris(2025, 6, 10, 2, 20)),
    ("a retry that would fall after the window waits for the next window",
     backup(), JobState(SRC, "b/h", paris(2025, 6, 9, 1, 30), paris(2025, 6, 10, 5, 50), 2),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("a source that never succeeded is retried too",
     backup(), JobState(SRC, "b/h", None, paris(2025, 6, 10, 1, 0), 1), paris(2025, 6, 10, 1, 5)),
    ("a source failing for days is still retried, at most four hours apart",
     backup(window_text=None), JobState(SRC, "b/h", paris(2025, 6, 1, 1), paris(2025, 6, 10, 1), 60),
     paris(2025, 6, 10, 5)),
    ("a failed manual run does not make a backup due before its time",
     backup(window_text=None), JobState(SRC, "b/h", paris(2025, 6, 10, 1), paris(2025, 6, 10, 14), 1),
     paris(2025, 6, 11, 1)),
    ("a success after failures clears the retry",
     backup(), JobState(SRC, "b/h", paris(2025, 6, 10, 2), paris(2025, 6, 10, 2), 0),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
    ("a failure count older than the last success is ignored",
     backup(), JobState(SRC, "b/h", paris(2025, 6, 10, 2), paris(2025, 6, 10, 1, 30), 4),
     slot(paris(2025, 6, 11, 1), "01:00-06:00")),
]


@pytest.mark.parametrize(("backup_", "state", "expected"), [row[1:] for row in NEXT_ATTEMPT],
                         ids=[row[0] for row in NEXT_ATTEMPT])
def test_the_next_attempt_is_the_one_in_the_table(backup_, state, expected):
    assert next_attempt(SRC, backup_, state, PARIS, paris(2025, 6, 10, 15)) == expected


# ---------------------------------------------------------------------- estimate

ESTIMATES = [
    (1024**3, 100_000_000, 1024**3 * 8 / 100_000_000),
    (10 * 1024**3, 1_000_000_000, 10 * 1024**3 * 8 / 1_000_000_000),
    (0, 100_000_000, 0.0),
    (None, 100_000_000, 600.0),
    (1024**3, None, 600.0),
    (1024**3, 0, 600.0),
]


@pytest.mark.parametrize(("size", "bandwidth", "expected"), ESTIMATES)
def test_estimate_is_size_over_bandwidth_or_ten_minutes_when_unknown(size, bandwidth, expected):
    assert estimate_seconds(size, bandwidth) == pytest.approx(expected)


# ------------------------------------------------------------------ select_jobs

GIB = 1024**3
MBIT = 1_000_000


def node(name: str, *, backup_: Backup | None = None, storage: Storage | None = None) -> Node:
    member, slug = name.split("/")
    return Node(member=member, slug=slug, address="192.0.2.1", port=22, user="mutualbackup",
                host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
                backup=backup_, storage=storage)


def federation(*nodes: Node) -> Federation:
    members: dict[str, list[Node]] = {}
    for n in nodes:
        members.setdefault(n.member, []).append(n)
    return Federation(
        name="test",
        coordinator=Coordinator(ssh_key="/etc/mutualbackup/id_ed25519", state="/var/lib/mutualbackup",
                                timezone="Europe/Paris"),
        members=tuple(Member(name=m, contact=f"ops@{m}.example", site=m, nodes=tuple(ns))
                      for m, ns in members.items()),
    )


def host(name: str, max_concurrent: int, bandwidth_mbit: int | None = 100) -> Node:
    return node(name, storage=Storage(path="/srv/mb", capacity=1000 * GIB, max_concurrent=max_concurrent,
                                      bandwidth=bandwidth_mbit * MBIT if bandwidth_mbit else None))


def source(name: str, estimate_gib: int | None = None, window_text: str | None = None) -> Node:
    estimate = estimate_gib * GIB if estimate_gib else None
    return node(name, backup_=backup(window_text=window_text, estimate=estimate))


NOW = paris(2025, 6, 10, 12, 0)


def done(src: str, target: str, hours_ago: float) -> JobState:
    """A job whose last success started ``hours_ago`` before NOW (due 24 h after it)."""
    return JobState(src, target, last_success=NOW - dt.timedelta(hours=hours_ago),
                    last_attempt=NOW - dt.timedelta(hours=hours_ago))


def running(src: str, target: str) -> JobState:
    return replace(done(src, target, 1), running=True)


def overdue(placements: dict[str, list[str]], hours_ago: float = 25) -> dict[tuple[str, str], JobState]:
    """Every placed job last backed up ``hours_ago`` before NOW: due since NOW - (hours_ago - 24) h."""
    return {(s, t): done(s, t, hours_ago) for s, targets in placements.items() for t in targets}


def pairs(jobs: list[Job]) -> list[tuple[str, str]]:
    return [(job.source, job.target) for job in jobs]


def test_a_host_never_gets_more_jobs_than_its_max_concurrent_counting_running_ones():
    fed = federation(host("h/big", 2), *(source(f"a/s{i}") for i in range(4)))
    placements = {f"a/s{i}": ["h/big"] for i in range(4)}
    states = overdue(placements) | {("a/s0", "h/big"): running("a/s0", "h/big")}
    jobs = select_jobs(fed, placements, states, NOW, PARIS, global_limit=10)
    assert pairs(jobs) == [("a/s1", "h/big")]


def test_a_running_source_and_target_is_never_started_twice():
    fed = federation(host("h/one", 3), host("h/two", 3), source("a/s0"))
    placements = {"a/s0": ["h/one", "h/two", "h/one"]}
    states = overdue({"a/s0": ["h/two"]}) | {
        ("a/s0", "h/one"): replace(running("a/s0", "h/one"), last_success=NOW - 10 * DAY)}
    assert pairs(select_jobs(fed, placements, states, NOW, PARIS)) == [("a/s0", "h/two")]
    assert pairs(select_jobs(fed, placements, overdue({"a/s0": ["h/one", "h/two"]}), NOW, PARIS)) == [
        ("a/s0", "h/one"), ("a/s0", "h/two")]


def test_the_global_limit_counts_running_jobs():
    fed = federation(*(host(f"h{i}/h", 3) for i in range(3)), *(source(f"a/s{i}") for i in range(6)))
    placements = {f"a/s{i}": [f"h{i % 3}/h"] for i in range(6)}
    idle = overdue(placements)
    states = idle | {("a/s0", "h0/h"): running("a/s0", "h0/h"), ("a/s1", "h1/h"): running("a/s1", "h1/h")}
    assert len(select_jobs(fed, placements, states, NOW, PARIS, global_limit=3)) == 1
    assert len(select_jobs(fed, placements, states, NOW, PARIS, global_limit=2)) == 0
    assert len(select_jobs(fed, placements, idle, NOW, PARIS)) == 4


def test_jobs_come_most_overdue_first_then_longest_then_by_name():
    fed = federation(host("h/slow", 9, 100), host("h/fast", 9, 1000),
                     source("a/old", 1), source("a/big", 50), source("a/small", 1), source("a/twin", 1))
    placements = {"a/old": ["h/slow"], "a/big": ["h/slow", "h/fast"], "a/small": ["h/slow"], "a/twin": ["h/slow"]}
    states = {
        ("a/old", "h/slow"): done("a/old", "h/slow", 30),
        ("a/big", "h/slow"): done("a/big", "h/slow", 25),
        ("a/big", "h/fast"): done("a/big", "h/fast", 25),
        ("a/small", "h/slow"): done("a/small", "h/slow", 25),
        ("a/twin", "h/slow"): done("a/twin", "h/slow", 25),
    }
    jobs = select_jobs(fed, placements, states, NOW, PARIS, global_limit=10)
    assert pairs(jobs) == [("a/old", "h/slow"), ("a/big", "h/slow"), ("a/big", "h/fast"),
                           ("a/small", "h/slow"), ("a/twin", "h/slow")]
    assert jobs[0].due == NOW - dt.timedelta(hours=6)
    assert jobs[1].estimated_seconds == pytest.approx(50 * GIB * 8 / (100 * MBIT))
    assert jobs[2].estimated_seconds == pytest.approx(50 * GIB * 8 / (1000 * MBIT))


def test_measured_sizes_win_over_the_estimate_for_ordering():
    fed = federation(host("h/h", 9), source("a/x", 1), source("a/y", 2))
    placements = {"a/x": ["h/h"], "a/y": ["h/h"]}
    states = overdue(placements)
    assert pairs(select_jobs(fed, placements, states, NOW, PARIS)) == [("a/y", "h/h"), ("a/x", "h/h")]
    jobs = select_jobs(fed, placements, states, NOW, PARIS, sizes={"a/x": 5 * GIB})
    assert pairs(jobs) == [("a/x", "h/h"), ("a/y", "h/h")]


def test_a_job_blocked_by_a_limit_stays_due_and_starts_once_a_slot_frees():
    fed = federation(host("h/h", 1), source("a/x"), source("a/y"))
    placements = {"a/x": ["h/h"], "a/y": ["h/h"]}
    states = {("a/x", "h/h"): done("a/x", "h/h", 26), ("a/y", "h/h"): done("a/y", "h/h", 25)}
    first = select_jobs(fed, placements, states, NOW, PARIS)
    assert pairs(first) == [("a/x", "h/h")]
    states[("a/x", "h/h")] = replace(states[("a/x", "h/h")], running=True)
    later = NOW + 3 * HOUR
    assert select_jobs(fed, placements, states, later, PARIS) == []
    states[("a/x", "h/h")] = JobState("a/x", "h/h", last_success=NOW, last_attempt=NOW)
    again = select_jobs(fed, placements, states, later + HOUR, PARIS)
    assert again == [Job("a/y", "h/h", "due", NOW - HOUR, 600.0)]


def test_jobs_not_due_or_outside_their_window_are_not_selected():
    fed = federation(host("h/h", 9), source("a/fresh"), source("a/night", window_text="01:00-06:00"),
                     source("a/new", window_text="08:00-18:00"), source("a/later", window_text="13:00-18:00"))
    placements = {"a/fresh": ["h/h"], "a/night": ["h/h"], "a/new": ["h/h"], "a/later": ["h/h"]}
    states = {("a/fresh", "h/h"): done("a/fresh", "h/h", 2), ("a/night", "h/h"): done("a/night", "h/h", 40)}
    assert pairs(select_jobs(fed, placements, states, NOW, PARIS)) == [("a/new", "h/h")]


def test_the_reason_says_never_due_or_retry():
    fed = federation(host("h/h", 9), source("a/new", window_text="08:00-18:00"), source("a/old"), source("a/bad"))
    placements = {"a/new": ["h/h"], "a/old": ["h/h"], "a/bad": ["h/h"]}
    states = {
        ("a/old", "h/h"): done("a/old", "h/h", 25),
        ("a/bad", "h/h"): JobState("a/bad", "h/h", NOW - 30 * HOUR, NOW - HOUR, 2),
    }
    reasons = {job.source: job.reason for job in select_jobs(fed, placements, states, NOW, PARIS)}
    assert reasons == {"a/new": "never", "a/old": "due", "a/bad": "retry"}


def test_max_per_source_keeps_a_source_to_one_replica_at_a_time_when_asked():
    fed = federation(host("h/one", 9), host("h/two", 9), source("a/x"))
    placements = {"a/x": ["h/one", "h/two"]}
    idle = overdue(placements)
    assert len(select_jobs(fed, placements, idle, NOW, PARIS)) == 2
    assert pairs(select_jobs(fed, placements, idle, NOW, PARIS, max_per_source=1)) == [("a/x", "h/one")]
    states = idle | {("a/x", "h/one"): JobState("a/x", "h/one", running=True)}
    assert select_jobs(fed, placements, states, NOW, PARIS, max_per_source=1) == []


def test_unplaced_sources_and_unknown_targets_are_ignored():
    fed = federation(host("h/h", 9), source("a/placed"), source("a/unplaced"))
    placements = {"a/placed": ["h/h", "gone/host"], "ghost/node": ["h/h"]}
    states = overdue({"a/placed": ["h/h", "gone/host"], "a/unplaced": ["h/h"], "ghost/node": ["h/h"]})
    assert pairs(select_jobs(fed, placements, states, NOW, PARIS)) == [("a/placed", "h/h")]


# ------------------------------------------------------------------ next_wakeup


def test_next_wakeup_is_the_earliest_future_due_time():
    fed = federation(host("h/h", 9), source("a/x"), source("a/y"))
    placements = {"a/x": ["h/h"], "a/y": ["h/h"]}
    states = {("a/x", "h/h"): done("a/x", "h/h", 20), ("a/y", "h/h"): done("a/y", "h/h", 22)}
    assert next_wakeup(fed, placements, states, NOW, PARIS) == NOW + 2 * HOUR


def test_next_wakeup_is_the_window_opening_for_an_overdue_job_outside_its_window():
    fed = federation(host("h/h", 9), source("a/night", window_text="01:00-06:00"))
    states = {("a/night", "h/h"): done("a/night", "h/h", 40)}
    assert next_wakeup(fed, {"a/night": ["h/h"]}, states, NOW, PARIS) == paris(2025, 6, 11, 1)


def test_next_wakeup_ignores_jobs_due_now_and_running_ones():
    fed = federation(host("h/h", 9), source("a/x"), source("a/y"))
    placements = {"a/x": ["h/h"], "a/y": ["h/h"]}
    states = {("a/x", "h/h"): done("a/x", "h/h", 25), ("a/y", "h/h"): running("a/y", "h/h")}
    assert next_wakeup(fed, placements, states, NOW, PARIS) is None


def test_a_remembered_next_attempt_is_the_one_computed_at_every_moment() -> None:
    """The daemon remembers next attempts between ticks (plan/due.py): whatever the moment it is asked, a
    remembered one equals what next_attempt computes then, for replicas that succeeded, failed, or never ran."""
    import random

    from mutualbackup.plan.due import remembered_next_attempt

    rng = random.Random(3)
    memo: dict = {}
    backups = [backup(), backup("6h"), backup("24h", None), backup("3h", "22:00-04:00")]
    start = paris(2025, 3, 28)
    for _ in range(3000):
        chosen = rng.choice(backups)
        success = start + dt.timedelta(hours=rng.randint(0, 200)) if rng.random() < 0.8 else None
        failures = rng.choice((0, 0, 1, 3))
        attempt = (success or start) + dt.timedelta(minutes=rng.randint(1, 600)) if failures else success
        state = JobState(SRC, rng.choice(("a/st", "b/st")), success, attempt, failures)
        now = start + dt.timedelta(minutes=rng.randint(0, 20000))  # across the spring DST change
        assert remembered_next_attempt(memo, SRC, chosen, state, PARIS, now) == next_attempt(SRC, chosen, state, PARIS, now)
    assert memo  # it did remember


def test_the_daemon_runs_as_many_jobs_at_once_as_the_hosts_take_between_8_and_256() -> None:
    from mutualbackup.plan.schedule import global_limit_for

    def hosts(count: int, each: int) -> Federation:
        members = tuple(Member(f"m{i}", "", "s", (Node(member=f"m{i}", slug="st", address="192.0.2.1", port=22, user="u",
                                                       host_key="ssh-ed25519 AAAA", site="s",
                                                       storage=Storage(path="/srv", capacity=1, max_concurrent=each)),))
                        for i in range(count))
        return Federation("f", Coordinator("/k", "/s"), members)

    assert global_limit_for(hosts(2, 2)) == 8  # a small federation keeps the floor
    assert global_limit_for(hosts(10, 3)) == 30
    assert global_limit_for(hosts(1000, 2)) == 256  # the coordinator's threads and sessions, bounded
