"""The scheduler loop of ``mutualbackup daemon``: what to start (pure, :mod:`~mutualbackup.plan.schedule`),
each job in its own thread (kinds dispatched from :data:`JOB_KINDS`), and a graceful stop.

Each tick (and whenever a job ends): reload the inventory if its files changed (an invalid one
is reported through ``mutualbackup_inventory_valid``; the last valid one stays in use), reap
finished jobs, then start the due backups, maintenance and drills within the limits. A job whose
replica's last run failed or was interrupted first cleans up what that run left
(:func:`~mutualbackup.jobs.crash_cleanup.clean_up_pair`); a replica held by a live
``mutualbackup run`` is skipped and tried again after :data:`BUSY_RETRY`. A job's failure is
recorded by the job and never stops the loop.

SIGTERM (or SIGINT): start nothing more (nor a job's next step: prune, compaction), let running
jobs finish for up to the grace period, then abort what is left (SIGINT to the remote borg through
a new connection, which keeps a checkpoint, then SIGTERM), record those runs ``interrupted``, and
exit 0 within the grace period. The service around the loop is :mod:`~mutualbackup.service`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from zoneinfo import ZoneInfo


from mutualbackup.jobs import maintenance
from mutualbackup.plan import schedule
from mutualbackup.jobs.backup import run_backup
from mutualbackup.context import Context, coordinator_key, ssh_connector
from mutualbackup.errors import MutualBackupError
from mutualbackup.plan.due import JobState, PairSummary
from mutualbackup.inventory.load import load_inventory
from mutualbackup.report.metrics import MetricsSource
from mutualbackup.jobs.crash_cleanup import clean_up_pair
from mutualbackup.jobs import drill, moves, prune
from mutualbackup.plan.moves import hosts_down, plan_moves
from mutualbackup.plan.placement import known_placement
from mutualbackup.restore.replicas import choose_replica
from mutualbackup.jobs.control import JobControl
from mutualbackup.state.run_index import RunIndex
from mutualbackup.state.history import StateDamaged

log = logging.getLogger("mutualbackup.daemon")

GRACE_SECONDS = 60.0
MIN_JOB_TIMEOUT = 3600.0
MAX_JOB_TIMEOUT = 48 * 3600.0
FIRST_RUN_TIMEOUT = 24 * 3600.0  # a replica's first backup: no measured duration yet
MAX_MOVES = 2  # replicas moved at a time (make before break: each costs a full first backup)
MOVES_EVERY = 60.0  # how often the placement is compared with the federation for replicas to move
COPY_EVERY = 3600.0  # how often the state's consistent copy is refreshed (History.save_copy)
BUSY_RETRY = 300.0  # a replica held by a live `mutualbackup run` is tried again after this long
ABORT_BUDGET = 30.0  # at most this much (and half) of the grace period is kept for aborting jobs cleanly


def job_timeout(estimated_seconds: float) -> float:
    """Per-job timeout: three times the estimate plus half an hour, within [1 h, 48 h]."""
    return min(MAX_JOB_TIMEOUT, max(MIN_JOB_TIMEOUT, 3 * estimated_seconds + 1800))


@dataclass
class RunningJob:
    kind: str  # backup, maintenance, drill (target: the replica it reads from, "" when unknown)
    source: str
    target: str
    reason: str
    thread: threading.Thread | None = None
    control: JobControl = field(default_factory=JobControl)


class Daemon:
    """The scheduler. :meth:`step` is one tick at a given ``now``; :meth:`serve` loops until :attr:`stop`.

    ``clock`` gives the times recorded in the history (tests pass a fake one,
    together with ``now`` to :meth:`step`); ``timeout_for`` maps a job's
    estimated duration to its timeout; ``read_at``: the inventory's stamp taken before ``ctx``'s federation was
    read (:func:`inventory_stamp`; an edit made meanwhile is then read at the first tick).
    """

    def __init__(
        self,
        ctx: Context,
        *,
        tick: float = 15.0,
        grace: float = GRACE_SECONDS,
        global_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        timeout_for: Callable[[float], float] = job_timeout,
        maintenance_enabled: bool = True,
        drills_enabled: bool = True,
        read_at: tuple[object, ...] | None = None,
    ):
        self.ctx = ctx
        self.tick = tick
        self.grace = grace
        self.fixed_limit = global_limit  # None: every host's max_concurrent together (plan/schedule.global_limit_for)
        self.global_limit = global_limit or schedule.global_limit_for(ctx.federation)
        self.clock = clock
        self.timeout_for = timeout_for
        self.maintenance_enabled = maintenance_enabled
        self.drills_enabled = drills_enabled
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload = threading.Event()  # SIGHUP: re-read the inventory at the next tick, jobs keep running
        self.running: dict[tuple[str, str], RunningJob] = {}
        self._busy_until: dict[tuple[str, str], float] = {}  # replicas held by another live coordinator process
        self._lock = threading.Lock()
        self.index = RunIndex(ctx.history)  # what each tick asks of the history, kept up to date
        self._states: dict[tuple[str, str], tuple[tuple, JobState]] = {}  # per replica: its inputs, its state
        self._due_memo: dict = {}  # next attempts that do not depend on the time (plan/due.py); per inventory
        self.metrics = MetricsSource(ctx.history, ctx.federation, placement=ctx.history.placement,
                                     unplaceable=len(ctx.placement.problems))
        # the files as ctx was read from them (``read_at``: stamped before they were read), and as last looked at
        self._read_at: tuple[object, ...] | None = read_at or inventory_stamp(ctx.federation.directory)
        self._inventory_stamp = self._read_at
        self._copied: float | None = None  # monotonic time of the last copy of the state
        self._moves_looked: float | None = None  # fake-clock time of the last look for replicas to move
        self.heartbeat: Callable[[], None] = lambda: None  # called every loop (systemd's watchdog)

    # --- inventory ------------------------------------------------------------

    def reload_if_changed(self, *, asked: bool = False) -> None:
        """A new inventory when its files changed (or when ``asked``: SIGHUP); the last valid one stays otherwise."""
        stamp = inventory_stamp(self.ctx.federation.directory)
        if stamp == self._inventory_stamp and not asked:
            return
        self._inventory_stamp = stamp
        try:
            federation = load_inventory(self.ctx.federation.directory)
            connector = self.ctx.connector
            if getattr(connector, "key_file", None) not in (None, coordinator_key(federation)):
                connector = ssh_connector(federation)  # the key the inventory names now
            candidate = Context(federation, self.ctx.history, connector)
            problems = candidate.placement.problems
        except MutualBackupError as exc:
            self.metrics.inventory_valid = False
            with self._lock:
                self._read_at = None
            log.error("inventory changed and is now invalid; keeping the last valid one:\n%s", exc)
            return
        log.info("inventory reloaded")
        for problem in problems:
            log.warning("%s; it keeps the replicas it has", problem)
        with self._lock:
            self.ctx = candidate
            self._read_at = stamp
        self.global_limit = self.fixed_limit or schedule.global_limit_for(federation)
        self._states.clear()
        self._due_memo.clear()
        self.metrics.federation = federation
        self.metrics.unplaceable = len(candidate.placement.problems)
        self.metrics.inventory_valid = True

    def inventory_as_it_is(self) -> Context | None:
        """The context in use when it was read from the inventory's files as they are now (read since they last
        changed, and valid); else None (changed since, being read, invalid, or the directory's path now leads
        elsewhere)."""
        with self._lock:
            ctx, read_at = self.ctx, self._read_at
        if read_at is None or inventory_stamp(ctx.federation.directory) != read_at:
            return None
        return ctx

    # --- scheduling -----------------------------------------------------------

    def _placement(self) -> dict[str, tuple[str, ...]]:
        return known_placement(self.ctx.federation, self.ctx.history.placement())

    def _busy(self) -> set[tuple[str, str]]:
        """Replicas another live coordinator process holds (a foreground ``mutualbackup run``), for now."""
        stamp = self.clock()
        return {pair for pair, until in self._busy_until.items() if until > stamp}

    def job_states(self, summaries: dict[tuple[str, str], PairSummary] | None = None) -> dict[tuple[str, str], JobState]:
        """What select_jobs needs per replica; any running job (backup, maintenance, or a drill reading
        from it) occupies it, and so does a replica another live coordinator process holds."""
        if summaries is None:
            summaries = self.index.pair_summaries("backup")
        occupied = set(self.running_jobs()) | self._busy()
        # A move's new replica is due at once (inside its window), not in a first run's spread slot: the source
        # has backups already, and the old replica waits for this one.
        arriving = {(m["source"], m["new"]): m["started"] for m in self.ctx.history.moves()}
        states = {}
        known = self._states  # the same inputs as at the last tick give the same state (most replicas, most ticks)
        for source, targets in self._placement().items():
            for target in targets:
                pair = (source, target)
                summary = summaries.get(pair)
                inputs = (summary, pair in occupied, arriving.get(pair))
                held = known.get(pair)
                if held is not None and held[0] == inputs:
                    states[pair] = held[1]
                    continue
                last_success = summary.last_success if summary and summary.last_success else None
                if last_success is None and pair in arriving:
                    node = self.ctx.federation.node(source)
                    assert node.backup is not None
                    last_success = arriving[pair] - node.backup.every
                states[pair] = JobState(
                    source=source,
                    target=target,
                    last_success=_utc(last_success) if last_success else None,
                    last_attempt=_utc(summary.last_attempt) if summary and summary.last_attempt else None,
                    consecutive_failures=summary.failures if summary else 0,
                    running=pair in occupied,
                )
                known[pair] = (inputs, states[pair])
        return states

    def occupancy(self) -> schedule.Occupancy:
        """What runs now (this process's jobs, and replicas another live process holds), for the limits."""
        running = [(job.kind, job.source, job.target) for job in self.running_jobs().values()]
        running += [("busy", source, target) for source, target in self._busy()]
        return schedule.Occupancy.of(running, self.global_limit)

    def running_jobs(self) -> dict[tuple[str, str], RunningJob]:
        """A copy of :attr:`running` (other threads add and remove jobs: a handed-off ``run``'s, for one)."""
        with self._lock:
            return dict(self.running)

    def reap(self) -> list[RunningJob]:
        """Forget the jobs whose thread has ended; return them."""
        with self._lock:
            done = [job for job in self.running.values() if job.thread is not None and not job.thread.is_alive()]
            for job in done:
                del self.running[(job.source, job.target)]
        return done

    def step(self, now: dt.datetime) -> list[RunningJob]:
        """One tick at ``now``: reap finished jobs, start the due ones. Returns the jobs started.

        Backups first, then maintenance, then drills, all within one :class:`schedule.Occupancy`.
        """
        self.reap()
        if self.stop.is_set():
            return []
        fed = self.ctx.federation
        tz = ZoneInfo(fed.coordinator.timezone)
        summaries = self.index.pair_summaries("backup")
        placement = self._placement()
        occupancy = self.occupancy()
        chosen = [("backup", job.source, job.target, job.reason, job.estimated_seconds) for job in schedule.select_jobs(
            fed, placement, self.job_states(summaries), now, tz, sizes=self.index.repository_sizes(), max_per_source=1,
            occupancy=occupancy, memo=self._due_memo,
        )]
        if self.maintenance_enabled:
            chosen += [("maintenance", source, target, "check_every", 0.0) for source, target in schedule.select_maintenance(
                fed, placement, summaries, self.index.pair_summaries("check"), occupancy, now, tz)]
        if self.drills_enabled:
            chosen += [("drill", source, target, "drill_every", 0.0) for source, target in schedule.select_drills(
                fed, drill.drills_due(fed, self.index, now), self._drill_replica, occupancy, now, tz)]
        chosen += self._moves(now)
        started = [self._start(*job) for job in chosen]
        return [job for job in started if job is not None]

    def _moves(self, now: dt.datetime) -> list[tuple[str, str, str, str, float]]:
        """The next step of each move under way whose turn it is, and new moves (at most :data:`MAX_MOVES` at
        a time) when a replica stopped being valid: jobs ``move`` SOURCE -> NEW HOST."""
        history, stamp = self.ctx.history, now.timestamp()
        moving = history.moves()
        self.metrics.moves_in_progress = len(moving)
        if self._moves_looked is not None and stamp - self._moves_looked < MOVES_EVERY:
            return []
        self._moves_looked = stamp
        fed = self.ctx.federation
        jobs = []
        running = self.running_jobs()
        for move in moving:
            if (move["source"], move["new"]) in running or move["source"] not in {s.name for s in fed.sources()}:
                continue
            if move["new"] not in history.placement().get(move["source"], ()) or moves.new_replica_healthy(
                    self.ctx, move):
                jobs.append(("move", move["source"], move["new"], f"move from {move['old']}", 0.0))
        if len(moving) < MAX_MOVES:
            contact, failed = self.index.host_contacts()
            _placement, wanted = plan_moves(fed, history.placement(), {(m["source"], m["old"]): m["new"] for m in moving},
                                            self.index.repository_sizes(), hosts_down(fed, contact, failed, stamp))
            for move in wanted[:MAX_MOVES - len(moving)]:
                history.start_move(move.source, move.old, move.new, move.reason, now=stamp)
                log.info("moving %s's replica from %s to %s (%s): make before break", move.source, move.old,
                         move.new, move.reason)
                jobs.append(("move", move.source, move.new, f"move from {move.old}", 0.0))
            self.metrics.moves_in_progress = len(moving) + len(wanted[:MAX_MOVES - len(moving)])
        return jobs

    def _drill_replica(self, source: str) -> str:
        """The replica a drill of ``source`` reads from (the freshest healthy one); "" when none."""
        try:
            return choose_replica(self.ctx, source, None)[0].name
        except (MutualBackupError, IndexError):
            return ""

    def next_wakeup(self, now: dt.datetime) -> dt.datetime | None:
        """When something may become startable without a job ending (None: nothing scheduled)."""
        fed = self.ctx.federation
        tz = ZoneInfo(fed.coordinator.timezone)
        placement = self._placement()
        wakes = [schedule.next_wakeup(fed, placement, self.job_states(), now, tz, memo=self._due_memo)]
        if self.maintenance_enabled:
            wakes.append(schedule.maintenance_wakeup(fed, placement, self.index.pair_summaries("backup"),
                                                     self.index.pair_summaries("check"), set(self.running_jobs()), now, tz))
        return min((w for w in wakes if w is not None), default=None)

    # --- jobs -------------------------------------------------------------------

    def _start(self, kind: str, source: str, target: str, reason: str, estimate: float) -> RunningJob | None:
        """Start a job in its own thread; None (nothing started) once the daemon is stopping."""
        job = RunningJob(kind, source, target, reason)
        job.thread = threading.Thread(
            target=self._run_job, args=(job, estimate), name=f"{kind} {source}->{target}", daemon=True
        )
        with self._lock:
            if self.stop.is_set():
                return None
            log.debug("starting %s %s -> %s (%s)", kind, source, target, reason)
            self.running[(source, target)] = job
            job.thread.start()
        return job

    def take_slot(self, job: RunningJob) -> str | None:
        """Hold ``job``'s replica for a job run outside the scheduler (a ``mutualbackup run`` handed to the
        daemon: :mod:`mutualbackup.handoff.server`) until :meth:`give_slot_back`; why not, else None."""
        with self._lock:
            if self.stop.is_set():
                return "the daemon is stopping"
            held = self.running.get((job.source, job.target))
            if held is not None:
                return f"the daemon's {held.kind} of it is in progress"
            self.running[(job.source, job.target)] = job
        return None

    def give_slot_back(self, job: RunningJob) -> None:
        with self._lock:
            if self.running.get((job.source, job.target)) is job:
                del self.running[(job.source, job.target)]
        self.wake.set()

    def _stopping(self, job: RunningJob) -> bool:
        return self.stop.is_set() or job.control.is_aborted

    def job_timeout_for(self, source: str, target: str, estimate: float) -> float:
        """The backup's timeout: the estimate-based one, or three times the last successful run if longer
        (at most :data:`MAX_JOB_TIMEOUT`); a replica never backed up gets at least :data:`FIRST_RUN_TIMEOUT`."""
        timeout = self.timeout_for(estimate)
        last = next((r for r in self.ctx.history.runs(kind="backup", source=source, target=target, limit=50)
                     if r.succeeded and r.duration is not None), None)
        if last is None:
            return max(timeout, FIRST_RUN_TIMEOUT)
        return max(timeout, min(MAX_JOB_TIMEOUT, 3 * (last.duration or 0.0)))

    def _run_job(self, job: RunningJob, estimate: float) -> None:
        """The job's thread: clean up after a bad last run of its replica, then the job of its kind."""
        try:
            if self._stopping(job):
                log.info("%s %s -> %s not started: the daemon is stopping", job.kind, job.source, job.target)
                return
            run, cleans_up = JOB_KINDS[job.kind]
            if cleans_up and self._needs_recovery(job) and not self._clean_up(job):
                return
            run(self, job, estimate)
        except Exception:  # a bug in one job must not stop the daemon
            log.exception("%s job %s -> %s crashed", job.kind, job.source, job.target)
        finally:
            self.wake.set()

    def _clean_up(self, job: RunningJob) -> bool:
        """:func:`clean_up_pair` before the job; False when the job must not start (busy elsewhere, stopping)."""
        fed = self.ctx.federation
        cleanup = clean_up_pair(self.ctx, fed.node(job.source), fed.node(job.target), clock=self.clock)
        if cleanup.busy:  # not a failure of the replica: another live process runs its job
            self._busy_until[(job.source, job.target)] = self.clock() + BUSY_RETRY
            log.warning("%s %s -> %s not started (trying again in %.0fs): %s", job.kind, job.source,
                        job.target, BUSY_RETRY, cleanup.busy)
            return False
        return not self._stopping(job)

    def _backup_job(self, job: RunningJob, estimate: float) -> None:
        """The backup, then (when it succeeded and the daemon is not stopping) the prune."""
        ctx = self.ctx
        source, host = ctx.federation.node(job.source), ctx.federation.node(job.target)
        outcome = run_backup(ctx, source, host, timeout=self.job_timeout_for(job.source, job.target, estimate),
                             clock=self.clock, control=job.control)
        assert source.backup is not None
        if outcome.ok and not self._stopping(job) and source.backup.retention.prune_flags():
            prune.prune_replica(ctx, source, host, clock=self.clock, control=job.control)

    def _maintenance_job(self, job: RunningJob, estimate: float) -> None:
        """The check, then (when it passed, and the daemon is not stopping) the guarded compaction."""
        ctx = self.ctx
        maintenance.maintain_replica(ctx, ctx.federation.node(job.source), ctx.federation.node(job.target),
                                     clock=self.clock, control=job.control, proceed=lambda: not self._stopping(job))

    def _move_job(self, job: RunningJob, estimate: float) -> None:
        """A move's next step (make the new replica, or give the old one up)."""
        for move in self.ctx.history.moves():
            if move["source"] == job.source and move["new"] == job.target:
                try:
                    moves.advance(self.ctx, move, clock=self.clock)
                except MutualBackupError as exc:
                    log.warning("move %s → %s: %s (tried again later)", job.source, job.target, exc)

    def _drill_job(self, job: RunningJob, estimate: float) -> None:
        drill.run_drill(self.ctx, self.ctx.federation.node(job.source), clock=self.clock, control=job.control)

    def _needs_recovery(self, job: RunningJob) -> bool:
        """True when the replica's last run was interrupted or failed (it may have left a borg or a
        lock), or another process runs one now."""
        last = self.ctx.history.runs(source=job.source, target=job.target, limit=1)
        return bool(last) and last[0].result in ("interrupted", "failure", "running")

    # --- main loop ------------------------------------------------------------

    def now(self) -> dt.datetime:
        return _utc(self.clock())

    def keep_copy(self) -> None:
        """The state's consistent copy, at start and every :data:`COPY_EVERY`: the way back from a damaged file."""
        stamp = time.monotonic()
        if self._copied is not None and stamp - self._copied < COPY_EVERY:
            return
        self._copied = stamp
        if not self.ctx.history.save_copy():
            log.error("the state database %s no longer reads whole: its copy was not refreshed (the previous one "
                      "is kept); `mutualbackup status` says what to do", self.ctx.history.path)

    def serve(self) -> int:
        """Tick until :attr:`stop` is set, then :meth:`shutdown`; returns the exit code (0; 1 when the state
        database turned out damaged: nothing can be recorded any more, so the daemon stops and says why)."""
        while not self.stop.is_set():
            delay = self.tick
            self.wake.clear()
            try:
                self.heartbeat()
                self.keep_copy()
                asked = self.reload.is_set()
                self.reload.clear()
                self.reload_if_changed(asked=asked)
                now = self.now()
                self.step(now)
                wake = self.next_wakeup(now)
                if wake is not None:
                    delay = min(delay, max(0.05, (wake - now).total_seconds()))
            except StateDamaged as exc:
                log.error("stopping: %s", exc)
                self.stop.set()
                self.shutdown()
                return 1
            except Exception:
                log.exception("scheduler tick failed; trying again next tick")
            self.wake.wait(delay)
        return self.shutdown()

    def shutdown(self) -> int:
        """Let running jobs finish within the grace period, abort the rest cleanly; returns 0."""
        start = time.monotonic()
        deadline = start + self.grace
        abort_at = deadline - min(ABORT_BUDGET, self.grace / 2)
        pending = self._alive_jobs()
        if pending:
            log.info("stopping: waiting up to %.0fs for %d running job(s)", abort_at - start, len(pending))
        self._join(pending, abort_at)
        left = self._alive_jobs()
        if left:
            log.warning("grace period over; aborting %d job(s): %s", len(left),
                        ", ".join(f"{j.kind} {j.source}->{j.target}" for j in left))
            budget = max(1.0, deadline - time.monotonic() - 1.0)
            stoppers = []
            for job in left:
                job.control.abort("the daemon was stopped (SIGTERM) and the grace period ran out")
                stoppers.append(threading.Thread(target=self._stop_remote, args=(job, budget), daemon=True))
                stoppers[-1].start()
            self._join(left, deadline - 0.5)
            for job in self._alive_jobs():
                job.control.close_transports()
            self._join(left, deadline)
            for thread in stoppers:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        try:
            for run in self.ctx.history.interrupt_own_runs("aborted: the daemon was stopped before this run ended",
                                                           now=self.clock()):
                log.warning("run %d (%s %s -> %s) marked interrupted", run.id, run.kind, run.source, run.target)
        except Exception:  # the exit stays clean; the next start marks what is left (history.mark_interrupted)
            log.exception("could not mark the runs left running as interrupted")
        log.info("daemon stopped")
        return 0

    def _alive_jobs(self) -> list[RunningJob]:
        with self._lock:
            return [j for j in self.running.values() if j.thread is not None and j.thread.is_alive()]

    @staticmethod
    def _join(jobs: list[RunningJob], deadline: float) -> None:
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _stop_remote(self, job: RunningJob, budget: float) -> None:
        """Stop the job's supervised command through a new connection: SIGINT, then SIGTERM."""
        current = job.control.current
        if current is None:
            job.control.close_transports()
            return
        node, role = current
        int_seconds = max(1, round(budget * 0.7))  # borg writes a checkpoint on SIGINT: give it most of the time
        term_seconds = max(1, int(budget - int_seconds))
        try:
            with self.ctx.session(node) as transport:
                reply = transport.request("stop", {"role": role, "int_seconds": int_seconds,
                                                   "term_seconds": term_seconds}, timeout=budget + 30)
            log.info("aborted %s %s -> %s on %s: %s", job.kind, job.source, job.target, node.name,
                     reply.data.get("said") or reply.error)
        except Exception as exc:  # the transport is closed below anyway
            log.warning("cannot abort %s %s -> %s on %s cleanly: %s", job.kind, job.source, job.target, node.name, exc)
            job.control.close_transports()


JOB_KINDS: dict[str, tuple[Callable[[Daemon, RunningJob, float], None], bool]] = {
    "backup": (Daemon._backup_job, True),
    "maintenance": (Daemon._maintenance_job, True),
    "drill": (Daemon._drill_job, False),
    "move": (Daemon._move_job, False),
}
"""Each job kind: what its thread runs, and whether a bad last run of its replica is cleaned up first."""


def inventory_stamp(directory: str) -> tuple[object, ...]:
    """What the inventory's loader reads, as the file system has it now: the directory's real path,
    ``federation.yml``, and every entry of ``members/`` but hidden ones (name, kind, inode, size, modification
    and change times: a file replaced with its old modification time, ``cp -p`` say, still changes the last)."""
    real = os.path.realpath(directory)
    stamp: list[object] = [real, _file_stamp(os.path.join(real, "federation.yml"), follow=True)]  # as opened
    try:
        with os.scandir(os.path.join(real, "members")) as entries:
            stamp += sorted((entry.name, _file_stamp(entry.path)) for entry in entries if not entry.name.startswith("."))
    except OSError as exc:
        stamp.append(exc.errno)
    return tuple(stamp)


def _file_stamp(path: str, follow: bool = False) -> tuple[int, ...]:
    """A file's kind, inode, size and times (of what a link leads to when ``follow``: the loader opens
    ``federation.yml`` through one, and refuses links among the member files)."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        return (-1, exc.errno or 0)
    return (info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)

