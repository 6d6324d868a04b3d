"""``mutualbackup ansible-inventory``: the federation's nodes as an Ansible script inventory, read by the real
``ansible-inventory`` through a two-line executable, as a federation's repository would hold it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import mb

INVENTORY = Path(__file__).parent / "inventories" / "three-members"


def test_list_gives_groups_by_member_and_role_and_each_nodes_address(tmp_path: Path) -> None:
    code, out, err = mb(INVENTORY, "ansible-inventory", "--list")
    assert code == 0, err
    document = json.loads(out)
    hostvars = document["_meta"]["hostvars"]
    assert "web1.coopcycle" in document["coopcycle"]["hosts"]
    assert set(document["mutualbackup_sources"]["hosts"]) | set(document["mutualbackup_hosts"]["hosts"]) == set(hostvars)
    web1 = hostvars["web1.coopcycle"]
    assert web1["mutualbackup_node"] == "coopcycle/web1" and web1["ansible_port"] >= 1
    assert web1["mutualbackup_member_file"] == str(INVENTORY.resolve() / "members" / "coopcycle.yml")
    assert "ansible_user" not in web1  # the admin logs in as themselves, never as the coordinator's login
    code, out, err = mb(INVENTORY, "ansible-inventory", "--host", "web1.coopcycle")
    assert code == 0 and json.loads(out) == web1


def ansible_and_script(tmp_path: Path) -> tuple[str, Path]:
    """The real ``ansible-inventory``, and the two-line executable a federation's repository would hold."""
    program = shutil.which("ansible-inventory", path=str(Path(sys.executable).parent))
    if program is None:
        pytest.skip("ansible-core is not installed")
    script = tmp_path / "federation.py"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m mutualbackup.cli --inventory {INVENTORY} "
                      "ansible-inventory \"$@\"\n")
    script.chmod(0o755)
    return program, script


def test_a_two_line_script_is_an_inventory_for_ansible(tmp_path: Path) -> None:
    program, script = ansible_and_script(tmp_path)
    done = subprocess.run([program, "-i", str(script), "--list", "--limit", "coopcycle"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert set(seen["_meta"]["hostvars"]) == set(json.loads(mb(INVENTORY, "ansible-inventory", "--list")[1])["coopcycle"]["hosts"])


def test_the_inventory_wins_over_the_join_playbooks_defaults(tmp_path: Path) -> None:
    """Ansible's precedence: the script's host variables above playbooks/group_vars/all.yml (the defaults)."""
    program, script = ansible_and_script(tmp_path)
    playbooks = Path(__file__).resolve().parent.parent / "playbooks"
    done = subprocess.run([program, "-i", str(script), "--playbook-dir", str(playbooks), "--host", "web1.coopcycle"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)
    assert merged["mutualbackup_node"] == "coopcycle/web1"  # not the default ""
    assert merged["mutualbackup_config_dir"] == "/etc/mutualbackup-node"  # a default still applies
