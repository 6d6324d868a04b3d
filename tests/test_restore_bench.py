"""The restore bench runs (at a tiny size), so that it cannot rot between the times someone measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import load_bench

pytestmark = pytest.mark.lab


def test_the_restore_bench_runs_and_reports_both_ratios(tmp_path: Path, borg_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("restore_bench")
    code = bench.main(["--size-mb", "1", "--repeat", "1", "--root", str(tmp_path), "--borg", borg_path, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] > 1024**2
    assert set(result["median_seconds"]) == {"bare", "source", "other node"}
    assert result["ratio_source"] > 0 and result["ratio_other_node"] > 0
