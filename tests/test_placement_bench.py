"""bench/placement_bench.py at a small size, so that it cannot rot; what it measures is asserted, not timed."""

from __future__ import annotations

from bench.placement_bench import main, run


def test_a_join_moves_almost_nothing_and_a_drain_moves_only_what_the_host_held() -> None:
    figures = run(members=60, sources_per=2)
    assert figures.sources == 120 and figures.replicas == 240
    assert figures.moved_percent <= 2.0
    assert figures.drained_replicas > 0 and figures.moves_after_drain == figures.drained_replicas


def test_the_bench_prints_its_figures(capsys) -> None:  # noqa: ANN001
    assert main(["--members", "12", "--sources-per", "1"]) == 0
    assert "goal: at most 2 %" in capsys.readouterr().out
