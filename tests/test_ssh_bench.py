"""The SSH bench runs (a few rounds), so that it cannot rot between the times someone measures."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

BENCH = Path(__file__).resolve().parent.parent / "bench" / "ssh_bench.py"


def test_the_ssh_bench_runs_and_reports_both_ratios(tmp_path: Path, borg_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("the bench needs root and /usr/sbin/sshd")
    spec = importlib.util.spec_from_file_location("ssh_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--repeat", "2", "--root", str(tmp_path), "--borg", borg_path, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_ms"]) == {
        "paramiko", "mutualbackup", "openssh", "paramiko, kept connection", "mutualbackup, kept connection"}
    assert result["ratio_connect_and_command"] > 0 and result["ratio_command_on_kept_connection"] > 0
