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
        "-e", f"mutualbackup_keys_out={tmp_path / 'joined'}",
    ]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"))
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"host_key: {node.host_key}" in first.stdout
    node_key = first.stdout.split("node_key: ")[1].split("'")[0].split('"')[0]
    assert node_key.startswith("age1")
    written = (tmp_path / "joined" / "coop.web1.yml").read_text()  # on the machine running Ansible, to paste
    assert f"host_key: {node.host_key}" in written and f"node_key: {node_key}" in written
    [line] = node.authorized_keys.read_text().splitlines()
    assert re.match(rf'command="/\S+/sudo -n -- /\S+/mutualbackup-node serve --config {re.escape(str(node.node_config))}"',
                    line)  # the login is not root: the sudo rule's own command line
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


COORDINATOR = Path(__file__).parent.parent / "playbooks" / "coordinator.yml"


def test_the_coordinator_playbook_parses() -> None:
    result = subprocess.run([ansible_playbook(), "--syntax-check", "-i", "localhost,", str(COORDINATOR)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.lab
def test_the_coordinator_playbook_prepares_the_machine_with_its_apt_pip_and_user_tasks(tmp_path: Path) -> None:
    """Run for real on this machine (as root, as CI is): the apt, pip and user tasks included, into directories
    of the test; the user it makes is removed afterwards. A second run changes nothing."""
    if os.geteuid() != 0:
        pytest.skip("the coordinator playbook makes a system user: it needs root")
    user = "mbcoordtest"
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(Path(__file__).parent.parent)], check=True, timeout=300, capture_output=True)
    [wheel] = wheels.glob("mutualbackup-*.whl")
    venv, etc, state = tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
    inventory = Path(__file__).parent / "inventories" / "three-members"
    argv = [
        ansible_playbook(), "-i", "localhost,", "-c", "local", str(COORDINATOR),
        "-e", f"ansible_python_interpreter={sys.executable}",
        "-e", f"mutualbackup_package={wheel} mutualbackup_pip_args=--no-deps mutualbackup_python={sys.executable}",
        "-e", f"mutualbackup_venv={venv} mutualbackup_user={user} mutualbackup_etc={etc} mutualbackup_state={state}",
        "-e", f"mutualbackup_inventory_src={inventory} mutualbackup_unit_dir={tmp_path / 'systemd'}",
        "-e", "mutualbackup_start=false mutualbackup_manage_prometheus=true mutualbackup_manage_grafana=true",
        "-e", f"mutualbackup_prometheus_dir={tmp_path / 'prometheus'} mutualbackup_grafana_provisioning="
              f"{tmp_path / 'grafana'} mutualbackup_grafana_dashboards={tmp_path / 'dashboards'}",
    ]
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "systemd").mkdir()
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"))
    try:
        first = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        key = etc / "id_ed25519"
        assert f"coordinator_pubkey: {key.with_suffix('.pub').read_text().strip()}" in first.stdout
        owner = subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout.strip()
        assert key.stat().st_uid == int(owner) and oct(key.stat().st_mode & 0o777) == "0o600"
        assert state.stat().st_uid == int(owner) and oct(state.stat().st_mode & 0o777) == "0o700"
        unit = (tmp_path / "systemd" / "mutualbackup.service").read_text()
        assert f"ExecStart={venv}/bin/mutualbackup daemon" in unit and f"User={user}\n" in unit
        assert f"ReadWritePaths={state}" in unit and f"MUTUALBACKUP_INVENTORY={etc}/inventory" in unit
        assert (etc / "inventory" / "federation.yml").is_file()
        assert (tmp_path / "prometheus" / "mutualbackup-alerts.yml").is_file()
        assert (tmp_path / "prometheus" / "prometheus.yml").is_file()
        assert sorted(p.name for p in (tmp_path / "dashboards").iterdir()) == ["federation-overview.json", "host.json",
                                                                              "member.json"]
        assert (tmp_path / "grafana" / "datasources" / "mutualbackup.yml").is_file()
        # the package the pip task installed is the one the unit runs (its dependencies are this test's own)
        [site] = venv.glob("lib/python*/site-packages")
        (site / "test-dependencies.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
        version = subprocess.run([str(venv / "bin" / "mutualbackup"), "--version"], capture_output=True, text=True)
        assert version.returncode == 0 and version.stdout.startswith("mutualbackup "), version.stderr
        second = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        assert second.returncode == 0 and re.search(r"changed=0\b", second.stdout), second.stdout + second.stderr
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)


@pytest.mark.lab
def test_the_join_playbook_prepares_every_node_of_a_member_from_the_federations_inventory_over_ssh(
    lab: Lab, tmp_path: Path
) -> None:
    """As a member's admin prepares its nodes: the federation's inventory as Ansible's (the two-line script), the
    admin logged in over SSH with become, apt, pip and user tasks included, `--limit` the member. Both nodes end
    joined (the coordinator's forced line, the node program and borg answering), their keys written out on the
    machine running Ansible; a second run changes nothing. The two lab nodes share this machine: each gets its
    own virtualenv, links, directories and login (the user task makes them; they are removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("the user task makes a system user and the join writes a sudo rule: it needs root")
    import yaml

    from lab.federation import write_signed

    logins = {"web1": "mbjoinweb1", "store1": "mbjoinstore1"}
    wheels = tmp_path / "wheels"  # the package and every dependency, borg included (built once by scripts/setup)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(Path(__file__).parent.parent)],
                   check=True, timeout=900, capture_output=True)
    [package] = wheels.glob("mutualbackup-*.whl")
    nodes = {slug: lab.add_node("coop", slug) for slug in ("web1", "store1")}
    inventory = tmp_path / "federation"
    (inventory / "members").mkdir(parents=True)
    (inventory / "federation.yml").write_text(yaml.safe_dump({
        "federation": "playbook", "coordinator": {"ssh_key": str(lab.coordinator_key), "state": str(tmp_path / "state")},
        "defaults": {"replicas": 1}}))
    entries = []
    for slug, node in nodes.items():
        node.user = logins[slug]
        entry: dict[str, object] = {"name": slug, **node.inventory_fields()}
        entry["borg"] = str(tmp_path / slug / "bin" / "borg")  # the one the playbook installs and links
        entry.pop("authorized_keys")  # the login's own ~/.ssh/authorized_keys, as on a real node
        entry.update({"storage": {"path": str(node.storage), "capacity": "1GiB"}} if slug == "store1"
                     else {"backup": {"paths": [str(node.data)]}})
        entries.append(entry)
    member = {"member": "coop", "contact": "ops@coop.example", "site": "coop",
              "admins": [{"name": "admin", "key": lab.admin_public_key("coop")}], "nodes": entries}
    write_signed(lab, inventory / "members" / "coop.yml", member)
    script = inventory / "federation-inventory"
    script.write_text(f"#!/bin/sh\nexec {Path(sys.executable).with_name('mutualbackup')} --inventory "
                      f"\"$(dirname \"$0\")\" ansible-inventory \"$@\"\n")
    script.chmod(0o755)
    admin_key = None
    per_node = {}
    for slug, node in nodes.items():
        admin_key = lab.allow_admin_login(node)
        lab.start(node)
        own = tmp_path / slug
        per_node[f"{slug}.coop"] = {
            "ansible_user": "root", "ansible_python_interpreter": sys.executable,
            "mutualbackup_venv": str(own / "venv"), "mutualbackup_bin_dir": str(own / "bin"),
            "mutualbackup_config_dir": str(node.node_config), "mutualbackup_state_dir": str(node.state),
            "mutualbackup_sudoers": lab.sudoers_file(node), "mutualbackup_host_key_file": f"{node.host_key_file}.pub",
        }
        (own / "bin").mkdir(parents=True)
    machine = tmp_path / "this-machine.yml"  # what differs because both nodes are one machine here
    machine.write_text(yaml.safe_dump({"all": {"hosts": per_node}}))
    argv = [ansible_playbook(), "-i", str(script), "-i", str(machine), str(PLAYBOOK), "--limit", "coop",
            "--forks", "1", "--private-key", str(admin_key),
            "-e", f"mutualbackup_package={package} mutualbackup_pip_args='--no-index --find-links {wheels}'"]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"),
               ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_SSH_ARGS="-o UserKnownHostsFile=/dev/null",
               PWD=str(tmp_path))  # run from tmp_path, as from a shell there
    try:
        first = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        for slug, node in nodes.items():
            written = (tmp_path / "joined" / f"coop.{slug}.yml").read_text()
            assert f"host_key: {node.host_key}" in written
            node.node_key = written.split("node_key: ")[1].split()[0]
            [line] = Path(f"/home/{node.user}/.ssh/authorized_keys").read_text().splitlines()
            assert re.match(rf'command="/\S+/sudo -n -- {re.escape(str(tmp_path / slug / "bin" / "mutualbackup-node"))} '
                            'serve --config ', line)
            assert ",restrict " in line and lab.coordinator_public_key.split()[1] in line
            with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
                hello = transport.request("hello", {}, timeout=120)  # the program the pip task installed, and borg
            assert hello.ok and hello.data["node"] == node.name, hello.error
            assert hello.data["borg"].startswith("borg 1.4"), hello.data
        second = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
        recap = [line for line in second.stdout.splitlines() if re.match(r"\S+\.coop\s+:", line)]
        assert len(recap) == 2 and all(re.search(r"changed=0\b", line) for line in recap), second.stdout[-3000:]
    finally:
        for login in logins.values():
            subprocess.run(["userdel", "-r", login], capture_output=True)
            subprocess.run(["groupdel", login], capture_output=True)
