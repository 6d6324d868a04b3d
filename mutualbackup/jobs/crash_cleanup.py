"""Clean up after a run that did not end well, before the next job of the same replica.

A coordinator killed with ``kill -9``, a host that rebooted, a connection that
dropped: each can leave behind

- a supervised command still running on the source or the host (the
  :mod:`supervise` wrapper stops it when the session goes, but a source that
  was unreachable at that moment may still run it), and
- a borg lock in the repository (``lock.exclusive/``, ``lock.roster``) whose
  holder (a ``borg serve`` or ``borg check`` on the host) was killed.

:func:`clean_up_pair` stops a leftover command only when the run that started
it is not running in a live coordinator process, and breaks a repository lock
only when it is certain that no borg holds it: every holder is a process of the
host itself (the same full borg host id, ``FQDN@NODE``) and none of those pids is alive there. Otherwise
it leaves things alone and says why. :func:`judge_lock` is the pure decision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError
from mutualbackup.inventory.model import Node
from mutualbackup.remote.supervision import parse_pidfile, pidfile_path, stop_remote
from mutualbackup.remote.transport import Transport, resolve_path
from mutualbackup.state.processes import run_owner_alive, this_process

log = logging.getLogger("mutualbackup.jobs.crash_cleanup")


def source_role(host: str) -> str:
    """The pidfile name (see :func:`supervise.pidfile_path`) of a source's job into its replica on ``host``.

    A node that is both a source and a host (A -> B and B -> A) runs a job per role for the same
    peer: the role is part of the name (``run/src.MEMBER.NODE.pid``; ``.`` cannot occur in a slug).
    """
    return f"src/{host}"


def host_role(source: str) -> str:
    """The pidfile name of a host's job on the repository of ``source`` (``run/repo.MEMBER.NODE.pid``)."""
    return f"repo/{source}"


@dataclass(frozen=True)
class LockVerdict:
    stale: bool
    reason: str


def judge_lock(hostname: str, holders: Iterable[borg.LockHolder], alive_pids: set[int]) -> LockVerdict:
    """Whether a repository lock on the host whose borg host id is ``hostname`` may be broken.

    ``hostname`` is the full id borg records (``FQDN@NODE``, or ``BORG_HOST_ID``), computed on
    the host itself: two machines may share a short name. ``holders`` come from the lock files;
    ``alive_pids`` are those of the holders' pids that are alive on the host. Stale only when
    there is at least one holder, every holder was written by this host (same full id), and
    no holder's pid is alive.
    """
    holders = list(holders)
    if not holders:
        return LockVerdict(False, "not locked")
    foreign = sorted({h.host for h in holders if not hostname or h.host != hostname})
    if foreign:
        return LockVerdict(False, f"locked by borg on another machine ({', '.join(foreign)}): cannot tell whether it still runs")
    live = sorted({h.pid for h in holders if h.pid in alive_pids})
    if live:
        return LockVerdict(False, f"locked by live process(es) {', '.join(map(str, live))} on {hostname}")
    gone = ", ".join(str(pid) for pid in sorted({h.pid for h in holders}))
    return LockVerdict(True, f"left by process(es) {gone} of {hostname}, which no longer exist")


@dataclass
class Cleanup:
    notes: list[str] = field(default_factory=list)
    busy: str | None = None  # set when another live coordinator process still runs this job


def clean_up_pair(
    ctx: Context, source: Node, host: Node, *, clock: Callable[[], float] = time.time, active: Collection[int] = (),
) -> Cleanup:
    """Stop leftovers of dead runs of ``source`` x ``host`` and break a stale repository lock.

    ``active``: ids of runs that the caller (this process) still runs; any other run of this
    process recorded ``running`` is dead (e.g. a thread that crashed before recording its end).
    Never raises for an unreachable node or a failed command: what could not be
    done is in the notes (the job that follows will fail and be retried).
    """
    cleanup = Cleanup()
    try:
        with ctx.session(source) as transport:
            _stop_leftover(ctx, transport, source, source_role(host.name), cleanup, active)
    except MutualBackupError as exc:
        cleanup.notes.append(f"{source.name}: cannot look for leftover commands: {exc}")
    if not cleanup.busy:
        try:
            with ctx.session(host) as transport:
                _stop_leftover(ctx, transport, host, host_role(source.name), cleanup, active)
                if not cleanup.busy:
                    _break_stale_lock(ctx, transport, source, host, cleanup, clock)
        except (MutualBackupError, ValueError) as exc:
            cleanup.notes.append(f"{host.name}: cannot clean up after the last run: {exc}")
    for note in cleanup.notes:
        log.warning("clean-up %s -> %s: %s", source.name, host.name, note)
    return cleanup


def _stop_leftover(
    ctx: Context, transport: Transport, node: Node, name: str, cleanup: Cleanup, active: Collection[int] = (),
) -> None:
    """Stop the supervised command of ``node``'s pidfile ``name`` (:func:`source_role`, :func:`host_role`)
    unless a live coordinator process runs it: another live process, or this one for a run in ``active``."""
    pidfile = pidfile_path(resolve_path(node.workdir, transport), name)
    data = transport.read_file(pidfile)
    if data is None:
        return
    info = parse_pidfile(data)
    owner = ctx.history.run_by_id(info.run_id) if info and info.run_id is not None else None
    live = owner is not None and owner.result == "running" and run_owner_alive(owner) and (
        owner.owner != this_process() or owner.id in active)
    if owner is not None and live:
        cleanup.busy = (
            f"run {owner.id} ({owner.kind}) of coordinator process {owner.pid} still runs on {node.name} "
            f"(pid {info.pid if info else '?'})"
        )
        return
    result = stop_remote(transport, pidfile, int_seconds=30, term_seconds=10)
    said = result.stdout.decode("utf-8", "replace").strip()
    if result.ok and said != "not running":
        what = f"run {info.run_id}" if info and info.run_id is not None else "an unknown run"
        cleanup.notes.append(f"{node.name}: stopped a leftover command of {what} (pid {info.pid if info else '?'}): {said}")
    elif not result.ok:
        cleanup.notes.append(f"{node.name}: a leftover command does not stop: {said or result.stderr_tail(3)}")


def _break_stale_lock(
    ctx: Context, transport: Transport, source: Node, host: Node, cleanup: Cleanup, clock: Callable[[], float]
) -> None:
    path = borg.repository_path(source, host)
    listing = transport.run(borg.lock_listing_argv(path), timeout=60)
    if listing.exit_code == 3:
        cleanup.notes.append(f"{host.name}: the repository {path} does not exist")
        return
    if not listing.ok:
        raise ValueError(f"lock listing exited {listing.exit_code}: {listing.stderr_tail(3)}")
    hostname, holders = borg.parse_lock_listing(listing.stdout)
    if not holders:
        return
    verdict = judge_lock(hostname, holders, _alive_on(transport, {h.pid for h in holders}))
    if not verdict.stale:
        cleanup.notes.append(f"{host.name}: repository {path} is {verdict.reason}; not breaking the lock")
        return
    workdir = resolve_path(host.workdir, transport)
    broken = transport.run(borg.break_lock_argv(host.borg, path), env=borg.host_env(workdir), timeout=120)
    if broken.ok:
        message = f"broke a stale lock of repository {path} on {host.name}: {verdict.reason}"
        cleanup.notes.append(message)
        ctx.history.add_alert(source.name, host.name, "stale-lock-broken", message, now=clock())
    else:
        cleanup.notes.append(f"{host.name}: borg break-lock exited {broken.exit_code}: {broken.stderr_tail(3)}")


def _alive_on(transport: Transport, pids: set[int]) -> set[int]:
    """Which of ``pids`` are live processes on the transport's node.

    A zombie (killed, not yet reaped by its parent) is not alive: it can hold no
    lock any more. ``ps`` exits 1 when it lists none; any other failure means
    "cannot tell", and then every pid counts as alive (a lock is never broken on a guess).
    """
    if not pids:
        return set()
    result = transport.run(("ps", "-o", "pid=,stat=", "-p", ",".join(str(p) for p in sorted(pids))), timeout=60)
    if result.exit_code not in (0, 1):
        return set(pids)
    alive = set()
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit() and not words[1].startswith("Z"):
            alive.add(int(words[0]))
    return alive
