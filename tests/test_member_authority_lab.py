"""Issue 13's acceptance on joined lab nodes over real ssh: a member file edited without its admin's signature
(a ``before:`` that would create a file, a retention of one archive, other paths), or re-signed by a key the
nodes did not pin, is reported by ``check`` and refused by every node of the member when the coordinator sends
it anyway: nothing is created, no archive is pruned, the refusal is in status and the log. Re-signed by a
pinned admin, the next backup uses the new paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from lab.federation import LabFederation, write_signed
from labkit import mb, mb_json
from restorekit import backed_up, node_doc, source, storage

pytestmark = pytest.mark.lab

SOURCE, HOST = "coop/web1", "other/store1"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    root = tmp_path_factory.mktemp("authority")
    yield from backed_up(root, borg_path, {"coop": [node_doc("web1", backup=source(["/etc"]))],
                                           "other": [node_doc("store1", storage=storage())]},
                         source_name=SOURCE, replicas=1)


@pytest.fixture
def member_file(fed: LabFederation) -> Iterator[Path]:
    """coop's member file, put back as its admin signed it after the test."""
    path = fed.inventory / "members" / "coop.yml"
    text, signature = path.read_bytes(), Path(f"{path}.sig").read_bytes()
    yield path
    path.write_bytes(text)
    Path(f"{path}.sig").write_bytes(signature)


def archives(fed: LabFederation) -> list[str]:
    code, rows = mb_json(fed, "archives", SOURCE, "--replica", HOST)
    assert code == 0, rows
    return sorted(row["name"] for row in rows["archives"])


def edit(path: Path, change) -> dict:  # noqa: ANN001
    document = yaml.safe_load(path.read_text())
    change(document["nodes"][0]["backup"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return document


@pytest.mark.parametrize("what", ["before", "retention", "paths"])
def test_an_unsigned_edit_is_reported_by_check_and_refused_by_the_node(
        fed: LabFederation, member_file: Path, what: str, tmp_path: Path) -> None:
    marker = Path(f"/tmp/mutualbackup-pwned-{os.getpid()}-{what}")
    held = archives(fed)
    if what == "before":
        edit(member_file, lambda b: b.update(before=[f"touch {marker}"]))
    elif what == "retention":
        edit(member_file, lambda b: b.update(retention={"daily": 1}))
    else:
        edit(member_file, lambda b: b.update(paths=[str(fed.data_path(SOURCE, "/nothing-here"))]))
    code, out, err = mb(fed, "check")
    assert code == 2 and "members/coop.yml" in out + err and "signature" in out + err
    code, out, err = mb(fed, "run", SOURCE)  # the coordinator sends it anyway
    assert code != 0 and "member file is refused" in out + err
    assert not marker.exists()
    assert archives(fed) == held  # no archive made, none pruned
    code, rows = mb_json(fed, "status")
    [row] = [r for r in rows if r["source"] == SOURCE]
    assert "member file is refused" in (row["last_error"] or "")


def test_a_file_re_signed_by_a_key_the_nodes_did_not_pin_is_refused(fed: LabFederation, member_file: Path,
                                                                       tmp_path: Path) -> None:
    mallory = tmp_path / "mallory"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(mallory)], check=True)
    public = " ".join(Path(f"{mallory}.pub").read_text().split()[:2])
    marker = Path(f"/tmp/mutualbackup-pwned-{os.getpid()}-mallory")
    document = edit(member_file, lambda b: b.update(before=[f"touch {marker}"]))
    document["admins"] = [{"name": "mallory", "key": public}]  # and names itself an admin
    member_file.write_text(yaml.safe_dump(document, sort_keys=False))
    from mutualbackup.inventory.signatures import sign

    sign(str(member_file), str(mallory))
    held = archives(fed)
    code, out, err = mb(fed, "run", SOURCE)
    assert code != 0 and "member file is refused" in out + err and "pinned at join: admin" in out + err
    assert not marker.exists() and archives(fed) == held


def test_a_file_re_signed_by_a_pinned_admin_is_used_by_the_next_backup(fed: LabFederation, member_file: Path,
                                                                         tmp_path: Path) -> None:
    new = fed.data_path(SOURCE, "/srv/new")
    new.mkdir(parents=True, exist_ok=True)
    (new / "fresh.txt").write_text("signed and used\n")
    document = edit(member_file, lambda b: b["paths"].append(str(new)))
    write_signed(fed.lab, member_file, document)
    assert mb(fed, "check")[0] == 0
    code, out, err = mb(fed, "run", SOURCE)
    assert code == 0, out + err
    target = tmp_path / "back"
    code, summary = mb_json(fed, "restore", SOURCE, "--to", f"{SOURCE}:{target}", "--path", str(new))
    assert code == 0, summary
    assert [p.read_text() for p in target.rglob("fresh.txt")] == ["signed and used\n"]
