"""A full storage quota on real sshd nodes and real borg: a clear failure, data intact, healthy once raised.

alpha/web backs up onto beta/store, whose capacity (40 MiB) is smaller than the
10 GiB minimum quota, so the replica's quota is the host's capacity. The tests run
in order on one federation: a small first backup, then one that does not fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from lab import federation as labfed
from lab.nodes import Lab
from lab.federation import LabFederation

from labkit import alpha_beta, mb, mb_json, same_tree, write_tree

pytestmark = pytest.mark.lab

SOURCE, HOST = "alpha/web", "beta/store"
CAPACITY = 40 * 1024**2


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    root = tmp_path_factory.mktemp("quota")
    federation_doc, members = alpha_beta("quota-lab", {"retention": {"daily": 7}, "compression": "lz4"})
    members["alpha"]["nodes"][0]["backup"]["estimate"] = "1MiB"
    members["beta"]["nodes"][0]["storage"]["capacity"] = "40MiB"
    with Lab(root / "lab", borg=borg_path) as lab:
        federation = labfed.build(lab, federation_doc, members, root)
        write_tree(federation.data_path(SOURCE, "/srv/data"))
        for command in ("apply", "run"):
            code, out, err = mb(federation, command)
            assert code == 0, out + err
        yield federation


def archive_names(fed: LabFederation) -> list[str]:
    code, doc = mb_json(fed, "archives", SOURCE)
    assert code == 0, doc
    return [archive["name"] for archive in doc["archives"]]


def host_line(fed: LabFederation) -> str:
    text = Path(fed.nodes[HOST].authorized_keys).read_text()
    lines = [line for line in text.splitlines() if line.endswith(f"mutualbackup:{SOURCE}")]
    assert len(lines) == 1, text
    return lines[0]


def restore(fed: LabFederation, target: Path, *extra: str) -> Path:
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"{SOURCE}:{target}", *extra)
    assert code == 0, out + err
    return Path(str(target) + str(fed.data_path(SOURCE, "/srv/data")))


@pytest.fixture(scope="module")
def over_quota(fed: LabFederation) -> dict[str, object]:
    """The second backup, 60 MiB of incompressible data into a 40 MiB quota, and what it left."""
    first = archive_names(fed)
    assert len(first) == 1
    assert f"--storage-quota {CAPACITY}" in host_line(fed)
    big = fed.data_path(SOURCE, "/srv/data") / "too big.bin"
    big.write_bytes(os.urandom(60 * 1024**2))
    code, out, err = mb(fed, "run")
    return {"first": first[0], "code": code, "output": out + err, "big": big}


def test_a_backup_over_the_quota_fails_saying_what_to_do(over_quota: dict[str, object]) -> None:
    assert over_quota["code"] == 1
    output = str(over_quota["output"])
    assert "exited 20" in output or "exit 20" in output, output
    assert "quota" in output and "estimate" in output and "mutualbackup apply" in output
    assert "earlier archives are intact" in output


def test_status_records_the_quota_error_and_a_second_full_attempt_makes_the_replica_failing(
    fed: LabFederation, over_quota: dict[str, object]
) -> None:
    code, doc = mb_json(fed, "status")
    (row,) = [r for r in doc if r["target"] == HOST]
    assert row["consecutive_failures"] == 1 and "quota" in row["last_error"]
    assert row["state"] == "ok" and code == 0  # one failure is retried before status calls it failing
    code, out, err = mb(fed, "run")  # still too big: the quota does not change by itself
    assert code == 1 and "quota" in out + err
    code, doc = mb_json(fed, "status")
    (row,) = [r for r in doc if r["target"] == HOST]
    assert code == 1 and row["state"] == "failing" and "quota" in row["last_error"]


def test_after_the_failure_the_repository_checks_clean_and_the_first_archive_restores_exactly(
    fed: LabFederation, over_quota: dict[str, object], tmp_path: Path
) -> None:
    assert archive_names(fed) == [over_quota["first"]]  # the failed transaction left no archive
    code, out, err = mb(fed, "verify")
    assert code == 0, out + err
    restored = restore(fed, tmp_path / "first", "--archive", str(over_quota["first"]))
    assert same_tree(fed.data_path(SOURCE, "/srv/data"), restored, ignore=(".cache", "too big.bin")) == []
    assert not (restored / "too big.bin").exists()


def test_once_the_capacity_is_raised_apply_gives_room_and_the_next_backup_is_healthy(
    fed: LabFederation, over_quota: dict[str, object], tmp_path: Path
) -> None:
    member_file = fed.inventory / "members" / "beta.yml"
    doc = yaml.safe_load(member_file.read_text())
    doc["nodes"][0]["storage"]["capacity"] = "1GiB"
    member_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = mb(fed, "apply")
    assert code == 0, out + err
    assert f"--storage-quota {1024**3}" in host_line(fed)
    code, out, err = mb(fed, "run")
    assert code == 0, out + err
    code, doc = mb_json(fed, "status")
    assert code == 0, doc
    assert len(archive_names(fed)) == 2
    restored = restore(fed, tmp_path / "latest")
    assert same_tree(fed.data_path(SOURCE, "/srv/data"), restored, ignore=(".cache",)) == []
    assert (restored / "too big.bin").read_bytes() == Path(str(over_quota["big"])).read_bytes()
