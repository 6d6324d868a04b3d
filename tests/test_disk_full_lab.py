"""A host whose disk (not its quota) fills up, on lab nodes over real ssh: a small tmpfs is the host's storage.
The backup that does not fit fails with the host's own words ("beta/store's disk is full"), what it wrote is
rolled back on the host at once (a key-free repository check), earlier archives stay intact, and once there
is room the next backup succeeds, with no maintenance check in between."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from lab import federation as labfed
from lab.federation import LabFederation
from lab.nodes import Lab
from labkit import alpha_beta, mb, mb_json

pytestmark = pytest.mark.lab

SOURCE, HOST = "alpha/web", "beta/store"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    root = tmp_path_factory.mktemp("diskfull")
    with Lab(root / "lab", borg=borg_path) as lab:
        fed = labfed.build(lab, *alpha_beta("disk-full", {"retention": {"daily": 7}}), root)
        storage = Path(fed.nodes[HOST].storage)
        owner = storage.stat()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o",
                               f"size=24m,mode=0700,uid={owner.st_uid},gid={owner.st_gid}", "tmpfs", str(storage)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr}")
        try:
            data = fed.data_path(SOURCE, "/srv/data")
            (data / "small.txt").write_text("small\n")
            code, out, err = mb(fed, "apply")
            assert code == 0, out + err
            yield fed
        finally:
            subprocess.run(["umount", "-l", str(storage)], check=False)


def test_a_full_host_disk_fails_clearly_is_rolled_back_and_the_next_backup_succeeds_once_there_is_room(
        fed: LabFederation) -> None:
    code, outcomes = mb_json(fed, "run")
    assert code == 0, outcomes  # a first archive, small
    data = fed.data_path(SOURCE, "/srv/data")
    big = data / "big.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024))  # incompressible, and more than the host's disk holds
    code, out, err = mb(fed, "run", SOURCE)
    assert code == 1
    assert f"{HOST}'s disk is full" in err and "once beta/store has room" in err, err
    assert "rolled back on beta/store" in err or "Rolling it back on beta/store failed" in err, err
    big.unlink()  # the member frees space (here: the source backs up less)
    code, outcomes = mb_json(fed, "run", SOURCE)
    assert code == 0 and outcomes[0]["result"] == "success", outcomes
    code, listing = mb_json(fed, "archives", SOURCE)
    assert code == 0 and len(listing["archives"]) == 2  # the first archive, intact, and the new one
