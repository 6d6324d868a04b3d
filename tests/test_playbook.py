"""playbooks/join.yml, run for real by ansible-playbook against a lab node over SSH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.nodes import Lab

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
def test_the_join_playbook_authorises_the_coordinator_and_prepares_storage_idempotently(lab: Lab, tmp_path: Path) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{node.port} {node.host_key}\n")
    authorized_keys = tmp_path / "home" / ".ssh" / "authorized_keys"
    storage = tmp_path / "storage"
    coordinator_pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq coordinator@test"
    argv = [
        ansible_playbook(), "-i", "127.0.0.1,", str(PLAYBOOK),
        "-e", f"ansible_port={node.port} ansible_user=root ansible_become=false",
        "-e", f"ansible_ssh_private_key_file={lab.coordinator_key}",
        "-e", f"ansible_ssh_common_args='-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes'",
        "-e", "ansible_python_interpreter=/usr/bin/python3 ansible_ssh_transfer_method=piped",
        "-e", "mutualbackup_user=root mutualbackup_manage_user=false mutualbackup_borg_install=none",
        "-e", f"mutualbackup_authorized_keys={authorized_keys} mutualbackup_storage_path={storage}",
        "-e", f"mutualbackup_host_key_file={node.host_key_file}.pub",
        "-e", f"mutualbackup_coordinator_pubkey='{coordinator_pub}'",
    ]
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"))
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"host_key: {node.host_key}" in first.stdout
    assert authorized_keys.read_text() == coordinator_pub + "\n"
    assert oct(authorized_keys.stat().st_mode & 0o777) == "0o600"
    assert storage.is_dir() and oct(storage.stat().st_mode & 0o777) == "0o700"

    second = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "changed=0" in second.stdout
    assert authorized_keys.read_text() == coordinator_pub + "\n"
