"""The metrics, from a real SQLite history and an inventory: names, types and labels as
SPEC.md says, the healthy definition as a table, counters kept incrementally, no secret
and no path exported, and the /metrics server."""

from __future__ import annotations

import gzip
import re
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mutualbackup.report.prometheus_text import Family, render_text
from mutualbackup.state.history import History
from mutualbackup.inventory.load import load_inventory
from lab.federation import free_port
from mutualbackup.report.ledger import compute_ledger
from mutualbackup.report.metrics import (
    FederationMetrics, MetricsSource, ReplicaFacts, build_registry, read_ledger, replica_healthy, start_metrics_server,
)
from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage
from mutualbackup.state.metrics_queries import DURATION_BUCKETS, RunTotals, read_replica_facts, read_running

from tests.test_monitoring_rules import SPEC, SPEC_METRICS

GiB = 1024**3
HOUR = 3600.0
NOW = 1_750_000_000.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
VALID = Path(__file__).parent / "inventories" / "three-members"
# Metric types (SPEC.md's "type" column); every other metric of the table is a gauge.
NOT_GAUGES = {"mutualbackup_backup_runs_total": "counter", "mutualbackup_backup_duration_seconds": "histogram"}


# --------------------------------------------------------------------------- helpers
def node(member: str, slug: str, *, source: bool = False, host: int | None = None, rpo: float = 26 * HOUR) -> Node:
    return Node(member=member, slug=slug, address="127.0.0.1", port=22, user="mb", host_key=KEY, site=member,
                backup=Backup(paths=("/srv/secret-data",), rpo=int(rpo)) if source else None,
                storage=Storage(path="/srv/lent-disk", capacity=host * GiB) if host else None)


def federation(*nodes: Node) -> Federation:
    members: dict[str, list[Node]] = {}
    for n in nodes:
        members.setdefault(n.member, []).append(n)
    return Federation("f", Coordinator("/k", "/s"), tuple(Member(m, "", m, tuple(ns)) for m, ns in members.items()))


# a/web is backed up on b/st and c/st, b/app on c/st and d/st.
FED = federation(
    node("a", "web", source=True), node("b", "st", host=100), node("c", "st", host=200), node("d", "st", host=300),
    node("b", "app", source=True),
)
PLACEMENT = {"a/web": ("b/st", "c/st"), "b/app": ("c/st", "d/st")}


def record(history: History, kind: str, source: str, target: str, started: float, result: str, *,
           seconds: float = 60.0, size: int | None = None, archive: tuple[int, int, int] | None = None,
           error: str | None = None, name: str | None = None, detail: dict | None = None) -> int:
    """One run in the history; ``result`` "running" leaves it running (by this live process)."""
    run_id = history.start_run(kind, source, target, started=started)
    if result != "running":
        o, c, d = archive or (None, None, None)
        history.finish_run(run_id, result, ended=started + seconds, repository_bytes=size, original_bytes=o,
                           compressed_bytes=c, deduplicated_bytes=d, error=error, archive=name, detail=detail)
    return run_id


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def set_pid(history: History, run_id: int, pid: int) -> None:
    with sqlite3.connect(history.path) as db:
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", (pid, run_id))


def metrics_of(history: History, fed: Federation = FED, placement=PLACEMENT, now: float = NOW) -> FederationMetrics:
    return FederationMetrics(MetricsSource(history, fed, placement=lambda: placement, clock=lambda: now))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def history(tmp_path: Path) -> History:
    h = History(tmp_path / "state")
    h.set_placement(PLACEMENT, now=NOW - 100 * HOUR)
    yield h
    h.close()


def full_history(history: History) -> None:
    """Runs of every kind, so that every metric has samples."""
    record(history, "backup", "a/web", "b/st", NOW - 30 * HOUR, "success", size=5 * GiB, archive=(10, 8, 2))
    record(history, "backup", "a/web", "b/st", NOW - 5 * HOUR, "warning", seconds=700, size=6 * GiB, archive=(11, 9, 3))
    record(history, "prune", "a/web", "b/st", NOW - 5 * HOUR + 700, "success", size=4 * GiB)
    record(history, "backup", "a/web", "c/st", NOW - 4 * HOUR, "failure", seconds=5, error="ssh: connect to /srv/x refused")
    record(history, "repo-check", "a/web", "b/st", NOW - 3 * HOUR, "success")
    record(history, "check", "a/web", "b/st", NOW - 3 * HOUR + 60, "success")
    record(history, "drill", "a/web", "b/st", NOW - 2 * HOUR, "success")
    record(history, "backup", "b/app", "c/st", NOW - 1 * HOUR, "success", size=GiB, archive=(3, 2, 1))
    record(history, "backup", "b/app", "d/st", NOW - 60, "running")
    record(history, "compact", "a/web", "b/st", NOW - 3 * HOUR + 120, "failure", detail={"refused": True})


# --------------------------------------------------------------------------- the contract
def spec_types() -> dict[str, str]:
    """metric -> type from SPEC.md's table (histograms and counters by their family name)."""
    types = {}
    for line in SPEC.read_text().splitlines():
        if line.startswith("| `mutualbackup_"):
            names_cell, kind = [cell.strip() for cell in line.strip("|").split("|")][:2]
            names = re.findall(r"`([^`]+)`", names_cell)
            prefix = names[0].rsplit("_", 2)[0]  # ..._original_bytes -> mutualbackup_archive
            for name in names:
                full = name if name.startswith("mutualbackup_") else prefix + name
                types[full] = kind.split()[0]
    return types


def test_the_type_table_of_this_test_is_the_spec_one():
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not beside the repository")
    types = spec_types()
    assert {name: kind for name, kind in types.items() if kind != "gauge"} == NOT_GAUGES
    assert set(types) == {re.sub(r"_(bucket|sum|count)$", "", name) for name in SPEC_METRICS}


@pytest.mark.parametrize("exposition", ["own server", "prometheus_client"])
def test_every_spec_metric_is_exported_with_its_name_type_and_labels(history: History, exposition: str):
    full_history(history)
    metrics = metrics_of(history)
    text = (render_text(metrics.families()).decode() if exposition == "own server"
            else generate_latest(build_registry(metrics.source)).decode())
    seen: dict[str, set[tuple[str, ...]]] = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            seen.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    assert set(seen) == set(SPEC_METRICS)
    for name, labels in seen.items():
        assert labels == {tuple(sorted(SPEC_METRICS[name]))}, name
    expected_types = {re.sub(r"_(bucket|sum|count)$", "", n): "gauge" for n in SPEC_METRICS}
    expected_types.update(NOT_GAUGES)
    # the parser names a counter family without its _total
    assert {n + "_total" if t == "counter" else n: t for n, t in types.items()} == expected_types


def test_both_expositions_hold_exactly_the_same_samples(history: History):
    full_history(history)
    metrics = metrics_of(history)
    own = samples(render_text(metrics.families()).decode())
    client = samples(generate_latest(build_registry(metrics.source)).decode())
    assert own == client
    assert len(own) > 50


def test_labels_name_members_and_nodes(history: History):
    full_history(history)
    text = render_text(metrics_of(history).families()).decode()
    assert value(text, "mutualbackup_last_success_timestamp_seconds",
                 source="a/web", target="b/st", source_member="a", target_member="b") == NOW - 5 * HOUR
    assert value(text, "mutualbackup_storage_capacity_bytes", host="c/st", member="c") == 200 * GiB
    assert value(text, "mutualbackup_replicas_desired", source="b/app", source_member="b") == 2


def test_label_values_with_quotes_backslashes_and_newlines_survive_the_text_format():
    family = Family("x", "gauge", "a help text with \\ and\na newline", ("a",))
    family.add(('say "hi" \\ bye\nnow',), 1.5)
    [parsed] = text_string_to_metric_families(render_text([family]).decode())
    assert parsed.samples[0].labels == {"a": 'say "hi" \\ bye\nnow'} and parsed.samples[0].value == 1.5


# --------------------------------------------------------------------------- values
def test_counters_and_histogram_count_finished_attempts_only(history: History):
    record(history, "backup", "a/web", "b/st", NOW - 50 * HOUR, "success", seconds=5)
    record(history, "backup", "a/web", "b/st", NOW - 40 * HOUR, "warning", seconds=45)
    record(history, "backup", "a/web", "b/st", NOW - 30 * HOUR, "failure", seconds=1000)
    record(history, "backup", "a/web", "b/st", NOW - 20 * HOUR, "interrupted", seconds=90000)
    record(history, "backup", "a/web", "b/st", NOW - 10, "running")
    record(history, "prune", "a/web", "b/st", NOW - 40 * HOUR, "failure")  # not a backup
    text = render_text(metrics_of(history).families()).decode()
    four = {"source": "a/web", "target": "b/st", "source_member": "a", "target_member": "b"}
    assert value(text, "mutualbackup_backup_runs_total", **four, result="success") == 2
    assert value(text, "mutualbackup_backup_runs_total", **four, result="failure") == 1
    buckets = {le: value(text, "mutualbackup_backup_duration_seconds_bucket", source="a/web", target="b/st", le=le)
               for le in ("10.0", "30.0", "60.0", "900.0", "1800.0", "+Inf")}
    assert buckets == {"10.0": 1, "30.0": 1, "60.0": 2, "900.0": 2, "1800.0": 3, "+Inf": 3}
    assert value(text, "mutualbackup_backup_duration_seconds_sum", source="a/web", target="b/st") == 1050
    assert value(text, "mutualbackup_backup_duration_seconds_count", source="a/web", target="b/st") == 3
    # the last attempt is the one in progress; the last success the warning
    assert value(text, "mutualbackup_last_attempt_timestamp_seconds", **four) == NOW - 10
    assert value(text, "mutualbackup_last_success_timestamp_seconds", **four) == NOW - 40 * HOUR
    assert len(DURATION_BUCKETS) == 11


def test_a_replica_never_backed_up_has_zero_counters_and_no_timestamps(history: History):
    text = render_text(metrics_of(history).families()).decode()
    four = {"source": "b/app", "target": "d/st", "source_member": "b", "target_member": "d"}
    assert value(text, "mutualbackup_backup_runs_total", **four, result="success") == 0
    assert value(text, "mutualbackup_backup_duration_seconds_count", source="b/app", target="d/st") == 0
    assert value(text, "mutualbackup_last_success_timestamp_seconds", **four) is None
    assert value(text, "mutualbackup_replicas_healthy", source="b/app", source_member="b") == 0


def test_the_repository_size_is_the_latest_measurement_of_a_backup_or_a_prune(history: History):
    record(history, "backup", "a/web", "b/st", NOW - 5 * HOUR, "success", size=6 * GiB, archive=(11, 9, 3))
    record(history, "prune", "a/web", "b/st", NOW - 5 * HOUR + 100, "success", size=4 * GiB)
    record(history, "backup", "a/web", "c/st", NOW - 5 * HOUR, "success", size=3 * GiB, archive=(11, 9, 3))
    record(history, "prune", "a/web", "c/st", NOW - 6 * HOUR, "success", size=1 * GiB)  # older
    record(history, "backup", "a/web", "c/st", NOW - 1 * HOUR, "failure")
    text = render_text(metrics_of(history).families()).decode()
    four = {"source": "a/web", "source_member": "a"}
    assert value(text, "mutualbackup_repository_size_bytes", **four, target="b/st", target_member="b") == 4 * GiB
    assert value(text, "mutualbackup_repository_size_bytes", **four, target="c/st", target_member="c") == 3 * GiB
    assert value(text, "mutualbackup_archive_original_bytes", source="a/web", target="c/st") == 11
    assert value(text, "mutualbackup_storage_used_bytes", host="c/st", member="c") == 3 * GiB
    assert value(text, "mutualbackup_member_lent_bytes", member="c") == 3 * GiB
    assert value(text, "mutualbackup_member_consumed_bytes", member="a") == 7 * GiB
    assert value(text, "mutualbackup_member_consumed_bytes", member="d") == 0


def test_storage_and_ledger_metrics_are_the_ledger_numbers(history: History):
    full_history(history)
    text = render_text(metrics_of(history).families()).decode()
    ledger = read_ledger(history, FED)
    assert ledger == compute_ledger(FED, PLACEMENT, {("a/web", "b/st"): 4 * GiB, ("b/app", "c/st"): GiB})
    for m in ledger.members:
        assert value(text, "mutualbackup_member_lent_bytes", member=m.member) == m.lent_bytes
        assert value(text, "mutualbackup_member_consumed_bytes", member=m.member) == m.consumed_bytes
    for h in ledger.hosts:
        assert value(text, "mutualbackup_storage_used_bytes", host=h.host, member=h.member) == h.used_bytes


def test_unreadable_files_are_those_of_the_last_successful_backup(history: History):
    record(history, "backup", "a/web", "b/st", NOW - 9 * HOUR, "warning", detail={"unreadable_files": 3})
    record(history, "backup", "a/web", "b/st", NOW - 5 * HOUR, "warning", detail={"unreadable_files": 2})
    record(history, "backup", "a/web", "b/st", NOW - 4 * HOUR, "failure")
    record(history, "backup", "a/web", "c/st", NOW - 5 * HOUR, "success")
    text = render_text(metrics_of(history).families()).decode()
    assert value(text, "mutualbackup_backup_unreadable_files", source="a/web", target="b/st") == 2
    assert value(text, "mutualbackup_backup_unreadable_files", source="a/web", target="c/st") == 0
    assert value(text, "mutualbackup_backup_unreadable_files", source="b/app", target="c/st") is None


@pytest.mark.parametrize("compactions, blocked", [
    pytest.param([], 0, id="never compacted"),
    pytest.param([("failure", {"refused": True})], 1, id="the guard refused"),
    pytest.param([("failure", {"refused": True}), ("success", {"compacted": True})], 0, id="refused, then allowed"),
    pytest.param([("failure", None)], 0, id="a compaction that failed for another reason (host down)"),
    pytest.param([("success", None), ("failure", {"refused": True}), ("interrupted", None)], 1,
                 id="an interrupted run is not a verdict"),
])
def test_compaction_blocked_is_the_verdict_of_the_latest_compaction(history: History, compactions, blocked):
    for index, (result, detail) in enumerate(compactions):
        record(history, "compact", "a/web", "b/st", NOW - 10 * HOUR + index * HOUR, result, detail=detail)
    text = render_text(metrics_of(history).families()).decode()
    assert value(text, "mutualbackup_compaction_blocked", source="a/web", target="b/st") == blocked
    assert value(text, "mutualbackup_compaction_blocked", source="a/web", target="c/st") == 0


def test_a_host_was_last_contacted_by_its_latest_successful_backup_or_repository_check(history: History):
    record(history, "backup", "a/web", "c/st", NOW - 9 * HOUR, "success")
    record(history, "repo-check", "b/app", "c/st", NOW - 7 * HOUR, "success")
    record(history, "backup", "b/app", "c/st", NOW - 6 * HOUR, "failure")
    record(history, "backup", "b/app", "d/st", NOW - 8 * HOUR, "failure")
    text = render_text(metrics_of(history).families()).decode()
    assert value(text, "mutualbackup_host_last_contact_timestamp_seconds", host="c/st", member="c") == NOW - 7 * HOUR
    assert value(text, "mutualbackup_host_last_contact_timestamp_seconds", host="d/st", member="d") is None


def test_unplaceable_sources_and_moves_are_what_the_daemon_says(history: History):
    metrics = metrics_of(history)
    metrics.source.unplaceable, metrics.source.moves_in_progress = 3, 1
    text = render_text(metrics.families()).decode()
    assert value(text, "mutualbackup_sources_unplaceable") == 3
    assert value(text, "mutualbackup_replica_moves_in_progress") == 1


def test_jobs_running_counts_runs_of_live_processes_on_each_host(history: History):
    record(history, "backup", "a/web", "b/st", NOW - 60, "running")
    record(history, "check", "b/app", "c/st", NOW - 60, "running")
    stale = record(history, "backup", "a/web", "c/st", NOW - 60, "running")
    set_pid(history, stale, dead_pid())
    text = render_text(metrics_of(history).families()).decode()
    assert {h: value(text, "mutualbackup_jobs_running", host=h) for h in ("b/st", "c/st", "d/st")} == {
        "b/st": 1, "c/st": 1, "d/st": 0}


def test_replicas_of_nodes_gone_from_the_inventory_are_not_exported(history: History):
    record(history, "backup", "a/web", "gone/st", NOW - HOUR, "success", size=GiB)
    placement = {**PLACEMENT, "a/web": ("b/st", "gone/st"), "gone/web": ("b/st",)}
    text = render_text(metrics_of(history, placement=placement).families()).decode()
    assert "gone/" not in text


def test_a_restarted_daemon_exports_the_same_values(history: History):
    full_history(history)
    first = render_text(metrics_of(history).families())
    assert render_text(metrics_of(history).families()) == first


# --------------------------------------------------------------------------- healthy
H = NOW - 2 * HOUR  # a recent success
HEALTHY_CASES = [
    pytest.param([], False, id="never backed up"),
    pytest.param([("backup", H, "success")], True, id="a success within the RPO"),
    pytest.param([("backup", NOW - 27 * HOUR, "success")], False, id="the last success is older than the RPO"),
    pytest.param([("backup", H, "success"), ("backup", H + 60, "failure")], False,
                 id="one failure after the success is enough (status calls it failing only after two)"),
    pytest.param([("backup", H, "failure"), ("backup", H + 60, "warning")], True, id="a failure then a success"),
    pytest.param([("backup", H, "success"), ("backup", H + 60, "interrupted")], True,
                 id="an interrupted run (coordinator stopped) is not a failed attempt"),
    pytest.param([("backup", H, "success"), ("backup", H + 60, "running")], True, id="a run in progress"),
    pytest.param([("backup", H, "success"), ("repo-check", H + 600, "failure")], False,
                 id="a later repository check on the host failed"),
    pytest.param([("repo-check", H - 600, "failure"), ("backup", H, "success")], True,
                 id="a repository check failed before the last attempt"),
    pytest.param([("backup", H, "success"), ("repo-check", H + 600, "success")], True,
                 id="a later repository check passed"),
    pytest.param([("backup", H, "success"), ("check", H + 600, "failure")], True,
                 id="only the host-side repo-check counts, not the archive check from the source"),
    pytest.param([("backup", H, "success"), ("prune", H + 600, "failure")], True, id="a failed prune is not a backup"),
]


@pytest.mark.parametrize("runs, healthy", HEALTHY_CASES)
def test_a_replica_is_healthy_when(history: History, runs, healthy):
    for kind, started, result in runs:
        record(history, kind, "a/web", "b/st", started, result)
    record(history, "backup", "a/web", "c/st", H, "success")  # the other replica stays healthy
    text = render_text(metrics_of(history).families()).decode()
    assert value(text, "mutualbackup_replicas_healthy", source="a/web", source_member="a") == 1 + healthy


def test_healthy_follows_the_clock_past_the_rpo():
    facts = ReplicaFacts(last_success=NOW - 10 * HOUR, last_finished=NOW - 10 * HOUR)
    assert replica_healthy(facts, 26 * HOUR, NOW)
    assert replica_healthy(facts, 26 * HOUR, NOW + 16 * HOUR)
    assert not replica_healthy(facts, 26 * HOUR, NOW + 16 * HOUR + 1)


# --------------------------------------------------------------------------- incremental totals
def fresh_tallies(history: History):
    with history.snapshot() as query:
        return RunTotals().read(query, (r.id for r in read_running(query) if r.kind == "backup"))


def kept_tallies(history: History, totals: RunTotals):
    with history.snapshot() as query:
        return totals.read(query, (r.id for r in read_running(query) if r.kind == "backup"))


def test_totals_kept_between_scrapes_equal_totals_summed_afresh(history: History):
    totals = RunTotals()
    running: list[int] = []
    steps = [
        lambda: record(history, "backup", "a/web", "b/st", NOW - 9 * HOUR, "success", seconds=20),
        lambda: running.append(record(history, "backup", "a/web", "c/st", NOW - 8 * HOUR, "running")),
        lambda: record(history, "backup", "b/app", "c/st", NOW - 7 * HOUR, "failure", seconds=3),
        lambda: record(history, "backup", "a/web", "b/st", NOW - 6 * HOUR, "success", seconds=4000),
        lambda: history.finish_run(running.pop(), "success", ended=NOW - 5 * HOUR),  # the long one ends
        lambda: running.append(record(history, "backup", "b/app", "d/st", NOW - 4 * HOUR, "running")),
        lambda: history.finish_run(running.pop(), "failure", ended=NOW - 4 * HOUR + 9),
        lambda: record(history, "check", "a/web", "b/st", NOW - 3 * HOUR, "success"),
    ]
    for step in steps:
        step()
        assert kept_tallies(history, totals) == fresh_tallies(history)
    assert totals.settled_below == max(r.id for r in history.runs()) + 1
    tally = fresh_tallies(history)[("a/web", "c/st")]
    assert (tally.success, tally.failure, tally.seconds) == (1, 0, 3 * HOUR)


def test_a_run_left_running_by_a_dead_process_does_not_hold_the_totals_back(history: History):
    totals = RunTotals()
    stale = record(history, "backup", "a/web", "c/st", NOW - 8 * HOUR, "running")
    set_pid(history, stale, dead_pid())
    record(history, "backup", "a/web", "b/st", NOW - 6 * HOUR, "success")
    assert kept_tallies(history, totals) == fresh_tallies(history)
    assert totals.settled_below > stale + 1
    history.mark_interrupted(now=NOW)  # what the next daemon start does
    assert kept_tallies(history, totals) == fresh_tallies(history)


def test_summing_the_runs_after_the_settled_ones_reads_only_that_range_of_ids(history: History):
    from mutualbackup.state import metrics_queries

    with history.snapshot() as query:
        plan = [row[-1] for row in query("EXPLAIN QUERY PLAN " + metrics_queries._TALLY_SQL, (0, 1))]
    assert plan[0].startswith("SEARCH runs USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"), plan


def test_latest_facts_use_one_index_look_up_per_fact(history: History):
    full_history(history)
    from mutualbackup.state import metrics_queries

    with history.snapshot() as query:
        plan = [row[-1] for row in query("EXPLAIN QUERY PLAN " + metrics_queries._LATEST_SQL, ("[]",))]
        facts = read_replica_facts(query, [("a/web", "b/st")])
    searches = [line for line in plan if line.startswith("SEARCH runs")]
    assert len(searches) == len(metrics_queries._LATEST) and all("runs_by_job" in line for line in searches), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan
    assert facts[("a/web", "b/st")].repository_bytes == 4 * GiB


# --------------------------------------------------------------------------- secrets and paths
def test_the_metrics_hold_no_path_key_error_or_archive_name(tmp_path: Path):
    fed = load_inventory(VALID)
    history = History(tmp_path / "state")
    placement = {s.name: tuple(h.name for h in fed.hosts() if h.member != s.member)[:1] for s in fed.sources()}
    history.set_placement(placement, now=NOW)
    secret_error = "borg: passphrase 'hunter2-correct-horse' rejected for /srv/mutualbackup/coopcycle/web1"
    for source, hosts in placement.items():
        record(history, "backup", source, hosts[0], NOW - HOUR, "success", size=GiB, archive=(3, 2, 1),
               name="web1-2025-06-15T00:00:00")
        record(history, "backup", source, hosts[0], NOW - 60, "failure", error=secret_error)
    text = render_text(metrics_of(history, fed=fed, placement=placement).families()).decode()
    assert "mutualbackup_replicas_healthy" in text
    forbidden = {"hunter2", "passphrase", "web1-2025", fed.coordinator.ssh_key, fed.coordinator.state, "~/"}
    for n in fed.nodes():
        forbidden |= {n.host_key.split()[1], n.workdir, n.authorized_keys, n.borg if "/" in n.borg else "\0"}
        forbidden |= set(n.backup.paths if n.backup else ()) | set(n.backup.exclude if n.backup else ())
        forbidden |= {n.storage.path} if n.storage else set()
    assert [word for word in forbidden if word in text] == []
    label_values = {v for (_name, labels), _ in samples(text).items() for _k, v in labels}
    words = {n.name for n in fed.nodes()} | {m.name for m in fed.members} | {"success", "failure", "+Inf"}
    assert {v for v in label_values if not re.fullmatch(r"\d+\.0", v)} <= words
    history.close()


# --------------------------------------------------------------------------- the server
def test_the_server_answers_metrics_plain_and_gzipped_and_nothing_else(history: History):
    full_history(history)
    source = MetricsSource(history, FED, placement=lambda: PLACEMENT, clock=lambda: NOW)
    server, thread = start_metrics_server("127.0.0.1", free_port(), source)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with opener.open(f"{url}/metrics", timeout=10) as response:
            plain = response.read().decode()
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        request = urllib.request.Request(f"{url}/metrics", headers={"Accept-Encoding": "gzip"})
        with opener.open(request, timeout=10) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(response.read()).decode() == plain
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(f"{url}/secrets", timeout=10)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert samples(plain) == samples(render_text(metrics_of(history).families()).decode())


def test_the_server_refuses_an_address_in_use():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(OSError):
            start_metrics_server("127.0.0.1", port, None)  # type: ignore[arg-type]


def test_a_broken_history_gives_a_500_not_a_dead_server(tmp_path: Path):
    history = History(tmp_path / "state")
    source = MetricsSource(history, FED, placement=lambda: PLACEMENT, clock=lambda: NOW)
    server, thread = start_metrics_server("127.0.0.1", free_port(), source)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        history.close()  # every query now fails
        with pytest.raises(urllib.error.HTTPError) as failed:
            opener.open(url, timeout=10)
        assert failed.value.code == 500
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_latest_runs_kept_between_scrapes_equal_the_full_query_at_every_step(tmp_path: Path):
    """LatestRuns reads only what changed since the last scrape; at every step of a random history (runs
    of every kind, started out of order, in progress, finished, interrupted; replicas added) it must give
    exactly what the indexed query over the whole history gives."""
    import random

    from mutualbackup.state.metrics_queries import LatestRuns

    rng = random.Random(7)
    history = History(tmp_path / "state")
    latest = LatestRuns()
    pairs = [("a/web", "b/st"), ("a/web", "c/st"), ("d/db", "b/st")]
    kinds = ("backup", "backup", "prune", "check", "repo-check", "compact", "accept-deletion", "drill")
    in_progress: list[int] = []
    now = 1_000_000.0
    for step in range(400):
        now += rng.uniform(0, 100)
        if in_progress and rng.random() < 0.4:
            run_id = in_progress.pop(rng.randrange(len(in_progress)))
            result = rng.choice(("success", "warning", "failure", "interrupted"))
            if result == "interrupted":
                history.mark_interrupted(now=now) if rng.random() < 0.1 else history.finish_run(run_id, result)
            else:
                history.finish_run(run_id, result, repository_bytes=rng.choice((None, rng.randint(1, 10**9))),
                                   original_bytes=rng.choice((None, 5)),
                                   detail={"refused": True} if rng.random() < 0.3 else {"unreadable_files": 2})
            in_progress = [r.id for r in history.running()]
        else:
            source, target = rng.choice(pairs)
            started = now - rng.uniform(0, 5000)  # adopted or rebuilt runs start in the past
            in_progress.append(history.start_run(rng.choice(kinds), source, target, started=started))
        if step == 200:
            pairs.append(("e/app", "c/st"))  # a replica added later: read whole the first time
        with history.snapshot() as query:
            asked = rng.sample(pairs, rng.randint(1, len(pairs)))
            running = [r.id for r in history.running()]
            assert latest.read(query, asked, running) == read_replica_facts(query, asked), step
