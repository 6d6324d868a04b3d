"""Where a source's things live: its files on the node, its repository on a host, archive names.

Pure. ``WORKDIR`` is a node's ``workdir``, expanded:

- ``WORKDIR/id_ed25519`` — the source's own SSH key, the one the hosts' forced commands accept;
- ``WORKDIR/passphrase`` — the repositories' passphrase, mode 0600, generated there;
- ``WORKDIR/known_hosts`` — the pinned host keys of the source's replica hosts;
- ``WORKDIR/borg`` — ``BORG_BASE_DIR`` (cache, security and config of borg).
"""

from __future__ import annotations

import posixpath
import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a node's backup starts on few imports
if TYPE_CHECKING:
    import datetime as dt

    from mutualbackup.inventory.model import Node


KEY_FILE = "id_ed25519"

PASSPHRASE_FILE = "passphrase"

KNOWN_HOSTS_FILE = "known_hosts"

BASE_DIR = "borg"


class SourcePaths:
    """The files of one source node, with ``~`` already expanded. (A plain class, not a dataclass: a backup's
    borg starts before the node program imports dataclasses, node/preload.py.)"""

    __slots__ = ("workdir",)

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def __repr__(self) -> str:
        return f"SourcePaths(workdir={self.workdir!r})"

    @property
    def key(self) -> str:
        return posixpath.join(self.workdir, KEY_FILE)

    @property
    def passphrase(self) -> str:
        return posixpath.join(self.workdir, PASSPHRASE_FILE)

    @property
    def known_hosts(self) -> str:
        return posixpath.join(self.workdir, KNOWN_HOSTS_FILE)

    @property
    def base_dir(self) -> str:
        return posixpath.join(self.workdir, BASE_DIR)


def repository_path(source: Node, host: Node) -> str:
    """Where ``source``'s repository lives on ``host``: STORAGE/MEMBER/NODE."""
    assert host.storage is not None
    return posixpath.join(host.storage.path, source.member, source.slug)


def repository_url(source: Node, host: Node) -> str:
    """The ``ssh://`` URL a source's borg uses to reach its repository on ``host``."""
    return url_of(host, repository_path(source, host))


def repository_url_for(member: str, node: str, host: Node) -> str:
    """The URL of the repository of ``MEMBER/NODE`` on ``host`` (as :func:`repository_url`, from the name alone)."""
    assert host.storage is not None
    return url_of(host, posixpath.join(host.storage.path, member, node))


def url_of(host: Node, path: str) -> str:
    """The ``ssh://`` URL of the repository at ``path`` on ``host`` (an IPv6 address in brackets)."""
    address = f"[{host.address}]" if ":" in host.address else host.address
    return f"ssh://{host.user}@{address}:{host.port}{path}"


def known_hosts_name(node: Node) -> str:
    """The host name as OpenSSH writes it in known_hosts (``[addr]:port`` unless port 22)."""
    return node.address if node.port == 22 else f"[{node.address}]:{node.port}"


def known_hosts_line(node: Node) -> str:
    return f"{known_hosts_name(node)} {node.host_key}"


def archive_name(source: Node, when: dt.datetime) -> str:
    """``NODE-YYYY-MM-DDTHH:MM:SS`` in UTC: sortable, unique per second."""
    import datetime as dt  # here: a node's backup starts borg before it imports datetime (node/preload.py)

    return f"{source.slug}-{when.astimezone(dt.timezone.utc):%Y-%m-%dT%H:%M:%S}"


CHECKPOINT_SUFFIX = re.compile(r"\.checkpoint(\.\d+)?\Z")


def archive_glob(source: Node) -> str:
    """The archives the coordinator creates for ``source`` (see :func:`archive_name`)."""
    return f"{source.slug}-*"


def is_checkpoint(name: str) -> bool:
    """True for borg's partial archives (``NAME.checkpoint``, ``NAME.checkpoint.N``)."""
    return CHECKPOINT_SUFFIX.search(name) is not None


def archive_path(path: str) -> str:
    """Borg stores ``/etc/x`` as ``etc/x``: the form ``extract`` and ``list`` expect."""
    return path.lstrip("/")


def path_pattern(path: str, *, exact: bool = False) -> str:
    """A path as a literal borg pattern, so that ``re:x`` or ``sh:*`` in a name stay literal.

    ``pp:`` (the path and everything under it) by default; ``pf:`` (exactly that
    path, a dictionary lookup in borg, fast for hundreds of sampled files) with ``exact``.
    """
    return ("pf:" if exact else "pp:") + archive_path(path)
