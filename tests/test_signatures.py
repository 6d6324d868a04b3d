"""Member files signed by their admins (ssh-keygen -Y): `mutualbackup sign`, and `check` refusing what is not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit import mb
from mutualbackup.inventory.signatures import NAMESPACE, SignatureError, allowed_signers, sign, verify
from signkit import admin_key, public, sign_inventory

VALID = Path(__file__).parent / "inventories" / "three-members"


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    copy = tmp_path / "inventory"
    shutil.copytree(VALID, copy)
    federation = copy / "federation.yml"
    federation.write_text(federation.read_text().replace("/var/lib/mutualbackup", str(tmp_path / "state")))
    sign_inventory(copy, admin_key(tmp_path / "keys", "alice"), "alice")
    return copy


def test_a_signature_verifies_with_ssh_keygen_itself_and_names_the_signing_key(tmp_path: Path) -> None:
    alice, bob = admin_key(tmp_path, "alice"), admin_key(tmp_path, "bob")
    path = tmp_path / "coop.yml"
    path.write_text("member: coop\n")
    sign(str(path), str(alice))
    signers = tmp_path / "allowed"
    signers.write_text(allowed_signers("coop", [public(bob), public(alice)]))
    with path.open("rb") as data:
        done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", "coop", "-n", NAMESPACE,
                               "-s", f"{path}.sig"], stdin=data, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    signature = Path(f"{path}.sig").read_bytes()
    fingerprint = verify(path.read_bytes(), signature, "coop", [public(bob), public(alice)])
    assert fingerprint and fingerprint in subprocess.run(["ssh-keygen", "-l", "-f", f"{alice}.pub"],
                                                         capture_output=True, text=True).stdout
    with pytest.raises(SignatureError, match="does not match"):
        verify(path.read_bytes() + b"retention: {daily: 1}\n", signature, "coop", [public(alice)])
    with pytest.raises(SignatureError, match="does not match"):
        verify(path.read_bytes(), signature, "coop", [public(bob)])  # not signed by an admin given
    with pytest.raises(SignatureError, match="not signed"):
        verify(path.read_bytes(), b"", "coop", [public(alice)])


def test_a_signature_for_another_namespace_does_not_count(tmp_path: Path) -> None:
    alice = admin_key(tmp_path, "alice")
    path = tmp_path / "coop.yml"
    path.write_text("member: coop\n")
    subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(alice), "-n", "git", str(path)], check=True, capture_output=True)
    with pytest.raises(SignatureError):
        verify(path.read_bytes(), Path(f"{path}.sig").read_bytes(), "coop", [public(alice)])


def test_check_passes_a_signed_inventory(inventory: Path) -> None:
    code, out, err = mb(inventory, "check")
    assert code == 0, err


@pytest.mark.parametrize("edit", [
    ("      before: [pg_dumpall -f /var/backups/pg.sql]\n", "      before: [touch /tmp/pwned]\n"),
    ("      paths: [/etc, /srv/www]\n", "      paths: [/tmp/nothing]\n"),
    ("      replicas: 1\n", "      replicas: 1\n      retention: {daily: 1}\n"),
], ids=["a before: command", "other paths", "a retention of one"])
def test_a_member_file_edited_without_signing_again_fails_check_naming_the_file(inventory: Path, edit) -> None:
    path = inventory / "members" / "coopcycle.yml"
    text = path.read_text()
    assert edit[0] in text, "the fixture changed"
    path.write_text(text.replace(edit[0], edit[1], 1))
    code, out, err = mb(inventory, "check")
    assert code == 2
    assert f"{path}:1: the signature does not match" in err and f"mutualbackup sign {path}" in err
    assert "framasoft" not in err  # the others are fine


def test_a_file_signed_by_a_key_that_is_not_its_admins_fails_check(inventory: Path, tmp_path: Path) -> None:
    path = inventory / "members" / "coopcycle.yml"
    sign(str(path), str(admin_key(tmp_path / "keys", "mallory")))
    code, out, err = mb(inventory, "check")
    assert code == 2 and f"{path}:1: the signature does not match" in err


def test_sign_uses_the_given_key_and_says_who_signed(inventory: Path, tmp_path: Path) -> None:
    path = inventory / "members" / "coopcycle.yml"
    path.write_text(path.read_text() + "# reviewed\n")
    code, out, err = mb(inventory, "sign", str(path), "--key", str(tmp_path / "keys" / "alice"))
    assert code == 0, err
    assert f"wrote {path}.sig: signed by alice (SHA256:" in out
    assert mb(inventory, "check")[0] == 0
    code, out, err = mb(inventory, "sign", str(path), "--key", str(admin_key(tmp_path / "keys", "mallory")))
    assert code == 1 and "lists no admin with this key" in err


def test_sign_uses_an_admins_key_held_by_the_ssh_agent(inventory: Path, tmp_path: Path) -> None:
    path = inventory / "members" / "coopcycle.yml"
    path.write_text(path.read_text() + "# reviewed through the agent\n")
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if "=" in line.split(";")[0])
    pid = int(env["SSH_AGENT_PID"])
    try:
        os.environ["SSH_AUTH_SOCK"] = env["SSH_AUTH_SOCK"]
        code, out, err = mb(inventory, "sign", str(path))
        assert code == 2 and "holds no key of" in err
        subprocess.run(["ssh-add", str(tmp_path / "keys" / "alice")], check=True, capture_output=True,
                       env={**os.environ, "SSH_AUTH_SOCK": env["SSH_AUTH_SOCK"]})
        code, out, err = mb(inventory, "sign", str(path))
        assert code == 0, err
        assert "signed by alice" in out
    finally:
        os.environ.pop("SSH_AUTH_SOCK", None)
        os.kill(pid, 15)
    assert mb(inventory, "check")[0] == 0
