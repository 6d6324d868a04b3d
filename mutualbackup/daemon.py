"""``mutualbackup daemon``: the scheduler loop, the job pool and the /metrics server.

Each tick: reload the inventory if its files changed (an invalid one is reported
through ``mutualbackup_inventory_valid`` and the last valid one stays in use),
ask :func:`schedule.select_jobs` what to start now, start those jobs in a thread
pool. A job failure is recorded by the job itself and never stops the loop.

SIGTERM (or SIGINT): stop starting jobs, let running ones finish for up to the
grace period, then abort what is left, and exit 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client import start_http_server

from . import schedule
from .backup import run_backup
from .context import Context, require_placeable, ssh_connector
from .errors import MutualBackupError, OperationFailed
from .history import History
from .inventory import load_inventory
from .metrics import MetricsSource, build_registry
from .model import Federation

log = logging.getLogger("mutualbackup.daemon")

GLOBAL_LIMIT = 8
GRACE_SECONDS = 60.0


class Daemon:
    def __init__(self, ctx: Context, *, tick: float = 15.0, grace: float = GRACE_SECONDS, global_limit: int = GLOBAL_LIMIT):
        self.ctx = ctx
        self.tick = tick
        self.grace = grace
        self.global_limit = global_limit
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=global_limit, thread_name_prefix="job")
        self.running: dict[tuple[str, str], Future[object]] = {}
        self.metrics = MetricsSource(ctx.history, ctx.federation, placement=ctx.history.placement)
        self._inventory_stamp = _stamp(ctx.federation.directory)

    # --- inventory ------------------------------------------------------------

    def reload_if_changed(self) -> None:
        stamp = _stamp(self.ctx.federation.directory)
        if stamp == self._inventory_stamp:
            return
        self._inventory_stamp = stamp
        try:
            federation = load_inventory(self.ctx.federation.directory)
            candidate = Context(federation, self.ctx.history, self.ctx.connector)
            require_placeable(federation, candidate.placement)
        except MutualBackupError as exc:
            self.metrics.inventory_valid = False
            log.error("inventory changed and is now invalid; keeping the last valid one:\n%s", exc)
            return
        log.info("inventory reloaded")
        self.ctx = candidate
        self.metrics.federation = federation
        self.metrics.inventory_valid = True

    # --- scheduling -----------------------------------------------------------

    def job_states(self) -> dict[tuple[str, str], schedule.JobState]:
        history = self.ctx.history
        states = {}
        for source, targets in history.placement().items():
            for target in targets:
                success = history.last_run("backup", source, target, successful=True)
                last = history.last_run("backup", source, target)
                states[(source, target)] = schedule.JobState(
                    source=source,
                    target=target,
                    last_success=_utc(success.started) if success else None,
                    last_attempt=_utc(last.started) if last else None,
                    consecutive_failures=history.consecutive_failures("backup", source, target),
                    running=(source, target) in self.running,
                )
        return states

    def step(self, now: dt.datetime) -> list[schedule.Job]:
        """One tick: reap finished jobs, start the due ones. Returns the jobs started."""
        for key, future in list(self.running.items()):
            if future.done():
                del self.running[key]
        fed = self.ctx.federation
        placement = {s: tuple(t for t in targets if _known(fed, t)) for s, targets in self.ctx.history.placement().items() if _known(fed, s)}
        jobs = schedule.select_jobs(
            fed, placement, self.job_states(), now, ZoneInfo(fed.coordinator.timezone),
            global_limit=self.global_limit, sizes=self.ctx.history.repository_sizes(), max_per_source=1,
        )
        for job in jobs:
            source, target = fed.node(job.source), fed.node(job.target)
            self.running[(job.source, job.target)] = self.pool.submit(self._run_job, source, target)
        return jobs

    def _run_job(self, source, target) -> None:
        try:
            run_backup(self.ctx, source, target)
        except Exception:  # a bug in one job must not stop the daemon
            log.exception("backup of %s -> %s crashed", source.name, target.name)

    # --- main loop ------------------------------------------------------------

    def serve(self) -> int:
        while not self.stop.is_set():
            try:
                self.reload_if_changed()
                self.step(dt.datetime.now(dt.timezone.utc))
            except Exception:
                log.exception("scheduler tick failed; trying again next tick")
            self.stop.wait(self.tick)
        return self.shutdown()

    def shutdown(self) -> int:
        pending = [f for f in self.running.values() if not f.done()]
        if pending:
            log.info("stopping: waiting up to %.0fs for %d running job(s)", self.grace, len(pending))
        deadline = time.monotonic() + self.grace
        for future in pending:
            _wait(future, deadline)
        self.pool.shutdown(wait=False, cancel_futures=True)
        left = [k for k, f in self.running.items() if not f.done()]
        if left:
            log.warning("grace period over; abandoning %d job(s): %s", len(left), ", ".join(f"{s}->{t}" for s, t in left))
            for s, t in left:
                for run in self.ctx.history.runs(kind="backup", source=s, target=t, result="running"):
                    self.ctx.history.finish_run(run.id, "interrupted", error="aborted: the daemon was stopped")
        log.info("daemon stopped")
        return 0


def run_daemon(args: argparse.Namespace, federation: Federation) -> int:
    state = getattr(args, "state", None) or federation.coordinator.state
    history = History(state)
    ctx = Context(federation, history, ssh_connector(federation))
    require_placeable(federation, ctx.placement)
    for run in history.mark_interrupted():
        log.warning("run %d (%s %s -> %s) was interrupted by a previous crash; marked", run.id, run.kind, run.source, run.target)
    daemon = Daemon(ctx, tick=args.tick)
    address, port = federation.coordinator.metrics_address
    try:
        server, _thread = start_http_server(port, addr=address, registry=build_registry(daemon.metrics))
    except OSError as exc:
        raise OperationFailed(f"cannot serve /metrics on {address}:{port}: {exc}") from None
    log.info("daemon started: %d source(s), metrics on http://%s:%d/metrics", len(federation.sources()), address, port)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        daemon.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.serve()
    finally:
        server.shutdown()


def _wait(future: Future[object], deadline: float) -> None:
    """Wait for ``future`` until ``deadline`` (monotonic); its outcome is already recorded."""
    try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
    except Exception:
        pass


def _stamp(directory: str) -> tuple[tuple[str, float], ...]:
    root = Path(directory)
    files = [root / "federation.yml", *sorted((root / "members").glob("*.yml"))]
    return tuple((str(p), p.stat().st_mtime if p.exists() else 0.0) for p in files)


def _known(federation: Federation, name: str) -> bool:
    try:
        federation.node(name)
    except KeyError:
        return False
    return True


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
