"""The restore bench runs (at a tiny size), so that it cannot rot between the times someone measures."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

BENCH = Path(__file__).resolve().parent.parent / "bench" / "restore_bench.py"


def test_the_restore_bench_runs_and_reports_both_ratios(tmp_path: Path, borg_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("the bench needs root and /usr/sbin/sshd")
    spec = importlib.util.spec_from_file_location("restore_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--size-mb", "1", "--repeat", "1", "--root", str(tmp_path), "--borg", borg_path, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] > 1024**2
    assert set(result["median_seconds"]) == {"bare", "bare over ssh", "source", "other node"}
    assert result["ratio_source"] > 0 and result["ratio_other_node"] > 0
