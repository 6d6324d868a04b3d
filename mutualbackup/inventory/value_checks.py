"""Checks of single inventory values: names, addresses, host keys, paths, commands.

Each ``check_*`` takes the text as written and returns the value for the model
(usually the same text, a host key normalised to ``TYPE BASE64``), or raises
:class:`ValueError` whose message quotes the text and says what is expected.
Pure functions: nothing here touches a file, a network or a shell.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import unicodedata
from typing import TYPE_CHECKING, Iterable

from mutualbackup.inventory.units import quote

if TYPE_CHECKING:
    from mutualbackup.inventory.model import Admin

__all__ = [
    "quote", "check_slug", "check_user", "check_address", "check_listen_address", "check_host_key",
    "check_absolute_path", "check_home_path", "check_pattern", "check_command", "check_borg_command",
    "check_compression", "check_timezone", "check_line", "check_admin_key", "check_signing_key", "unusable_admin",
    "check_node_key",
]  # fmt: skip

_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_BORG_COMMAND = re.compile(r"/[A-Za-z0-9._+/-]+|[A-Za-z0-9._+][A-Za-z0-9._+-]*")
_COMPRESSION = re.compile(r"(auto,)?(?:(lz4)|(zstd)(?:,([0-9]{1,2}))?|(zlib|lzma)(?:,([0-9]))?)|(none)")
_EC_COORDINATE_BYTES = {"nistp256": 32, "nistp384": 48, "nistp521": 66}
HOST_KEY_TYPES = (
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
)  # fmt: skip


def check_slug(text: str) -> str:
    """A member, node, site or federation name: ``[a-z0-9][a-z0-9-]{0,31}``."""
    if _SLUG.fullmatch(text):
        return text
    raise ValueError(
        f'{quote(text)} is not a valid name; use 1 to 32 lowercase letters, digits and "-",'
        " starting with a letter or digit (like coopcycle or web1)"
    )


def check_user(text: str) -> str:
    """A POSIX login name: ``[a-z_][a-z0-9_-]{0,31}``."""
    if _USER.fullmatch(text):
        return text
    raise ValueError(
        f'{quote(text)} is not a login name; use up to 32 lowercase letters, digits, "_" and "-",'
        ' starting with a letter or "_" (like mutualbackup)'
    )


def _is_host_name(text: str) -> bool:
    """RFC 1123 host name whose last label is not all digits (so ``10.0.0.999`` is not one)."""
    labels = text.split(".")
    return len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _is_ip(text: str, version: int | None = None) -> bool:
    """An IPv4 or IPv6 address as written, without brackets or a ``%zone``."""
    if "%" in text:
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def check_address(text: str) -> str:
    """A host name (RFC 1123) or an IPv4/IPv6 address, nothing else."""
    if _is_ip(text) or _is_host_name(text):
        return text
    raise ValueError(
        f"{quote(text)} is not a host name or an IP address; write a name like backup.example.org"
        " or an address like 203.0.113.10 or 2001:db8::10"
    )


def check_listen_address(text: str) -> str:
    """``ADDRESS:PORT`` where to serve metrics; an IPv6 address goes in brackets."""
    host, colon, port = text.rpartition(":")
    if colon and re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535:
        if host.startswith("[") and host.endswith("]") and _is_ip(host[1:-1], 6):
            return text
        if _is_ip(host, 4) or _is_host_name(host):
            return text
    raise ValueError(
        f"{quote(text)} is not ADDRESS:PORT; write it like 127.0.0.1:9468, [::1]:9468"
        " or monitor.example.org:9468 (port from 1 to 65535)"
    )


def _wire_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    """The SSH wire ``string`` at ``offset`` (uint32 length + bytes) and the offset after it."""
    if offset + 4 > len(blob):
        raise ValueError("the key data is cut short")
    end = offset + 4 + int.from_bytes(blob[offset : offset + 4], "big")
    if end > len(blob):
        raise ValueError("the key data is cut short")
    return blob[offset + 4 : end], end


def _check_key_blob(key_type: str, blob: bytes) -> None:
    """Raises ValueError unless ``blob`` is a well-formed public key of ``key_type``."""
    embedded, offset = _wire_string(blob, 0)
    if embedded != key_type.encode():
        raise ValueError(f"the key data says {quote(embedded.decode('ascii', 'replace'))}, not {key_type}")
    if key_type == "ssh-ed25519":
        key, offset = _wire_string(blob, offset)
        if len(key) != 32:
            raise ValueError(f"an ssh-ed25519 key is 32 bytes, this one is {len(key)}")
    elif key_type.startswith("ecdsa-"):
        curve = key_type.rpartition("-")[2]
        named, offset = _wire_string(blob, offset)
        if named != curve.encode():
            raise ValueError(f"the key data names the curve {quote(named.decode('ascii', 'replace'))}, not {curve}")
        point, offset = _wire_string(blob, offset)
        if len(point) != 1 + 2 * _EC_COORDINATE_BYTES[curve] or point[:1] != b"\x04":
            raise ValueError(f"the key data does not hold a {curve} point")
    else:
        exponent, offset = _wire_string(blob, offset)
        modulus, offset = _wire_string(blob, offset)
        if not exponent or not modulus:
            raise ValueError("the key data has an empty RSA exponent or modulus")
    if offset != len(blob):
        raise ValueError("the key data has extra bytes at the end")


def check_host_key(text: str) -> str:
    """A pinned public host key ``TYPE BASE64 [comment]`` -> ``TYPE BASE64``.

    TYPE is one of :data:`HOST_KEY_TYPES`; BASE64 must decode to an SSH public
    key blob of that same type. The messages start with "does not parse: ".
    """
    parts = text.split(maxsplit=2)
    source = "(copy the line from ssh-keyscan or /etc/ssh/ssh_host_ed25519_key.pub)"
    if len(parts) < 2:
        raise ValueError(f'does not parse: expected "TYPE BASE64 [comment]" {source}, got {quote(text)}')
    key_type, encoded = parts[0], parts[1]
    if key_type not in HOST_KEY_TYPES:
        raise ValueError(
            f"does not parse: unknown key type {quote(key_type)}; expected one of {', '.join(HOST_KEY_TYPES)}"
        )
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"does not parse: the key is not valid base64 {source}") from None
    try:
        _check_key_blob(key_type, blob)
    except ValueError as exc:
        raise ValueError(f"does not parse: {exc} {source}") from None
    return f"{key_type} {encoded}"


def check_admin_key(text: str) -> str:
    """An admin's OpenSSH public key ``TYPE BASE64 [comment]`` -> ``TYPE BASE64`` (ed25519 or RSA: the key
    types the age format seals for, and OpenSSH file signatures accept)."""
    key = check_host_key(text).replace("does not parse", "the key does not parse")
    if key.split()[0] not in ("ssh-ed25519", "ssh-rsa"):
        raise ValueError(f"{quote(key.split()[0])} keys cannot open a recovery kit; use an ssh-ed25519 (or ssh-rsa) key")
    return key


def check_signing_key(key: str) -> str:
    """An admin's key (already through :func:`check_admin_key`) that a signature can be trusted from: ValueError for
    an ``ssh-ed25519`` "key" that no private key makes (a point of small order, or not in canonical form), whose
    signature holds for any file, for ``ssh-keygen`` too; and for an ``ssh-rsa`` key OpenSSH will not verify with
    (under 1024 bits or over 16384, a modulus that reads as negative). Checked where admins are trusted: a node
    pinning them (at join, or re-pinned from a signed file) and ``check``; not by every command that reads the
    inventory (generated test federations write made-up keys)."""
    if key.startswith("ssh-ed25519 "):
        from nacl.bindings import crypto_core_ed25519_is_valid_point  # libsodium (PyNaCl, paramiko's own dependency)

        if not crypto_core_ed25519_is_valid_point(base64.b64decode(key.split()[1])[-32:]):
            raise ValueError("its ssh-ed25519 key is not a point any private key makes (of small order, or not in "
                             "canonical form): a signature by it would hold for any file; copy the key again from "
                             "the admin's .pub file")
    if key.startswith("ssh-rsa "):
        blob = base64.b64decode(key.split()[1])
        _, offset = _wire_string(blob, 0)
        _, offset = _wire_string(blob, offset)
        modulus, _ = _wire_string(blob, offset)
        if modulus[:1] >= b"\x80":
            raise ValueError("its ssh-rsa key's modulus reads as a negative number, which OpenSSH refuses; "
                             "copy the key again from its .pub file")
        bits = int.from_bytes(modulus, "big").bit_length()
        if not 1024 <= bits <= 16384:
            raise ValueError(f"its ssh-rsa key has {bits} bits: OpenSSH signs and verifies with RSA keys of 1024 to "
                             "16384 bits only; use an ssh-ed25519 key (ssh-keygen -t ed25519)")
    return key


def unusable_admin(admins: Iterable[Admin]) -> str | None:
    """``admin NAME: why`` for the first of ``admins`` whose key :func:`check_signing_key` refuses; None if none."""
    for admin in admins:
        try:
            check_signing_key(admin.key)
        except ValueError as exc:
            return f"admin {admin.name}: {exc}"
    return None


_NODE_KEY = re.compile(r"age1[02-9ac-hj-np-z]{58}")


def check_node_key(text: str) -> str:
    """A node's sealing key as ``mutualbackup-node join`` prints it: an age X25519 recipient ``age1…``."""
    if _NODE_KEY.fullmatch(text):
        return text
    raise ValueError(f"{quote(text)} is not a node key; paste the node_key line that `mutualbackup-node join` printed")


def _refuse_shell_characters(text: str, what: str) -> None:
    """Raises ValueError when ``text`` holds ``$``, a backtick or a control character."""
    for char in text:
        if char in "$`":
            raise ValueError(
                f"{quote(text)} contains a shell expansion character ({char}); mutualbackup refuses these"
                f" so that a {what} copied into a shell cannot run anything"
            )
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValueError(
                f"{quote(text)} contains a control character (U+{ord(char):04X}); mutualbackup refuses"
                f" these so that a {what} copied into a shell cannot run anything"
            )


def check_absolute_path(text: str) -> str:
    """An absolute path; spaces, quotes and non-ASCII are fine, ``$``, backticks and controls are not."""
    _refuse_shell_characters(text, "path")
    if not text.startswith("/"):
        raise ValueError(f"{quote(text)} is not an absolute path; write it from the root, like /srv/mutualbackup")
    return text


def check_home_path(text: str) -> str:
    """An absolute path or one under the login's home, written ``~/...``."""
    _refuse_shell_characters(text, "path")
    if "%" in text or '"' in text:
        raise ValueError(
            f"{quote(text)} contains % or a double quote: the keys and known_hosts kept here are given to ssh,"
            " which expands % and cannot quote a double quote; choose a plainer directory"
        )
    if not (text.startswith("/") or (text.startswith("~/") and len(text) > 2)):
        raise ValueError(
            f"{quote(text)} is neither an absolute path nor under the home directory;"
            " write it like /var/lib/mutualbackup or ~/.mutualbackup"
        )
    return text


def check_pattern(text: str) -> str:
    """A borg exclude pattern (``*.cache``, ``/srv/www/tmp``, ``sh:...``): one line, no expansion."""
    _refuse_shell_characters(text, "pattern")
    if not text:
        raise ValueError("an exclude pattern must not be empty")
    return text


def check_command(text: str) -> str:
    """A ``before:`` shell command, run on the source by design: any text but NUL."""
    if "\x00" in text:
        raise ValueError(f"{quote(text)} contains a NUL character, which no command line can hold")
    if not text.strip():
        raise ValueError("a command must not be empty")
    return text


def check_borg_command(text: str) -> str:
    """The borg executable: a command name (``borg``) or an absolute path, plain characters only."""
    if _BORG_COMMAND.fullmatch(text):
        return text
    raise ValueError(
        f"{quote(text)} is not a command name (like borg) or an absolute path (like /usr/local/bin/borg);"
        ' use letters, digits and . _ + - / only'
    )


def check_compression(text: str) -> str:
    """A borg compression spec: none, lz4, zstd[,1-22], zlib[,0-9], lzma[,0-9], optionally after ``auto,``."""
    match = _COMPRESSION.fullmatch(text)
    if match and not (match.group(4) and not 1 <= int(match.group(4)) <= 22):
        return text
    raise ValueError(
        f"{quote(text)} is not a borg compression; use none, lz4, zstd[,1-22], zlib[,0-9] or lzma[,0-9],"
        ' optionally after "auto," (like zstd,3 or auto,zstd,9)'
    )


def check_timezone(text: str) -> str:
    """An IANA time zone name known to this system (``Europe/Paris``), or ``UTC``."""
    if text == "UTC":
        return text
    import zoneinfo  # here: the node program checks names with this module, and never a time zone

    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{quote(text)} is not a time zone name; use one like Europe/Paris or UTC") from None
    return text


def check_line(text: str) -> str:
    """One line of free text (a contact): no control characters."""
    if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in text):
        raise ValueError(f"{quote(text)} must be one line of text without control characters")
    return text
