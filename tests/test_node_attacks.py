"""The coordinator's key, tried as an attacker who stole it would, straight over ssh against joined lab nodes.

Every attempt — a shell, `cat` of the passphrase, `rm` of a repository, a pty, port forwarding,
sftp, scp, a request in the name of another node, a restore over the live system — is refused,
and nothing changes on the node. And the backups the node program runs as root read every file.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Iterator

import paramiko
import pytest

from lab.federation import LabFederation
from labkit import mb, mb_json
from mutualbackup.remote.ssh import SSHTransport, parse_host_key
from restorekit import backed_up, node_doc, restored, source, storage

pytestmark = pytest.mark.lab

SOURCE, HOST = "coop/web1", "other/store1"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    root = tmp_path_factory.mktemp("attacks")
    secret = Path(str(root / "lab" / "nodes" / "coop" / "web1" / "data") + "/etc/root-only/shadow")

    def root_only_file() -> None:
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(os.urandom(4096))
        secret.chmod(0o600)  # root's alone: the node's login cannot read it
        secret.parent.chmod(0o700)

    root_only_file()
    yield from backed_up(root, borg_path, {"coop": [node_doc("web1", backup=source(["/etc"])), node_doc("web2")],
                                           "other": [node_doc("store1", storage=storage())]},
                         source_name=SOURCE, replicas=1)


def snapshot(fed: LabFederation) -> dict[str, bytes]:
    """Every file of every node (data, state, storage, keys), to show that nothing changed."""
    files = {}
    for node in fed.nodes.values():
        for path in sorted(node.dir.rglob("*")):
            if path.is_file() and "log" not in path.parts and "run" not in path.parts:
                files[str(path)] = path.read_bytes()
    return files


def ssh(fed: LabFederation, node: str, *options: str, command: str = "", stdin: bytes = b"",
        tmp: Path) -> subprocess.CompletedProcess[bytes]:
    """OpenSSH's client with the coordinator's own key, as the thief would use it."""
    target = fed.nodes[node]
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{target.port} {target.host_key}\n")
    argv = ["ssh", "-F", "/dev/null", "-i", str(fed.lab.coordinator_key), "-p", str(target.port), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            *options, f"{target.user}@127.0.0.1", *([command] if command else [])]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60)


def connected(fed: LabFederation, node: str) -> paramiko.Transport:
    target = fed.nodes[node]
    transport = paramiko.Transport(("127.0.0.1", target.port))
    pinned = parse_host_key(target.host_key)
    transport.connect(hostkey=pinned, username=target.user,
                      pkey=paramiko.Ed25519Key.from_private_key_file(str(fed.lab.coordinator_key)))
    return transport


@pytest.mark.parametrize("command", [
    "id; sh -i", "cat {state}/passphrase", "cat {state}/identity", "rm -rf {storage}/coop",
    "mutualbackup-node join --help", "borg list {storage}/coop/web1",
])
def test_a_command_with_the_coordinators_key_runs_nothing_and_reads_nothing(fed: LabFederation, tmp_path: Path,
                                                                           command: str) -> None:
    before = snapshot(fed)
    secrets = [(fed.nodes[SOURCE].state / name).read_bytes().strip() for name in ("passphrase", "identity")]
    for node in (SOURCE, HOST):
        line = command.format(state=fed.nodes[SOURCE].state, storage=fed.nodes[HOST].storage)
        done = ssh(fed, node, command=line, tmp=tmp_path)
        assert done.returncode == 2, done  # serve: the request on stdin is not one
        assert b'"code":2' in done.stdout and b"not a JSON line" in done.stdout
        assert not any(secret in done.stdout + done.stderr for secret in secrets)
        assert b"uid=" not in done.stdout
    assert snapshot(fed) == before


def test_a_shell_a_pty_or_a_request_on_stdin_for_a_command_gets_only_the_node_program(fed: LabFederation,
                                                                                     tmp_path: Path) -> None:
    before = snapshot(fed)
    interactive = ssh(fed, SOURCE, "-tt", stdin=b"id\nexit\n", tmp=tmp_path)
    assert b"uid=" not in interactive.stdout and interactive.returncode != 0
    forged = ssh(fed, SOURCE, command="x", tmp=tmp_path,
                 stdin=b'{"protocol":1,"request":"sh","node":"coop/web1","args":{"command":"id"}}\n')
    assert forged.returncode == 2 and b"does not take a request 'sh'" in forged.stdout
    assert snapshot(fed) == before


def test_port_forwarding_sftp_and_scp_are_refused(fed: LabFederation, tmp_path: Path) -> None:
    before = snapshot(fed)
    transport = connected(fed, HOST)
    try:
        with pytest.raises(paramiko.ChannelException):  # ssh -L
            transport.open_channel("direct-tcpip", ("127.0.0.1", fed.nodes[HOST].port), ("127.0.0.1", 0), timeout=10)
        with pytest.raises(paramiko.SSHException):  # ssh -R
            transport.request_port_forward("127.0.0.1", 0)
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            paramiko.SFTPClient.from_transport(transport).listdir(str(fed.nodes[HOST].storage))
    finally:
        transport.close()
    copied = subprocess.run(
        ["scp", "-F", "/dev/null", "-i", str(fed.lab.coordinator_key), "-P", str(fed.nodes[HOST].port),
         "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
         f"{fed.nodes[HOST].user}@127.0.0.1:{fed.nodes[SOURCE].state}/passphrase", str(tmp_path / "stolen")],
        capture_output=True, timeout=60)
    assert copied.returncode != 0 and not (tmp_path / "stolen").exists()
    assert snapshot(fed) == before


def test_a_request_in_the_name_of_another_node_is_refused_by_the_server(fed: LabFederation) -> None:
    """A forged inventory gives mallory/mine coop/web1's address, port and host key: web1 knows it is web1."""
    before = snapshot(fed)
    claimed = dataclasses.replace(fed.nodes[SOURCE].as_node(), member="mallory", slug="mine")
    with SSHTransport(claimed, str(fed.lab.coordinator_key)) as transport:
        reply = transport.request("prepare", {"hosts": []}, timeout=60)
    assert not reply.ok and "this server is coop/web1" in (reply.error or "")
    assert snapshot(fed) == before


def test_a_restore_never_writes_over_the_live_system(fed: LabFederation) -> None:
    before = snapshot(fed)
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"{SOURCE}:/", "--force")
    assert code == 2 and "/" in err and "new directory" in err
    assert snapshot(fed) == before


def test_a_root_only_file_is_backed_up_and_restores_byte_identical(fed: LabFederation, tmp_path: Path) -> None:
    original = fed.data_path(SOURCE, "/etc") / "root-only" / "shadow"
    assert original.stat().st_uid == 0 and original.stat().st_mode & 0o777 == 0o600
    assert fed.nodes[SOURCE].user != "root"  # the node's login could not have read it
    code, rows = mb_json(fed, "status")
    assert code == 0 and all(row["state"] == "ok" for row in rows)
    target = tmp_path / "back"
    code, summary = mb_json(fed, "restore", SOURCE, "--to", f"{SOURCE}:{target}", "--path", str(original.parent))
    assert code == 0, summary
    copy = restored(target, original)
    assert copy.read_bytes() == original.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600 and copy.stat().st_uid == 0


def test_join_finds_roots_tools_in_the_systems_directories_never_in_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty PATH entry means the current directory: a `visudo` planted there is never the one join checks
    its sudo rule with (and Ansible's session may have no sbin directory on its PATH at all)."""
    from mutualbackup.node.join import system_tool

    planted = tmp_path / "visudo"
    planted.write_text("#!/bin/sh\nexit 0\n")
    planted.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", ":/usr/bin")
    found = system_tool("visudo")
    assert found is not None and found.startswith("/") and Path(found).parent != tmp_path


def test_join_refuses_a_program_someone_but_root_could_replace(tmp_path: Path) -> None:
    """The sudo rule runs the program as root: a program in a directory others can write, or not root's, is
    refused before anything is installed."""
    from mutualbackup.node.join import JoinError, only_roots

    shared = tmp_path / "shared"
    shared.mkdir()
    program = shared / "mutualbackup-node"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    only_roots(str(program))  # root's, 0755: fine
    shared.chmod(0o777)
    with pytest.raises(JoinError, match="not root's alone"):
        only_roots(str(program))
    shared.chmod(0o755)
    os.chown(program, 65534, 65534)
    with pytest.raises(JoinError, match="uid 65534"):
        only_roots(str(program))
    os.chown(program, 0, 0)
    link = tmp_path / "bin" / "mutualbackup-node"  # the link a playbook makes: the file it leads to counts too
    link.parent.mkdir()
    link.symlink_to(program)
    shared.chmod(0o777)
    with pytest.raises(JoinError):
        only_roots(str(link))


def test_join_refuses_to_pin_an_admin_key_no_private_key_makes(tmp_path: Path) -> None:
    """An ed25519 "key" of small order signs for any file: a node that pinned it would obey anyone."""
    from mutualbackup.node.join import JoinError, _node_of_member_file
    from signkit import ed25519_key

    path = tmp_path / "coop.yml"
    path.write_text(f"member: coop\nadmins:\n  - name: eve\n    key: {ed25519_key()}\nnodes:\n  - name: web1\n")
    with pytest.raises(JoinError, match="admin eve cannot be pinned: its ssh-ed25519 key is not a point any private"):
        _node_of_member_file(path, "coop", "web1")
