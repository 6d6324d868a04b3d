"""Prometheus metrics computed at scrape time from the history and the inventory.

A scrape never runs borg or opens an SSH connection: it reads the SQLite history
(one read transaction) and the inventory. Since everything comes from the
history, a daemon restart does not reset what members see. Only names of nodes
and members are exported: no path, no key, no passphrase, no error text.

What is exported, where SPEC.md leaves room:

- **replicas**: the recorded placement (what ``apply`` made), restricted to
  sources and hosts of the current inventory;
- ``last_success`` / ``last_attempt``: start time of the last successful backup
  (borg success or warning) / of the last backup run of any outcome, including
  one in progress;
- ``backup_runs_total{result}``: finished backup attempts, ``success`` (borg
  success or warning) or ``failure``. Runs in progress and runs ``interrupted``
  because the coordinator stopped are not attempts (as for the scheduler) and are
  not counted; ``backup_duration_seconds`` observes the same runs (end − start);
- ``archive_*_bytes``: the last successful backup's archive;
- ``repository_size_bytes``: the last measurement of the repository (recorded by
  a successful backup or prune: borg's deduplicated, compressed size);
- ``last_check_success``: start of the last successful ``check`` (host-side
  repository check, then the archives from the source);
- ``replicas_healthy``: replicas of the source that are **healthy**:

  1. the last successful backup started within the source's ``rpo``, and
  2. the latest finished backup attempt of that replica did not fail, and
  3. if a host-side repository check (run kind ``repo-check``) started after
     that attempt started, the latest such check did not fail.

  So a replica whose host is down turns unhealthy as soon as the coordinator has
  evidence: the first failed attempt (or failed check), not after the RPO. This
  is stricter than ``status``'s ``failing`` (2+ failures in a row);
- ``storage_*``, ``member_*``: :func:`ledger.compute_ledger` on the measured sizes,
  the same numbers as ``mutualbackup ledger``;
- ``jobs_running{host}``: runs in progress (any kind) whose host it is, started
  by a process that is still alive.

Speed (see :mod:`runfacts` and :mod:`exposition`): the latest runs of a replica
are index look-ups, the counters are kept incrementally, and
:func:`start_metrics_server` writes the text format itself (prometheus_client's
formatting alone takes most of a second for 50 000 samples; :func:`build_registry`
stays for prometheus_client users). For 1 000 sources × 2 replicas and a year of
history (1.7 million runs), a scrape takes about 0.2 s (``bench/metrics_bench.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mutualbackup.report.prometheus_text import Family, format_bound, start_metrics_server as serve_families
from mutualbackup.state.history import History
from mutualbackup.report.ledger import Ledger, compute_ledger
from mutualbackup.inventory.model import Federation
from mutualbackup.plan.placement import known_placement
from mutualbackup.state.metrics_queries import (
    DURATION_BUCKETS, LatestRuns, Pair, ReplicaFacts, RunningRun, RunTally, RunTotals, read_drills, read_replica_facts, read_running,
)

log = logging.getLogger("mutualbackup.report.metrics")


@dataclass
class MetricsSource:
    """What the collector reads; the daemon updates ``federation`` and ``inventory_valid`` on reload."""

    history: History
    federation: Federation
    placement: Callable[[], Mapping[str, Sequence[str]]]
    inventory_valid: bool = True
    clock: Callable[[], float] = field(default=time.time)
    unplaceable: int = 0  # sources the current inventory cannot place (the daemon sets it at each load)
    moves_in_progress: int = 0  # replicas being moved (make before break)


def replica_healthy(facts: ReplicaFacts, rpo: float, now: float) -> bool:
    """Whether a replica is healthy (see the module notes), from its facts, its source's RPO and ``now``."""
    if facts.last_success is None or now - facts.last_success > rpo:
        return False
    if facts.last_finished_failed:
        return False
    if facts.repo_check_failed and facts.repo_check is not None and facts.repo_check >= (facts.last_finished or 0.0):
        return False
    return True


# --- the families ----------------------------------------------------------------


def read_ledger(history: History, federation: Federation) -> Ledger:
    """The ledger of ``mutualbackup ledger``: recorded placement and measured sizes, as the metrics export them."""
    placement = known_placement(federation, history.placement())
    pairs = [(s, t) for s, targets in sorted(placement.items()) for t in targets]
    with history.snapshot() as query:
        facts = read_replica_facts(query, pairs)
    return _ledger(federation, placement, facts)


def _ledger(federation: Federation, placement: Mapping[str, Sequence[str]], facts: Mapping[Pair, ReplicaFacts]) -> Ledger:
    sizes = {pair: f.repository_bytes for pair, f in facts.items() if f.repository_bytes is not None}
    return compute_ledger(federation, placement, sizes)


class FederationMetrics:
    """Every metric of SPEC.md's table, computed from the history and the inventory at each call.

    Keeps the running totals of :class:`RunTotals` between calls; one instance per server.
    """

    def __init__(self, source: MetricsSource):
        self.source = source
        self.totals = RunTotals()
        self.latest = LatestRuns()

    def warm(self) -> None:
        """Sum the history once now (what the first scrape would otherwise do)."""
        with self.source.history.snapshot() as query:
            self.totals.read(query, (r.id for r in read_running(query) if r.kind == "backup"))

    def families(self) -> list[Family]:
        src = self.source
        fed = src.federation
        now = src.clock()
        placement = known_placement(fed, src.placement())
        pairs = [(s, t) for s, targets in sorted(placement.items()) for t in targets]
        with src.history.snapshot() as query:
            running = read_running(query)
            facts = self.latest.read(query, pairs, (r.id for r in running))
            tallies = self.totals.read(query, (r.id for r in running if r.kind == "backup"))
            drills = read_drills(query)
        member_of = {node.name: node.member for node in fed.nodes()}
        return [
            *_replica_families(pairs, member_of, facts, tallies),
            *_source_families(fed, placement, facts, drills, now),
            *_storage_families(fed, placement, facts, running),
            *_federation_families(src),
        ]


_FOUR = ("source", "target", "source_member", "target_member")
_TWO = ("source", "target")


def _replica_families(
    pairs: Sequence[Pair], member_of: Mapping[str, str], facts: Mapping[Pair, ReplicaFacts], tallies: Mapping[Pair, RunTally]
) -> list[Family]:
    last_success = Family("mutualbackup_last_success_timestamp_seconds", "gauge",
                          "Start time of the replica's last successful backup", _FOUR)
    last_attempt = Family("mutualbackup_last_attempt_timestamp_seconds", "gauge",
                          "Start time of the replica's last backup run, whatever its outcome", _FOUR)
    runs_total = Family("mutualbackup_backup_runs_total", "counter",
                        "Finished backup attempts of the replica, by result", _FOUR + ("result",))
    duration = Family("mutualbackup_backup_duration_seconds", "histogram",
                      "Duration of the replica's finished backup attempts", _TWO)
    original = Family("mutualbackup_archive_original_bytes", "gauge", "Original size of the last archive", _TWO)
    compressed = Family("mutualbackup_archive_compressed_bytes", "gauge", "Compressed size of the last archive", _TWO)
    dedup = Family("mutualbackup_archive_deduplicated_bytes", "gauge",
                   "Deduplicated size of the last archive (the new data it added)", _TWO)
    repo_size = Family("mutualbackup_repository_size_bytes", "gauge", "Last measured size of the replica's repository", _FOUR)
    check = Family("mutualbackup_last_check_success_timestamp_seconds", "gauge",
                   "Start time of the replica's last successful borg check", _TWO)
    unreadable = Family("mutualbackup_backup_unreadable_files", "gauge",
                        "Files the replica's last successful backup could not read (they are not in the archive)", _TWO)
    blocked = Family("mutualbackup_compaction_blocked", "gauge",
                     "1 when the latest compaction of the replica was refused by the guard (deletions it cannot explain)",
                     _TWO)
    empty, no_runs = ReplicaFacts(), RunTally()
    # rows appended directly (label values are tuples already): ten thousand replicas make 130 000 rows
    for pair in pairs:
        source, target = pair
        four = (source, target, member_of[source], member_of[target])
        fact = facts.get(pair, empty)
        if fact.last_success is not None:
            last_success.rows.append((four, fact.last_success))
        if fact.last_attempt is not None:
            last_attempt.rows.append((four, fact.last_attempt))
        tally = tallies.get(pair, no_runs)
        runs_total.rows.append(((*four, "success"), tally.success))
        runs_total.rows.append(((*four, "failure"), tally.failure))
        duration.rows.append((pair, list(zip(DURATION_BUCKETS, tally.buckets)), tally.count, tally.seconds))
        if fact.archive is not None:
            original.rows.append((pair, fact.archive[0]))
            compressed.rows.append((pair, fact.archive[1]))
            dedup.rows.append((pair, fact.archive[2]))
        if fact.repository_bytes is not None:
            repo_size.rows.append((four, fact.repository_bytes))
        if fact.last_check_success is not None:
            check.rows.append((pair, fact.last_check_success))
        if fact.unreadable_files is not None:
            unreadable.rows.append((pair, fact.unreadable_files))
        blocked.rows.append((pair, 1 if fact.compaction_blocked else 0))
    return [last_success, last_attempt, runs_total, duration, original, compressed, dedup, repo_size, check,
            unreadable, blocked]


def _source_families(
    fed: Federation, placement: Mapping[str, Sequence[str]], facts: Mapping[Pair, ReplicaFacts],
    drills: Mapping[str, float], now: float,
) -> list[Family]:
    rpo = Family("mutualbackup_rpo_seconds", "gauge", "Recovery point objective of the source", ("source",))
    desired = Family("mutualbackup_replicas_desired", "gauge", "Replicas the inventory asks for",
                     ("source", "source_member"))
    healthy = Family("mutualbackup_replicas_healthy", "gauge",
                     "Replicas backed up within the RPO whose latest backup attempt (and any later repository check) "
                     "did not fail", ("source", "source_member"))
    drill = Family("mutualbackup_last_drill_success_timestamp_seconds", "gauge",
                   "Start time of the source's last successful restore drill", ("source",))
    empty = ReplicaFacts()
    for node in fed.sources():
        assert node.backup is not None
        rpo.add((node.name,), node.backup.rpo)
        desired.add((node.name, node.member), node.backup.replicas)
        ok = sum(replica_healthy(facts.get((node.name, t), empty), node.backup.rpo, now) for t in placement.get(node.name, ()))
        healthy.add((node.name, node.member), ok)
        if node.name in drills:
            drill.add((node.name,), drills[node.name])
    return [rpo, desired, healthy, drill]


def _storage_families(
    fed: Federation, placement: Mapping[str, Sequence[str]], facts: Mapping[Pair, ReplicaFacts], running: Sequence[RunningRun]
) -> list[Family]:
    ledger = _ledger(fed, placement, facts)
    capacity = Family("mutualbackup_storage_capacity_bytes", "gauge", "Capacity the host lends (storage.capacity)",
                      ("host", "member"))
    used = Family("mutualbackup_storage_used_bytes", "gauge", "Measured size of the repositories on the host",
                  ("host", "member"))
    jobs = Family("mutualbackup_jobs_running", "gauge", "Jobs (backups, checks, drills...) running on the host now",
                  ("host",))
    contact = Family("mutualbackup_host_last_contact_timestamp_seconds", "gauge",
                     "Start time of the latest backup or repository check that reached the host", ("host", "member"))
    per_host: dict[str, int] = {}
    for run in running:
        per_host[run.target] = per_host.get(run.target, 0) + 1
    reached: dict[str, float] = {}
    for (_source, target), fact in facts.items():
        if fact.last_contact is not None:
            reached[target] = max(reached.get(target, 0.0), fact.last_contact)
    for host in ledger.hosts:
        capacity.add((host.host, host.member), host.capacity_bytes)
        used.add((host.host, host.member), host.used_bytes)
        jobs.add((host.host,), per_host.get(host.host, 0))
        if host.host in reached:
            contact.add((host.host, host.member), reached[host.host])
    lent = Family("mutualbackup_member_lent_bytes", "gauge", "Bytes of other members' repositories on the member's hosts",
                  ("member",))
    consumed = Family("mutualbackup_member_consumed_bytes", "gauge",
                      "Bytes of the member's repositories on other members' hosts", ("member",))
    for member in ledger.members:
        lent.add((member.member,), member.lent_bytes)
        consumed.add((member.member,), member.consumed_bytes)
    return [capacity, used, lent, consumed, jobs, contact]


def _federation_families(src: MetricsSource) -> list[Family]:
    valid = Family("mutualbackup_inventory_valid", "gauge", "1 when the inventory the daemon uses is valid, else 0")
    valid.add((), 1 if src.inventory_valid else 0)
    unplaceable = Family("mutualbackup_sources_unplaceable", "gauge",
                         "Sources the inventory cannot give all their replicas (they keep the ones they have)")
    unplaceable.add((), src.unplaceable)
    moves = Family("mutualbackup_replica_moves_in_progress", "gauge",
                   "Replicas being moved to another host (the old one is kept until the new one is healthy)")
    moves.add((), src.moves_in_progress)
    return [valid, unplaceable, moves]


# --- serving ------------------------------------------------------------------------


class FederationCollector(Collector):
    """The same families for a prometheus_client registry (``generate_latest``, ``start_http_server``)."""

    def __init__(self, source: MetricsSource):
        self.metrics = FederationMetrics(source)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        for family in self.metrics.families():
            yield to_prometheus(family)


def to_prometheus(family: Family) -> Metric:
    """``family`` as a prometheus_client metric family."""
    labels = list(family.labels)
    if family.kind == "histogram":
        histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
        for values, buckets, count, total in family.rows:
            histogram.add_metric(list(values), [(format_bound(b), c) for b, c in buckets] + [("+Inf", count)], total)
        return histogram
    metric = (CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily)(family.name, family.help, labels=labels)
    for values, value in family.rows:
        metric.add_metric(list(values), value)
    return metric


def build_registry(source: MetricsSource) -> CollectorRegistry:
    """A prometheus_client registry holding the federation's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(source))
    return registry


def start_metrics_server(address: str, port: int, source: MetricsSource) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve the federation's metrics at ``http://ADDRESS:PORT/metrics`` (see :mod:`exposition`).

    The history is summed once in the background right away (a second or so for
    a year of a large federation), so that the first scrape is as fast as the next ones. Returns ``(server, thread)``; stop with
    ``server.shutdown()``. Raises OSError when the address cannot be bound.
    """
    metrics = FederationMetrics(source)
    server, thread = serve_families(address, port, metrics.families)
    threading.Thread(target=_warm, args=(metrics,), name="metrics-warm", daemon=True).start()
    return server, thread


def _warm(metrics: FederationMetrics) -> None:
    try:
        metrics.warm()
    except Exception:  # the first scrape will try again, and report
        log.exception("cannot sum the history for the metrics")
