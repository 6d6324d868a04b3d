"""Member files signed by their admins: OpenSSH file signatures (``ssh-keygen -Y``), nothing of our own.

``members/NAME.yml.sig`` beside ``members/NAME.yml``, made by
``ssh-keygen -Y sign -n mutualbackup-member -f KEY members/NAME.yml`` (or ``mutualbackup sign``).
A signature verifies against a set of admins' keys: ``allowed_signers`` lines naming the member as
the principal, for this namespace only. The coordinator's ``check`` verifies each file against its
own ``admins:``; a node verifies the file it is given against the admins it pinned at join.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from mutualbackup.inventory.model import Federation, Member

NAMESPACE = "mutualbackup-member"
SIGNATURE_SUFFIX = ".sig"
TIMEOUT = 30


class SignatureError(Exception):
    """The signature is missing, malformed, or not made by one of the keys given."""


def allowed_signers(principal: str, keys: Iterable[str], namespace: str = NAMESPACE) -> str:
    """``ssh-keygen``'s allowed-signers text: each key may sign for ``principal`` in ``namespace`` only."""
    return "".join(f'{principal} namespaces="{namespace}" {" ".join(key.split()[:2])}\n' for key in keys)


def verify(data: bytes, signature: bytes, principal: str, keys: Iterable[str], *, namespace: str = NAMESPACE) -> str:
    """The SHA256 fingerprint of the key among ``keys`` that signed ``data``; SignatureError otherwise."""
    keys = list(keys)
    if not keys:
        raise SignatureError("there is no admin key to check the signature against")
    if not signature.strip():
        raise SignatureError("the file is not signed")
    if b"BEGIN SSH SIGNATURE" not in signature:
        raise SignatureError("the signature file is not an OpenSSH signature")
    with tempfile.TemporaryDirectory(prefix="mutualbackup-verify-") as scratch:
        signers, signed = os.path.join(scratch, "allowed_signers"), os.path.join(scratch, "file.sig")
        with open(signers, "w", encoding="utf-8") as handle:
            handle.write(allowed_signers(principal, keys, namespace))
        with open(signed, "wb") as handle:
            handle.write(signature)
        done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", signers, "-I", principal, "-n", namespace,
                               "-s", signed], input=data, capture_output=True, timeout=TIMEOUT)
    said = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0:
        raise SignatureError("the signature does not match: the file changed after it was signed, or it was "
                             "signed by a key that is not one of the admins")
    found = re.search(r"SHA256:[A-Za-z0-9+/=]+", said)
    return found.group(0) if found else ""


def verify_in_process(data: bytes, signature: bytes, keys: Iterable[str], *, namespace: str = NAMESPACE) -> str | None:
    """The SHA256 fingerprint of the key among ``keys`` that signed ``data``, found without a process: the sshsig
    library (OpenSSH's signature format over cryptography's Ed25519 and RSA) checks the signature, once this
    function has found it exactly as ``ssh-keygen -Y sign`` writes one, for one of ``keys`` exactly. None when it
    cannot say yes: anything else (bytes the library would skip, a key or signature type or size OpenSSH refuses,
    a message hash other than SHA-512 or SHA-256), a signature that does not verify, the library missing. Only ever
    a yes: what it does not vouch for is for :func:`verify` (ssh-keygen itself) to decide and explain. Not for a
    node's own decisions (:mod:`mutualbackup.node.authority`), which OpenSSH's code makes."""
    try:
        import sshsig
        from sshsig.sshsig import SshsigSignature

        blob = _dearmored(signature)
        outer = SshsigSignature(blob)
        if bytes(outer) != blob or outer.hash_algo not in (b"sha512", b"sha256"):
            return None  # more than ssh-keygen's sign writes (a reserved field, bytes after it), or another hash
        if outer.public_key not in {_admin_blob(key) for key in keys}:
            return None  # not byte for byte one of the admins' keys as OpenSSH encodes them (the library reads less)
        if not _plain_signature(outer.public_key, outer.signature):
            return None
        signer = sshsig.PublicKey.from_ssh_encoding(outer.public_key)
        return sshsig.verify(data, signature, [signer], namespace=namespace).sha256_str()
    except Exception:  # noqa: BLE001 - anything it cannot vouch for is ssh-keygen's to judge
        return None


def _dearmored(signature: bytes) -> bytes:
    """The blob of an armored signature, read more strictly than ssh-keygen reads it (nothing before the armor,
    nothing but base64 inside): ValueError otherwise."""
    import base64

    lines = signature.decode("ascii").split("\n")
    if lines[0] != "-----BEGIN SSH SIGNATURE-----":
        raise ValueError("not an armored signature")
    return base64.b64decode("".join(lines[1:lines.index("-----END SSH SIGNATURE-----")]), validate=True)


def _admin_blob(key: str) -> bytes | None:
    """The blob of an admin's ``ssh-ed25519`` or ``ssh-rsa`` key when it is what OpenSSH itself would write (an RSA
    modulus of 1024 to 16384 bits, as OpenSSH accepts); else None."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key

    try:
        kind, encoded = key.split()[:2]
        blob = base64.b64decode(encoded, validate=True)
        loaded = load_ssh_public_key(f"{kind} {encoded}".encode("ascii"))
    except Exception:  # noqa: BLE001 - malformed, or a type cryptography does not know (UnsupportedAlgorithm)
        return None
    if isinstance(loaded, rsa.RSAPublicKey) and kind == "ssh-rsa":
        if not 1024 <= loaded.key_size <= 16384:
            return None
    elif not (isinstance(loaded, ed25519.Ed25519PublicKey) and kind == "ssh-ed25519"):
        return None
    again = base64.b64decode(loaded.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1])
    return blob if again == blob else None


def _plain_signature(key: bytes, inner: bytes) -> bool:
    """Whether ``inner``, a signature by ``key``, is exactly its algorithm's name and its bytes as OpenSSH makes
    them: ``ssh-ed25519`` and 64 bytes, or ``rsa-sha2-512``/``rsa-sha2-256`` and the modulus's length."""
    from mutualbackup.inventory.value_checks import _wire_string as _wire
    name, at = _wire(inner, 0)
    raw, at = _wire(inner, at)
    if at != len(inner):
        return False
    kind, where = _wire(key, 0)
    if kind == b"ssh-ed25519":
        return name == b"ssh-ed25519" and len(raw) == 64
    _exponent, where = _wire(key, where)
    modulus, _ = _wire(key, where)
    return name in (b"rsa-sha2-512", b"rsa-sha2-256") and len(raw) == len(modulus.lstrip(b"\0"))


def fingerprint(key: str) -> str:
    """``SHA256:…`` of an OpenSSH public key, as ssh-keygen prints it."""
    import base64
    import hashlib

    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def sign(path: str, key: str | None = None, agent_key: str | None = None, *, namespace: str = NAMESPACE) -> str:
    """Sign the file ``path`` with the private key file ``key``, or with ``agent_key`` (a public key held by
    the ssh-agent); writes ``PATH.sig`` (replacing an older one) and returns its path."""
    target = path + SIGNATURE_SUFFIX
    with tempfile.TemporaryDirectory(prefix="mutualbackup-sign-") as scratch:
        copy = os.path.join(scratch, os.path.basename(path))
        with open(path, "rb") as source, open(copy, "wb") as handle:
            handle.write(source.read())
        if agent_key is not None:
            public = os.path.join(scratch, "key.pub")
            with open(public, "w", encoding="ascii") as handle:
                handle.write(agent_key + "\n")
            argv = ["ssh-keygen", "-Y", "sign", "-U", "-f", public, "-n", namespace, copy]
        else:
            argv = ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", namespace, copy]
        done = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        if done.returncode != 0:
            raise SignatureError(done.stderr.decode("utf-8", "replace").strip() or "ssh-keygen could not sign")
        with open(copy + SIGNATURE_SUFFIX, "rb") as handle:
            signature = handle.read()
    temporary = target + ".new"
    with open(temporary, "wb") as handle:
        handle.write(signature)
    os.replace(temporary, target)
    return target


def agent_keys() -> list[str]:
    """The public keys the ssh-agent holds (``TYPE BASE64``); [] without an agent."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    done = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        return []
    return [" ".join(line.split()[:2]) for line in done.stdout.splitlines() if len(line.split()) >= 2]


def member_signature_problems(federation: "Federation") -> list[str]:
    """Each member file checked against its own ``admins:``, as ``FILE:1: what is wrong, what to do``.

    A signature is verified in this process when the sshsig library can vouch for it (:func:`verify_in_process`:
    Ed25519 and RSA admins' keys, about 0.1 ms each); any other is verified by ``ssh-keygen``, a few processes at
    a time, which also says what is wrong with one that does not verify (a thousand members: a thousand
    processes, seconds of CPU). Problems come out in the members' order. The coordinator's check is advice to
    its operator: what a node obeys, it verifies itself with ``ssh-keygen`` against the admins it pinned."""
    from concurrent.futures import ThreadPoolExecutor

    from mutualbackup.inventory.value_checks import unusable_admin

    def problem(member: "Member") -> str | None:
        path = member.where.file if member.where is not None else ""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            with open(path + SIGNATURE_SUFFIX, "rb") as handle:
                signature = handle.read()
        except FileNotFoundError:
            return (f"{path}:1: not signed (no {os.path.basename(path)}{SIGNATURE_SUFFIX}): one of "
                    f"{member.name}'s admins reviews it and signs it: mutualbackup sign {path}")
        except OSError as exc:
            return f"{path}:1: cannot read it or its signature: {exc.strerror}"
        if not member.admins:
            return (f"{path}:1: names no admins: add admins: (the member's people and their SSH keys), "
                    "then one of them signs the file")
        unusable = unusable_admin(member.admins)
        if unusable is not None:
            return f"{path}:1: {unusable}; its nodes refuse the file"
        keys = [admin.key for admin in member.admins]
        if verify_in_process(data, signature, keys) is not None:
            return None
        try:
            verify(data, signature, member.name, keys)
        except SignatureError as exc:
            return (f"{path}:1: {exc}; one of {member.name}'s admins reviews it and signs it again: "
                    f"mutualbackup sign {path}")
        return None

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return [found for found in pool.map(problem, federation.members) if found is not None]
