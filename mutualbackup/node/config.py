"""What a node knows of itself, written by ``join``: whose it is, where its things are, whom it obeys.

``CONFIG/node.json`` (root-owned, readable by all): the member and node name pinned at join, the
login the coordinator and peers use (``user``) and its ``authorized_keys``, the host-side work
directory (unprivileged: repositories' borg cache and pidfiles), the root-only state directory
(the source's key, passphrase, pinned hosts, borg cache; the node's sealing identity), borg's
executable, and the member's admins pinned at join. Nothing in it is secret.

A root process reads a configuration only from a directory that root owns and nobody else can
write: whoever gets the unprivileged login cannot point a root request at a file of theirs.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass, field

from mutualbackup.node import CONFIG_FILE, DEFAULT_CONFIG, ENVIRONMENT  # noqa: F401 - the node's constants
from mutualbackup.node.config_file import (  # noqa: F401 - the file's reading, shared with what runs first
    FORMAT, ConfigError, borg_program, config_directory, read_config,
)

DEFAULT_STATE = "/var/lib/mutualbackup-node"
IDENTITY_FILE = "identity"  # the node's age X25519 identity (sealing key), in the state directory


@dataclass(frozen=True)
class Admin:
    name: str
    key: str  # "ssh-ed25519 AAAA…" (OpenSSH public key, no comment)


@dataclass(frozen=True)
class NodeConfig:
    member: str
    node: str
    user: str  # the login of the coordinator and of peers (borg serve), unprivileged
    authorized_keys: str  # that login's authorized_keys (the forced-command line, the managed block)
    work: str  # host-side work directory, owned by ``user``: borg's cache for host checks, pidfiles
    state: str  # root-only: the source's key, passphrase, pinned hosts, borg cache, sealing identity
    borg: str = "borg"
    storage: str = ""  # where this node keeps other members' repositories ("" when it lends no storage)
    admins: tuple[Admin, ...] = ()
    coordinator_key: str = ""
    sudo: bool = False  # the login is not root: the forced command is ``sudo -n mutualbackup-node serve``
    program: str = ""  # mutualbackup-node's absolute path, as the sudo rule names it
    directory: str = field(default="", compare=False)  # where it was read from

    @property
    def name(self) -> str:
        return f"{self.member}/{self.node}"

    @property
    def identity_file(self) -> str:
        return posixpath.join(self.state, IDENTITY_FILE)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("directory")
        data["admins"] = [asdict(a) for a in self.admins]
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"


def load_config(directory: str, *, trusted: bool | None = None) -> NodeConfig:
    """The configuration in ``directory``; ConfigError saying what is wrong (see :func:`read_config`: ``trusted``,
    by default when this process is root, requires root alone to be able to write it)."""
    data = read_config(directory, trusted=trusted)
    try:
        admins = tuple(Admin(str(a["name"]), str(a["key"])) for a in data.get("admins", []))
        return NodeConfig(
            member=str(data["member"]), node=str(data["node"]), user=str(data["user"]),
            authorized_keys=str(data["authorized_keys"]), work=str(data["work"]), state=str(data["state"]),
            borg=borg_program(data), storage=str(data.get("storage") or ""), admins=admins,
            coordinator_key=str(data.get("coordinator_key", "")),
            sudo=bool(data.get("sudo", False)), program=str(data.get("program") or ""), directory=directory,
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{os.path.join(directory, CONFIG_FILE)} lacks {exc}") from None


def write_config(config: NodeConfig, directory: str) -> None:
    """Write ``node.json`` into ``directory`` (made 0755), atomically, mode 0644."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    temporary = path + ".new"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(config.to_json())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
