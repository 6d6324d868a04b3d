"""bench/tick_bench.py at a small size, so that it cannot rot: a tick with nothing due starts nothing and
contacts no node (asserted inside), and the bench prints its goal."""

from __future__ import annotations

from bench.tick_bench import main, run


def test_a_tick_with_nothing_due_starts_nothing_and_contacts_no_node() -> None:
    figures = run(members=20, sources_per=2, ticks=2)
    assert figures.sources == 40 and figures.replicas == 80 and figures.inside_ms > 0


def test_the_bench_prints_its_figures(capsys) -> None:  # noqa: ANN001
    assert main(["--members", "10", "--sources-per", "1", "--ticks", "1"]) == 0
    assert "goal: < 50 ms" in capsys.readouterr().out
