"""`mutualbackup run` as the executable, on real sshd nodes: a command line run again connects to its source on
its hint before the inventory is read, once; a stale hint is closed unused and replaced, one that answers nothing
is dropped, and every run backs up what the inventory says (remote/hints.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lab import federation as labfed
from lab.nodes import Lab
from labkit import alpha_beta, mb, mb_json
from mutualbackup.context import coordinator_key
from mutualbackup.inventory.load import load_inventory
from mutualbackup.remote import hints

pytestmark = pytest.mark.lab

SOURCE, HOST = "alpha/web", "beta/store"
PROGRAM = str(Path(sys.executable).with_name("mutualbackup"))  # the executable, as an operator or a timer runs it


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[labfed.LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    root = tmp_path_factory.mktemp("hints")
    with Lab(root / "lab", borg=borg_path) as lab:
        fed = labfed.build(lab, *alpha_beta("hints", {"retention": {"daily": 7}}), root)
        (fed.data_path(SOURCE, "/srv/data") / "file.txt").write_text("hinted\n")
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        yield fed


def run(fed: labfed.LabFederation, cache: Path) -> tuple[list[str], dict[str, str], subprocess.CompletedProcess[str]]:
    argv = ["--inventory", str(fed.inventory), "run", SOURCE]
    env = {name: value for name, value in os.environ.items() if not name.startswith("MUTUALBACKUP_")}
    env["XDG_CACHE_HOME"] = str(cache)
    done = subprocess.run([PROGRAM, *argv], env=env, cwd=str(cache.parent), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return argv, env, done


def sessions(fed: labfed.LabFederation, node: str) -> int:
    """The coordinator's SSH sessions the node's sshd has started so far (not borg's own, from a source)."""
    lines = fed.nodes[node].sshd_log.read_text(errors="replace").splitlines()
    return sum("Starting session" in line and "mutualbackup-node serve" in line for line in lines)


def endpoint(fed: labfed.LabFederation, node: str) -> hints.Endpoint:
    federation = load_inventory(str(fed.inventory))
    return hints.Endpoint.of(federation.node(node), coordinator_key(federation))


def backups(fed: labfed.LabFederation) -> int:
    code, listing = mb_json(fed, "archives", SOURCE)
    assert code == 0, listing
    return len(listing["archives"])


def test_a_run_again_connects_to_its_source_once_on_its_hint(fed: labfed.LabFederation, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    argv, env, _ = run(fed, cache)  # first: no hint yet, one is kept
    where = hints.cache_file(env)
    assert hints.recall(where, hints.key(argv, env, str(tmp_path))) == endpoint(fed, SOURCE)
    assert oct(os.stat(where).st_mode & 0o777) == "0o600"
    archives = backups(fed)  # (it asks the source too)
    before = sessions(fed, SOURCE)
    run(fed, cache)
    assert sessions(fed, SOURCE) == before + 1  # the hinted session carried the backup: no second connection
    assert backups(fed) == archives + 1


def test_a_stale_hint_is_closed_unused_and_the_run_backs_up_what_the_inventory_says(
        fed: labfed.LabFederation, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    argv = ["--inventory", str(fed.inventory), "run", SOURCE]
    env = {name: value for name, value in os.environ.items() if not name.startswith("MUTUALBACKUP_")}
    env["XDG_CACHE_HOME"] = str(cache)
    command = hints.key(argv, env, str(tmp_path))
    hints.remember(hints.cache_file(env), command, endpoint(fed, HOST))  # another node answers that hint
    archives = backups(fed)
    host_sessions, source_sessions = sessions(fed, HOST), sessions(fed, SOURCE)
    run(fed, cache)
    assert sessions(fed, HOST) == host_sessions + 1 and sessions(fed, SOURCE) == source_sessions + 1
    assert backups(fed) == archives + 1  # of the source the inventory names
    assert hints.recall(hints.cache_file(env), command) == endpoint(fed, SOURCE)  # the hint is right again
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once it is closed
    nowhere = endpoint(fed, SOURCE)
    nowhere.port = port
    hints.remember(hints.cache_file(env), command, nowhere)
    run(fed, cache)
    assert backups(fed) == archives + 2
    assert hints.recall(hints.cache_file(env), command) == endpoint(fed, SOURCE)
