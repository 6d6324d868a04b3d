"""playbooks/join.yml, run for real by ansible-playbook against a lab node over SSH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.nodes import Lab
from mutualbackup.remote.ssh import SSHTransport

PLAYBOOK = Path(__file__).parent.parent / "playbooks" / "join.yml"


def ansible_playbook() -> str:
    found = shutil.which("ansible-playbook") or shutil.which("ansible-playbook", path=os.path.dirname(sys.executable))
    if not found:
        pytest.fail("ansible-playbook is not installed: scripts/setup installs it with the test extras")
    return found


def test_the_join_playbook_parses() -> None:
    result = subprocess.run([ansible_playbook(), "--syntax-check", "-i", "localhost,", str(PLAYBOOK)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.lab
def test_the_join_playbook_joins_the_node_as_its_admin_would_and_is_idempotent(lab: Lab, tmp_path: Path) -> None:
    """Run on the node itself (as its admin runs Ansible there); the coordinator then reaches the node program."""
    node = lab.add_node("coop", "web1")
    lab.start(node)
    argv = [
        ansible_playbook(), "-i", "localhost,", "-c", "local", str(PLAYBOOK),
        "-e", f"ansible_python_interpreter={sys.executable}",
        "-e", f"mutualbackup_node={node.name} mutualbackup_member_file={lab.member_file_alone(node)}",
        "-e", f"mutualbackup_user={node.user} mutualbackup_manage_user=false mutualbackup_install=none",
        "-e", f"mutualbackup_program={lab.program} mutualbackup_config_dir={node.node_config}",
        "-e", f"mutualbackup_state_dir={node.state} mutualbackup_sudoers={lab.sudoers_file(node)}",
        "-e", f"mutualbackup_host_key_file={node.host_key_file}.pub",
        "-e", f"mutualbackup_coordinator_pubkey='{lab.coordinator_public_key}'",
    ]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"))
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"host_key: {node.host_key}" in first.stdout
    node_key = first.stdout.split("node_key: ")[1].split("'")[0].split('"')[0]
    assert node_key.startswith("age1")
    [line] = node.authorized_keys.read_text().splitlines()
    assert re.match(rf'command="(\S*/)?mutualbackup-node serve --config {re.escape(str(node.node_config))}"', line)
    assert ",restrict " in line and lab.coordinator_public_key.split()[1] in line
    assert oct(node.authorized_keys.stat().st_mode & 0o777) == "0o600"
    assert oct(node.storage.stat().st_mode & 0o777) == "0o700"
    node.node_key = node_key
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
        hello = transport.request("hello", {}, timeout=60)
    assert hello.ok and hello.data["node"] == "coop/web1", hello.error

    second = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "changed=0" in second.stdout
    assert f"node_key: {node_key}" in second.stdout  # the sealing key is made once
    assert node.authorized_keys.read_text() == line + "\n"
