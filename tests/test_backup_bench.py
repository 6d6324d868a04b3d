"""The backup bench runs (at a tiny size), so that it cannot rot between the times someone measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import load_bench

pytestmark = pytest.mark.lab


def test_the_backup_bench_runs_and_reports_the_overhead(tmp_path: Path, borg_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("backup_bench")
    code = bench.main(["--size-mb", "1", "--repeat", "1", "--full-mb", "2", "--full-repeat", "1", "--root", str(tmp_path),
                       "--borg", borg_path, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] > 1024**2
    assert set(result["median_seconds"]) == {"bare", "mutualbackup", "process", "handed",
                                             "serve hello, kept connection", "plain login, kept connection"}
    assert result["median_seconds"]["mutualbackup"] > 0 and result["goal_seconds"] == 0.15
    assert result["median_seconds"]["process"] > 0 and result["full_ratio"] > 0
    assert result["median_seconds"]["handed"] > 0  # (the bench checks that the daemon ran those backups)
