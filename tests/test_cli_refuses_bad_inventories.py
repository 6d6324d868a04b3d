"""Every command refuses an invalid inventory with exit 2 and FILE:LINE messages, and does nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from signkit import admin_key, sign_inventory
from labkit import mb

VALID = Path(__file__).parent / "inventories" / "three-members"

COMMANDS = [
    ("check",),
    ("plan",),
    ("apply",),
    ("run",),
    ("status",),
    ("archives", "coopcycle/web1"),
    ("restore", "coopcycle/web1", "--to", "coopcycle/web1:/tmp/x"),
    ("daemon",),
]

HOSTILE = [
    pytest.param("coopcycle.yml", "  - name: web1\n", "  - name: a;rm -rf x\n", "name", id="a node named a;rm -rf x"),
    pytest.param("coopcycle.yml", "      paths: [/etc, /srv/www]\n", "      paths: [/etc, '/srv/$(touch /tmp/pwned)']\n", "$", id="a path with $(...)"),
    pytest.param("libre-hosting.yml", "      path: /srv/backups\n", "      path: srv/backups\n", "absolute", id="a relative storage path"),
    pytest.param("coopcycle.yml", "  - name: db1\n", "  - name: web1\n", "web1", id="a duplicate node name"),
    pytest.param("coopcycle.yml", "host_key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAEBAQEB", "host_key: ssh-ed25519 AAAAnope", "host_key", id="a host key that does not parse"),
    pytest.param("coopcycle.yml", "    port: 22\n", "    port: 22\n    colour: blue\n", "colour", id="an unknown key"),
]


def hostile_inventory(tmp_path: Path, member_file: str, old: str, new: str) -> Path:
    inventory = tmp_path / "inventory"
    shutil.copytree(VALID, inventory)
    federation = inventory / "federation.yml"
    federation.write_text(federation.read_text().replace("/var/lib/mutualbackup", str(tmp_path / "state")))
    path = inventory / "members" / member_file
    text = path.read_text()
    assert old in text, f"the fixture changed: {old!r} not in {member_file}"
    path.write_text(text.replace(old, new, 1))
    return inventory


@pytest.mark.parametrize("member_file, old, new, mentions", HOSTILE)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_hostile_inventory_and_changes_nothing(
    tmp_path: Path, member_file: str, old: str, new: str, mentions: str, command: tuple[str, ...]
) -> None:
    inventory = hostile_inventory(tmp_path, member_file, old, new)
    code, out, err = mb(inventory, *command)
    assert code == 2, (out, err)
    assert re.search(rf"{re.escape(str(inventory / 'members' / member_file))}:\d+: ", err), err
    assert mentions in err
    assert "nothing was done" in err
    assert not (tmp_path / "state").exists()
    assert not Path("/tmp/pwned").exists()


def test_a_placement_that_cannot_be_satisfied_is_an_error_for_check_and_reported_by_plan_and_status(
        tmp_path: Path) -> None:
    inventory = hostile_inventory(tmp_path, "coopcycle.yml", "      replicas: 1\n", "      replicas: 5\n")
    code, out, err = mb(inventory, "check")
    assert code == 2
    assert re.search(r"coopcycle\.yml:\d+: cannot place coopcycle/web1: it needs 5 replica", err), err
    assert not (tmp_path / "state").exists()
    for command in (("plan",), ("status",)):  # reported, never a failure of the command itself
        code, out, err = mb(inventory, *command)
        assert code == 1, (command, out, err)
        assert re.search(r"warning: .*coopcycle\.yml:\d+: cannot place coopcycle/web1: it needs 5 replica.*"
                         r"it keeps the replicas it has", err), err
    code, out, err = mb(inventory, "plan", "--json")
    assert code == 1 and [u["source"] for u in json.loads(out)["unplaceable"]] == ["coopcycle/web1"]


def test_the_valid_fixture_passes_check_once_its_admins_signed_it(tmp_path: Path) -> None:
    inventory = hostile_inventory(tmp_path, "coopcycle.yml", "", "")
    code, out, err = mb(inventory, "check")
    assert code == 2 and "coopcycle.yml:1: not signed" in err and "mutualbackup sign" in err
    sign_inventory(inventory, admin_key(tmp_path / "keys"))
    code, out, err = mb(inventory, "check")
    assert code == 0, err
    assert "ok" in out


def test_a_missing_inventory_directory_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = mb(tmp_path / "nowhere", "check")
    assert code == 2
    assert "no inventory directory" in err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`mutualbackup plan | head -1`: the reader left; no traceback, no BrokenPipeError."""
    import subprocess
    import sys

    inventory = hostile_inventory(tmp_path, "coopcycle.yml", "", "")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "mutualbackup.cli", "--inventory", str(inventory), "plan"],
                              stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr.decode() and "BrokenPipe" not in done.stderr.decode(), done.stderr
    assert done.returncode == 0
