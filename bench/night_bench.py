"""A night of backups at federation scale, simulated: does it end on time?

MEMBERS members × 3 nodes (a host and two sources, 2 replicas each), placed by the real placement; every
replica backed up the night before at its slot. Then tonight is played on a virtual clock with the real
scheduler (``select_jobs``: due times and window slots, each host's ``max_concurrent``, one job per source,
the daemon's global limit): a backup sends its source's nightly change (``estimate`` × CHANGE) to its host,
whose inbound ``bandwidth`` is shared by the backups running into it (sources' uplinks are not modelled).
Prints the makespan (from the window's opening to the last backup's end) against a lower bound no schedule
can beat — on each host's link, from any slot on, the bytes of the backups released from then on ÷ its
bandwidth (at the opening: the most loaded host's bytes in ÷ its bandwidth); a source's backups one after
the other from its slot, each alone on its host's link — and whether the night ends inside the window. Pure: no node, no state. Usage::

    .venv/bin/python bench/night_bench.py [--members 1000] [--change 0.05] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is importable as a package
from bench.placement_bench import federation as bench_federation
from mutualbackup.inventory.model import Federation, Window
from mutualbackup.plan.due import JobState, remembered_next_attempt
from mutualbackup.plan.placement import place
from mutualbackup.plan.schedule import Occupancy, global_limit_for, select_jobs
from mutualbackup.plan.windows import next_occurrence, window_slot

MBIT = 1_000_000
BANDWIDTHS = (100 * MBIT, 250 * MBIT, 1000 * MBIT)  # a host's inbound link, bits per second
GOAL = 1.10
WINDOW = Window(60, 360)


@dataclass
class Night:
    members: int
    replicas: int
    global_limit: int
    gigabytes: float
    makespan_seconds: float
    bound_seconds: float
    bound_reason: str
    window_seconds: float
    simulated_in_seconds: float

    @property
    def ratio(self) -> float:
        return self.makespan_seconds / self.bound_seconds

    def lines(self) -> str:
        hours = lambda s: f"{s / 3600:.2f} h"  # noqa: E731
        return (f"a night of {self.members} members × 3 nodes: {self.replicas} backups, {self.gigabytes:.0f} GB, "
                f"at most {self.global_limit} jobs at once\n"
                f"  makespan {hours(self.makespan_seconds)}; lower bound {hours(self.bound_seconds)} "
                f"({self.bound_reason}): ×{self.ratio:.3f} (goal: ≤ ×{GOAL})\n"
                f"  the window is {hours(self.window_seconds)}: the night ends "
                f"{'inside' if self.makespan_seconds <= self.window_seconds else 'AFTER'} it\n"
                f"  (simulated in {self.simulated_in_seconds:.1f} s)")


def night_federation(members: int) -> Federation:
    """The placement bench's federation, its hosts given inbound links of 100 Mbit/s to 1 Gbit/s, its sources
    a daily backup in the window 01:00-06:00 (the example federation's)."""
    fed = bench_federation(members, 2)
    changed = []
    for index, member in enumerate(fed.members):
        nodes = tuple(replace(n, storage=replace(n.storage, bandwidth=BANDWIDTHS[index % len(BANDWIDTHS)]))
                      if n.storage is not None else replace(n, backup=replace(n.backup, window=WINDOW, every=86400))
                      for n in member.nodes)
        changed.append(replace(member, nodes=nodes))
    return replace(fed, members=tuple(changed))


def simulate(fed: Federation, change: float, tz: ZoneInfo = ZoneInfo("UTC"), limit: int | None = None) -> Night:
    """Tonight, played with the daemon's global limit (``limit``: another one, to compare)."""
    started = time.perf_counter()
    placement = place(fed).replicas
    limit = limit or global_limit_for(fed)
    sources = {s.name: s for s in fed.sources()}
    hosts = {h.name: h for h in fed.hosts()}
    window = next(iter(sources.values())).backup.window
    assert window is not None and all(s.backup.window == window for s in sources.values())
    tonight = next_occurrence(window, tz, dt.datetime(2026, 12, 6, 12, tzinfo=dt.timezone.utc))
    last_night = next_occurrence(window, tz, tonight.start - dt.timedelta(days=1, minutes=1))
    pairs = [(s, t) for s, targets in placement.items() for t in targets]
    nightly = {s: int((src.backup.estimate or 0) * change) for s, src in sources.items()}
    full = {s: src.backup.estimate or 0 for s, src in sources.items()}  # what the daemon orders by: the sizes
    states = {}
    for source, target in pairs:  # last night's backup ran at its slot: tonight's is due at tonight's slot
        last = window_slot(source, window, last_night)
        states[(source, target)] = JobState(source, target, last_success=last, last_attempt=last)
    rate = {h: hosts[h].storage.bandwidth / 8 for h in hosts}  # bytes per second
    left: dict[tuple[str, str], float] = {}  # running backups: bytes still to send
    begun: dict[tuple[str, str], dt.datetime] = {}
    pending = dict(placement)
    memo: dict = {}
    now, ended = tonight.start, tonight.start
    while pending or left:
        occupancy = Occupancy.of((("backup", s, t) for s, t in left), limit)
        for job in select_jobs(fed, pending, states, now, tz, sizes=full, max_per_source=1, occupancy=occupancy,
                               memo=memo):
            pair = (job.source, job.target)
            left[pair], begun[pair] = float(nightly[job.source]), now
            states[pair] = replace(states[pair], running=True)
        per_host: dict[str, int] = {}
        for _source, target in left:
            per_host[target] = per_host.get(target, 0) + 1
        finish = min((remaining * per_host[t] / rate[t] for (s, t), remaining in left.items()), default=None)
        wake = _next_due(pending, states, sources, now, tz, memo)
        step = min(x for x in (finish, wake) if x is not None) if (finish is not None or wake is not None) else None
        if step is None:
            break  # nothing runs and nothing will be due: what is left cannot be scheduled tonight
        step = max(step, 0.001)
        now += dt.timedelta(seconds=step)
        for pair in list(left):
            left[pair] -= step * rate[pair[1]] / per_host[pair[1]]
            if left[pair] <= 1.0:  # done: recorded as the daemon records a success
                del left[pair]
                states[pair] = replace(states[pair], last_success=begun[pair], last_attempt=begun[pair],
                                       running=False)
                pending[pair[0]] = tuple(t for t in pending[pair[0]] if t != pair[1])
                if not pending[pair[0]]:
                    del pending[pair[0]]
                ended = now
    bound, reason = lower_bound(placement, nightly, rate, window, tonight)
    return Night(len(fed.members), len(pairs), limit, sum(nightly[s] for s, _ in pairs) / 1e9,
                 (ended - tonight.start).total_seconds(), bound, reason, (tonight.end - tonight.start).total_seconds(),
                 time.perf_counter() - started)


def _next_due(pending, states, sources, now, tz, memo) -> float | None:  # noqa: ANN001
    """Seconds until the next pending backup that is not due yet becomes due (None: none)."""
    soonest = None
    for source, targets in pending.items():
        for target in targets:
            state = states[(source, target)]
            if state.running:
                continue
            due = remembered_next_attempt(memo, source, sources[source].backup, state, tz, now)
            if due > now and (soonest is None or due < soonest):
                soonest = due
    return None if soonest is None else (soonest - now).total_seconds()


def lower_bound(placement, nightly, rate, window, tonight) -> tuple[float, str]:  # noqa: ANN001
    """What no schedule can beat (seconds from the window's opening), and which constraint it is.

    A backup cannot start before its slot (its release time). For one host's link, the backups released at
    or after any slot r must all be sent after r: the link needs r + their bytes ÷ its bandwidth (the classic
    bound of one machine with release times and preemption; at r = the opening it is the most loaded host's
    bytes ÷ its bandwidth). For one source, its backups go one after the other from its slot, each at best
    alone on its host's link."""
    released: dict[str, list[tuple[float, float]]] = {}
    serial: dict[str, float] = {}
    for source, targets in placement.items():
        slot = (window_slot(source, window, tonight) - tonight.start).total_seconds()
        for target in targets:
            alone = nightly[source] / rate[target]
            released.setdefault(target, []).append((slot, alone))
            serial[source] = serial.get(source, slot) + alone
    link = 0.0
    for jobs in released.values():
        after = 0.0
        for slot, alone in sorted(jobs, reverse=True):  # latest release first: the work released from then on
            after += alone
            link = max(link, slot + after)
    return max((link, "a host's link: the bytes released into it from a slot on, from that slot"),
               (max(serial.values()), "a source's backups one after the other from its slot"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--change", type=float, default=0.05, help="the share of a source that changes each night")
    parser.add_argument("--before", type=int, default=8, metavar="JOBS",
                        help="also play the night with the daemon's fixed limit before issue 16 (0: do not)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    fed = night_federation(args.members)
    nights = [simulate(fed, args.change)]
    if args.before:
        nights.append(simulate(fed, args.change, limit=args.before))
    if args.json:
        print(json.dumps([{**asdict(n), "ratio": round(n.ratio, 4)} for n in nights], indent=2))
    else:
        print("\n".join(n.lines() for n in nights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
