"""What one daemon tick costs at federation scale: MEMBERS members × (a host and SOURCES_PER sources, 2
replicas each), placed, with a recorded day of backups in a real SQLite state; then the daemon's
``step`` (backups, maintenance, drills and moves to choose: none due) and ``next_wakeup``, timed at a
moment inside the window and one outside it. Goal: < 50 ms a tick at 3 000 sources. Pure: no node is
contacted (the connector refuses). Usage::

    .venv/bin/python bench/tick_bench.py [--members 1000] [--sources-per 3] [--ticks 20] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is importable as a package
from bench.placement_bench import federation as bench_federation
from mutualbackup.context import Context
from mutualbackup.daemon import Daemon
from mutualbackup.plan.placement import place
from mutualbackup.state.history import History


def refuse(node):  # noqa: ANN001, ANN201 - a Connector that must not be used
    raise AssertionError(f"the tick contacted {node.name}")


@dataclass
class Figures:
    sources: int
    replicas: int
    inside_ms: float
    outside_ms: float
    wakeup_ms: float

    def lines(self) -> str:
        return (f"daemon tick at {self.sources} sources, {self.replicas} replicas (nothing due):\n"
                f"  step inside the window  {self.inside_ms:6.1f} ms median (goal: < 50 ms)\n"
                f"  step outside it         {self.outside_ms:6.1f} ms median\n"
                f"  next_wakeup             {self.wakeup_ms:6.1f} ms median")


def median_ms(call, ticks: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(ticks):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run(members: int, sources_per: int, ticks: int) -> Figures:
    fed = bench_federation(members, sources_per)
    placement = place(fed).replicas
    with tempfile.TemporaryDirectory(prefix="mutualbackup-tick-") as scratch:
        history = History(scratch)
        try:
            history.set_placement(placement)
            inside = dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.timezone.utc)  # the default window is 01:00-06:00
            done = inside.timestamp() - 1800
            for source, hosts in placement.items():
                for host in hosts:
                    for kind in ("backup", "check", "drill"):
                        run_id = history.start_run(kind, source, host, started=done)
                        history.finish_run(run_id, "success", ended=done + 60, repository_bytes=10**9)
            daemon = Daemon(Context(fed, history, refuse), clock=lambda: inside.timestamp())
            daemon._moves_looked = None
            inside_ms = median_ms(lambda: _no_job(daemon.step(inside)), ticks)
            outside = inside.replace(hour=12)
            outside_ms = median_ms(lambda: _no_job(daemon.step(outside)), ticks)
            wakeup_ms = median_ms(lambda: daemon.next_wakeup(inside), ticks)
        finally:
            history.close()
    return Figures(len(placement), sum(map(len, placement.values())), inside_ms, outside_ms, wakeup_ms)


def _no_job(started: list) -> None:
    assert not started, f"a job was due: {started[:3]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--sources-per", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.members, args.sources_per, args.ticks)
    print(json.dumps(asdict(figures), indent=2) if args.json else figures.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
