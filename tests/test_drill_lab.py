"""Restore drills end to end: a sample of the latest archive, extracted on the source,
verified against borg's item checksums and the live files; recorded, exported, shown.

One small federation: coopcycle/web1 (two top-level paths) with one replica on picasoft/store1.
The test that corrupts the repository runs last.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import generate_latest

from mutualbackup.context import Context
from mutualbackup.jobs.drill import drills_due
from mutualbackup.state.history import History
from mutualbackup.inventory.load import load_inventory
from lab.federation import LabFederation
from mutualbackup.report.metrics import MetricsSource, build_registry

from labkit import mb, mb_json
from restorekit import backed_up, AWKWARD_DIR, node_doc, source, storage

pytestmark = pytest.mark.lab

SOURCE = "coopcycle/web1"
HOST = "picasoft/store1"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from backed_up(
        tmp_path_factory.mktemp("drill"),
        borg_path,
        {"coopcycle": [node_doc("web1", backup=source(["/etc", AWKWARD_DIR]))], "picasoft": [node_doc("store1", storage=storage())]},
        replicas=1,
        source_name=SOURCE,
    )


def scratch_dirs(fed: LabFederation) -> list[Path]:
    return [*fed.nodes[SOURCE].state.glob("drill-*"), *Path(fed.nodes[SOURCE].workdir).glob("drill-*")]


def test_a_drill_passes_on_a_healthy_repository_and_is_recorded_exported_and_shown(fed: LabFederation) -> None:
    history = History(fed.state)
    federation = load_inventory(str(fed.inventory))
    assert drills_due(federation, history, time.time()) == [SOURCE]

    code, outcomes = mb_json(fed, "drill")
    assert code == 0, outcomes
    [first] = outcomes
    assert (first["source"], first["target"], first["result"]) == (SOURCE, HOST, "success")
    assert first["files"] >= 10 and first["bytes"] > 300_000
    assert first["live_checked"] == first["files"]  # nothing changed since the backup
    assert scratch_dirs(fed) == []

    code, [second] = mb_json(fed, "drill", SOURCE)
    assert code == 0 and second["result"] == "success"
    assert {first["top_level"], second["top_level"]} == {
        str(fed.data_path(SOURCE, "/etc")), str(fed.data_path(SOURCE, AWKWARD_DIR))
    }  # successive drills put each top-level path first in turn

    assert drills_due(federation, history, time.time()) == []
    code, rows = mb_json(fed, "status")
    assert code == 0
    assert {(r["drill_state"], r["drill_target"]) for r in rows} == {("ok", HOST)}
    ctx = Context(federation, history, connector=lambda node: None)  # type: ignore[arg-type,return-value]
    metrics = generate_latest(build_registry(MetricsSource(ctx.history, federation, placement=ctx.history.placement))).decode()
    assert f'mutualbackup_last_drill_success_timestamp_seconds{{source="{SOURCE}"}}' in metrics


def test_a_live_file_silently_different_from_the_archive_fails_the_drill(fed: LabFederation) -> None:
    live = fed.data_path(SOURCE, "/etc") / "plain.txt"
    original = live.read_bytes()
    stat = live.stat()
    live.write_bytes(original.upper())  # same size...
    os.utime(live, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...same mtime: as if a disk flipped bits
    try:
        code, out, err = mb(fed, "drill", SOURCE)
    finally:
        live.write_bytes(original)
        os.utime(live, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert code == 1
    assert "drill FAILED" in err and "plain.txt" in err and "live file" in err
    assert scratch_dirs(fed) == []
    code, out, err = mb(fed, "drill", SOURCE)
    assert code == 0, err


def test_a_corrupted_segment_on_the_host_fails_the_drill_with_a_clear_message(fed: LabFederation) -> None:
    repository = Path(fed.nodes[HOST].storage) / "coopcycle" / "web1"
    segments = [p for p in (repository / "data").rglob("*") if p.is_file() and p.name.isdigit()]
    largest = max(segments, key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    with open(largest, "r+b") as handle:
        handle.seek(size // 4)
        handle.write(os.urandom(size // 2))

    code, out, err = mb(fed, "drill", SOURCE)
    assert code == 1
    assert "drill FAILED" in err and HOST in err
    assert "may be damaged" in err and "mutualbackup verify" in err
    assert "checksum" in err.lower() or "integrity" in err.lower()
    assert scratch_dirs(fed) == []

    code, rows = mb_json(fed, "status")
    assert code == 1  # a failed drill makes status fail
    assert {r["drill_state"] for r in rows} == {"failed"}
    assert rows[0]["drill_error"]
    code, out, err = mb(fed, "status")
    assert "drill  failed" in out and "drill error:" in out
