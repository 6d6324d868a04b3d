"""Keeping repositories healthy: prune, check, and compaction guarded by promise 3.

Per source x replica:

- **prune** (after each successful backup, from the source, through its
  append-only key): ``borg list`` before, ``borg prune`` with the source's
  ``retention``, ``borg list`` after. Every archive seen is recorded in the
  history; those that disappeared *and* that :func:`retention.plan_prune`
  deletes are marked pruned by the coordinator. Any other disappearance is an
  alert, and stays unexplained (so compaction will refuse). The plan's deletions
  are saved in the run (``plan_delete``) before ``borg prune`` starts: after a
  failed or aborted prune the archives it removed of its plan are marked (when
  the repository can still be listed), and after a crash the next prune marks
  the vanished archives that the saved plan of an unfinished prune deletes.
- **check** (every ``check_every``, and ``mutualbackup verify``):
  ``repo-check`` on the host, as its user, without any key
  (``borg check --repository-only`` and the repository's last-write time, so
  a host that lost data is noticed even when the source is down), then
  ``check`` from the source (``borg check --archives-only``); the ``check``
  run succeeds only when both did.
- **compact** (after a successful check): the guard of SPEC promise 3 first
  (rules in :mod:`guard`). From the source: every archive the coordinator
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
  from its start (:func:`guard.run_window`): a late restart never turns days of
  foreign writes into the coordinator's; a longer crashed run makes the guard
  refuse (an alert; nothing is lost).
  Otherwise: refuse, alert, keep everything. Then ``borg compact`` on the
  host, only when the coordinator pruned something since the last
  compaction; the freed volume is recorded.

  Limits: the host-side rule tells *when* writes happened, not *what* they
  deleted. A source that lies in ``borg list`` and deletes during the
  coordinator's own backup or prune of it (it sees them start) is not caught;
  nor is a write between the guard's reads and ``borg compact`` taking the lock.

Every step is a run in the history (kinds ``prune``, ``repo-check``,
``check``, ``compact``) and a log line at its start and end. Nothing here
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
from mutualbackup.inventory.model import Node
from mutualbackup.jobs.crash_cleanup import host_role, source_role
from mutualbackup.jobs.runs import RecordedRun, RunFailed, RunOutcome, aborted
from mutualbackup.plan.retention import plan_prune
from mutualbackup.remote.supervision import JobControl, pidfile_path, run_supervised
from mutualbackup.remote.transport import Result, Transport, resolve_path

log = logging.getLogger("mutualbackup.jobs.maintenance")


def _run_of(ctx: Context, kind: str, source: Node, host: Node, clock: Callable[[], float],
            control: JobControl | None) -> RecordedRun:
    return RecordedRun(ctx.history, kind, source.name, host.name, clock=clock, control=control, logger=log)

LIST_TIMEOUT = 900
PRUNE_TIMEOUT = 4 * 3600
CHECK_TIMEOUT = 24 * 3600
COMPACT_TIMEOUT = 12 * 3600
WRITE_CLOCK_SKEW = 3600  # seconds of clock difference tolerated between the coordinator and a host


def _borg_ok(result: Result, what: str, *, strict: bool = False) -> None:
    """Raise unless borg succeeded; ``strict``: a warning fails too (``borg check`` exits 1 when it finds errors)."""
    verdict = borg.classify_exit(result.exit_code)
    if verdict != "success" and (strict or verdict != "warning"):
        if strict and verdict == "warning":
            raise RunFailed(f"{what} found errors (exit {result.exit_code}):\n{result.stderr_tail()}".strip(), result.exit_code,
                          alert="repository-damaged")
        raise RunFailed(f"{what} exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail()}".strip(),
                      result.exit_code)


def _list(transport: Transport, source: Node, url: str, env: Mapping[str, str]) -> list[borg.ArchiveEntry]:
    result = transport.run(borg.list_argv(source.borg, url), env=env, timeout=LIST_TIMEOUT)
    _borg_ok(result, "borg list")
    return borg.parse_list_json(result.stdout)


def _live_bytes(transport: Transport, source: Node, url: str, env: Mapping[str, str]) -> int | None:
    """The repository's live size (``borg info``), or None when borg cannot tell."""
    result = transport.run(borg.info_argv(source.borg, url), env=env, timeout=LIST_TIMEOUT)
    if not borg.succeeded(result.exit_code):
        return None
    try:
        return borg.parse_info_repository_bytes(result.stdout)
    except (ValueError, KeyError):
        return None


# --- prune --------------------------------------------------------------------------


def prune_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> RunOutcome:
    """``borg prune`` of ``source``'s repository on ``host`` with its retention; see the module notes."""
    assert source.backup is not None
    step = _run_of(ctx, "prune", source, host, clock, control)

    def body() -> RunOutcome:
        assert source.backup is not None
        url = borg.repository_url(source, host)
        with ctx.session(source, control) as transport:
            paths = ctx.source_paths(transport, source)
            env = borg.client_env(paths)
            before = _list(transport, source, url, env)
            _explain_unfinished_prunes(ctx, source, host, {a.name for a in before}, clock)
            changed = archive_changes(_recorded(ctx, source, host), {a.name: a.id for a in before})
            ctx.history.record_archives(source.name, host.name, _entries(before), now=clock())
            plan = plan_prune([a for a in before if a.name.startswith(f"{source.slug}-")], source.backup.retention)
            aborted(control)
            # committed before borg runs: a crash or an abort mid-prune leaves deletions the next prune explains
            step.save(plan_delete=list(plan.delete))
            try:
                result = run_supervised(
                    transport, source, pidfile_path(paths.workdir, source_role(host.name)), step.id,
                    borg.prune_argv(source.borg, url, source.backup.retention, borg.archive_glob(source)),
                    env=env, timeout=PRUNE_TIMEOUT, control=control,
                )
                aborted(control)
                _borg_ok(result, "borg prune")
            except Exception:  # failed or aborted (not Ctrl-C: no more borg then); the next prune explains the rest
                _mark_partial_prune(ctx, transport, source, host, url, env, before, plan.delete, changed.replaced, clock)
                raise
            size = _live_bytes(transport, source, url, env)  # before the listing that vouches for it
            after = {a.name: a.id for a in _list(transport, source, url, env)}
            removed = {a.name for a in before} - set(after)
            # a replaced archive is not the one recorded: its deletion explains nothing
            explained = sorted((removed & set(plan.delete)) - set(changed.replaced))
            unexplained = sorted(plan.explains(removed))
            ctx.history.mark_pruned(source.name, host.name, explained, now=clock())
            changed_after = archive_changes(_recorded(ctx, source, host), after)
        verified = not changed and not unexplained and not changed_after
        detail = {"pruned": explained, "kept": sorted(plan.keep), "verified": verified}
        if unexplained or changed or changed_after:
            problems = guard_problems(changed.vanished, None, None, replaced=changed.replaced)
            if unexplained:
                problems.append(f"borg prune removed {len(unexplained)} archive(s) that the retention policy keeps: "
                                f"{', '.join(unexplained)}")
            elif changed_after and not changed:
                problems.append(f"after the prune, archive(s) are missing or changed: {', '.join(changed_after.names)}")
            message = (
                "\n".join(problems) + f"\nThey are not marked as pruned, so compaction of {source.name} on {host.name} "
                "will refuse until this is explained; the data is still there (append-only)."
            )
            ctx.history.add_alert(source.name, host.name, "prune-unexplained", message, now=clock())
            return step.fail(message, detail=detail)
        return step.succeed(detail, repository_bytes=size)

    with step:

        body()

    return step.outcome


def _mark_partial_prune(
    ctx: Context, transport: Transport, source: Node, host: Node, url: str, env: Mapping[str, str],
    before: Sequence[borg.ArchiveEntry], delete: Sequence[str], replaced: Sequence[str], clock: Callable[[], float],
) -> None:
    """After a failed or aborted ``borg prune``: mark pruned what it removed of its plan, when the
    repository can still be listed (best effort: otherwise the next prune explains them)."""
    try:
        after = {a.name for a in _list(transport, source, url, env)}
    except Exception as exc:  # the prune's own failure is what the run records
        log.warning("prune   %s -> %s: cannot list the archives after a failed prune: %s", source.name, host.name, exc)
        return
    removed = {a.name for a in before} - after
    ctx.history.mark_pruned(source.name, host.name, sorted((removed & set(delete)) - set(replaced)), now=clock())


def _explain_unfinished_prunes(
    ctx: Context, source: Node, host: Node, listed: set[str], clock: Callable[[], float]
) -> list[str]:
    """Mark pruned the archives recorded, never marked, no longer ``listed``, that the saved plan
    (``plan_delete``) of a prune that did not succeed, since the last successful one, deletes:
    that prune removed them before it crashed or failed. Returns their names."""
    planned: set[str] = set()
    for run in ctx.history.runs(kind="prune", source=source.name, target=host.name):  # newest first
        if run.succeeded:
            break
        if run.result == "running":
            continue
        try:
            planned.update(json.loads(run.detail).get("plan_delete", ()) if run.detail else ())
        except (ValueError, AttributeError):
            continue
    known = ctx.history.known_archives(source.name, host.name)
    names = sorted(name for name in planned if name in known and known[name][1] is None and name not in listed)
    if names:
        ctx.history.mark_pruned(source.name, host.name, names, now=clock())
        log.info("prune   %s -> %s: %d archive(s) removed by an unfinished prune: %s", source.name, host.name,
                 len(names), ", ".join(names))
    return names


# --- check ----------------------------------------------------------------------------


def check_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> list[RunOutcome]:
    """``repo-check`` on the host (no key), then ``check`` of the archives from the source."""
    repository = _repository_check(ctx, source, host, clock, control)
    step = _run_of(ctx, "check", source, host, clock, control)
    if not repository.ok:
        return [repository, step.fail(f"not checked further: the repository check on {host.name} failed:\n{repository.error}")]

    def body() -> RunOutcome:
        url = borg.repository_url(source, host)
        try:
            with ctx.session(source, control) as transport:
                paths = ctx.source_paths(transport, source)
                result = run_supervised(
                    transport, source, pidfile_path(paths.workdir, source_role(host.name)), step.id,
                    borg.check_argv(source.borg, url, archives_only=True),
                    env=borg.client_env(paths), timeout=CHECK_TIMEOUT, control=control,
                )
        except TransportError as exc:
            raise RunFailed(f"cannot reach {source.name} to check the archives (the repository check on {host.name} "
                          f"passed): {exc}") from None
        aborted(control)
        _borg_ok(result, "borg check --archives-only", strict=True)
        return step.succeed({"repository": "ok", "archives": "ok"})

    with step:
        body()
    return [repository, step.outcome]


def _repository_check(ctx: Context, source: Node, host: Node, clock: Callable[[], float], control: JobControl | None) -> RunOutcome:
    step = _run_of(ctx, "repo-check", source, host, clock, control)

    def body() -> RunOutcome:
        path = borg.repository_path(source, host)
        with ctx.session(host, control) as transport:
            workdir = resolve_path(host.workdir, transport)
            facts = _facts(transport, host, path)
            result = run_supervised(
                transport, host, pidfile_path(workdir, host_role(source.name)), step.id,
                borg.check_argv(host.borg, path, repository_only=True),
                env=borg.host_env(workdir), timeout=CHECK_TIMEOUT, control=control,
            )
        aborted(control)
        _borg_ok(result, f"borg check --repository-only on {host.name}", strict=True)
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


def _facts(transport: Transport, host: Node, path: str) -> borg.RepositoryFacts:
    result = transport.run(borg.repository_facts_argv(path), timeout=LIST_TIMEOUT)
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
    step = _run_of(ctx, "compact", source, host, clock, control)

    def body() -> RunOutcome:
        url = borg.repository_url(source, host)
        try:
            with ctx.session(source, control) as transport:
                env = borg.client_env(ctx.source_paths(transport, source))
                present = _list(transport, source, url, env)
                live = _live_bytes(transport, source, url, env)
        except TransportError as exc:
            raise RunFailed(f"skipped: cannot reach {source.name} to list its archives, and compaction only runs after "
                          f"that check: {exc}") from None
        changed = archive_changes(_recorded(ctx, source, host), {a.name: a.id for a in present})
        ctx.history.record_archives(source.name, host.name, _entries(present), now=clock())
        pair_runs = ctx.history.runs(source=source.name, target=host.name)
        baseline = baseline_bytes(pair_runs)
        refusal = {"compacted": False, "vanished": list(changed.vanished), "replaced": list(changed.replaced),
                   "baseline_bytes": baseline, "live_bytes": live}
        problems = guard_problems(changed.vanished, baseline, live, replaced=changed.replaced)
        if problems:
            return _refuse(ctx, step, source, host, problems, refusal, clock)
        known = ctx.history.known_archives(source.name, host.name)
        pruned = _pruned_since_compaction(ctx, source, host, known)
        aborted(control)
        path = borg.repository_path(source, host)
        with ctx.session(host, control) as transport:
            workdir = resolve_path(host.workdir, transport)
            asked = clock()
            host_now, transactions = _transactions(transport, host, path)
            offset = host_now - (asked + clock()) / 2
            windows = [run_window(r, clock()) for r in pair_runs if r.kind in WRITING_KINDS]
            foreign = foreign_transactions(transactions, checked_through(pair_runs), windows, offset)
            if foreign:
                problems = guard_problems((), None, None, foreign=foreign, offset=offset)
                refusal["foreign_transactions"] = [t.number for t in foreign]
                return _refuse(ctx, step, source, host, problems, refusal, clock)
            checked = max((t.number for t in transactions), default=checked_through(pair_runs))
            if not pruned and not force:
                return step.succeed({"compacted": False, "reason": "nothing pruned since the last compaction",
                                     "live_bytes": live, "transactions_checked": checked})
            before = _facts(transport, host, path)
            result = run_supervised(transport, host, pidfile_path(workdir, host_role(source.name)), step.id,
                                    borg.compact_argv(host.borg, path), env=borg.host_env(workdir),
                                    timeout=COMPACT_TIMEOUT, control=control)
            aborted(control)
            _borg_ok(result, f"borg compact on {host.name}")
            after = _facts(transport, host, path)
        return step.succeed({"compacted": True, "pruned": pruned, "freed_bytes": before.bytes - after.bytes,
                             "bytes_before": before.bytes, "bytes_after": after.bytes, "live_bytes": live,
                             "transactions_checked": checked})

    with step:

        body()

    return step.outcome


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
    )


def _refuse(ctx: Context, step: RecordedRun, source: Node, host: Node, problems: Sequence[str],
            detail: Mapping[str, object], clock: Callable[[], float]) -> RunOutcome:
    message = _refusal(source, host, problems, foreign="foreign_transactions" in detail)
    ctx.history.add_alert(source.name, host.name, "compaction-refused", message, now=clock())
    return step.fail(message, detail={**detail, "refused": True})


def _recorded(ctx: Context, source: Node, host: Node) -> dict[str, tuple[str | None, float | None]]:
    """name -> (recorded archive id, pruned) of the archives the coordinator recorded in this repository."""
    ids = ctx.history.archive_ids(source.name, host.name)
    return {name: (ids.get(name), pruned) for name, (_created, pruned) in ctx.history.known_archives(source.name, host.name).items()}


def _entries(archives: Sequence[borg.ArchiveEntry]) -> list[tuple[str, float, str | None]]:
    return [(a.name, a.time.timestamp(), a.id or None) for a in archives if not borg.is_checkpoint(a.name)]


def _transactions(transport: Transport, host: Node, path: str) -> tuple[float, list[borg.Transaction]]:
    """The host's clock and the repository's transactions log, read on the host (no key)."""
    result = transport.run(borg.transactions_argv(path), timeout=LIST_TIMEOUT)
    if result.exit_code in (borg.REPOSITORY_MISSING, borg.REPOSITORY_NOT_BORG):
        _facts(transport, host, path)  # says which, with its alert
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


def verify(ctx: Context, sources: Sequence[Node], *, clock: Callable[[], float] = time.time) -> list[RunOutcome]:
    """``mutualbackup verify``: :func:`check_replica` of every replica of ``sources``."""
    outcomes: list[RunOutcome] = []
    for source in sources:
        for target in ctx.replicas_of(source.name):
            outcomes += check_replica(ctx, source, ctx.node(target), clock=clock)
    return outcomes


def print_verify(outcomes: Sequence[RunOutcome], out: Callable[[str], None] = print,
                 err: Callable[[str], None] | None = None) -> int:
    """One line per replica checked by :func:`verify`; the exit code (1 when a check failed or none ran)."""
    import sys

    err = err or (lambda line: print(line, file=sys.stderr))
    pairs: dict[tuple[str, str], list[RunOutcome]] = {}
    for outcome in outcomes:
        pairs.setdefault((outcome.source, outcome.target), []).append(outcome)
    if not pairs:
        err("nothing to verify: no provisioned replica (run `mutualbackup apply`)")
        return 1
    failed = False
    for (source, target), steps in pairs.items():
        seconds = sum(s.duration for s in steps)
        bad = [s for s in steps if not s.ok]
        if not bad:
            out(f"{source} → {target}  ok      repository and archives checked  {seconds:.1f}s")
            continue
        failed = True
        err(f"{source} → {target}  FAILED  {bad[0].kind}  {seconds:.1f}s")
        for line in (bad[0].error or "").splitlines():
            err(f"  {line}")
    return 1 if failed else 0
