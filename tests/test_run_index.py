"""The daemon's incremental answers (state/run_index.py) equal the history's own queries at every step of a
random history: runs of every kind started out of order, in progress, finished in every way, interrupted."""

from __future__ import annotations

import random
from pathlib import Path

from mutualbackup.jobs.drill import drills_due
from mutualbackup.state.history import History
from mutualbackup.state.run_index import RunIndex
from test_placement import federation, node

KINDS = ("backup", "backup", "backup", "check", "prune", "compact", "drill", "repo-check")


def test_every_answer_equals_the_full_query_at_every_step(tmp_path: Path) -> None:
    rng = random.Random(11)
    history = History(tmp_path / "state")
    index = RunIndex(history)
    pairs = [("a/web", "b/st"), ("a/web", "c/st"), ("d/db", "b/st"), ("d/db", "", )]
    fed = federation(node("a", "web", "x", source=1), node("d", "db", "y", source=1), node("b", "st", "z", host=9),
                     node("c", "st", "w", host=9))
    now = 1_000_000.0
    for step in range(500):
        now += rng.uniform(0, 3000)
        running = history.running()
        if running and rng.random() < 0.45:
            run = rng.choice(running)
            result = rng.choice(("success", "warning", "failure", "failure", "interrupted"))
            history.finish_run(run.id, result, ended=now, repository_bytes=rng.choice((None, rng.randint(1, 99))))
        else:
            source, target = rng.choice(pairs)
            started = now - rng.choice((0.0, rng.uniform(0, 90_000)))  # some rebuilt in the past, some equal
            history.start_run(rng.choice(KINDS), source, target, started=round(started, -4))  # ties too
        if rng.random() < 0.5:  # not at every step: what was laid over must fold in right later
            for kind in ("backup", "check", "drill"):
                assert index.pair_summaries(kind) == history.pair_summaries(kind), (step, kind)
            assert index.repository_sizes() == history.repository_sizes(), step
            assert index.host_contacts() == history.host_contacts(), step
            assert drills_due(fed, index, now) == drills_due(fed, history, now), step
    assert index.settled_below > 1  # it did fold runs in for good
