"""The lab itself: real sshd nodes on 127.0.0.1 that start, authenticate and stop cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mutualbackup.errors import TransportError
from lab.accounts import LAB_USER
from lab.nodes import Lab, LabError, LabNode, is_alive
from mutualbackup.remote.ssh import SSHTransport

from labkit import wait_for

pytestmark = pytest.mark.lab


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(256)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def start_times(pids: list[int]) -> dict[int, int]:
    """pid → start time, to tell a process from a later one reusing its PID."""
    times = {}
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        times[pid] = int(raw[raw.rindex(")") + 2 :].split()[19])
    return times


def command_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A key of the test's own that gets a plain shell on nodes that allow it: to look at the lab itself."""
    key = tmp_path / "probe"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def allow(node: LabNode, key: Path) -> None:
    with node.authorized_keys.open("a") as keys:
        keys.write(Path(f"{key}.pub").read_text())


def ssh_argv(node: LabNode, key: Path, command: str, tmp: Path) -> list[str]:
    known = tmp / f"known-{node.port}"
    known.write_text(f"[127.0.0.1]:{node.port} {node.host_key}\n")
    return ["ssh", "-i", str(key), "-p", str(node.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", f"{node.user}@127.0.0.1", command]


def shell(node: LabNode, key: Path, command: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ssh_argv(node, key, command, tmp), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def hello(lab: Lab, node: LabNode, key: Path | None = None):
    with SSHTransport(node.as_node(), str(key or lab.coordinator_key)) as transport:
        return transport.request("hello", {}, timeout=30)


def busy_tree(lab: Lab, node: LabNode, probe: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], dict[int, int]]:
    """Start a long command on ``node``; once it runs, the ssh client and the node's processes with their start times."""
    client = subprocess.Popen(ssh_argv(node, probe, "sleep 60", tmp), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: any(command_name(pid) == "sleep" for pid in lab.processes(node)))
    tree = start_times(lab.processes(node))
    assert len(tree) >= 3  # listener, per-connection sshd, sleep
    return client, tree


def test_nodes_start_on_distinct_ports_and_answer_ssh(lab: Lab, probe: Path, tmp_path: Path) -> None:
    nodes = [lab.add_node("coop", "web1"), lab.add_node("coop", "web2"), lab.add_node("other", "web1")]
    lab.start_all()
    assert len({node.port for node in nodes}) == 3
    assert len({node.dir for node in nodes}) == 3
    for node in nodes:
        allow(node, probe)
        assert node.pid is not None and is_alive(node.pid)
        assert banner(node.port).startswith(b"SSH-2.0")
        done = shell(node, probe, "command -v borg; id -un", tmp_path)
        assert done.stdout.split() == [lab.borg, LAB_USER], done.stderr


def test_commands_on_a_node_see_the_labs_path_not_the_machines_shell_setup(lab: Lab, probe: Path, tmp_path: Path) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    allow(node, probe)
    path = shell(node, probe, 'printf %s "$PATH"', tmp_path).stdout
    assert path == f"{Path(lab.borg).parent}:/usr/local/bin:/usr/bin:/bin"  # ~/.bashrc added nothing


def test_inventory_fields_describe_how_to_reach_the_node(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    fields = node.inventory_fields()
    assert fields == {
        "address": "127.0.0.1",
        "port": node.port,
        "user": LAB_USER,
        "host_key": node.host_key,
        "workdir": str(node.workdir),
        "authorized_keys": str(node.authorized_keys),
        "borg": lab.borg,
    }
    assert node.host_key.startswith("ssh-ed25519 AAAA") and len(node.host_key.split()) == 2
    assert node.name == "coop/web1"
    for path in (node.workdir, node.data, node.storage):
        assert path.is_dir()
    node_key = lab.join_alone(node)
    assert node.inventory_fields()["node_key"] == node_key and node_key.startswith("age1")


def test_before_its_join_a_node_lets_nobody_in_and_after_it_only_the_coordinator_behind_the_node_program(
    lab: Lab,
) -> None:
    node = lab.add_node("coop", "web1")
    assert node.authorized_keys.read_text() == ""
    lab.join_alone(node)
    lines = node.authorized_keys.read_text().splitlines()
    assert len(lines) == 1
    assert re.match(rf'command="/\S+/sudo -n -- {re.escape(lab.program)} serve --config {re.escape(str(node.node_config))}",'
                    'restrict ', lines[0])  # the sudo rule's own command line: no program of ours starts as the login
    assert lines[0].split()[-3:-1] == lab.coordinator_public_key.split()[:2]
    assert lab.coordinator_public_key.endswith(" mutualbackup-coordinator")
    assert lab.coordinator_public_key.split()[:2] == Path(f"{lab.coordinator_key}.pub").read_text().split()[:2]


def test_each_node_answers_the_coordinator_key_and_refuses_any_other(lab: Lab, tmp_path: Path) -> None:
    first, second = lab.add_node("coop", "web1"), lab.add_node("other", "web1")
    for node in (first, second):
        lab.join_alone(node)
    lab.start_all()
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    for node in (first, second):
        answer = hello(lab, node)
        assert answer.ok and answer.data["node"] == node.name, answer.error
        with pytest.raises(TransportError, match="refused the coordinator key"):
            hello(lab, node, stranger)


def test_a_line_an_older_join_wrote_still_reaches_root_through_the_logins_step(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.join_alone(node)
    lab.start(node)
    [line] = node.authorized_keys.read_text().splitlines()
    old = re.sub(r'^command="\S+/sudo -n -- (\S+)', r'command="\1', line)  # `mutualbackup-node serve --config DIR`
    assert old != line and " serve --config " in old
    node.authorized_keys.write_text(old + "\n")
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:  # `leftover` needs root
        reply = transport.request("leftover", {"role": "src/beta/store"}, timeout=60)
    assert reply.ok and reply.data == {}, reply


def test_the_sudo_rule_lets_the_coordinators_hint_through_and_a_backups_borg_starts_on_it(lab: Lab) -> None:
    """What the coordinator asked sshd to run reaches root's `serve` (the rule keeps SSH_ORIGINAL_COMMAND for it
    alone): on `serve backup`, borg starts before the request is even sent; unused, it ends with the session."""
    node = lab.add_node("coop", "web1")
    lab.join_alone(node)
    lab.start(node)
    rule = Path(lab.sudoers_file(node)).read_text()
    assert rule.startswith(f'Defaults!{lab.program} env_keep += "SSH_ORIGINAL_COMMAND"\n'), rule

    def borgs_started_early() -> list[int]:
        found = []
        for pid in lab.processes(node):
            try:
                if b"borg_preload.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:  # a process of the session that ended since it was listed
                continue
        return found

    transport = SSHTransport(node.as_node(), str(lab.coordinator_key))
    try:
        transport.start("backup")
        wait_for(borgs_started_early, seconds=60, what="borg started on the hint")
    finally:
        transport.close()
    wait_for(lambda: not borgs_started_early(), seconds=60, what="the unused borg ended")


def test_a_node_reads_only_its_own_authorized_keys(lab: Lab, probe: Path, tmp_path: Path) -> None:
    first, second = lab.add_node("coop", "web1"), lab.add_node("other", "web1")
    lab.start_all()
    allow(first, probe)
    assert shell(first, probe, "true", tmp_path).returncode == 0
    refused = shell(second, probe, "true", tmp_path)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr


def test_stop_leaves_no_process_of_the_node_alive(lab: Lab, probe: Path, tmp_path: Path) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    allow(node, probe)
    port = node.port
    client, tree = busy_tree(lab, node, probe, tmp_path)
    lab.stop(node)
    assert client.wait(timeout=10) == 255
    assert [pid for pid, started in tree.items() if is_alive(pid, started)] == []
    assert node.pid is None and lab.processes(node) == []
    assert refuses_connections(port)


def test_kill_ends_the_node_and_its_commands_at_once(lab: Lab, probe: Path, tmp_path: Path) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    allow(node, probe)
    client, tree = busy_tree(lab, node, probe, tmp_path)
    before = time.monotonic()
    lab.kill(node)
    assert time.monotonic() - before < 2
    assert client.wait(timeout=10) == 255
    assert [pid for pid, started in tree.items() if is_alive(pid, started)] == []


def test_stop_all_stops_every_node_and_leaves_the_others_untouched(lab: Lab, probe: Path, tmp_path: Path) -> None:
    nodes = [lab.add_node("coop", "web1"), lab.add_node("other", "db1")]
    lab.start_all()
    for node in nodes:
        allow(node, probe)
    trees = [busy_tree(lab, node, probe, tmp_path) for node in nodes]
    with Lab(tmp_path / "neighbour", borg=lab.borg) as neighbour:
        bystander = neighbour.add_node("coop", "web1")
        neighbour.start(bystander)
        lab.stop_all()
        assert bystander.pid is not None and is_alive(bystander.pid)
        assert banner(bystander.port).startswith(b"SSH-2.0")
    assert not is_alive(bystander.pid or 0) and bystander.pid is None
    for client, _ in trees:
        assert client.wait(timeout=10) == 255
    for _, tree in trees:
        assert [pid for pid, started in tree.items() if is_alive(pid, started)] == []
    assert all(node.pid is None for node in nodes)
    lab.start_all()  # and they start again
    assert all(banner(node.port).startswith(b"SSH-2.0") for node in nodes)


def test_leaving_the_lab_context_stops_its_nodes(tmp_path: Path, borg_path: str) -> None:
    with Lab(tmp_path / "lab", borg=borg_path) as lab:
        node = lab.add_node("coop", "web1")
        lab.start(node)
        pid = node.pid
        assert pid is not None and is_alive(pid)
    assert not is_alive(pid)


def test_restart_keeps_the_port_and_the_host_key(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    port, key, pid = node.port, node.host_key, node.pid
    lab.restart(node)
    assert (node.port, node.host_key) == (port, key)
    assert node.pid != pid and banner(port).startswith(b"SSH-2.0")


def test_change_host_key_gives_the_running_node_a_new_key(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.join_alone(node)
    lab.start(node)
    old = node.host_key
    new = lab.change_host_key(node)
    assert new == node.host_key != old
    assert node.pid is not None
    assert hello(lab, node).ok


def test_a_taken_port_makes_start_move_the_node_to_another(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", node.port))
        squatter.listen()
        taken = node.port
        lab.start(node)
    finally:
        squatter.close()
    assert node.port != taken
    assert banner(node.port).startswith(b"SSH-2.0")


def test_bad_slugs_and_duplicate_nodes_are_refused(lab: Lab) -> None:
    lab.add_node("coop", "web1")
    for member, slug in [("coop", "web1"), ("../etc", "x"), ("coop", "Web1"), ("coop", "")]:
        with pytest.raises(ValueError):
            lab.add_node(member, slug)


def test_a_node_whose_sshd_died_by_itself_can_be_started_again(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    assert node.pid is not None
    os.kill(node.pid, signal.SIGKILL)
    wait_for(lambda: lab.processes(node) == [])
    lab.start(node)
    assert banner(node.port).startswith(b"SSH-2.0")


def test_a_node_that_cannot_start_raises_with_the_sshd_log(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    node.host_key_file.unlink()
    with pytest.raises(LabError, match="exited") as raised:
        lab.start(node)
    assert "no hostkeys available" in str(raised.value)
    assert node.pid is None
