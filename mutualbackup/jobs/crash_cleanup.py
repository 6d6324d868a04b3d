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
from typing import Callable, Collection

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed
from mutualbackup.inventory.model import Node
from mutualbackup.remote.transport import Transport
from mutualbackup.state.processes import run_owner_alive, this_process

log = logging.getLogger("mutualbackup.jobs.crash_cleanup")


def source_role(host: str) -> str:
    """The pidfile name (see :func:`mutualbackup.node.system.pidfile_path`) of a source's job into its replica on ``host``.

    A node that is both a source and a host (A -> B and B -> A) runs a job per role for the same
    peer: the role is part of the name (``run/src.MEMBER.NODE.pid``; ``.`` cannot occur in a slug).
    """
    return f"src/{host}"


def host_role(source: str) -> str:
    """The pidfile name of a host's job on the repository of ``source`` (``run/repo.MEMBER.NODE.pid``)."""
    return f"repo/{source}"


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
    ctx: Context, transport: Transport, node: Node, role: str, cleanup: Cleanup, active: Collection[int] = (),
) -> None:
    """Stop the supervised command of ``node``'s job ``role`` (:func:`source_role`, :func:`host_role`)
    unless a live coordinator process runs it: another live process, or this one for a run in ``active``."""
    found = transport.request("leftover", {"role": role}, timeout=120)
    if not found.ok:
        raise OperationFailed(found.error or f"{node.name} did not say what is left")
    if "pid" not in found.data:
        return
    pid, run_id = found.data.get("pid"), found.data.get("run_id")
    owner = ctx.history.run_by_id(run_id) if isinstance(run_id, int) else None
    live = owner is not None and owner.result == "running" and run_owner_alive(owner) and (
        owner.owner != this_process() or owner.id in active)
    if owner is not None and live:
        cleanup.busy = f"run {owner.id} ({owner.kind}) of coordinator process {owner.pid} still runs on {node.name} (pid {pid})"
        return
    stopped = transport.request("stop", {"role": role, "int_seconds": 30, "term_seconds": 10}, timeout=120)
    said = str(stopped.data.get("said") or stopped.error or "")
    if stopped.data.get("stopped") and said != "not running":
        what = f"run {run_id}" if run_id is not None else "an unknown run"
        cleanup.notes.append(f"{node.name}: stopped a leftover command of {what} (pid {pid}): {said}")
    elif not stopped.data.get("stopped"):
        cleanup.notes.append(f"{node.name}: a leftover command does not stop: {said}")


def _break_stale_lock(
    ctx: Context, transport: Transport, source: Node, host: Node, cleanup: Cleanup, clock: Callable[[], float]
) -> None:
    """Ask the host to break the repository's lock when it is certainly stale (the host judges, see
    :func:`~mutualbackup.borg.judge_lock`); note what it did."""
    path = borg.repository_path(source, host)
    reply = transport.request("unlock", {"source": source.name}, timeout=300)
    if not reply.ok:
        raise ValueError(reply.error or "the host did not answer")
    data = reply.data
    if data.get("missing"):
        cleanup.notes.append(f"{host.name}: the repository {path} does not exist")
    elif data.get("locked") and not data.get("broken") and not data.get("error"):
        cleanup.notes.append(f"{host.name}: repository {path} is {data.get('reason')}; not breaking the lock")
    elif data.get("broken"):
        message = f"broke a stale lock of repository {path} on {host.name}: {data.get('reason')}"
        cleanup.notes.append(message)
        ctx.history.add_alert(source.name, host.name, "stale-lock-broken", message, now=clock())
    elif data.get("error"):
        cleanup.notes.append(f"{host.name}: {data.get('error')}")
