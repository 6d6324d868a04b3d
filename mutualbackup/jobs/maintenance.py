"""Keeping repositories healthy: check, and compaction guarded by promise 3 (the prune is :mod:`~mutualbackup.jobs.prune`).

Per source x replica:

- **check** (every ``check_every``, and ``mutualbackup verify``):
  ``repo-check`` on the host, as its user, without any key
  (``borg check --repository-only`` and the repository's last-write time, so
  a host that lost data is noticed even when the source is down), then
  ``check`` from the source (``borg check --archives-only``); the ``check``
  run succeeds only when both did.
- **compact** (after a successful check): the guard of SPEC promise 3 first
  (rules in :mod:`~mutualbackup.plan.compaction_rules`). From the source: every archive the coordinator
  recorded and did not prune must still be listed *under the borg archive id
  recorded with it* (a delete + create of the same name is a replaced
  archive), and the live size must not be below the size measured right
  after the coordinator's last *verified* prune (one that found the archives
  exactly as recorded; a backup's own measurement is never a baseline). On
  the host, without a key: every line of the repository's ``transactions``
  log (borg writes one per commit through an ``--append-only`` serve, and no
  key holder can remove one) numbered above the last one a passed guard
  accounted for must lie within a backup or prune run of the coordinator into
  that repository (its clock, the host's offset measured now, 60 s of slack).
  A run still ``running``, or ``interrupted`` by a crash (its recorded end is
  only when the next process noticed: ``end_uncertain``), covers at most 12 h
  from its start (:func:`~mutualbackup.plan.compaction_rules.run_window`): a late restart never turns days of
  foreign writes into the coordinator's; a longer crashed run makes the guard
  refuse (an alert; nothing is lost).
  Otherwise: refuse, alert, keep everything. Then ``borg compact`` on the
  host, only when the coordinator pruned something since the last
  compaction; the freed volume is recorded.

  Limits: the host-side rule tells *when* writes happened, not *what* they
  deleted. A source that lies in ``borg list`` and deletes during the
  coordinator's own backup or prune of it (it sees them start) is not caught;
  nor is a write between the guard's reads and ``borg compact`` taking the lock.

Every step is a run in the history (kinds ``repo-check``, ``check``,
``compact``) and a log line at its start and end. Nothing here
raises for a failed step.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import TransportError
from mutualbackup.plan.compaction_rules import (WRITING_KINDS, archive_changes, baseline_bytes, checked_through,
                    foreign_transactions, guard_problems, run_window)
from mutualbackup.state.history import Run
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.crash_cleanup import host_role, source_role
from mutualbackup.jobs.archives import LIST_TIMEOUT, archive_entries, borg_ok, list_archives, live_bytes, recorded_archives
from mutualbackup.jobs.runs import RecordedRun, RunFailed, RunOutcome, aborted, running
from mutualbackup.node.requests import host_ref
from mutualbackup.jobs.control import JobControl
from mutualbackup.remote.transport import Result, Transport, reply_result

log = logging.getLogger("mutualbackup.jobs.maintenance")


def _run_of(ctx: Context, kind: str, source: Node, host: Node, clock: Callable[[], float],
            control: JobControl | None) -> RecordedRun:
    return RecordedRun(ctx.history, kind, source.name, host.name, clock=clock, control=control, logger=log)


CHECK_TIMEOUT = 24 * 3600
COMPACT_TIMEOUT = 12 * 3600
WRITE_CLOCK_SKEW = 3600  # seconds of clock difference tolerated between the coordinator and a host


# --- prune --------------------------------------------------------------------------


# --- check ----------------------------------------------------------------------------


def check_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> list[RunOutcome]:
    """``repo-check`` on the host (no key), then ``check`` of the archives from the source."""
    repository = repository_check(ctx, source, host, clock, control)
    step = _run_of(ctx, "check", source, host, clock, control)
    if not repository.ok:
        return [repository, step.fail(f"not checked further: the repository check on {host.name} failed:\n{repository.error}")]

    def body() -> RunOutcome:
        try:
            with ctx.session(source, control) as transport, running(control, source, source_role(host.name)):
                result = reply_result(transport.request(
                    "check", {"host": host_ref(host), "run_id": step.id, "timeout": CHECK_TIMEOUT},
                    timeout=CHECK_TIMEOUT + 120))
        except TransportError as exc:
            raise RunFailed(f"cannot reach {source.name} to check the archives (the repository check on {host.name} "
                          f"passed): {exc}") from None
        aborted(control)
        borg_ok(result, "borg check --archives-only", strict=True)
        return step.succeed({"repository": "ok", "archives": "ok"})

    with step:
        body()
    return [repository, step.outcome]


def repository_check(ctx: Context, source: Node, host: Node, clock: Callable[[], float], control: JobControl | None) -> RunOutcome:
    """``borg check --repository-only`` on the host, without any key (it also drops an uncommitted transaction)."""
    step = _run_of(ctx, "repo-check", source, host, clock, control)

    def body() -> RunOutcome:
        path = borg.repository_path(source, host)
        with ctx.session(host, control) as transport, running(control, host, host_role(source.name)):
            reply = transport.request("repo_check", {"source": source.name, "run_id": step.id, "timeout": CHECK_TIMEOUT},
                                      timeout=CHECK_TIMEOUT + 120)
        facts = _facts(reply_result(reply, "facts"), host, path)
        result = reply_result(reply, "check")
        aborted(control)
        borg_ok(result, f"borg check --repository-only on {host.name}", strict=True)
        detail = {"segments": facts.segments, "bytes": facts.bytes, "last_write": facts.last_write}
        last = ctx.history.last_run("backup", source.name, host.name, successful=True)
        if last is not None and last.ended is not None and (facts.last_write or 0) < last.ended - WRITE_CLOCK_SKEW:
            raise RunFailed(
                f"{host.name} may have lost data: the repository {path} was last written at "
                f"{_iso(facts.last_write)}, but a backup into it succeeded at {_iso(last.ended)}. "
                "Was the host restored from an older snapshot? Check with its operators before compacting anything.",
                alert="repository-rolled-back",
            )
        return step.succeed(detail)

    with step:
        body()
    return step.outcome


def _facts(result: Result, host: Node, path: str) -> borg.RepositoryFacts:
    """The repository's facts the host read; RunFailed (with its alert) when it is missing or no repository."""
    if result.exit_code == borg.REPOSITORY_MISSING:
        raise RunFailed(f"the repository {path} is missing on {host.name}: the host lost it, or it was moved. "
                      "Run `mutualbackup apply` to create an empty one (the history in it is gone).", alert="repository-missing")
    if result.exit_code == borg.REPOSITORY_NOT_BORG:
        raise RunFailed(f"{path} on {host.name} holds no borg repository (no config or data/): it was damaged or replaced",
                      alert="repository-damaged")
    if not result.ok:
        raise RunFailed(f"cannot read the repository {path} on {host.name} (exit {result.exit_code}): {result.stderr_tail(5)}")
    return borg.parse_repository_facts(result.stdout)


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


# --- compact --------------------------------------------------------------------------


def compact_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time,
    control: JobControl | None = None, force: bool = False,
) -> RunOutcome:
    """Check that every deletion is the coordinator's own, then ``borg compact`` on the host.

    Compacts only when the coordinator pruned something since the last
    compaction (or ``force``). Refuses, alerts and keeps everything otherwise.
    """
    with _run_of(ctx, "compact", source, host, clock, control) as run:
        _compact(ctx, run, source, host, force)
    assert run.outcome is not None
    return run.outcome


def _compact(ctx: Context, run: RecordedRun, source: Node, host: Node, force: bool) -> None:
    """The guard from the source (archives and volume), then on the host (its transactions log), then compact."""
    clock, control = run.clock, run.control
    try:
        with ctx.session(source, control) as transport:
            present = list_archives(transport, host)
            live = live_bytes(transport, host)
    except TransportError as exc:
        raise RunFailed(f"skipped: cannot reach {source.name} to list its archives, and compaction only runs after "
                        f"that check: {exc}") from None
    changed = archive_changes(recorded_archives(ctx, source, host), {a.name: a.id for a in present})
    ctx.history.record_archives(source.name, host.name, archive_entries(present), now=clock())
    pair_runs = ctx.history.runs(source=source.name, target=host.name)
    baseline = baseline_bytes(pair_runs)
    listed_ids = {a.name: a.id for a in present}
    refusal = {"compacted": False, "vanished": list(changed.vanished), "replaced": list(changed.replaced),
               "replaced_ids": {name: listed_ids.get(name) for name in changed.replaced},  # what an admin may accept
               "baseline_bytes": baseline, "live_bytes": live}
    problems = guard_problems(changed.vanished, baseline, live, replaced=changed.replaced)
    path = borg.repository_path(source, host)
    if problems:
        problems += _host_side_anyway(ctx, run, source, host, path, pair_runs, refusal)
        _refuse(ctx, run, source, host, problems, refusal, clock)
        return
    pruned = _pruned_since_compaction(ctx, source, host, ctx.history.known_archives(source.name, host.name))
    aborted(control)
    with ctx.session(host, control) as transport:
        checked = _host_side_guard(ctx, run, transport, source, host, path, pair_runs, refusal)
        if checked is None:
            return
        if not pruned and not force:
            run.succeed({"compacted": False, "reason": "nothing pruned since the last compaction",
                         "live_bytes": live, "transactions_checked": checked})
            return
        with running(control, host, host_role(source.name)):
            reply = transport.request("compact", {"source": source.name, "run_id": run.id, "timeout": COMPACT_TIMEOUT},
                                      timeout=COMPACT_TIMEOUT + 120)
        before = _facts(reply_result(reply, "before"), host, path)
        aborted(control)
        borg_ok(reply_result(reply, "compact"), f"borg compact on {host.name}")
        after = _facts(reply_result(reply, "after"), host, path)
    run.succeed({"compacted": True, "pruned": pruned, "freed_bytes": before.bytes - after.bytes,
                 "bytes_before": before.bytes, "bytes_after": after.bytes, "live_bytes": live,
                 "transactions_checked": checked})


def _host_side_guard(
    ctx: Context, run: RecordedRun, transport: Transport, source: Node, host: Node, path: str,
    pair_runs: Sequence[Run], refusal: dict[str, object],
) -> int | None:
    """The host-side rule of the guard: the last transaction it accounts for, or None after refusing."""
    transactions, problems = _foreign(run, transport, host, path, pair_runs, refusal)
    if problems:
        _refuse(ctx, run, source, host, problems, refusal, run.clock)
        return None
    return max((t.number for t in transactions), default=checked_through(pair_runs))


def _foreign(
    run: RecordedRun, transport: Transport, host: Node, path: str, pair_runs: Sequence[Run], refusal: dict[str, object],
) -> tuple[list[borg.Transaction], list[str]]:
    """The host's transactions, and the problems of those no run of the coordinator accounts for (their numbers
    go into ``refusal``)."""
    clock = run.clock
    asked = clock()
    host_now, transactions = _transactions(transport, host, path)
    offset = host_now - (asked + clock()) / 2
    windows = [run_window(r, clock()) for r in pair_runs if r.kind in WRITING_KINDS]
    foreign = foreign_transactions(transactions, checked_through(pair_runs), windows, offset)
    if not foreign:
        return transactions, []
    refusal["foreign_transactions"] = [t.number for t in foreign]
    return transactions, guard_problems((), None, None, foreign=foreign, offset=offset)


def _host_side_anyway(
    ctx: Context, run: RecordedRun, source: Node, host: Node, path: str, pair_runs: Sequence[Run],
    refusal: dict[str, object],
) -> list[str]:
    """When the source side already refuses: the host side too, so that one refusal lists everything a
    member's admin may then accept at once (best effort: a host that does not answer adds nothing)."""
    try:
        with ctx.session(host, run.control) as transport:
            return _foreign(run, transport, host, path, pair_runs, refusal)[1]
    except (TransportError, RunFailed) as exc:
        log.info("compaction of %s on %s refused; the host's transactions log could not be read as well: %s",
                 source.name, host.name, exc)
        return []


def _refusal(source: Node, host: Node, problems: Sequence[str], *, foreign: bool = False) -> str:
    path = borg.repository_path(source, host)
    return (
        f"compaction of {source.name} on {host.name} refused; nothing was compacted, so the deleted data is still on disk.\n"
        + "\n".join(f"- {p}" for p in problems)
        + f"\nSomeone with {source.name}'s key deleted or rewrote archives, or the repository was rolled back. "
        f"To recover: on {host.name}, with backups of {source.name} paused, roll {path} back to the last transaction "
        "before the deletion (borg documentation, \"Append-only mode\": remove the newer segments and index files), "
        f"then run `mutualbackup verify {source.name}`. Compaction stays refused until the archives are back"
        + (f"; a write in the host's log stays unexplained until its line is removed from {path}/transactions "
           "(do that only once you know who made it, and after the rollback if it deleted anything)." if foreign else ".")
        + f"\nIf the deletion was deliberate, one of {source.member}'s admins accepts exactly this: "
        f"`mutualbackup accept-deletion {source.name} --replica {host.name} --statement FILE` writes what to sign, the "
        "admin signs it on their own machine (ssh-keygen -Y sign -n mutualbackup-accept-deletion -f KEY FILE), and "
        f"`mutualbackup accept-deletion {source.name} --replica {host.name} --signature FILE.sig` records it; the next "
        "compaction then frees it for good."
    )


def _refuse(ctx: Context, step: RecordedRun, source: Node, host: Node, problems: Sequence[str],
            detail: Mapping[str, object], clock: Callable[[], float]) -> RunOutcome:
    message = _refusal(source, host, problems, foreign="foreign_transactions" in detail)
    ctx.history.add_alert(source.name, host.name, "compaction-refused", message, now=clock())
    return step.fail(message, detail={**detail, "refused": True})


def path_source(path: str) -> str:
    """The source (``MEMBER/NODE``) whose repository lives at ``path`` (STORAGE/MEMBER/NODE)."""
    return "/".join(path.rstrip("/").split("/")[-2:])


def _transactions(transport: Transport, host: Node, path: str) -> tuple[float, list[borg.Transaction]]:
    """The host's clock and the repository's transactions log, read on the host (no key)."""
    result = reply_result(transport.request("transactions", {"source": path_source(path)}, timeout=LIST_TIMEOUT + 60))
    if result.exit_code in (borg.REPOSITORY_MISSING, borg.REPOSITORY_NOT_BORG):
        _facts(result, host, path)  # says which, with its alert
    if not result.ok:
        raise RunFailed(f"cannot read the transactions log of {path} on {host.name} (exit {result.exit_code}): "
                      f"{result.stderr_tail(5)}")
    return borg.parse_transactions(result.stdout)


def _pruned_since_compaction(ctx: Context, source: Node, host: Node, known: Mapping[str, tuple[float, float | None]]) -> list[str]:
    since = 0.0
    for run in ctx.history.runs(kind="compact", source=source.name, target=host.name, result="success"):
        if run.detail and json.loads(run.detail).get("compacted"):
            since = run.started
            break
    return sorted(name for name, (_created, pruned) in known.items() if pruned is not None and pruned >= since)


# --- the maintenance job, verify, and when it is due -----------------------------------


def maintain_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None,
    proceed: Callable[[], bool] = lambda: True,
) -> list[RunOutcome]:
    """The daemon's periodic job: check, then (when the check passed and ``proceed()`` still says so)
    guarded compaction."""
    outcomes = check_replica(ctx, source, host, clock=clock, control=control)
    if all(o.ok for o in outcomes) and proceed() and not (control is not None and control.is_aborted):
        outcomes.append(compact_replica(ctx, source, host, clock=clock, control=control))
    return outcomes


def verify(ctx: Context, sources: Sequence[Node], *, clock: Callable[[], float] = time.time,
           on_step: Callable[[str], None] | None = None) -> list[RunOutcome]:
    """``mutualbackup verify``: :func:`check_replica` of every replica of ``sources`` (``on_step`` hears which)."""
    pairs = [(source, target) for source in sources
             for target in ctx.replica_hosts(source.name)]  # a host that left is skipped, with a warning
    outcomes: list[RunOutcome] = []
    for number, (source, target) in enumerate(pairs, 1):
        if on_step is not None:
            on_step(f"verify {number} of {len(pairs)}: {source.name} on {target.name}")
        outcomes += check_replica(ctx, source, target, clock=clock)
    return outcomes


