"""Replicas move by themselves, make before break (issue 14's acceptance, on lab nodes over real ssh, the real
daemon stepped in this process): a host its member marks ``draining``, or a member that leaves the federation.
The new replica is made and backed up before the old one is given up; at no moment does the source have fewer
healthy replicas than before; the old repository stays on its host, listed as an orphan."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from lab.federation import LabFederation, write_signed
from labkit import mb, mb_json, wait_for
from mutualbackup.context import Context, ssh_connector
from mutualbackup.daemon import Daemon
from mutualbackup.inventory.load import load_inventory
from mutualbackup.state.history import History
from restorekit import backed_up, node_doc, restored, source, storage

pytestmark = pytest.mark.lab

SOURCE = "alpha/web"


def three_hosts(tmp_path_factory: pytest.TempPathFactory, borg_path: str, name: str) -> Iterator[LabFederation]:
    yield from backed_up(tmp_path_factory.mktemp(name), borg_path, {
        "alpha": [node_doc("web", backup=source(["/etc"]))],
        "beta": [node_doc("store", storage=storage())],
        "gamma": [node_doc("store", storage=storage())],
        "delta": [node_doc("store", storage=storage())],
    }, source_name=SOURCE, replicas=2)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from three_hosts(tmp_path_factory, borg_path, "moves")


@pytest.fixture(scope="module")
def fed2(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from three_hosts(tmp_path_factory, borg_path, "leaves")


def healthy(history: History, hosts: tuple[str, ...]) -> int:
    return sum(1 for h in hosts if history.last_run("backup", SOURCE, h, successful=True) is not None)


def run_daemon_until_moved(fed: LabFederation, gone: str) -> tuple[History, list[int]]:
    """The daemon, stepped here, until ``SOURCE`` holds no replica on ``gone``; the healthy counts seen."""
    federation = load_inventory(str(fed.inventory))
    history = History(fed.state)
    daemon = Daemon(Context(federation, history, ssh_connector(federation)), tick=0.2, maintenance_enabled=False,
                    drills_enabled=False)
    seen = []
    deadline = time.monotonic() + 240

    def moved() -> bool:
        daemon._moves_looked = None  # look at every step: the test does not wait a minute between looks
        daemon.step(daemon.now())
        seen.append(healthy(history, history.placement()[SOURCE]))
        return gone not in history.placement()[SOURCE] and not history.moves() and not daemon.running

    try:
        while not moved():
            assert time.monotonic() < deadline, f"not moved: {history.placement()} {list(map(dict, history.moves()))}"
            time.sleep(0.2)
    finally:
        daemon.stop.set()
        daemon.shutdown()
    return history, seen


def line_for(fed: LabFederation, host: str) -> bool:
    keys = Path(fed.nodes[host].authorized_keys)
    return keys.exists() and f"mutualbackup:{SOURCE}" in keys.read_text()


def test_a_draining_host_ends_with_no_replica_having_never_reduced_the_healthy_count(fed: LabFederation,
                                                                                      tmp_path: Path) -> None:
    history = History(fed.state)
    [first, second] = history.placement()[SOURCE]
    assert healthy(history, (first, second)) == 2
    member = first.split("/")[0]
    path = fed.inventory / "members" / f"{member}.yml"
    document = yaml.safe_load(path.read_text())
    document["nodes"][0]["storage"]["draining"] = True
    write_signed(fed.lab, path, document)  # its own member takes it out
    code, out, err = mb(fed, "apply")  # the sysadmin applies it: nothing is given up before its move is done
    assert code == 0, out + err
    assert f"moving      {SOURCE}: {first} → " in out and "once the new one is healthy" in out
    assert line_for(fed, first) and history.placement()[SOURCE][:2] == (first, second)
    assert [(m["source"], m["old"], m["reason"]) for m in history.moves()] == [(SOURCE, first, "draining")]
    code, out, err = mb(fed, "apply")
    assert code == 0 and "moving" not in out, out + err  # the move is under way, not started twice
    history, seen = run_daemon_until_moved(fed, first)
    now = history.placement()[SOURCE]
    assert first not in now and second in now and len(now) == 2
    assert min(seen) >= 2  # make before break: never fewer healthy replicas than before the change
    assert healthy(history, now) == 2
    assert not line_for(fed, first) and line_for(fed, now[1])  # the old key line is gone, the new one is there
    assert Path(fed.nodes[first].storage, SOURCE, "config").exists()  # the old repository is kept
    assert [(o["source"], o["host"]) for o in history.orphans()] == [(SOURCE, first)]
    code, planned = mb_json(fed, "plan")
    assert code == 0 and planned["orphans"] == [{"source": SOURCE, "host": first, "bytes": planned["orphans"][0]["bytes"]}]
    code, rows = mb_json(fed, "status")
    assert code == 0 and {r["target"] for r in rows} == set(now)
    target = tmp_path / "back"
    code, summary = mb_json(fed, "restore", SOURCE, "--to", f"{SOURCE}:{target}", "--replica", now[1])
    assert code == 0, summary
    original = fed.data_path(SOURCE, "/etc") / "plain.txt"
    assert restored(target, original).read_bytes() == original.read_bytes()


def test_a_member_that_leaves_gives_its_replicas_away_and_nothing_else_fails(fed2: LabFederation) -> None:
    fed = fed2
    history = History(fed.state)
    [first, second] = history.placement()[SOURCE]
    member = first.split("/")[0]
    (fed.inventory / "members" / f"{member}.yml").unlink()
    (fed.inventory / "members" / f"{member}.yml.sig").unlink()
    for command in (("status",), ("ledger",), ("verify", SOURCE), ("archives", SOURCE)):  # before anything moved
        code, out, err = mb(fed, *command)
        assert code in (0, 1) and "Traceback" not in err, (command, out, err)
        assert "no node" not in err
    history, seen = run_daemon_until_moved(fed, first)
    now = history.placement()[SOURCE]
    assert first not in now and second in now and len(now) == 2
    assert min(seen) >= 1  # only the departed member's replica was ever missing
    assert healthy(history, now) == 2
    wait_for(lambda: mb(fed, "status")[0] == 0, 10, "status ok")


@pytest.fixture(scope="module")
def fed3(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from three_hosts(tmp_path_factory, borg_path, "dies")


def test_a_host_down_for_longer_than_host_down_after_has_its_replicas_made_again_elsewhere(
        fed3: LabFederation) -> None:
    fed = fed3
    history = History(fed.state)
    [first, second] = history.placement()[SOURCE]
    member = first.split("/")[0]
    path = fed.inventory / "members" / f"{member}.yml"
    document = yaml.safe_load(path.read_text())
    document["nodes"][0]["storage"]["host_down_after"] = "2s"
    write_signed(fed.lab, path, document)
    fed.lab.stop(fed.nodes[first])  # the server dies for good
    code, out, err = mb(fed, "run", SOURCE, "--replica", first)  # an attempt fails: it is down, not just idle
    assert code == 1 and first in err
    time.sleep(2.5)  # longer than its host_down_after since it was last reached
    history, seen = run_daemon_until_moved(fed, first)
    now = history.placement()[SOURCE]
    assert first not in now and second in now and len(now) == 2 and healthy(history, now) == 2
    assert min(seen) >= 1  # the dead host's replica was the only one ever missing
    assert [(o["source"], o["host"]) for o in history.orphans()] == [(SOURCE, first)]
