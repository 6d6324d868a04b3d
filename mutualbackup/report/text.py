"""The human output of the commands: short, aligned, errors on stderr (``--json`` is the commands' own)."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from mutualbackup.inventory.units import format_duration, format_size
from mutualbackup.jobs.doctor import Checkup
from mutualbackup.jobs.runs import RunOutcome
from mutualbackup.plan.placement import Change, Placement
from mutualbackup.inventory.model import Federation
from mutualbackup.report.ledger import Ledger


def print_plan(federation: Federation, placement: Placement, changes: Sequence[Change]) -> None:
    """Where each replica goes, how full each host would be, and what changes against the state."""
    width = max((len(s) for s in placement.replicas), default=6)
    for source, hosts in sorted(placement.replicas.items()):
        print(f"{source:<{width}}  → {', '.join(hosts)}")
    print()
    for host in federation.hosts():
        assert host.storage is not None
        used = placement.used.get(host.name, 0)
        print(f"{host.name:<{width}}  {format_size(used)} of {format_size(host.storage.capacity)} placed")
    print()
    if not changes:
        print("no change against the state")
    for c in changes:
        symbol = {"+": "+", "-": "−", "~": "~"}[c.kind]
        extra = f" (from {c.previous})" if c.previous else ""
        print(f"{symbol} {c.source} → {c.target}{extra}")


def print_moves(moves, orphans) -> None:  # noqa: ANN001 - rows of the history
    """Replicas being moved (make before break), and the repositories moves gave up."""
    if moves:
        print()
    for m in moves:
        print(f"moving {m['source']}: {m['old']} → {m['new']} ({m['reason']}; the old replica is given up once "
              "the new one is backed up)")
    if orphans:
        print("\nrepositories given up by a move (kept on their hosts; the owning members decide):")
    for o in orphans:
        size = format_size(o["bytes"]) if o["bytes"] else "size unknown"
        print(f"  {o['source']} on {o['host']}  {size}")


def print_backup(o, out=None, err=None) -> None:  # noqa: ANN001
    """One line per backup run by ``mutualbackup run``: its result, archive, sizes and time; the error on stderr
    (``out`` and ``err``: stdout and stderr unless given)."""
    out, err = out or sys.stdout, err or sys.stderr
    if o.ok:
        size = f"{format_size(o.original_bytes or 0)} read, {format_size(o.deduplicated_bytes or 0)} new"
        print(f"{o.source} → {o.target}  {o.result:<7}  {o.archive}  {size}  {o.duration:.1f}s", file=out)
        if o.result == "warning":
            print(f"  warning: {o.error}", file=out)
    else:
        print(f"{o.source} → {o.target}  FAILED  {o.duration:.1f}s", file=err)
        for line in (o.error or "").splitlines():
            print(f"  {line}", file=err)


def print_status(rows, now: float) -> None:  # noqa: ANN001
    """The human form of ``status``: one line per source × replica, then one per source's drill."""
    ws = max((len(r.source) for r in rows), default=6)
    wt = max((len(r.target) for r in rows), default=6)
    for r in rows:
        age = format_duration(r.age_seconds) + " ago" if r.age_seconds is not None else "-"
        print(f"{r.source:<{ws}}  {r.target:<{wt}}  {r.state:<7}  {age}")
        if r.last_error and r.state != "ok":
            print(f"    last error: {r.last_error.splitlines()[0]}")
        if r.unreadable_files:
            more = ", …" if r.unreadable_files > len(r.unreadable_paths) else ""
            print(f"    warning: {r.unreadable_files} file(s) could not be read and are not in the archive: "
                  f"{', '.join(r.unreadable_paths)}{more}")
        if r.compaction_refused:
            print("    COMPACTION REFUSED: " + "\n    ".join(r.compaction_refused.splitlines()))
    drills = {r.source: r for r in rows}
    if drills:
        print()
    for r in drills.values():
        when = format_duration(now - r.last_drill_success) + " ago" if r.last_drill_success else "never"
        print(f"{r.source:<{ws}}  drill  {r.drill_state:<7}  last success {when}")
        if r.drill_error:
            print(f"    drill error: {r.drill_error.splitlines()[0]}")


def format_progress_summary(result) -> str:  # noqa: ANN001
    rate = f"{format_size(int(result.bytes / result.seconds))}/s" if result.seconds > 0 else "-"
    return f"{result.files} item(s), {format_size(result.bytes)} in {result.seconds:.1f}s ({rate}), {result.access}"


def print_restore(result) -> None:  # noqa: ANN001
    """What a restore wrote (or would write, with ``--dry-run``), and borg's warnings."""
    verb = "would restore" if result.dry_run else "restored"
    print(f"{verb} {result.archive} of {result.source} from {result.replica} into {result.node}:{result.directory}")
    print(f"  {format_progress_summary(result)}")
    for line in result.listed:
        print(f"  {line}")
    for line in result.warnings:
        print(f"  warning: {line}")


def print_drills(outcomes) -> None:  # noqa: ANN001
    """One line per drill; a failed one's error on stderr."""
    for o in outcomes:
        if o.ok:
            print(f"{o.source} on {o.target}  drill ok  {o.archive}  {o.files} file(s), {format_size(o.bytes)} "
                  f"from {o.top_level}; {o.live_checked} compared with the live files  {o.duration:.1f}s")
        else:
            print(f"{o.source} on {o.target or '-'}  drill FAILED  {o.duration:.1f}s", file=sys.stderr)
            for line in (o.error or "").splitlines():
                print(f"  {line}", file=sys.stderr)


def print_ledger(ledger: Ledger) -> None:
    """Per member: capacity lent, used by others, used elsewhere, balance."""
    header = ("member", "capacity lent", "used by others", "used elsewhere", "balance")
    rows = [(m.member, format_size(m.capacity_bytes), format_size(m.lent_bytes), format_size(m.consumed_bytes),
             ("+" if m.balance_bytes > 0 else "") + format_size(m.balance_bytes)) for m in ledger.members]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip())


def print_verify(outcomes: Sequence[RunOutcome], out: Callable[[str], None] = print,
                 err: Callable[[str], None] | None = None) -> int:
    """One line per replica checked by :func:`verify`; the exit code (1 when a check failed or none ran)."""
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


def print_doctor(checkups: Sequence[Checkup]) -> None:
    """One line per node (versions, clock, free space), then each problem with what to do."""
    for found in checkups:
        facts = []
        if found.reachable:
            facts.append(f"node {found.node_version}")
            facts.append(found.borg_version or "no borg")
            if found.clock_skew_seconds is not None:
                facts.append(f"clock {found.clock_skew_seconds:+.1f}s")
            if found.storage_free_bytes is not None:
                facts.append(f"{format_size(found.storage_free_bytes)} free")
        print(f"{found.node}  {'ok' if found.ok else 'PROBLEM'}  {'  '.join(facts)}".rstrip())
        for problem in found.problems:
            for number, line in enumerate(problem.splitlines()):
                print(("  - " if number == 0 else "    ") + line)
