"""The SSH bench runs (a few rounds), so that it cannot rot between the times someone measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import load_bench

pytestmark = pytest.mark.lab


def test_the_ssh_bench_runs_and_reports_both_ratios(tmp_path: Path, borg_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("ssh_bench")
    code = bench.main(["--repeat", "2", "--root", str(tmp_path), "--borg", borg_path, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_ms"]) == {
        "paramiko", "mutualbackup", "openssh", "paramiko, kept connection", "mutualbackup, kept connection"}
    assert result["ratio_connect_and_command"] > 0 and result["ratio_command_on_kept_connection"] > 0
