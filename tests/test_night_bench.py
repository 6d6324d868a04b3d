"""bench/night_bench.py at a small size, so that it cannot rot: the simulated night runs every backup once,
with the real placement and scheduler, and never ends before its own lower bound."""

from __future__ import annotations

from bench.night_bench import main, night_federation, simulate


def test_a_small_night_runs_every_backup_and_ends_no_sooner_than_its_bound() -> None:
    night = simulate(night_federation(20), 0.05)
    assert night.replicas == 80 and night.global_limit == 40  # every host's max_concurrent together
    assert night.makespan_seconds >= night.bound_seconds * 0.999  # a bound no schedule beats
    assert night.ratio <= 1.10 and night.makespan_seconds <= night.window_seconds
    heavy = simulate(night_federation(20), 1.0)  # every byte again: backups overlap
    held = simulate(night_federation(20), 1.0, limit=1)  # one job at a time: the night is the sum of them all
    assert held.makespan_seconds > 1.1 * heavy.makespan_seconds


def test_the_bench_prints_its_figures(capsys) -> None:  # noqa: ANN001
    assert main(["--members", "10", "--before", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("makespan") == 2 and "goal: ≤ ×1.1" in out
