"""bench/scale_bench.py at a small size, so that it cannot rot: the generated inventory passes `check` and
`plan` as whole processes, and the indexed placement decides as the plain search did (asserted inside)."""

from __future__ import annotations

from bench.scale_bench import main, run


def test_a_generated_signed_federation_checks_and_plans_and_both_searches_agree() -> None:
    figures = run(members=12, sources=120, hosts=40)
    assert figures.check_small > 0 and figures.plan_large > 0 and figures.placement_seconds > 0


def test_the_bench_prints_its_figures(capsys) -> None:  # noqa: ANN001
    assert main(["--members", "12", "--sources", "20", "--hosts", "10"]) == 0
    out = capsys.readouterr().out
    assert "goal: < 3 s" in out and "same decisions" in out
