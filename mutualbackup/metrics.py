"""Prometheus metrics computed at scrape time from the history and the inventory.

A scrape never runs borg or opens an SSH connection, and since everything is
read from the SQLite history, a daemon restart does not reset what members see.
Only names of nodes and members are exported: no path, no key, no passphrase.

Definitions where SPEC.md leaves room:
- ``replicas_healthy``: replicas whose state is ``ok`` (see :mod:`status`);
- ``storage_used_bytes``: the measured size of the repositories on a host;
- ``member_lent_bytes``: bytes of other members' repositories on the member's hosts;
  ``member_consumed_bytes``: bytes of the member's repositories on other members' hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .history import History
from .model import Federation
from .status import replica_state

DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)


@dataclass
class MetricsSource:
    """What the collector reads; the daemon updates ``federation`` and ``inventory_valid`` on reload."""

    history: History
    federation: Federation
    placement: Callable[[], Mapping[str, Sequence[str]]]
    inventory_valid: bool = True
    clock: Callable[[], float] = field(default=time.time)


class FederationCollector(Collector):
    def __init__(self, source: MetricsSource):
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        src = self.source
        fed = src.federation
        now = src.clock()
        placement = src.placement()
        members = {node.name: node.member for node in fed.nodes()}
        facts = _read_facts(src.history)

        def labels4(source: str, target: str) -> list[str]:
            return [source, target, members.get(source, ""), members.get(target, "")]

        pair_labels = ["source", "target", "source_member", "target_member"]
        last_success = GaugeMetricFamily(
            "mutualbackup_last_success_timestamp_seconds", "Start time of the last successful backup", labels=pair_labels
        )
        last_attempt = GaugeMetricFamily(
            "mutualbackup_last_attempt_timestamp_seconds", "Start time of the last backup attempt", labels=pair_labels
        )
        runs_total = CounterMetricFamily(
            "mutualbackup_backup_runs_total", "Backup runs by result", labels=pair_labels + ["result"]
        )
        repo_size = GaugeMetricFamily(
            "mutualbackup_repository_size_bytes", "Measured size of the repository on disk", labels=pair_labels
        )
        original = GaugeMetricFamily("mutualbackup_archive_original_bytes", "Original size of the last archive", labels=["source", "target"])
        compressed = GaugeMetricFamily("mutualbackup_archive_compressed_bytes", "Compressed size of the last archive", labels=["source", "target"])
        dedup = GaugeMetricFamily("mutualbackup_archive_deduplicated_bytes", "Deduplicated size of the last archive", labels=["source", "target"])
        check = GaugeMetricFamily(
            "mutualbackup_last_check_success_timestamp_seconds", "Last successful borg check of the repository", labels=["source", "target"]
        )
        duration = HistogramMetricFamily("mutualbackup_backup_duration_seconds", "Duration of backup runs", labels=["source", "target"])

        pairs = [(s, t) for s, targets in sorted(placement.items()) for t in targets]
        for s, t in pairs:
            key = (s, t)
            if key in facts.last_success:
                last_success.add_metric(labels4(s, t), facts.last_success[key])
            if key in facts.last_attempt:
                last_attempt.add_metric(labels4(s, t), facts.last_attempt[key])
            counts = facts.counts.get(key, {})
            for result in ("success", "failure"):
                runs_total.add_metric(labels4(s, t) + [result], counts.get(result, 0))
            if key in facts.repository:
                repo_size.add_metric(labels4(s, t), facts.repository[key])
            if key in facts.archive:
                o, c, d = facts.archive[key]
                original.add_metric([s, t], o)
                compressed.add_metric([s, t], c)
                dedup.add_metric([s, t], d)
            if key in facts.check:
                check.add_metric([s, t], facts.check[key])
            buckets = facts.durations.get(key, [0] * len(DURATION_BUCKETS) + [0])
            cumulative = [(str(b), buckets[i]) for i, b in enumerate(DURATION_BUCKETS)] + [("+Inf", buckets[-1])]
            duration.add_metric([s, t], cumulative, facts.duration_sum.get(key, 0.0))

        rpo = GaugeMetricFamily("mutualbackup_rpo_seconds", "Recovery point objective of the source", labels=["source"])
        desired = GaugeMetricFamily("mutualbackup_replicas_desired", "Replicas the source should have", labels=["source", "source_member"])
        healthy = GaugeMetricFamily("mutualbackup_replicas_healthy", "Replicas with a recent successful backup", labels=["source", "source_member"])
        drill = GaugeMetricFamily("mutualbackup_last_drill_success_timestamp_seconds", "Last successful restore drill", labels=["source"])
        for node in fed.sources():
            assert node.backup is not None
            rpo.add_metric([node.name], node.backup.rpo)
            desired.add_metric([node.name, node.member], node.backup.replicas)
            ok = sum(
                1
                for t in placement.get(node.name, ())
                if replica_state(facts.last_success.get((node.name, t)), facts.failures.get((node.name, t), 0), node.backup.rpo, now) == "ok"
            )
            healthy.add_metric([node.name, node.member], ok)
            if node.name in facts.drill:
                drill.add_metric([node.name], facts.drill[node.name])

        capacity = GaugeMetricFamily("mutualbackup_storage_capacity_bytes", "Capacity a host lends", labels=["host", "member"])
        used = GaugeMetricFamily("mutualbackup_storage_used_bytes", "Measured size of the repositories on a host", labels=["host", "member"])
        running = GaugeMetricFamily("mutualbackup_jobs_running", "Backups running into a host", labels=["host"])
        lent: dict[str, float] = {m.name: 0.0 for m in fed.members}
        consumed: dict[str, float] = {m.name: 0.0 for m in fed.members}
        used_by_host: dict[str, float] = {}
        for (s, t), size in facts.repository.items():
            if t in members and (s, t) in set(pairs):
                used_by_host[t] = used_by_host.get(t, 0.0) + size
                if members.get(s) != members[t]:
                    lent[members[t]] = lent.get(members[t], 0.0) + size
                    if s in members:
                        consumed[members[s]] = consumed.get(members[s], 0.0) + size
        for host in fed.hosts():
            assert host.storage is not None
            capacity.add_metric([host.name, host.member], host.storage.capacity)
            used.add_metric([host.name, host.member], used_by_host.get(host.name, 0.0))
            running.add_metric([host.name], facts.running.get(host.name, 0))
        lent_m = GaugeMetricFamily("mutualbackup_member_lent_bytes", "Bytes of other members' backups on this member's hosts", labels=["member"])
        consumed_m = GaugeMetricFamily("mutualbackup_member_consumed_bytes", "Bytes of this member's backups on other members' hosts", labels=["member"])
        for member in sorted(lent):
            lent_m.add_metric([member], lent[member])
            consumed_m.add_metric([member], consumed.get(member, 0.0))
        valid = GaugeMetricFamily("mutualbackup_inventory_valid", "1 when the inventory the daemon uses is valid")
        valid.add_metric([], 1 if src.inventory_valid else 0)

        yield from (last_success, last_attempt, runs_total, duration, original, compressed, dedup, repo_size, rpo,
                    desired, healthy, check, drill, capacity, used, lent_m, consumed_m, running, valid)


@dataclass
class _Facts:
    last_success: dict[tuple[str, str], float] = field(default_factory=dict)
    last_attempt: dict[tuple[str, str], float] = field(default_factory=dict)
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    repository: dict[tuple[str, str], float] = field(default_factory=dict)
    archive: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    check: dict[tuple[str, str], float] = field(default_factory=dict)
    drill: dict[str, float] = field(default_factory=dict)
    durations: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    duration_sum: dict[tuple[str, str], float] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)


def _read_facts(history: History) -> _Facts:
    """Everything the collector needs, in a handful of aggregate queries."""
    f = _Facts()
    q = history._query  # noqa: SLF001 — the collector is the history's read-only partner
    for r in q("""SELECT source, target, MAX(started) AS t FROM runs WHERE kind = 'backup'
                  AND result IN ('success', 'warning') GROUP BY source, target"""):
        f.last_success[(r["source"], r["target"])] = r["t"]
    for r in q("SELECT source, target, MAX(started) AS t FROM runs WHERE kind = 'backup' GROUP BY source, target"):
        f.last_attempt[(r["source"], r["target"])] = r["t"]
    for r in q("""SELECT source, target, CASE WHEN result IN ('success', 'warning') THEN 'success' ELSE 'failure' END AS res,
                  COUNT(*) AS n FROM runs WHERE kind = 'backup' AND result != 'running' GROUP BY source, target, res"""):
        f.counts.setdefault((r["source"], r["target"]), {})[r["res"]] = r["n"]
    for r in q("""SELECT source, target, COUNT(*) AS n FROM runs r WHERE kind = 'backup' AND result IN ('failure', 'interrupted')
                  AND started > COALESCE((SELECT MAX(started) FROM runs WHERE kind = 'backup' AND source = r.source
                  AND target = r.target AND result IN ('success', 'warning')), 0) GROUP BY source, target"""):
        f.failures[(r["source"], r["target"])] = r["n"]
    for r in q("""SELECT r.source, r.target, r.repository_bytes, r.original_bytes, r.compressed_bytes, r.deduplicated_bytes
                  FROM runs r JOIN (SELECT source, target, MAX(started) AS t FROM runs WHERE kind = 'backup'
                  AND result IN ('success', 'warning') GROUP BY source, target) last
                  ON r.source = last.source AND r.target = last.target AND r.started = last.t AND r.kind = 'backup'"""):
        key = (r["source"], r["target"])
        if r["repository_bytes"] is not None:
            f.repository[key] = r["repository_bytes"]
        if r["original_bytes"] is not None:
            f.archive[key] = (r["original_bytes"], r["compressed_bytes"] or 0, r["deduplicated_bytes"] or 0)
    for r in q("""SELECT source, target, MAX(started) AS t FROM runs WHERE kind = 'check'
                  AND result IN ('success', 'warning') GROUP BY source, target"""):
        f.check[(r["source"], r["target"])] = r["t"]
    for r in q("SELECT source, MAX(started) AS t FROM runs WHERE kind = 'drill' AND result IN ('success', 'warning') GROUP BY source"):
        f.drill[r["source"]] = r["t"]
    bucket_sql = ", ".join(f"SUM(ended - started <= {b}) AS b{i}" for i, b in enumerate(DURATION_BUCKETS))
    for r in q(f"""SELECT source, target, {bucket_sql}, COUNT(*) AS n, SUM(ended - started) AS total FROM runs
                   WHERE kind = 'backup' AND ended IS NOT NULL AND result != 'running' GROUP BY source, target"""):
        key = (r["source"], r["target"])
        f.durations[key] = [int(r[f"b{i}"]) for i in range(len(DURATION_BUCKETS))] + [int(r["n"])]
        f.duration_sum[key] = float(r["total"] or 0.0)
    for r in q("SELECT target, COUNT(*) AS n FROM runs WHERE kind = 'backup' AND result = 'running' GROUP BY target"):
        f.running[r["target"]] = r["n"]
    return f


def build_registry(source: MetricsSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(source))
    return registry
