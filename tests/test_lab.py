"""The lab itself: real sshd nodes on 127.0.0.1 that start, authenticate and stop cleanly."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mutualbackup.errors import TransportError
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


def busy_tree(lab: Lab, node: LabNode, pool: concurrent.futures.Executor) -> tuple[concurrent.futures.Future, dict[int, int]]:
    """Start a long command on ``node``; once it runs, the node's processes with their start times."""
    transport = SSHTransport(node.as_node(), str(lab.coordinator_key))
    future = pool.submit(transport.run, ["sleep", "60"])
    future.add_done_callback(lambda _: transport.close())
    wait_for(lambda: any(command_name(pid) == "sleep" for pid in lab.processes(node)))
    tree = start_times(lab.processes(node))
    assert len(tree) >= 3  # listener, per-connection sshd, sleep
    return future, tree


def test_nodes_start_on_distinct_ports_and_answer_ssh(lab: Lab) -> None:
    nodes = [lab.add_node("coop", "web1"), lab.add_node("coop", "web2"), lab.add_node("other", "web1")]
    lab.start_all()
    assert len({node.port for node in nodes}) == 3
    assert len({node.dir for node in nodes}) == 3
    for node in nodes:
        assert node.pid is not None and is_alive(node.pid)
        assert banner(node.port).startswith(b"SSH-2.0")
        with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
            assert transport.run(["sh", "-c", 'command -v borg']).stdout.decode().strip() == lab.borg


def test_commands_on_a_node_see_the_labs_path_not_the_machines_shell_setup(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
        path = transport.run(["sh", "-c", 'printf %s "$PATH"']).stdout.decode()
    assert path == f"{Path(lab.borg).parent}:/usr/local/bin:/usr/bin:/bin"  # ~/.bashrc added nothing


def test_inventory_fields_describe_how_to_reach_the_node(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    fields = node.inventory_fields()
    assert fields == {
        "address": "127.0.0.1",
        "port": node.port,
        "user": "root",
        "host_key": node.host_key,
        "workdir": str(node.workdir),
        "authorized_keys": str(node.authorized_keys),
        "borg": lab.borg,
    }
    assert node.host_key.startswith("ssh-ed25519 AAAA") and len(node.host_key.split()) == 2
    assert node.name == "coop/web1"
    for path in (node.workdir, node.data, node.storage):
        assert path.is_dir()


def test_authorized_keys_holds_only_the_coordinator_key(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    assert node.authorized_keys.read_text() == lab.coordinator_public_key + "\n"
    assert lab.coordinator_public_key.endswith(" mutualbackup-coordinator")
    assert lab.coordinator_public_key.split()[:2] == Path(f"{lab.coordinator_key}.pub").read_text().split()[:2]


def test_each_node_accepts_the_coordinator_key_and_refuses_any_other(lab: Lab, tmp_path: Path) -> None:
    first, second = lab.add_node("coop", "web1"), lab.add_node("other", "web1")
    lab.start_all()
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    for node in (first, second):
        with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
            assert transport.run(["true"]).ok
        with SSHTransport(node.as_node(), str(stranger)) as transport:
            with pytest.raises(TransportError, match="refused the coordinator key"):
                transport.run(["true"])


def test_a_node_reads_only_its_own_authorized_keys(lab: Lab, tmp_path: Path) -> None:
    first, second = lab.add_node("coop", "web1"), lab.add_node("other", "web1")
    lab.start_all()
    extra = tmp_path / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(extra)], check=True)
    with first.authorized_keys.open("a") as keys:
        keys.write(Path(f"{extra}.pub").read_text())
    with SSHTransport(first.as_node(), str(extra)) as transport:
        assert transport.run(["true"]).ok
    with SSHTransport(second.as_node(), str(extra)) as transport:
        with pytest.raises(TransportError):
            transport.run(["true"])


def test_stop_leaves_no_process_of_the_node_alive(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    port = node.port
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future, tree = busy_tree(lab, node, pool)
        lab.stop(node)
        assert future.result(timeout=10).exit_code == -1
    assert [pid for pid, started in tree.items() if is_alive(pid, started)] == []
    assert node.pid is None and lab.processes(node) == []
    assert refuses_connections(port)


def test_kill_ends_the_node_and_its_commands_at_once(lab: Lab) -> None:
    node = lab.add_node("coop", "web1")
    lab.start(node)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future, tree = busy_tree(lab, node, pool)
        before = time.monotonic()
        lab.kill(node)
        assert time.monotonic() - before < 2
        result = future.result(timeout=10)
    assert result.exit_code == -1 and b"lost" in result.stderr
    assert [pid for pid, started in tree.items() if is_alive(pid, started)] == []


def test_stop_all_stops_every_node_and_leaves_the_others_untouched(lab: Lab, tmp_path: Path) -> None:
    nodes = [lab.add_node("coop", "web1"), lab.add_node("other", "db1")]
    lab.start_all()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trees = [busy_tree(lab, node, pool) for node in nodes]
        with Lab(tmp_path / "neighbour", borg=lab.borg) as neighbour:
            bystander = neighbour.add_node("coop", "web1")
            neighbour.start(bystander)
            lab.stop_all()
            assert bystander.pid is not None and is_alive(bystander.pid)
            assert banner(bystander.port).startswith(b"SSH-2.0")
        assert not is_alive(bystander.pid or 0) and bystander.pid is None
        for future, _ in trees:
            assert future.result(timeout=10).exit_code == -1
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
    lab.start(node)
    old = node.host_key
    new = lab.change_host_key(node)
    assert new == node.host_key != old
    assert node.pid is not None
    with SSHTransport(node.as_node(), str(lab.coordinator_key)) as transport:
        assert transport.run(["true"]).ok


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
