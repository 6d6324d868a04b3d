"""``mutualbackup daemon`` as a service: the state opened and runs of a crashed process marked, the
/metrics server, the signals, then the :class:`~mutualbackup.daemon.Daemon` loop until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal

from mutualbackup.context import Context, ssh_connector
from mutualbackup.daemon import GRACE_SECONDS, Daemon
from mutualbackup.errors import OperationFailed
from mutualbackup.handoff.server import HandoffServer
from mutualbackup.inventory.model import Federation
from mutualbackup.report.metrics import start_metrics_server
from mutualbackup.state.history import History
from mutualbackup.systemd_notify import Notifier

log = logging.getLogger("mutualbackup.daemon")


def run_daemon(args: argparse.Namespace, federation: Federation, read_at: tuple[object, ...] | None = None) -> int:
    """The daemon until SIGTERM; ``read_at``: the inventory's stamp taken before ``federation`` was read."""
    state = getattr(args, "state", None) or federation.coordinator.state
    history = History(state)
    ctx = Context(federation, history, ssh_connector(federation))
    for problem in ctx.placement.problems:
        log.warning("%s; it keeps the replicas it has, and the daemon backs them up", problem)
    for run in history.mark_interrupted():
        log.warning("run %d (%s %s -> %s) was interrupted by a previous crash; marked", run.id, run.kind, run.source, run.target)
    daemon = Daemon(ctx, tick=args.tick, grace=getattr(args, "grace", GRACE_SECONDS),
                    global_limit=getattr(args, "max_jobs", None), read_at=read_at)
    address, port = federation.coordinator.metrics_address
    try:
        server, _thread = start_metrics_server(address, port, daemon.metrics)
    except OSError as exc:
        raise OperationFailed(f"cannot serve /metrics on {address}:{port}: {exc}") from None
    log.info("daemon started: %d source(s), metrics on http://%s:%d/metrics, grace %.0fs, at most %d jobs at once",
             len(federation.sources()), address, port, daemon.grace, daemon.global_limit)
    systemd = Notifier()
    systemd.ready(f"{len(federation.sources())} source(s), metrics on {address}:{port}")
    daemon.heartbeat = systemd.ping

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        systemd.stopping()
        daemon.stop.set()
        daemon.wake.set()

    def on_hangup(_signum: int, _frame: object) -> None:
        log.info("received SIGHUP: re-reading the inventory (running jobs go on)")
        daemon.reload.set()
        daemon.wake.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    handoffs = HandoffServer(daemon)
    handoffs.start()
    try:
        return daemon.serve()
    finally:
        handoffs.close()
        server.shutdown()
