"""Load and validate an inventory directory into a :class:`~mutualbackup.inventory.model.Federation`.

The directory holds ``federation.yml`` and ``members/*.yml`` (SPEC.md, "Inventory").
Validation is strict and complete: every problem in every file is gathered and
reported at once as ``FILE:LINE: message`` through :class:`InventoryError`, and
a :class:`Federation` is returned only when there is none. The checks of single
values (names, addresses, host keys, paths) live in :mod:`mutualbackup.inventory.value_checks`;
this module holds the shape of the files. Pure code: it reads files, nothing else.
"""

from __future__ import annotations

import os
from typing import Callable

import yaml

from mutualbackup.inventory import value_checks
from mutualbackup.errors import InventoryError
from mutualbackup.inventory.model import Admin, Backup, Coordinator, Federation, Member, Node, Retention, Storage, Where
from mutualbackup.inventory.units import parse_bandwidth, parse_duration, parse_size, parse_window
from mutualbackup.inventory.yaml_lines import Reader, load_file

FEDERATION_KEYS = ("federation", "coordinator", "defaults")
COORDINATOR_KEYS = ("ssh_key", "state", "metrics", "timezone")
MEMBER_KEYS = ("member", "contact", "site", "admins", "nodes")
ADMIN_KEYS = ("name", "key")
NODE_KEYS = (
    "name", "address", "port", "user", "host_key", "node_key", "workdir", "authorized_keys", "borg", "backup", "storage",
)
BACKUP_KEYS = (
    "paths", "exclude", "estimate", "replicas", "every", "window", "rpo",
    "retention", "compression", "check_every", "drill_every", "before",
)  # fmt: skip
STORAGE_KEYS = ("path", "capacity", "max_concurrent", "bandwidth", "draining", "host_down_after")
DEFAULT_KEYS = tuple(key for key in BACKUP_KEYS + STORAGE_KEYS if key not in ("paths", "path"))
RETENTION_KEYS = ("hourly", "daily", "weekly", "monthly", "yearly")

_NO_DEFAULT = {
    "paths": 'defaults cannot hold "paths": each source lists its own in its backup: section',
    "path": 'defaults cannot hold "path": each host gives its own in its storage: section',
    "before": 'defaults cannot hold "before": what runs on a member\'s nodes is written in its own signed file',
    "exclude": 'defaults cannot hold "exclude": what a member leaves out is written in its own signed file',
}
_INVALID = object()  # a default that is present but wrong: reported once, never merged
Defaults = dict[str, object]


def load_inventory(directory: str | os.PathLike[str]) -> Federation:
    """Read ``DIRECTORY/federation.yml`` and ``DIRECTORY/members/*.yml`` (sorted by name).

    In: the inventory directory. Out: the validated federation, defaults merged
    into every node. Raises :class:`InventoryError` listing every problem of
    every file as ``FILE:LINE: message``, FILE being ``os.path.join(directory, ...)``.
    """
    directory = os.fspath(directory)
    problems: list[str] = []
    reader = Reader(os.path.join(directory, "federation.yml"))
    name, coordinator, defaults = _read_federation_file(reader)
    problems += reader.formatted()
    files, by_file = _member_files(os.path.join(directory, "members"))
    members: list[Member] = []
    first_seen: dict[str, Where] = {}
    for file in files:
        reader = Reader(file)
        member = _read_member_file(reader, defaults, first_seen)
        by_file.append((file, reader.formatted()))
        if member is not None:
            members.append(member)
    for _, file_problems in sorted(by_file, key=lambda pair: pair[0]):
        problems += file_problems
    problems += _one_server_one_node(members)
    if problems or name is None or coordinator is None:
        raise InventoryError(problems)
    return Federation(name=name, coordinator=coordinator, members=tuple(members), directory=directory)


def _one_server_one_node(members: list[Member]) -> list[str]:
    """Two nodes that share an address and port, a host key or a node key are one server claimed twice:
    a member could otherwise declare another member's server as its own node (its ``before:`` run there,
    its data backed up into a repository the claimant restores)."""
    seen: dict[tuple[str, ...], Node] = {}
    problems: list[str] = []
    for member in members:
        for node in member.nodes:
            identities = [("address and port", ("address", node.address.lower(), str(node.port))),
                          ("host_key", ("host_key", node.host_key))]
            if node.node_key:
                identities.append(("node_key", ("node_key", node.node_key)))
            for what, identity in identities:
                first = seen.setdefault(identity, node)
                if first is not node:
                    problems.append(f"{node.where}: node {node.name} has the same {what} as {first.name} "
                                    f"({first.where}): each server is one node, of one member; "
                                    "correct the one that is wrong")
    return problems


def _member_files(members_dir: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The member files (``*.yml``, sorted) and ``(path, [problem])`` pairs.

    Only regular files are read: a symlink (it could point outside the inventory, or nowhere), a
    directory or anything else under ``members/`` is an error, never a silent skip. Hidden files
    (an editor's) and the signatures (``*.yml.sig``) are skipped.
    """
    try:
        names = sorted(os.listdir(members_dir))
    except FileNotFoundError:
        problem = f"{members_dir}:1: directory not found; it must hold one MEMBER.yml file per member"
        return [], [(members_dir, [problem])]
    except OSError as exc:
        return [], [(members_dir, [f"{members_dir}:1: cannot list the directory: {exc.strerror or exc}"])]
    files: list[str] = []
    problems: list[tuple[str, list[str]]] = []
    for name in names:
        path = os.path.join(members_dir, name)
        if name.startswith(".") or name.endswith(".yml.sig"):
            continue
        kind = _kind_of(path)
        if name.endswith(".yml") and kind == "file":
            files.append(path)
        elif name.endswith(".yml"):
            problems.append((path, [f"{path}:1: a member file must be a regular file, and this is {kind}; "
                                    "replace it with the file itself"]))
        elif name.endswith(".yaml"):
            message = "member files must end in .yml, so this one would be ignored; rename it"
            problems.append((path, [f"{path}:1: {message}"]))
        elif kind != "file":
            problems.append((path, [f"{path}:1: only member files (MEMBER.yml) and their signatures belong in "
                                    f"members/, and this is {kind}; move it away"]))
    if not files and not problems:
        message = "no member files (*.yml) found; add one MEMBER.yml per member"
        problems.append((members_dir, [f"{members_dir}:1: {message}"]))
    return files, problems


def _kind_of(path: str) -> str:
    """``file`` for a regular file, else what it is (never following a symlink)."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _root(reader: Reader, expected: str) -> yaml.Node | None:
    """The top node of the reader's file, or None after recording why there is none."""
    node, line, message = load_file(reader.file)
    if message:
        reader.error(line, message)
    elif node is None:
        reader.error(1, f"the file is empty; it must hold {expected}")
    return node


def _read_federation_file(reader: Reader) -> tuple[str | None, Coordinator | None, Defaults | None]:
    """``(name, coordinator, defaults)``; each None when missing or wrong.

    ``defaults`` is None only when the file could not be read at all (then
    member files are checked without assuming anything about defaults).
    """
    root = _root(reader, "federation, coordinator and defaults")
    if root is None:
        return None, None, None
    values = reader.mapping(root, "federation.yml", FEDERATION_KEYS, required=("federation", "coordinator"))
    if values is None:
        return None, None, None
    name = None
    if "federation" in values:
        name = reader.parsed(values["federation"], "federation", "a name", value_checks.check_slug)
    coordinator = _read_coordinator(reader, values["coordinator"]) if "coordinator" in values else None
    defaults: Defaults = {}
    if "defaults" in values:
        settings = reader.mapping(values["defaults"], "defaults", DEFAULT_KEYS, refused=_NO_DEFAULT)
        for key, node in (settings or {}).items():
            value = _SETTINGS[key](reader, node, f"defaults.{key}")
            defaults[key] = _INVALID if value is None else value
    return name, coordinator, defaults


def _read_coordinator(reader: Reader, node: yaml.Node) -> Coordinator | None:
    """The ``coordinator:`` mapping, or None when anything in it is wrong."""
    before = len(reader.problems)
    values = reader.mapping(node, "coordinator", COORDINATOR_KEYS, required=("ssh_key", "state"))
    if values is None:
        return None
    read = {
        "ssh_key": lambda n: reader.parsed(n, "coordinator.ssh_key", "a path", value_checks.check_absolute_path),
        "state": lambda n: reader.parsed(n, "coordinator.state", "a path", value_checks.check_absolute_path),
        "metrics": lambda n: reader.parsed(n, "coordinator.metrics", "ADDRESS:PORT", value_checks.check_listen_address),
        "timezone": lambda n: reader.parsed(n, "coordinator.timezone", "a time zone", value_checks.check_timezone),
    }
    settings = {key: read[key](node) for key, node in values.items()}
    if len(reader.problems) > before:
        return None
    return Coordinator(**settings)  # type: ignore[arg-type]


def _read_member_file(reader: Reader, defaults: Defaults | None, first_seen: dict[str, Where]) -> Member | None:
    """One member file; None when it has any problem. Records the member in ``first_seen``."""
    root = _root(reader, "member, site and nodes")
    if root is None:
        return None
    values = reader.mapping(root, "the member file", MEMBER_KEYS, required=("member", "site", "nodes"))
    if values is None:
        return None
    name = site = None
    if "member" in values:
        name = reader.parsed(values["member"], "member", "a name", value_checks.check_slug)
        stem = os.path.basename(reader.file).removesuffix(".yml")
        if name is not None and name != stem:
            reader.error(values["member"], f'this file says member "{name}", and its name says "{stem}": '
                                           f"members/NAME.yml holds member NAME (rename the file, or correct member:)")
        elif name is not None and name in first_seen:
            reader.error(
                values["member"],
                f'member "{name}" is already defined at {first_seen[name]}; each member has exactly one file',
            )
        elif name is not None:
            first_seen[name] = reader.where(root)
    contact = ""
    if "contact" in values:
        contact = reader.parsed(values["contact"], "contact", "one line of text", value_checks.check_line) or ""
    if "site" in values:
        site = reader.parsed(values["site"], "site", "a name", value_checks.check_slug)
    nodes: list[Node] = []
    items = reader.sequence(values["nodes"], "nodes", "[{name: web1, address: ...}]", True) if "nodes" in values else []
    seen_nodes: dict[str, int] = {}
    for index, item in enumerate(items or ()):
        node = _read_node(reader, item, index, name or "", site or "", defaults, seen_nodes)
        if node is not None:
            nodes.append(node)
    admins = _read_admins(reader, values["admins"]) if "admins" in values else ()
    if reader.problems or name is None or site is None or admins is None:
        return None
    return Member(name=name, contact=contact, site=site, nodes=tuple(nodes), where=reader.where(root), admins=admins)


def _read_admins(reader: Reader, node: yaml.Node) -> tuple[Admin, ...] | None:
    """``admins:``: the member's people, each ``{name, key}`` (an ed25519 or RSA OpenSSH public key)."""
    items = reader.sequence(node, "admins", "[{name: alice, key: ssh-ed25519 AAAA...}]", True)
    if items is None:
        return None
    admins: list[Admin] = []
    for index, item in enumerate(items):
        values = reader.mapping(item, f"admins item {index + 1}", ADMIN_KEYS, required=ADMIN_KEYS)
        if values is None or set(ADMIN_KEYS) - set(values):
            continue
        name = reader.parsed(values["name"], "admins.name", "a name", value_checks.check_slug)
        key = reader.parsed(values["key"], "admins.key", "an SSH public key", value_checks.check_admin_key, " ")
        if name is not None and key is not None:
            if any(a.name == name for a in admins):
                reader.error(values["name"], f'admin "{name}" is listed twice')
            admins.append(Admin(name, key))
    return tuple(admins) if len(admins) == len(items) else None


def _node_label(node: yaml.Node, index: int) -> str:
    """``node "web1"`` when the node's name is readable, else ``nodes item 3``."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "name" and isinstance(value, yaml.ScalarNode):
                try:
                    return f'node "{value_checks.check_slug(value.value)}"'
                except ValueError:
                    break
    return f"nodes item {index + 1}"


def _read_node(
    reader: Reader,
    node: yaml.Node,
    index: int,
    member: str,
    site: str,
    defaults: Defaults | None,
    seen: dict[str, int],
) -> Node | None:
    """One item of ``nodes:``, defaults merged; None when anything in it is wrong."""
    before = len(reader.problems)
    what = _node_label(node, index)
    values = reader.mapping(node, what, NODE_KEYS, required=("name", "address", "user", "host_key"))
    if values is None:
        return None
    read: dict[str, Callable[[yaml.Node], object]] = {
        "name": lambda n: reader.parsed(n, "name", "a name", value_checks.check_slug),
        "address": lambda n: reader.parsed(n, "address", "a host name or IP address", value_checks.check_address),
        "port": lambda n: reader.integer(n, "port", 1, 65535),
        "user": lambda n: reader.parsed(n, "user", "a login name", value_checks.check_user),
        "host_key": lambda n: reader.parsed(n, "host_key", "a public key", value_checks.check_host_key, " "),
        "node_key": lambda n: reader.parsed(n, "node_key", "a node key", value_checks.check_node_key),
        "workdir": lambda n: reader.parsed(n, "workdir", "a path", value_checks.check_home_path),
        "authorized_keys": lambda n: reader.parsed(n, "authorized_keys", "a path", value_checks.check_home_path),
        "borg": lambda n: reader.parsed(n, "borg", "a command", value_checks.check_borg_command),
        "backup": lambda n: _read_section(reader, n, "backup", BACKUP_KEYS, defaults),
        "storage": lambda n: _read_section(reader, n, "storage", STORAGE_KEYS, defaults),
    }
    settings = {key: read[key](value) for key, value in values.items()}
    name = settings.get("name")
    if isinstance(name, str):
        if name in seen:
            reader.error(
                values["name"],
                f'node name "{name}" is used twice in this member (first at {reader.file}:{seen[name]});'
                " node names must be unique within a member",
            )
        else:
            seen[name] = reader.where(values["name"]).line
    if len(reader.problems) > before or any(value is None for value in settings.values()):
        return None
    backup = settings.pop("backup", None)
    storage = settings.pop("storage", None)
    return Node(
        member=member,
        slug=settings.pop("name"),  # type: ignore[arg-type]
        port=settings.pop("port", 22),  # type: ignore[arg-type]
        backup=Backup(**backup) if backup is not None else None,  # type: ignore[arg-type]
        storage=Storage(**storage) if storage is not None else None,  # type: ignore[arg-type]
        site=site,
        where=reader.where(node),
        **settings,  # type: ignore[arg-type]
    )


def _read_section(
    reader: Reader, node: yaml.Node, section: str, keys: tuple[str, ...], defaults: Defaults | None
) -> dict[str, object] | None:
    """A node's ``backup:`` or ``storage:`` settings with the federation defaults under them.

    Out: keyword arguments for :class:`Backup` / :class:`Storage`, or None when
    something is wrong (recorded). Node values win over defaults.
    """
    required = "paths" if section == "backup" else "path"
    values = reader.mapping(node, section, keys, required=(required,))
    if values is None:
        return None
    merged = {key: value for key, value in (defaults or {}).items() if key in keys and value is not _INVALID}
    failed = False
    for key, value_node in values.items():
        value = _SETTINGS[key](reader, value_node, f"{section}.{key}")
        failed = failed or value is None
        merged[key] = value
    if section == "storage" and "capacity" not in values and defaults is not None and "capacity" not in defaults:
        reader.error(reader.key_of(node), 'storage is missing the required key "capacity" (set it here or in defaults)')
        failed = True
    if section == "storage" and "capacity" not in merged:
        failed = True  # reported above, or a default that is wrong in federation.yml
    return None if failed or required not in values else merged


def _positive(parse: Callable[[str], int], what: str) -> Callable[[str], int]:
    """``parse`` that also refuses zero (``0s``, ``0GiB``)."""

    def parse_positive(text: str) -> int:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"{value_checks.quote(text)} is zero; {what} must be more than that")
        return value

    return parse_positive


def _read_strings(
    reader: Reader, node: yaml.Node, label: str, example: str, check: Callable[[str], str], non_empty: bool = False
) -> tuple[str, ...] | None:
    """A list of strings, each passed through ``check``; None when any is wrong."""
    items = reader.sequence(node, label, example, non_empty)
    if items is None:
        return None
    values = [reader.parsed(item, f"{label}[{i}]", "a string", check) for i, item in enumerate(items)]
    return None if any(value is None for value in values) else tuple(values)  # type: ignore[arg-type]


def _read_retention(reader: Reader, node: yaml.Node, label: str) -> Retention | None:
    """``{daily: 7, weekly: 4, ...}``: non-negative counts, at least one above zero."""
    before = len(reader.problems)
    values = reader.mapping(node, label, RETENTION_KEYS)
    if values is None:
        return None
    counts = {key: reader.integer(value, f"{label}.{key}", 0) for key, value in values.items()}
    if len(reader.problems) > before:
        return None
    if not any(counts.values()):
        reader.error(node, f"{label} keeps nothing; set at least one of {', '.join(RETENTION_KEYS)} above 0")
        return None
    return Retention(**counts)  # type: ignore[arg-type]


def _read_flag(reader: Reader, node: yaml.Node, label: str) -> bool | None:
    """``true`` or ``false``."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
        return node.value.lower() in ("true", "yes", "on")
    reader.error(node, f"{label} must be true or false")
    return None


def _parsed(expected: str, parse: Callable[[str], object]) -> Callable[[Reader, yaml.Node, str], object]:
    return lambda reader, node, label: reader.parsed(node, label, expected, parse)


# How each backup:/storage: key is read (in a node's section or in defaults).
# Each returns the value for the model, or None after recording a problem.
_SETTINGS: dict[str, Callable[[Reader, yaml.Node, str], object]] = {
    "paths": lambda r, n, label: _read_strings(r, n, label, "[/etc, /srv/www]", value_checks.check_absolute_path, True),
    "exclude": lambda r, n, label: _read_strings(r, n, label, '["*.cache", /srv/www/tmp]', value_checks.check_pattern),
    "estimate": _parsed("a size like 20GiB", parse_size),
    "replicas": lambda r, n, label: r.integer(n, label, 1),
    "every": _parsed("a duration like 24h", _positive(parse_duration, "every")),
    "window": _parsed('a window like "01:00-06:00"', parse_window),
    "rpo": _parsed("a duration like 26h", _positive(parse_duration, "rpo")),
    "retention": _read_retention,
    "compression": _parsed("a compression like zstd,3", value_checks.check_compression),
    "check_every": _parsed("a duration like 7d", _positive(parse_duration, "check_every")),
    "drill_every": _parsed("a duration like 30d", _positive(parse_duration, "drill_every")),
    "before": lambda r, n, label: _read_strings(r, n, label, '["pg_dumpall -f /var/backups/pg.sql"]',
                                               value_checks.check_command),
    "path": _parsed("a path", value_checks.check_absolute_path),
    "capacity": _parsed("a size like 500GiB", _positive(parse_size, "capacity")),
    "max_concurrent": lambda r, n, label: r.integer(n, label, 1),
    "bandwidth": _parsed("a bandwidth like 100Mbit", _positive(parse_bandwidth, "bandwidth")),
    "draining": lambda r, n, label: _read_flag(r, n, label),
    "host_down_after": _parsed("a duration like 3d", _positive(parse_duration, "host_down_after")),
}
