"""Prune, after each successful backup: from the source, through its append-only key.

``borg list`` before, ``borg prune`` with the source's ``retention``, ``borg list`` after.
Every archive seen is recorded in the history; those that disappeared *and* that
:func:`~mutualbackup.plan.retention.plan_prune` deletes are marked pruned by the
coordinator. Any other disappearance is an alert, and stays unexplained (so compaction
will refuse). The plan's deletions are saved in the run (``plan_delete``) before
``borg prune`` starts: after a failed or aborted prune the archives it removed of its plan
are marked (when the repository can still be listed), and after a crash the next prune
marks the vanished archives that the saved plan of an unfinished prune deletes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.inventory.model import Backup, Node
from mutualbackup.jobs.archives import archive_entries, borg_ok, list_archives, live_bytes, recorded_archives
from mutualbackup.jobs.crash_cleanup import source_role
from mutualbackup.jobs.runs import RecordedRun, RunOutcome, aborted, refused_by_node, running
from mutualbackup.node.requests import host_ref
from mutualbackup.plan.compaction_rules import ArchiveChanges, archive_changes, guard_problems
from mutualbackup.plan.retention import plan_prune
from mutualbackup.jobs.control import JobControl
from mutualbackup.remote.transport import Transport, reply_result

log = logging.getLogger("mutualbackup.jobs.maintenance")

PRUNE_TIMEOUT = 4 * 3600


def prune_replica(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, control: JobControl | None = None
) -> RunOutcome:
    """``borg prune`` of ``source``'s repository on ``host`` with its retention; see the module notes."""
    assert source.backup is not None
    with RecordedRun(ctx.history, "prune", source.name, host.name, clock=clock, control=control, logger=log) as run:
        _prune(ctx, run, source, host, clock, control)
    assert run.outcome is not None
    return run.outcome


def _prune(ctx: Context, run: RecordedRun, source: Node, host: Node, clock: Callable[[], float],
           control: JobControl | None) -> None:
    assert source.backup is not None
    with ctx.session(source, control) as transport:
        before = list_archives(transport, host)
        _explain_unfinished_prunes(ctx, source, host, {a.name for a in before}, clock)
        changed = archive_changes(recorded_archives(ctx, source, host), {a.name: a.id for a in before})
        ctx.history.record_archives(source.name, host.name, archive_entries(before), now=clock())
        plan = plan_prune([a for a in before if a.name.startswith(f"{source.slug}-")], source.backup.retention)
        aborted(control)
        # committed before borg runs: a crash or an abort mid-prune leaves deletions the next prune explains
        run.save(plan_delete=list(plan.delete))
        try:
            with running(control, source, source_role(host.name)):
                reply = transport.request("prune", {"host": host_ref(host), "retention": retention_of(source.backup),
                                                    "run_id": run.id, "timeout": PRUNE_TIMEOUT,
                                                    "signed": ctx.signed(source.member)},
                                          timeout=PRUNE_TIMEOUT + 120)
            if reply.data.get("not_signed"):
                refused_by_node(ctx.history, source, host, reply.error or "", clock())
            result = reply_result(reply)
            aborted(control)
            borg_ok(result, "borg prune")
        except Exception:  # failed or aborted (not Ctrl-C: no more borg then); the next prune explains the rest
            _mark_partial_prune(ctx, transport, source, host, before, plan.delete, changed.replaced, clock)
            raise
        size = live_bytes(transport, host)  # before the listing that vouches for it
        after = {a.name: a.id for a in list_archives(transport, host)}
    removed = {a.name for a in before} - set(after)
    # a replaced archive is not the one recorded: its deletion explains nothing
    explained = sorted((removed & set(plan.delete)) - set(changed.replaced))
    unexplained = sorted(plan.explains(removed))
    ctx.history.mark_pruned(source.name, host.name, explained, now=clock())
    changed_after = archive_changes(recorded_archives(ctx, source, host), after)
    verified = not changed and not unexplained and not changed_after
    detail = {"pruned": explained, "kept": sorted(plan.keep), "verified": verified}
    if verified:
        run.succeed(detail, repository_bytes=size)
        return
    message = _unexplained(source, host, changed, unexplained, changed_after)
    ctx.history.add_alert(source.name, host.name, "prune-unexplained", message, now=clock())
    run.fail(message, detail=detail)


def _unexplained(source: Node, host: Node, changed: ArchiveChanges, unexplained: Sequence[str],
                 changed_after: ArchiveChanges) -> str:
    """What a prune found that the coordinator's own records do not explain, and what follows."""
    problems = guard_problems(changed.vanished, None, None, replaced=changed.replaced)
    if unexplained:
        problems.append(f"borg prune removed {len(unexplained)} archive(s) that the retention policy keeps: "
                        f"{', '.join(unexplained)}")
    elif changed_after and not changed:
        problems.append(f"after the prune, archive(s) are missing or changed: {', '.join(changed_after.names)}")
    return (
        "\n".join(problems) + f"\nThey are not marked as pruned, so compaction of {source.name} on {host.name} "
        "will refuse until this is explained; the data is still there (append-only)."
    )


def _mark_partial_prune(
    ctx: Context, transport: Transport, source: Node, host: Node,
    before: Sequence[borg.ArchiveEntry], delete: Sequence[str], replaced: Sequence[str], clock: Callable[[], float],
) -> None:
    """After a failed or aborted ``borg prune``: mark pruned what it removed of its plan, when the
    repository can still be listed (best effort: otherwise the next prune explains them)."""
    try:
        after = {a.name for a in list_archives(transport, host)}
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


def retention_of(backup: Backup) -> dict[str, int]:
    """What a source is told to keep: its node checks it against what its member signed."""
    retention = backup.retention
    return {name: getattr(retention, name) for name in ("hourly", "daily", "weekly", "monthly", "yearly")
            if getattr(retention, name)}
