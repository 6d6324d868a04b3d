"""bench/metrics_bench.py at a tiny size, so that it cannot rot. Nothing is timed here."""

from __future__ import annotations

from bench.metrics_bench import SERVERS, main, run, synthetic_federation, synthetic_placement


def test_the_synthetic_federation_places_each_source_on_other_members():
    federation = synthetic_federation(25)
    placement = synthetic_placement(federation, 2)
    assert len(federation.sources()) == 25 and len(placement) == 25
    for source, hosts in placement.items():
        members = [h.split("/")[0] for h in hosts]
        assert source.split("/")[0] not in members and len(set(members)) == 2


def test_the_bench_runs_at_a_tiny_size_and_both_servers_serve_the_same_samples():
    figures = run(sources=3, replicas=2, days=3, scrapes=2)
    # 3 sources x 2 replicas x 3 days of backups (+ prunes, checks), and 5 runs in progress at most
    assert figures.rows >= 3 * 2 * 3
    assert [s.server for s in figures.scrapes] == list(SERVERS)
    assert len({s.samples for s in figures.scrapes}) == 1
    # per replica: 2 timestamps, 2 counters, 11 + 1 buckets, sum, count, 3 archive sizes, repository size, check
    assert figures.scrapes[0].samples > 3 * 2 * 22
    assert all(s.cold_ms > 0 and s.warm_median_ms > 0 for s in figures.scrapes)
    assert "3 sources x 2 replicas" in figures.lines()


def test_the_bench_prints_its_figure(capsys):
    assert main(["--sources", "2", "--days", "1", "--scrapes", "2", "--server", "start_metrics_server"]) == 0
    out = capsys.readouterr().out
    assert "/metrics of 2 sources x 2 replicas, 1 days of history" in out
    assert "start_metrics_server" in out and "warm median" in out
