"""``mutualbackup doctor``: each node checked before the federation trusts it with data, and what to fix."""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from mutualbackup import __version__
from mutualbackup.context import Context
from mutualbackup.inventory.units import format_size
from mutualbackup.jobs.doctor import doctor
from mutualbackup.state.history import History
from fake import GIB, FakeClock, FakeWorld, make_federation
from lab.federation import LabFederation
from labkit import alpha_beta, mb, mb_json

import lab.federation as labfed
from lab.nodes import Lab


def fake(tmp_path: Path) -> tuple[Context, FakeWorld]:
    federation = make_federation(2)
    world = FakeWorld(federation, FakeClock(time.time()))
    return Context(federation, History(str(tmp_path / "state")), world.connect), world


def test_a_healthy_federation_has_every_node_ok_with_its_versions_clock_and_free_space(tmp_path: Path) -> None:
    ctx, _ = fake(tmp_path)
    found = {c.node: c for c in doctor(ctx, list(ctx.federation.nodes()))}
    assert set(found) == {"coop0/store", "coop0/src0", "coop1/store", "coop1/src0"}
    assert all(c.ok and c.reachable for c in found.values()), [c.problems for c in found.values()]
    store = found["coop0/store"]
    assert store.node_version == __version__ and store.borg_version == "borg 1.4.5"
    assert abs(store.clock_skew_seconds) < 5 and store.storage_free_bytes == 10 * 1024**4
    assert found["coop0/src0"].storage_free_bytes is None  # a source lends nothing


def test_an_unreachable_node_and_a_full_host_are_problems_that_say_what_to_do(tmp_path: Path) -> None:
    ctx, world = fake(tmp_path)
    world.unreachable.add("coop1/src0")
    world.free["coop0/store"] = 3 * GIB  # it lends 2000 GiB and holds nothing yet
    found = {c.node: c for c in doctor(ctx, list(ctx.federation.nodes()))}
    assert not found["coop1/src0"].reachable and "connection refused" in found["coop1/src0"].problems[0]
    assert "→ is the server up" in found["coop1/src0"].problems[0]
    [full] = found["coop0/store"].problems
    assert f"3 GiB free on the storage's disk, and it still lends {format_size(2000 * GIB)}" in full
    assert "lower storage.capacity" in full
    assert found["coop1/store"].ok and found["coop0/src0"].ok


def test_a_skewed_clock_and_an_old_borg_are_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, world = fake(tmp_path)

    def old_borg(node, argv, world):  # noqa: ANN001, ANN202
        from mutualbackup.remote.transport import Result

        return Result(argv, 0, b"borg 1.2.8\n", b"") if node.name == "coop0/src0" and argv[1:] == ("--version",) else None

    world.script(old_borg)
    import mutualbackup.node.source as source

    ahead = types.SimpleNamespace(time=lambda: time.time() + 600, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(source, "time", ahead)  # the node's clock, 10 minutes ahead
    found = {c.node: c for c in doctor(ctx, [ctx.node("coop0/src0")])}
    problems = "\n".join(found["coop0/src0"].problems)
    assert "borg 1.2.8 on the node" in problems and "install borgbackup 1.4" in problems
    assert "clock is 600 s ahead of the coordinator's" in problems and "NTP" in problems


# --- on the lab -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    import os

    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    root = tmp_path_factory.mktemp("doctor")
    federation, members = alpha_beta("doctor", {"rpo": "26h", "retention": {"daily": 7}})
    members["beta"]["nodes"][0]["storage"]["capacity"] = "1GiB"
    with Lab(root / "lab", borg=borg_path) as lab:
        yield labfed.build(lab, federation, members, root)


@pytest.mark.lab
def test_doctor_on_joined_lab_nodes_is_ok_and_names_a_changed_host_key_and_a_host_that_lends_too_much(
    fed: LabFederation,
) -> None:
    code, found = mb_json(fed, "doctor")
    assert code == 0, found
    assert [(c["node"], c["ok"]) for c in found] == [("alpha/web", True), ("beta/store", True)]
    assert all(c["node_version"] == __version__ and c["borg_version"].startswith("borg 1.4.") for c in found)
    assert found[1]["storage_free_bytes"] > GIB and found[0]["storage_free_bytes"] is None
    assert all(c["member_file_signer"].startswith("SHA256:") for c in found)  # each node accepts its member's file

    path = fed.inventory / "members" / "beta.yml"
    original = path.read_text()
    member = yaml.safe_load(original)
    member["nodes"][0]["storage"]["capacity"] = "1000TiB"
    path.write_text(yaml.safe_dump(member, sort_keys=False))
    fed.lab.change_host_key(fed.nodes["alpha/web"])
    try:
        code, out, err = mb(fed, "doctor")
    finally:
        path.write_text(original)
    assert code == 1
    assert "alpha/web  PROBLEM" in out and "host key" in out and "host_key:" in out
    assert "beta/store  PROBLEM" in out and "it still lends" in out and "lower storage.capacity" in out
    assert "beta's member file is refused" in out and "`mutualbackup sign`" in out  # edited, not signed again
