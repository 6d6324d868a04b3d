"""Member files signed as their admins sign them, for tests that write inventories: a key, an admins: entry, a .sig."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mutualbackup.inventory.signatures import sign


def admin_key(directory: Path, name: str = "admin") -> Path:
    """A new ed25519 key pair ``directory/NAME`` (and ``.pub``), as an admin has one."""
    key = directory / name
    if not key.exists():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def public(key: Path) -> str:
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def sign_inventory(inventory: Path, key: Path, name: str = "admin") -> None:
    """Give every member file of ``inventory`` an admin with ``key`` (unless it names admins) and sign it."""
    for path in sorted((inventory / "members").glob("*.yml")):
        text = path.read_text()
        if "\nadmins:" not in "\n" + text:
            path.write_text(text.rstrip("\n") + f"\nadmins:\n  - name: {name}\n    key: {public(key)}\n")
        sign(str(path), str(key))


NEUTRAL_POINT = bytes([1]) + bytes(31)
"""The ed25519 point no private key makes whose "signature" holds for any file (the curve's neutral element)."""


def ed25519_key(point: bytes = NEUTRAL_POINT) -> str:
    """An ``ssh-ed25519`` public key line for the 32 bytes ``point``, whatever they are."""
    import base64

    blob = len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + len(point).to_bytes(4, "big") + point
    return "ssh-ed25519 " + base64.b64encode(blob).decode()
