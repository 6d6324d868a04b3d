"""A real Prometheus reads the exposition of mutualbackup's own /metrics server
(start_metrics_server) exactly as prometheus_client's parser does. No lab needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mutualbackup.report.prometheus_text import render_text
from mutualbackup.state.history import History
from lab.federation import free_port
from mutualbackup.report.metrics import MetricsSource, start_metrics_server

from test_metrics import FED, NOW, PLACEMENT, full_history, metrics_of, samples
from test_prometheus_e2e import PROMETHEUS, World, poll, query, ready, start_prometheus, stop


def test_prometheus_ingests_every_sample_of_the_own_server(tmp_path: Path):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is not installed (apt-get install prometheus)")
    history = History(tmp_path / "state")
    history.set_placement(PLACEMENT, now=NOW)
    full_history(history)
    expected = samples(render_text(metrics_of(history).families()).decode())
    source = MetricsSource(history, FED, placement=lambda: PLACEMENT, clock=lambda: NOW)
    server, thread = start_metrics_server("127.0.0.1", free_port(), source)
    prometheus, url, log = start_prometheus(tmp_path, server.server_address[1])
    try:
        poll("Prometheus to be ready", lambda: ready(f"{url}/-/ready") or prometheus.poll() is not None, timeout=60)
        assert prometheus.poll() is None, log.read_text()[-2000:]
        world = World(None, None, url, None)  # type: ignore[arg-type]
        poll("a scrape", lambda: query(world, 'up{job="mutualbackup"} == 1')["data"]["result"], timeout=30)
        result = query(world, '{__name__=~"mutualbackup_.+"}')["data"]["result"]
    finally:
        stop(prometheus)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        history.close()
    ingested = {(r["metric"].pop("__name__"), tuple(sorted((k, v) for k, v in r["metric"].items()
                                                          if k not in ("job", "instance")))): float(r["value"][1])
                for r in result}
    assert ingested == expected
