"""Scrape time of ``/metrics`` for a large federation with a long synthetic history.

Builds, in a temporary state directory, SOURCES sources (10 per member) × REPLICAS
replicas on hosts of other members, and DAYS days of history per replica: one
backup a day (2 % fail; a successful one is followed by its prune), a weekly
check (``repo-check`` then ``check``), a monthly restore drill per source, and a
few backups in progress. Then, for each server, starts it on 127.0.0.1 and GETs
``/metrics`` SCRAPES times with the headers Prometheus 2.42 sends:

- ``start_metrics_server``: mutualbackup's own server (writes the text format itself);
- ``prometheus_client``: prometheus_client's ``start_http_server`` around the same
  collector (``build_registry``).

Prints the history's size, then per server the cold scrape (the first, right after
the start: it sums the whole history once) and the warm ones (median and worst),
in ms. Nothing is compared with a goal: the figures are for people. Usage::

    .venv/bin/python bench/metrics_bench.py [--sources 1000] [--replicas 2] [--days 365] [--scrapes 10]
                                            [--server NAME] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sqlite3
import statistics
import sys
from pathlib import Path
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass

from prometheus_client import start_http_server

from mutualbackup.state.history import History
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives beside the product
from lab.federation import free_port
from mutualbackup.report.metrics import MetricsSource, build_registry, start_metrics_server
from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage

DAY = 86400.0
GiB = 1024**3
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
SOURCES_PER_MEMBER = 10


@dataclass(frozen=True)
class Scrapes:
    server: str
    samples: int
    body_bytes: int
    cold_ms: float
    warm_median_ms: float
    warm_max_ms: float

    def line(self) -> str:
        return (f"  {self.server:<20} cold {self.cold_ms:6.0f} ms   warm median {self.warm_median_ms:5.0f} ms"
                f" (worst {self.warm_max_ms:.0f} ms)   {self.samples:,} samples, {self.body_bytes / 1e6:.1f} MB")


@dataclass(frozen=True)
class Figures:
    sources: int
    replicas: int
    days: int
    rows: int
    fill_seconds: float
    scrapes: list[Scrapes]

    def lines(self) -> str:
        head = (f"/metrics of {self.sources} sources x {self.replicas} replicas, {self.days} days of history "
                f"({self.rows:,} runs in the history):")
        return "\n".join([head, *(s.line() for s in self.scrapes)])


def synthetic_federation(sources: int) -> Federation:
    """``sources`` sources, 10 per member; every member also lends one host."""
    count = max(3, -(-sources // SOURCES_PER_MEMBER))
    members = []
    for m in range(count):
        name = f"member{m:03d}"
        nodes = [Node(name, f"web{i}", "127.0.0.1", 22, "mb", KEY, site=f"site{m}",
                      backup=Backup(paths=("/srv",), estimate=GiB))
                 for i in range(min(SOURCES_PER_MEMBER, sources - m * SOURCES_PER_MEMBER))]
        nodes.append(Node(name, "store", "127.0.0.1", 22, "mb", KEY, site=f"site{m}",
                          storage=Storage(path="/srv/mb", capacity=100 * 1024 * GiB)))
        members.append(Member(name, f"ops@{name}.example", f"site{m}", tuple(nodes)))
    return Federation("bench", Coordinator("/k", "/s"), tuple(members))


def synthetic_placement(federation: Federation, replicas: int) -> dict[str, tuple[str, ...]]:
    """Each source on the hosts of the next ``replicas`` members (never its own)."""
    hosts = [n.name for n in federation.hosts()]
    placement = {}
    for node in federation.sources():
        own = next(i for i, h in enumerate(hosts) if h.startswith(node.member + "/"))
        placement[node.name] = tuple(hosts[(own + k) % len(hosts)] for k in range(1, replicas + 1))
    return placement


def fill_history(history: History, placement: dict[str, tuple[str, ...]], days: int, now: float, seed: int = 1) -> int:
    """Write ``days`` days of runs for every replica (bulk, in one transaction); returns the row count."""
    rng = random.Random(seed)
    rows: list[tuple] = []
    start = now - days * DAY
    pid = os.getpid()
    for source, targets in placement.items():
        for day in range(days):
            t0 = start + day * DAY + rng.uniform(3600, 5 * 3600)
            for target in targets:
                t = t0 + rng.uniform(0, 600)
                duration = rng.lognormvariate(5, 1)
                size = int(GiB * (1 + day / 365))
                if rng.random() < 0.02:
                    rows.append(("backup", source, target, t, t + duration, "failure", 2, None, None, None, None, None, None))
                    continue
                rows.append(("backup", source, target, t, t + duration, "success", 0, f"a-{day}",
                             size, size // 2, size // 50, size // 2 + day * 1000, 1000))
                rows.append(("prune", source, target, t + duration, t + duration + 5, "success", 0, None,
                             None, None, None, size // 2, None))
                if day % 7 == 3:
                    c = t + 10 * 3600
                    rows.append(("repo-check", source, target, c, c + 60, "success", 0, None, None, None, None, None, None))
                    rows.append(("check", source, target, c + 60, c + 300, "success", 0, None, None, None, None, None, None))
            if day % 30 == 15:
                rows.append(("drill", source, targets[0], t0 + 8 * 3600, t0 + 8 * 3600 + 30, "success", 0,
                             None, None, None, None, None, None))
    # a few backups in progress, by a live process (this one): the incremental totals stop at the first
    for source, targets in list(placement.items())[:5]:
        rows.append(("backup", source, targets[0], now - 60, None, "running", None, None, None, None, None, None, None))
    with sqlite3.connect(history.path) as db:
        db.execute("PRAGMA synchronous=OFF")
        db.executemany(
            """INSERT INTO runs (kind, source, target, started, ended, result, exit_code, archive, original_bytes,
               compressed_bytes, deduplicated_bytes, repository_bytes, nfiles, pid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
            [row + (pid,) for row in rows],
        )
    history.set_placement(placement, now=start)
    return len(rows)


# What Prometheus 2.42 sends.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
SERVERS = {
    # the daemon's own server (mutualbackup.report.metrics.start_metrics_server)
    "start_metrics_server": lambda port, source: start_metrics_server("127.0.0.1", port, source),
    # prometheus_client's server around the same collector
    "prometheus_client": lambda port, source: start_http_server(port, addr="127.0.0.1", registry=build_registry(source)),
}


def scrape(url: str) -> tuple[float, bytes]:
    """GET ``url`` as Prometheus does; (seconds, decompressed body)."""
    request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    t = time.perf_counter()
    with opener.open(request, timeout=120) as response:
        body = response.read()
        encoding = response.headers.get("Content-Encoding")
    elapsed = time.perf_counter() - t
    return elapsed, gzip.decompress(body) if encoding == "gzip" else body


def measure(server: str, history: History, federation: Federation, scrapes: int) -> Scrapes:
    """Start ``server`` on a free port, scrape it ``scrapes`` times (the first one cold), stop it."""
    source = MetricsSource(history, federation, placement=history.placement)
    httpd, thread = SERVERS[server](free_port(), source)
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
        cold, body = scrape(url)
        warm = [scrape(url)[0] for _ in range(max(1, scrapes - 1))]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return Scrapes(server, samples, len(body), cold * 1000, statistics.median(warm) * 1000, max(warm) * 1000)


def run(sources: int = 1000, replicas: int = 2, days: int = 365, scrapes: int = 10,
        servers: tuple[str, ...] = tuple(SERVERS)) -> Figures:
    """Build the federation and its history in a temporary directory, and measure each server."""
    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as tmp:
        history = History(tmp)
        try:
            federation = synthetic_federation(sources)
            placement = synthetic_placement(federation, replicas)
            t = time.perf_counter()
            rows = fill_history(history, placement, days, time.time())
            fill_seconds = time.perf_counter() - t
            results = [measure(server, history, federation, scrapes) for server in servers]
        finally:
            history.close()
    return Figures(sources, replicas, days, rows, fill_seconds, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--server", choices=sorted(SERVERS), action="append", help="default: both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.sources, args.replicas, args.days, args.scrapes, tuple(args.server or SERVERS))
    print(json.dumps(asdict(figures), indent=2) if args.json else figures.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
