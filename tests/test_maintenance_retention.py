"""plan_prune: which archives borg prune keeps, by hand-worked tables and against borg's own code."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import random
from dataclasses import dataclass

import pytest

from mutualbackup.borg import ArchiveEntry
from mutualbackup.inventory.model import Retention
from mutualbackup.plan.retention import plan_prune

UTC = dt.timezone.utc


def archives(*stamps: str) -> list[ArchiveEntry]:
    return [ArchiveEntry(f"web-{s}", dt.datetime.fromisoformat(s).replace(tzinfo=UTC), "") for s in stamps]


def kept(plan) -> set[str]:
    return {name.removeprefix("web-") for name in plan.keep}


def test_daily_keeps_the_newest_archive_of_each_of_the_last_days() -> None:
    plan = plan_prune(archives("2025-03-10T09:00", "2025-03-10T18:00", "2025-03-11T10:00", "2025-03-09T23:59"),
                      Retention(daily=2))
    assert kept(plan) == {"2025-03-11T10:00", "2025-03-10T18:00"}
    assert plan.delete == ("web-2025-03-10T09:00", "web-2025-03-09T23:59")


def test_rules_skip_archives_an_earlier_rule_kept_and_the_list_ending_keeps_the_oldest() -> None:
    plan = plan_prune(archives("2025-01-15T10:00", "2025-02-10T10:00", "2025-03-03T10:00", "2025-03-05T10:00",
                               "2025-03-10T09:00", "2025-03-10T18:00", "2025-03-11T10:00"),
                      Retention(daily=2, weekly=2, monthly=2))
    assert kept(plan) == {"2025-03-11T10:00", "2025-03-10T18:00", "2025-03-05T10:00", "2025-02-10T10:00",
                          "2025-01-15T10:00"}
    assert plan.keep["web-2025-01-15T10:00"] == "monthly #1"


def test_a_rule_that_runs_out_of_archives_keeps_the_oldest_one() -> None:
    plan = plan_prune(archives("2025-03-10T09:00", "2025-03-10T10:00", "2025-03-10T11:00"), Retention(daily=3))
    assert kept(plan) == {"2025-03-10T11:00", "2025-03-10T09:00"}
    assert plan.keep["web-2025-03-10T09:00"] == "daily[oldest] #2"


def test_checkpoints_are_deleted_unless_the_newest_one_is_newer_than_every_archive() -> None:
    entries = archives("2025-03-10T09:00", "2025-03-11T09:00") + [
        ArchiveEntry("web-2025-03-10T08:00.checkpoint", dt.datetime(2025, 3, 10, 8, tzinfo=UTC), ""),
        ArchiveEntry("web-2025-03-12T08:00.checkpoint", dt.datetime(2025, 3, 12, 8, tzinfo=UTC), ""),
    ]
    plan = plan_prune(entries, Retention(daily=7))
    assert set(plan.keep) == {"web-2025-03-10T09:00", "web-2025-03-11T09:00", "web-2025-03-12T08:00.checkpoint"}
    assert plan.delete == ("web-2025-03-10T08:00.checkpoint",)


def test_explains_lists_the_removed_archives_the_plan_does_not_delete() -> None:
    plan = plan_prune(archives("2025-03-10T09:00", "2025-03-10T18:00"), Retention(daily=1))
    assert plan.explains({"web-2025-03-10T09:00"}) == set()
    assert plan.explains({"web-2025-03-10T18:00"}) == {"web-2025-03-10T18:00"}


# --- the same answers as borg's own code --------------------------------------------------


@dataclass(frozen=True)
class BorgArchive:
    name: str
    ts: dt.datetime
    id: bytes


def borg_prune(entries: list[ArchiveEntry], retention: Retention) -> set[str]:
    """What borg 1.4's do_prune keeps, using its own prune_split (run with TZ=UTC, as we run borg)."""
    helpers = pytest.importorskip("borg.helpers")
    import re

    items = sorted((BorgArchive(e.name, e.time, e.name.encode()) for e in entries), key=lambda a: a.ts, reverse=True)
    is_checkpoint = re.compile(r"(\.checkpoint(\.\d+)?)\Z").search
    checkpoints = [a for a in items if is_checkpoint(a.name)]
    keep_checkpoints = checkpoints[:1] if items and checkpoints and items[0] is checkpoints[0] else []
    complete = [a for a in items if a not in checkpoints]
    keep: list[BorgArchive] = []
    kept_because: dict = {}
    for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
        count = getattr(retention, rule)
        if count:
            keep += helpers.prune_split(complete, rule, count, kept_because)
    return {a.name for a in keep + keep_checkpoints}


@pytest.fixture
def utc_local_time(monkeypatch: pytest.MonkeyPatch):
    """borg computes periods in local time; the coordinator runs borg with TZ=UTC."""
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_plan_prune_keeps_what_borgs_own_prune_keeps_on_random_histories(utc_local_time) -> None:
    rng = random.Random(1234)
    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    for _ in range(300):
        offsets = sorted(rng.sample(range(0, 400 * 24 * 60), rng.randint(0, 40)))
        entries = [ArchiveEntry(f"web-{i}", start + dt.timedelta(minutes=m), "") for i, m in enumerate(offsets)]
        for i in rng.sample(range(len(entries)), min(len(entries), rng.randint(0, 3))):
            entries[i] = ArchiveEntry(entries[i].name + ".checkpoint", entries[i].time, "")
        retention = Retention(**{rule: rng.choice((0, 0, 1, 2, 3, 7)) for rule in ("hourly", "daily", "weekly", "monthly", "yearly")})
        if not retention.prune_flags():
            retention = Retention(daily=1)
        assert set(plan_prune(entries, retention).keep) == borg_prune(entries, retention), (retention, entries)


def test_archives_started_in_the_same_instant_keep_borgs_order_as_borgs_stable_sort_does(utc_local_time) -> None:
    same = dt.datetime(2025, 3, 10, 9, 0, 0, 123456, tzinfo=UTC)
    for names in (("web-a", "web-b"), ("web-b", "web-a")):
        entries = [ArchiveEntry(name, same, "") for name in names]
        plan = plan_prune(entries, Retention(daily=1))
        assert set(plan.keep) == {names[0]}  # the first listed, not the greatest name
        if importlib.util.find_spec("borg") is not None:
            assert set(plan.keep) == borg_prune(entries, Retention(daily=1))


def test_a_listing_keeps_borgs_order_for_archives_started_in_the_same_instant() -> None:
    from mutualbackup.borg import parse_list_json
    listing = {"archives": [{"archive": name, "start": "2025-03-10T09:00:00.123456", "id": name}
                            for name in ("web-b", "web-a")]}
    assert [a.name for a in parse_list_json(json.dumps(listing).encode())] == ["web-b", "web-a"]
