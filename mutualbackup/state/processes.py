"""Which process owns a run: ``PID:START`` identities, so that a recycled pid (or a container's
daemon, PID 1 at every start) is never taken for the process that started a run."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mutualbackup.state.history import Run


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat``); None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of proc(5); fields[0] is field 3
    except (OSError, IndexError):
        return None


def process_identity(pid: int) -> str | None:
    """``PID:START`` of a live process ``pid`` (None when its start time cannot be read)."""
    start = process_start(pid)
    return None if start is None else f"{pid}:{start}"


_THIS_PROCESS: tuple[int, str] | None = None


def this_process() -> str:
    """This process's identity, recorded with each run it starts: ``PID:START``, or ``PID:uuid``
    where ``/proc`` cannot tell (computed again after a fork)."""
    global _THIS_PROCESS
    pid = os.getpid()
    if _THIS_PROCESS is None or _THIS_PROCESS[0] != pid:
        _THIS_PROCESS = (pid, process_identity(pid) or f"{pid}:{uuid.uuid4().hex}")
    return _THIS_PROCESS[1]


def run_owner_alive(run: Run) -> bool:
    """Whether the process that started ``run`` is still alive (True for this process's own runs).

    Another process with the same pid (a container's daemon is PID 1 at every start; a reused
    pid) is not the owner: the start times differ. Old rows without ``owner`` are judged by
    pid, except that this process's pid is not this process (it never wrote such a row).
    """
    mine = this_process()
    if run.owner == mine:
        return True
    if run.pid is None or run.pid == os.getpid() or not pid_alive(run.pid):
        return False
    if run.owner is None:
        return True
    pid, _, start = run.owner.partition(":")
    if start.isdigit():  # a /proc start time: compare it
        return process_start(int(pid)) == start if pid.isdigit() else False
    return True  # recorded without /proc (a uuid): cannot tell, so alive


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process on this (the coordinator's) machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
