"""The coordinator loses its state directory (issue 14's acceptance, on lab nodes over real ssh): ``apply``
adopts every repository the hosts hold — none initialised again, nothing uploaded again — and status,
the next backup and a restore work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from lab.federation import LabFederation
from labkit import mb, mb_json
from restorekit import backed_up, node_doc, restored, source, storage

pytestmark = pytest.mark.lab

SOURCES = ("coop/web1", "other/app1")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    root = tmp_path_factory.mktemp("lost")
    yield from backed_up(root, borg_path, {
        "coop": [node_doc("web1", backup=source(["/etc"])), node_doc("store1", storage=storage())],
        "other": [node_doc("app1", backup=source(["/srv/app"])), node_doc("store1", storage=storage())],
        "third": [node_doc("store1", storage=storage())],
    }, source_name=SOURCES[0], replicas=2)


def repositories(fed: LabFederation) -> dict[str, bytes]:
    """Each repository's config (its id: a repository initialised again would have another one)."""
    found = {}
    for node in fed.nodes.values():
        for config in sorted(Path(node.storage).glob("*/*/config")):
            found[str(config.parent)] = config.read_bytes()
    return found


def test_apply_with_a_lost_state_adopts_every_repository_and_everything_works(fed: LabFederation,
                                                                              tmp_path: Path) -> None:
    code, before = mb_json(fed, "plan")
    assert code == 0
    held = repositories(fed)
    assert len(held) == 4  # two sources x two replicas
    shutil.rmtree(fed.state)  # the coordinator's disk is gone
    code, out, err = mb(fed, "apply")
    assert code == 0, out + err
    assert out.count("= adopted") == 4 and "+ repository" not in out
    assert repositories(fed) == held  # not one initialised again
    code, after = mb_json(fed, "plan")
    assert code == 0 and after["replicas"] == before["replicas"] and after["changes"] == []
    code, rows = mb_json(fed, "status")
    assert code == 0 and {(r["source"], r["state"]) for r in rows} == {(s, "ok") for s in SOURCES}
    code, outcomes = mb_json(fed, "run", SOURCES[0])
    assert code == 0, outcomes
    assert all(o["result"] == "success" and o["deduplicated_bytes"] < o["original_bytes"] / 10 for o in outcomes)
    target = tmp_path / "back"
    code, summary = mb_json(fed, "restore", SOURCES[0], "--to", f"{SOURCES[0]}:{target}")
    assert code == 0, summary
    original = fed.data_path(SOURCES[0], "/etc") / "plain.txt"
    assert restored(target, original).read_bytes() == original.read_bytes()
