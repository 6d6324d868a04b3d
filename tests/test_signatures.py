"""Member files signed by their admins (ssh-keygen -Y): `mutualbackup sign`, and `check` refusing what is not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit import mb
from mutualbackup.inventory.signatures import NAMESPACE, SignatureError, allowed_signers, sign, verify, verify_in_process
from signkit import admin_key, ed25519_key, public, sign_inventory

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


def _keypair(directory: Path, name: str, kind: str) -> Path:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def _rearmored(signature: bytes, change) -> bytes:  # noqa: ANN001 - bytes -> bytes
    """The signature with its binary blob changed by ``change``, armored again as ssh-keygen armors it."""
    import base64

    lines = signature.decode().splitlines()
    blob = change(base64.b64decode("".join(lines[1:-1])))
    text = base64.b64encode(blob).decode()
    return ("\n".join([lines[0], *(text[i:i + 70] for i in range(0, len(text), 70)), lines[-1]]) + "\n").encode()


def _with_reserved(blob: bytes) -> bytes:
    """The blob with something in its reserved field (after the magic, the version, the key and the namespace)."""
    import struct

    at = 10
    for _ in range(2):
        at += 4 + struct.unpack(">I", blob[at:at + 4])[0]
    assert blob[at:at + 4] == b"\0\0\0\0"
    return blob[:at] + b"\0\0\0\2ok" + blob[at + 4:]


def _wire(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _fields(blob: bytes) -> list[bytes]:
    """A signature blob's fields after its magic and version: key, namespace, reserved, hash, signature."""
    fields, at = [], 10
    for _ in range(5):
        size = int.from_bytes(blob[at:at + 4], "big")
        fields.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    return fields


def _refielded(change):  # noqa: ANN001, ANN202 - list[bytes] -> list[bytes], as a blob change
    return lambda blob: blob[:10] + b"".join(_wire(field) for field in change(_fields(blob)))


def _inner(name: bytes | None = None, extra: bytes = b""):  # noqa: ANN202
    """A change of the signature field: another algorithm name, or bytes after the signature's own."""
    def change(fields: list[bytes]) -> list[bytes]:
        said = fields[4]
        own = int.from_bytes(said[:4], "big")
        raw = said[4 + own:]
        return [*fields[:4], _wire(name if name is not None else said[4:4 + own]) + raw + extra]
    return change


def _small_rsa_signature(data: bytes, bits: int) -> tuple[bytes, str]:
    """A signature made the way ssh-keygen makes one, by an RSA key smaller than OpenSSH accepts (ssh-keygen
    will not make one itself); and that key, as an admins: line would give it."""
    import base64
    import hashlib
    import secrets

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def prime(size: int) -> int:  # cryptography makes no key under 1024 bits, but loads one
        while True:
            n = secrets.randbits(size) | (3 << (size - 2)) | 1
            if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
                return n

    while True:
        p, q = prime(bits // 2), prime(bits - bits // 2)
        try:
            d = pow(65537, -1, (p - 1) * (q - 1))
            break
        except ValueError:
            continue
    key = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                rsa.RSAPublicNumbers(65537, p * q)).private_key()
    numbers = key.public_key().public_numbers()

    def mpint(n: int) -> bytes:
        return _wire(n.to_bytes(n.bit_length() // 8 + 1, "big"))

    public_blob = _wire(b"ssh-rsa") + mpint(numbers.e) + mpint(numbers.n)
    signed = b"SSHSIG" + _wire(NAMESPACE.encode()) + _wire(b"") + _wire(b"sha512") + _wire(hashlib.sha512(data).digest())
    raw = key.sign(signed, padding.PKCS1v15(), hashes.SHA512())
    blob = (b"SSHSIG" + (1).to_bytes(4, "big") + _wire(public_blob) + _wire(NAMESPACE.encode()) + _wire(b"")
            + _wire(b"sha512") + _wire(_wire(b"rsa-sha2-512") + _wire(raw)))
    text = base64.b64encode(blob).decode()
    armored = "\n".join(["-----BEGIN SSH SIGNATURE-----", *(text[i:i + 70] for i in range(0, len(text), 70)),
                         "-----END SSH SIGNATURE-----"]) + "\n"
    return armored.encode(), "ssh-rsa " + base64.b64encode(public_blob).decode()


@pytest.fixture(scope="module")
def signed_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes, list[str], bool]]:
    """Signature cases as a hostile or careless signer makes them: name -> (data, signature, admins' keys, whether
    the library should vouch for it)."""
    keys = tmp_path_factory.mktemp("signers")
    alice, mallory = _keypair(keys, "alice", "ed25519"), _keypair(keys, "mallory", "ed25519")
    rsa, ecdsa = _keypair(keys, "rsa", "rsa"), _keypair(keys, "ecdsa", "ecdsa")
    data = b"member: coop\nnodes: []\n"

    def signed(key: Path, *options: str, namespace: str = NAMESPACE) -> bytes:
        path = keys / "file.yml"
        path.write_bytes(data)
        subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", namespace, *options, str(path)],
                       check=True, capture_output=True)
        signature = Path(f"{path}.sig").read_bytes()
        Path(f"{path}.sig").unlink()
        return signature

    good = signed(alice)
    rsa_signed = signed(rsa)
    small, small_key = _small_rsa_signature(data, 1016)
    return {
        "ed25519": (data, good, [public(alice)], True),
        "ed25519 among others": (data, good, [public(mallory), "ssh-foo AAAA", public(alice) + " alice@laptop"], True),
        "rsa": (data, rsa_signed, [public(rsa)], True),
        "rsa, sha256": (data, signed(rsa, "-O", "hashalg=sha256"), [public(rsa)], True),
        "ed25519, sha256": (data, signed(alice, "-O", "hashalg=sha256"), [public(alice)], True),
        "ecdsa (ssh-keygen's alone)": (data, signed(ecdsa), [public(ecdsa)], False),
        "the file edited": (data + b"before: [touch /tmp/pwned]\n", good, [public(alice)], False),
        "a key that is not an admin's": (data, signed(mallory), [public(alice)], False),
        "another namespace": (data, signed(alice, namespace="git"), [public(alice)], False),
        "the namespace's prefix": (data, signed(alice, namespace=NAMESPACE[:-1]), [public(alice)], False),
        "a truncated signature": (data, b"\n".join(good.splitlines()[:-2]) + b"\n", [public(alice)], False),
        "bytes after the blob": (data, _rearmored(good, lambda blob: blob + b"\0\0\0\0"), [public(alice)], False),
        "a flipped bit": (data, _rearmored(good, lambda blob: blob[:-1] + bytes([blob[-1] ^ 1])), [public(alice)],
                          False),
        "the version changed": (data, _rearmored(good, lambda blob: blob[:9] + b"\2" + blob[10:]), [public(alice)],
                                False),
        "text before the armor": (data, b"signed by alice\n" + good, [public(alice)], False),
        "text after the armor": (data, good + b"and nothing else\n", [public(alice)], True),
        "a reserved field": (data, _rearmored(good, _with_reserved), [public(alice)], False),
        "a stray character": (data, good.replace(b"\n", b"\n!", 2).replace(b"\n!", b"\n", 1), [public(alice)],
                              False),
        "bytes after the signature's own": (data, _rearmored(good, _refielded(_inner(extra=b"\0"))), [public(alice)],
                                            False),
        "bytes after an rsa signature's own": (data, _rearmored(rsa_signed, _refielded(_inner(extra=b"\0\0"))),
                                               [public(rsa)], False),
        "another signature name": (data, _rearmored(good, _refielded(_inner(name=b"rsa-sha2-512"))), [public(alice)],
                                   False),
        "bytes after the key in it": (data, _rearmored(good, _refielded(lambda f: [f[0] + b"xx", *f[1:]])),
                                      [public(alice)], False),
        "an rsa key of 1016 bits": (data, small, [small_key], False),
        "not armored": (data, b"-----BEGIN SSH SIGNATURE-----\nnot base64 at all\n-----END SSH SIGNATURE-----\n",
                        [public(alice)], False),
        "empty": (data, b"", [public(alice)], False),
    }


CASES = ["ed25519", "ed25519 among others", "rsa", "rsa, sha256", "ed25519, sha256", "ecdsa (ssh-keygen's alone)",
         "the file edited", "a key that is not an admin's", "another namespace", "the namespace's prefix",
         "a truncated signature", "bytes after the blob", "text before the armor", "text after the armor",
         "a reserved field", "a stray character", "bytes after the signature's own", "bytes after an rsa signature's own",
         "another signature name", "bytes after the key in it", "an rsa key of 1016 bits", "a flipped bit", "the version changed", "not armored",
         "empty"]


LIBRARY_ALONE = {"bytes after the blob", "text before the armor", "a stray character", "bytes after the signature's own",
                 "bytes after an rsa signature's own", "bytes after the key in it", "an rsa key of 1016 bits"}
"""What the sshsig library alone accepts and ssh-keygen refuses: verify_in_process's own checks exist for these."""


@pytest.mark.parametrize("case", sorted(LIBRARY_ALONE))
def test_the_library_alone_would_vouch_for_what_ssh_keygen_refuses(signed_cases, case: str) -> None:
    """The cases above are not vacuous: the library by itself says yes to each (and ssh-keygen no, above)."""
    import sshsig

    data, signature, keys, _ = signed_cases[case]
    assert sshsig.verify(data, signature, [sshsig.PublicKey.from_openssh_str(key) for key in keys],
                         namespace=NAMESPACE) is not None


SSH_KEYGEN_ALONE = {"ecdsa (ssh-keygen's alone)", "a reserved field"}  # what it accepts and the library leaves to it


@pytest.mark.parametrize("case", CASES)
def test_the_in_process_check_vouches_only_for_what_ssh_keygen_accepts(signed_cases, case: str) -> None:
    """`check` trusts verify_in_process's yes without asking ssh-keygen: it must never say yes where OpenSSH's own
    verifier says no, and must say the same key signed; it must also really say yes where it can (else `check`
    spawns a thousand processes again)."""
    data, signature, keys, vouched = signed_cases[case]
    try:
        by_ssh_keygen: str | None = verify(data, signature, "coop", keys)
    except SignatureError:
        by_ssh_keygen = None
    in_process = verify_in_process(data, signature, keys)
    if in_process is not None:
        assert in_process == by_ssh_keygen
    assert (in_process is not None) == vouched
    assert (by_ssh_keygen is not None) == (vouched or case in SSH_KEYGEN_ALONE)


def test_check_verifies_in_process_and_leaves_the_rest_to_ssh_keygen(inventory: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed inventory's check runs no ssh-keygen; a signature the library does not vouch for (one with a
    reserved field, which ssh-keygen accepts) is checked by ssh-keygen, and a bad one is explained by it."""
    from mutualbackup.inventory import signatures
    from mutualbackup.inventory.load import load_inventory

    by_ssh_keygen: list[str] = []
    real = signatures.verify
    monkeypatch.setattr(signatures, "verify", lambda data, signature, principal, keys, **kw: (
        by_ssh_keygen.append(principal), real(data, signature, principal, keys, **kw))[1])
    assert signatures.member_signature_problems(load_inventory(inventory)) == []
    assert by_ssh_keygen == []
    path = inventory / "members" / "coopcycle.yml"
    signature = Path(f"{path}.sig")
    signature.write_bytes(_rearmored(signature.read_bytes(), _with_reserved))
    assert signatures.member_signature_problems(load_inventory(inventory)) == []
    assert by_ssh_keygen == ["coopcycle"]
    path.write_text(path.read_text() + "# edited\n")
    problems = signatures.member_signature_problems(load_inventory(inventory))
    assert len(problems) == 1 and f"{path}:1: the signature does not match" in problems[0]
    assert by_ssh_keygen == ["coopcycle", "coopcycle"]


def test_check_names_an_admin_whose_key_no_private_key_makes(inventory: Path) -> None:
    """A file signed by its real admin that also lists a "key" of small order: anyone could sign for that member, so
    check says so and nodes refuse the file, however well it is signed."""
    path = inventory / "members" / "coopcycle.yml"
    path.write_text(path.read_text().replace("\nadmins:\n", f"\nadmins:\n  - name: eve\n    key: {ed25519_key()}\n", 1))
    sign(str(path), str(inventory.parent / "keys" / "alice"))
    code, out, err = mb(inventory, "check")
    assert code == 2 and f"{path}:1: admin eve: its ssh-ed25519 key is not a point any private key makes" in err
