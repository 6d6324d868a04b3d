"""``--log-format json``: one JSON object a line (time, level, event, source, target, result, duration, error),
for the job lines a log pipeline indexes; plain lines stay the default."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from mutualbackup.cli import JsonLines, build_parser
from mutualbackup.jobs.runs import RecordedRun, RunFailed
from mutualbackup.state.history import History


def test_a_jobs_start_and_end_are_json_objects_with_their_facts(tmp_path: Path) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLines())
    log = logging.getLogger("mutualbackup.test-json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    history = History(tmp_path)
    with RecordedRun(history, "backup", "coop/web1", "other/store1", clock=time.time, logger=log) as run:
        run.succeed({}, archive="web1-x", note="web1-x")
    with RecordedRun(history, "backup", "coop/web1", "other/store1", clock=time.time, logger=log):
        raise RunFailed("borg create exited 2: the host's disk is full\nmore", 2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["backup start", "backup end", "backup start", "backup end"]
    assert lines[1]["result"] == "success" and lines[1]["source"] == "coop/web1" and lines[1]["target"] == "other/store1"
    assert isinstance(lines[1]["duration"], float) and lines[1]["level"] == "info" and lines[1]["time"].endswith("+00:00")
    assert lines[3]["result"] == "failure" and lines[3]["error"] == "borg create exited 2: the host's disk is full"
    assert lines[3]["level"] == "warning"


def test_the_option_is_taken_by_every_command() -> None:
    for argv in (["--log-format", "json", "status"], ["daemon", "--log-format", "json"]):
        assert build_parser().parse_args(argv).log_format == "json"
