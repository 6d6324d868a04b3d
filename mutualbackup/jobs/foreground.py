"""``mutualbackup run``: back up now, in the foreground — the same steps whether the command runs the jobs
itself or hands them to the daemon serving the same inventory (:mod:`mutualbackup.handoff`).

What the operator sees goes through a :class:`Report`: the command's own prints to its terminal; the daemon's
sends each line to the command, which prints it. :func:`back_up_now` decides what runs and in which order;
``claim`` is where the daemon takes each replica's slot (one job per replica at a time).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Protocol

from mutualbackup.errors import UsageError

if TYPE_CHECKING:
    from mutualbackup import borg
    from mutualbackup.context import Context
    from mutualbackup.jobs.backup import Outcome
    from mutualbackup.jobs.control import JobControl

Claim = Callable[[str, str], ContextManager["tuple[JobControl | None, str | None]"]]
"""``claim(source, target)``: inside, the job's control and None; or None and why the job may not start."""


class Report(Protocol):
    def note(self, text: str) -> None:
        """A line for the operator's stderr (a job not started, and why)."""

    def backing_up(self, source: str, target: str) -> ContextManager[Callable[[borg.CreateProgress], None] | None]:
        """While one backup runs: where borg's progress goes (None: nowhere)."""

    def outcome(self, outcome: Outcome) -> None:
        """One backup's outcome, once it ended."""


@contextlib.contextmanager
def unclaimed(source: str, target: str) -> Iterator[tuple[JobControl | None, str | None]]:
    """The command's own claim: every replica is free here (:func:`job_in_progress` has said who holds one)."""
    yield None, None


def back_up_now(ctx: Context, names: list[str], replica: str | None, report: Report,
                claim: Claim = unclaimed) -> list[Outcome | None]:
    """Back up the sources ``names`` (all when empty) into each replica (only ``replica`` when named), one after
    the other; each outcome, None for a job that did not start. Raises :class:`UsageError` for a name that is no
    source, or a ``replica`` that holds none of them."""
    from mutualbackup.jobs.backup import run_backup

    sources = [ctx.source(name) for name in names] if names else list(ctx.federation.sources())
    if replica:
        ctx.node(replica)
    outcomes: list[Outcome | None] = []
    for source in sources:
        targets = ctx.replica_hosts(source.name)
        if not targets:
            report.note(f"{source.name}: no provisioned replica; run `mutualbackup apply` first")
            outcomes.append(None)
            continue
        for target in targets:
            if replica and target.name != replica:
                continue
            holder = job_in_progress(ctx, source.name, target.name)
            with claim(source.name, target.name) as (control, refused):
                if holder or refused:
                    report.note(f"{source.name} → {target.name}  not started: {holder or refused}; "
                                "run it again once that ends")
                    outcomes.append(None)
                    continue
                with report.backing_up(source.name, target.name) as on_progress:
                    outcome = run_backup(ctx, source, target, on_progress=on_progress, control=control)
            outcomes.append(outcome)
            report.outcome(outcome)
    if replica and not [o for o in outcomes if o is not None]:
        raise UsageError(f"{replica} holds no replica of the named source(s)")
    return outcomes


def exit_code(outcomes: list[Outcome | None]) -> int:
    """0 when every job ran and succeeded (a warning is a success), else 1."""
    return 0 if all(o is not None and o.ok for o in outcomes) else 1


def job_in_progress(ctx: Context, source: str, target: str) -> str | None:
    """Who runs a job on this replica now (the daemon, or another ``run``): one job per replica at a time."""
    from mutualbackup.state.processes import run_owner_alive

    for run in ctx.history.runs(source=source, target=target, result="running"):
        if run_owner_alive(run):
            started = time.strftime("%H:%M:%S", time.localtime(run.started))
            return f"its {run.kind} (run {run.id}, started {started}) is in progress in coordinator process {run.pid}"
    return None
