"""Loading and validating inventories, and the units they are written in.

Hostile and broken inventories are tables: each row edits a valid member file
and names the one problem expected, at the line where the edit is.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from mutualbackup.errors import InventoryError
from mutualbackup.inventory.load import load_inventory
from mutualbackup.inventory.model import Window
from mutualbackup.inventory.units import (
    format_bandwidth,
    format_duration,
    format_size,
    parse_bandwidth,
    parse_duration,
    parse_size,
    parse_window,
)
from signkit import NEUTRAL_POINT, ed25519_key

FIXTURES = Path(__file__).parent / "inventories"


def ssh_string(data: bytes) -> bytes:
    """An SSH wire ``string``: uint32 length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


def ed25519_host_key(seed: int, key_type: bytes = b"ssh-ed25519", length: int = 32) -> str:
    """A host key line ``ssh-ed25519 BASE64`` built from the wire blob, for tests only."""
    blob = ssh_string(key_type) + ssh_string(bytes([seed]) * length)
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


FEDERATION = """\
federation: test-federation
coordinator:
  ssh_key: /etc/mutualbackup/id_ed25519
  state: /var/lib/mutualbackup
defaults:
  replicas: 1
"""

MEMBER = f"""\
member: coopcycle
contact: ops@coopcycle.example
site: paris-nord
nodes:
  - name: web1
    address: 203.0.113.10
    port: 22
    user: mutualbackup
    host_key: {ed25519_host_key(1)}
    backup:
      paths: [/etc]
      retention: {{daily: 7}}
    storage:
      path: /srv/mutualbackup
      capacity: 500GiB
"""


def write_inventory(root: Path, members: dict[str, str], federation: str = FEDERATION) -> str:
    """Write ``federation.yml`` and ``members/NAME`` files under ``root``; return the directory."""
    (root / "members").mkdir(parents=True, exist_ok=True)
    (root / "federation.yml").write_text(federation, encoding="utf-8")
    for name, text in members.items():
        (root / "members" / name).write_text(text, encoding="utf-8")
    return str(root)


def line_of(text: str, needle: str) -> int:
    """The 1-based line of ``text`` holding ``needle``, which must appear on exactly one line."""
    lines = [number for number, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} is on lines {lines}"
    return lines[0]


def problems_of(directory: str) -> list[str]:
    """The problems load_inventory reports for ``directory`` (it must report some)."""
    with pytest.raises(InventoryError) as caught:
        load_inventory(directory)
    return caught.value.problems


def edited(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the text"
    return text.replace(old, new)


# --- a valid federation ------------------------------------------------------------------


def test_the_three_member_fixture_loads_with_every_member_and_node():
    federation = load_inventory(FIXTURES / "three-members")

    assert federation.name == "plateformes-en-communs"
    assert [member.name for member in federation.members] == ["coopcycle", "framasoft", "libre-hosting"]
    assert [node.name for node in federation.sources()] == ["coopcycle/web1", "coopcycle/db1", "libre-hosting/mail"]
    assert [node.name for node in federation.hosts()] == [
        "coopcycle/web1",
        "framasoft/stockage",
        "libre-hosting/mail",
    ]
    assert federation.coordinator.timezone == "Europe/Paris"
    assert federation.coordinator.metrics_address == ("127.0.0.1", 9468)
    assert federation.directory == str(FIXTURES / "three-members")


def test_defaults_fill_what_a_node_leaves_out_and_node_values_win():
    federation = load_inventory(FIXTURES / "three-members")
    web1, db1, mail = federation.sources()

    assert web1.backup.replicas == 1  # the node says 1, defaults say 2
    assert db1.backup.replicas == 2
    assert db1.backup.window == Window(22 * 60, 4 * 60)  # node's own, crossing midnight
    assert mail.backup.window == Window(60, 360)  # from defaults
    assert db1.backup.retention.prune_flags() == ("--keep-hourly=24", "--keep-daily=7")
    assert mail.backup.retention.prune_flags() == ("--keep-daily=7", "--keep-weekly=4", "--keep-monthly=6")
    assert (mail.backup.every, mail.backup.rpo) == (6 * 3600, 8 * 3600)
    assert (web1.backup.check_every, web1.backup.drill_every) == (7 * 86400, 30 * 86400)
    assert mail.backup.compression == "auto,lzma,6"
    stockage = federation.node("framasoft/stockage")
    assert stockage.storage.capacity == 100 * 1024**3  # capacity from defaults
    assert stockage.storage.max_concurrent == 3  # from defaults
    assert web1.storage.max_concurrent == 2  # node wins
    assert web1.storage.bandwidth == 100_000_000
    assert mail.storage.capacity == 2 * 10**12


def test_values_given_nowhere_take_the_model_defaults(tmp_path):
    federation_text = edited(FEDERATION, "defaults:\n  replicas: 1\n", "")
    member = edited(MEMBER, "    port: 22\n", "")
    federation = load_inventory(write_inventory(tmp_path, {"coopcycle.yml": member}, federation_text))
    node = federation.node("coopcycle/web1")

    assert node.port == 22
    assert (node.workdir, node.authorized_keys, node.borg) == ("~/.mutualbackup", "~/.ssh/authorized_keys", "borg")
    assert node.backup.replicas == 2
    assert node.backup.compression == "zstd,3"
    assert node.backup.window is None
    assert node.storage.max_concurrent == 2
    assert node.storage.bandwidth is None
    assert federation.coordinator.metrics == "127.0.0.1:9468"
    assert federation.coordinator.timezone == "UTC"


def test_paths_with_spaces_quotes_and_non_ascii_are_kept_exactly():
    db1 = load_inventory(FIXTURES / "three-members").node("coopcycle/db1")

    assert db1.backup.paths == ("/var/lib/postgresql", "/srv/it's \"here\" now", "/srv/données partagées")


def test_host_keys_of_every_type_are_kept_without_their_comment():
    federation = load_inventory(FIXTURES / "three-members")

    assert federation.node("coopcycle/web1").host_key == ed25519_host_key(1)  # "root@web1" dropped
    assert federation.node("framasoft/stockage").host_key.startswith("ecdsa-sha2-nistp256 AAAAE2VjZHNh")
    assert federation.node("libre-hosting/mail").host_key.startswith("ssh-rsa AAAAB3NzaC1yc2E")


def test_nodes_take_their_members_site_and_remember_where_they_are_written():
    federation = load_inventory(FIXTURES / "three-members")
    coopcycle_file = os.path.join(str(FIXTURES / "three-members"), "members", "coopcycle.yml")
    member = federation.member("coopcycle")
    db1 = federation.node("coopcycle/db1")

    assert db1.site == "paris-nord"
    assert str(member.where) == f"{coopcycle_file}:1"
    text = Path(coopcycle_file).read_text(encoding="utf-8")
    assert str(db1.where) == f"{coopcycle_file}:{line_of(text, 'name: db1')}"


def test_addresses_may_be_host_names_ipv4_or_ipv6(tmp_path):
    for address in ("203.0.113.10", '"2001:db8::10"', "backup.example.org", "localhost", "xn--bcher-kva.example"):
        member = edited(MEMBER, "address: 203.0.113.10", f"address: {address}")
        node = load_inventory(write_inventory(tmp_path, {"coopcycle.yml": member})).node("coopcycle/web1")
        assert node.address == address.strip('"')


def test_member_files_are_read_in_name_order_and_hidden_files_are_skipped(tmp_path):
    second = MEMBER.replace("coopcycle", "zeta").replace("paris-nord", "lyon").replace(
        "203.0.113.10", "203.0.113.20").replace(ed25519_host_key(1), ed25519_host_key(2))
    first = MEMBER.replace("coopcycle", "alpha")
    directory = write_inventory(tmp_path, {"zeta.yml": second, "alpha.yml": first, ".#alpha.yml": "not: [yaml",
                                           "alpha.yml.sig": "a signature"})
    (tmp_path / "members" / "README.md").write_text("not a member file")

    assert [member.name for member in load_inventory(directory).members] == ["alpha", "zeta"]


@pytest.mark.parametrize("claimed", ["address and port", "host_key", "both"])
def test_a_member_file_claiming_another_members_server_is_refused_naming_both_nodes(tmp_path, claimed) -> None:
    """The hostile member copies coopcycle/web1's address and port, or its host key, into a node of its own."""
    hostile = MEMBER.replace("coopcycle", "mallory").replace("paris-nord", "elsewhere").replace("name: web1", "name: mine")
    if claimed == "host_key":
        hostile = hostile.replace("203.0.113.10", "203.0.113.66")
    elif claimed == "address and port":
        hostile = hostile.replace(ed25519_host_key(1), ed25519_host_key(66))
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER, "mallory.yml": hostile})
    with pytest.raises(InventoryError) as raised:
        load_inventory(directory)
    message = str(raised.value)
    for what in (["address and port", "host_key"] if claimed == "both" else [claimed]):
        assert f"members/mallory.yml:5: node mallory/mine has the same {what} as coopcycle/web1 (" in message
    assert "coopcycle.yml:5)" in message and "each server is one node" in message


def test_two_nodes_on_one_address_with_different_ports_are_two_nodes(tmp_path) -> None:
    other = MEMBER.replace("coopcycle", "zeta").replace("port: 22", "port: 2222").replace(
        ed25519_host_key(1), ed25519_host_key(2))
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER, "zeta.yml": other})
    assert len(list(load_inventory(directory).nodes())) == 2


# --- one problem per row ------------------------------------------------------------------

HOSTILE_MEMBER_EDITS = [
    # (id, old text, new text, text on the line of the problem, expected message)
    ("node named like a shell command", "name: web1", 'name: "a;rm -rf x"', "a;rm",
     'name: "a;rm -rf x" is not a valid name; use 1 to 32 lowercase letters'),
    ("command substitution in a path", "paths: [/etc]", 'paths: [/etc, "/srv/$(touch /tmp/pwned)"]', "pwned",
     'backup.paths[1]: "/srv/$(touch /tmp/pwned)" contains a shell expansion character ($); mutualbackup refuses'
     " these so that a path copied into a shell cannot run anything"),
    ("backtick in an exclude pattern", "paths: [/etc]", "paths: [/etc]\n      exclude: ['*`id`*']", "exclude",
     'backup.exclude[0]: "*`id`*" contains a shell expansion character (`)'),
    ("newline in a path", "paths: [/etc]", 'paths: ["/etc\\nrm -rf /"]', "paths",
     'backup.paths[0]: "/etc\\nrm -rf /" contains a control character (U+000A)'),
    ("relative storage path", "path: /srv/mutualbackup", "path: srv/mutualbackup", "path: srv",
     'storage.path: "srv/mutualbackup" is not an absolute path'),
    ("relative backup path", "paths: [/etc]", "paths: [etc]", "paths",
     'backup.paths[0]: "etc" is not an absolute path'),
    ("host key that is not base64", ed25519_host_key(1), "ssh-ed25519 not*base64", "host_key",
     "host_key does not parse: the key is not valid base64"),
    ("host key cut short", ed25519_host_key(1), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "host_key",
     "host_key does not parse: the key data is cut short"),
    ("host key of another type than it says", ed25519_host_key(1), ed25519_host_key(1, b"ssh-rsa"), "host_key",
     'host_key does not parse: the key data says "ssh-rsa", not ssh-ed25519'),
    ("ed25519 host key of 31 bytes", ed25519_host_key(1), ed25519_host_key(1, length=31), "host_key",
     "host_key does not parse: an ssh-ed25519 key is 32 bytes, this one is 31"),
    ("host key of an unknown type", ed25519_host_key(1), "ssh-dss AAAAB3NzaC1kc3M=", "host_key",
     'host_key does not parse: unknown key type "ssh-dss"'),
    ("host key without its key", ed25519_host_key(1), "ssh-ed25519", "host_key",
     'host_key does not parse: expected "TYPE BASE64 [comment]"'),
    ("unknown key in a node", "    user: mutualbackup\n", "    user: mutualbackup\n    adress: x\n", "adress",
     'unknown key "adress" in node "web1"; did you mean "address"? allowed keys: name, address, port,'),
    ("unknown key in backup", "paths: [/etc]", "paths: [/etc]\n      keep: 3", "keep",
     'unknown key "keep" in backup; allowed keys: paths, exclude,'),
    ("duplicate YAML key", "    port: 22\n", "    port: 22\n    port: 2222\n", "2222",
     'duplicate key "port" in node "web1" (first at line 7); YAML would silently keep only the last one'),
    ("boolean where an integer is expected", "port: 22", "port: yes", "port",
     "port must be an integer from 1 to 65535, got the yes/no value yes"),
    ("word where a port is expected", "port: 22", "port: ssh", "port",
     'port must be an integer from 1 to 65535, got "ssh"'),
    ("quoted port", "port: 22", 'port: "22"', "port",
     'port must be an integer from 1 to 65535, got "22" (a quoted string: remove the quotes)'),
    ("port out of range", "port: 22", "port: 70000", "port",
     "port must be an integer from 1 to 65535, got the integer 70000"),
    ("boolean replicas", "paths: [/etc]", "paths: [/etc]\n      replicas: true", "replicas",
     "backup.replicas must be an integer of at least 1, got the yes/no value true"),
    ("zero replicas", "paths: [/etc]", "paths: [/etc]\n      replicas: 0", "replicas",
     "backup.replicas must be an integer of at least 1, got the integer 0"),
    ("address with a shell character", "address: 203.0.113.10", 'address: "host;id"', "address",
     'address: "host;id" is not a host name or an IP address'),
    ("address that looks like an option", "address: 203.0.113.10", "address: -oProxyCommand=id", "address",
     'address: "-oProxyCommand=id" is not a host name or an IP address'),
    ("IPv4 address out of range", "address: 203.0.113.10", "address: 203.0.113.999", "address",
     'address: "203.0.113.999" is not a host name or an IP address'),
    ("IPv6 address with a zone", "address: 203.0.113.10", 'address: "fe80::1%$(id)"', "address",
     "is not a host name or an IP address"),
    ("login name with capitals", "user: mutualbackup", "user: Backup", "user", 'user: "Backup" is not a login name'),
    ("relative workdir", "    port: 22\n", "    port: 22\n    workdir: .mutualbackup\n", "workdir",
     'workdir: ".mutualbackup" is neither an absolute path nor under the home directory'),
    ("workdir in another user's home", "    port: 22\n", "    port: 22\n    workdir: ~root/x\n", "workdir",
     'workdir: "~root/x" is neither an absolute path nor under the home directory'),
    ("borg with arguments", "    port: 22\n", "    port: 22\n    borg: borg --debug\n", "borg:",
     'borg: "borg --debug" is not a command name (like borg) or an absolute path'),
    ("compression level out of range", "paths: [/etc]", "paths: [/etc]\n      compression: zstd,23", "compression",
     'backup.compression: "zstd,23" is not a borg compression'),
    ("empty window", "paths: [/etc]", 'paths: [/etc]\n      window: "03:00-03:00"', "window",
     'backup.window: "03:00-03:00" starts and ends at the same time'),
    ("retention that keeps nothing", "retention: {daily: 7}", "retention: {daily: 0}", "retention",
     "backup.retention keeps nothing; set at least one of hourly, daily, weekly, monthly, yearly above 0"),
    ("negative retention", "retention: {daily: 7}", "retention: {daily: -1}", "retention",
     "backup.retention.daily must be an integer of at least 0, got the integer -1"),
    ("duration without a unit", "paths: [/etc]", "paths: [/etc]\n      every: 3600", "every",
     'backup.every: "3600" is not a duration; write a number and a unit, like 26h, 7d or 1h30m'),
    ("zero duration", "paths: [/etc]", "paths: [/etc]\n      rpo: 0h", "rpo", 'backup.rpo: "0h" is zero'),
    ("size with an unknown unit", "capacity: 500GiB", "capacity: 500gigs", "capacity",
     'storage.capacity: "500gigs" is not a size'),
    ("bandwidth in bytes", "capacity: 500GiB", "capacity: 500GiB\n      bandwidth: 100MB", "bandwidth",
     'storage.bandwidth: "100MB" is not a bandwidth'),
    ("paths given as one string", "paths: [/etc]", "paths: /etc", "paths",
     'backup.paths must be a list, like [/etc, /srv/www]; got "/etc"'),
    ("empty paths", "paths: [/etc]", "paths: []", "paths", "backup.paths must not be empty"),
    ("before command with a NUL", "paths: [/etc]", 'paths: [/etc]\n      before: ["echo \\0"]', "before",
     "backup.before[0]: \"echo \\u0000\" contains a NUL character"),
    ("missing user", "    user: mutualbackup\n", "", "name: web1", 'node "web1" is missing the required key "user"'),
    ("storage without capacity", "      capacity: 500GiB\n", "", "storage:",
     'storage is missing the required key "capacity" (set it here or in defaults)'),
    ("backup without paths", "      paths: [/etc]\n", "", "backup:", 'backup is missing the required key "paths"'),
    ("contact that is a list", "contact: ops@coopcycle.example", "contact: [a, b]", "contact",
     "contact must be one line of text, got a list"),
    ("bad site", "site: paris-nord", "site: Paris Nord", "site", 'site: "Paris Nord" is not a valid name'),
    ("YAML merge key", "    port: 22\n", "    port: 22\n    <<: {borg: borg}\n", "<<",
     'merge keys (<<) are not supported in node "web1"'),
    ("explicit YAML tag", "name: web1", "name: !!python/name:os.system web1", "name:",
     "name: YAML tags such as tag:yaml.org,2002:python/name:os.system are not supported"),
]  # fmt: skip


@pytest.mark.parametrize(
    "old, new, needle, message",
    [row[1:] for row in HOSTILE_MEMBER_EDITS],
    ids=[row[0] for row in HOSTILE_MEMBER_EDITS],
)
def test_a_bad_member_file_is_refused_with_one_problem_at_the_right_line(tmp_path, old, new, needle, message):
    text = edited(MEMBER, old, new)
    directory = write_inventory(tmp_path, {"coopcycle.yml": text})

    problems = problems_of(directory)

    where = f"{os.path.join(directory, 'members', 'coopcycle.yml')}:{line_of(text, needle)}: "
    assert len(problems) == 1, problems
    assert problems[0].startswith(where), problems
    assert message in problems[0]


BAD_FEDERATION_EDITS = [
    ("bad federation name", "federation: test-federation", "federation: Test Federation", "federation:",
     'federation: "Test Federation" is not a valid name'),
    ("relative state directory", "state: /var/lib/mutualbackup", "state: var/lib", "state",
     'coordinator.state: "var/lib" is not an absolute path'),
    ("missing ssh key", "  ssh_key: /etc/mutualbackup/id_ed25519\n", "", "coordinator:",
     'coordinator is missing the required key "ssh_key"'),
    ("metrics without a port", "state: /var/lib/mutualbackup", "state: /var/lib/mutualbackup\n  metrics: localhost",
     "metrics", 'coordinator.metrics: "localhost" is not ADDRESS:PORT'),
    ("IPv6 metrics address without brackets", "state: /var/lib/mutualbackup",
     'state: /var/lib/mutualbackup\n  metrics: "::1:9468"', "metrics",
     'coordinator.metrics: "::1:9468" is not ADDRESS:PORT'),
    ("unknown time zone", "state: /var/lib/mutualbackup", "state: /var/lib/mutualbackup\n  timezone: Mars/Olympus",
     "timezone", 'coordinator.timezone: "Mars/Olympus" is not a time zone name'),
    ("time zone that is a path", "state: /var/lib/mutualbackup",
     "state: /var/lib/mutualbackup\n  timezone: /etc/passwd", "timezone",
     'coordinator.timezone: "/etc/passwd" is not a time zone name'),
    ("paths in defaults", "replicas: 1", "replicas: 1\n  paths: [/etc]", "paths",
     'defaults cannot hold "paths": each source lists its own in its backup: section'),
    ("unknown key in defaults", "replicas: 1", "replicas: 1\n  replica: 2", "replica:",
     'unknown key "replica" in defaults; did you mean "replicas"?'),
    ("boolean in defaults", "replicas: 1", "replicas: no", "replicas",
     "defaults.replicas must be an integer of at least 1, got the yes/no value no"),
    ("duplicate top-level key", "defaults:", "federation: again\ndefaults:", "again", 'duplicate key "federation"'),
]  # fmt: skip


@pytest.mark.parametrize(
    "old, new, needle, message",
    [row[1:] for row in BAD_FEDERATION_EDITS],
    ids=[row[0] for row in BAD_FEDERATION_EDITS],
)
def test_a_bad_federation_file_is_refused_with_one_problem_at_the_right_line(tmp_path, old, new, needle, message):
    text = edited(FEDERATION, old, new)
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER}, text)

    problems = problems_of(directory)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{os.path.join(directory, 'federation.yml')}:{line_of(text, needle)}: "), problems
    assert message in problems[0]


# --- names used twice, broken files ------------------------------------------------------


def test_a_node_name_used_twice_in_a_member_is_refused_at_the_second_naming_the_first(tmp_path):
    second = f"  - name: web1\n    address: 203.0.113.11\n    user: mutualbackup\n    host_key: {ed25519_host_key(2)}\n"
    text = MEMBER + second
    directory = write_inventory(tmp_path, {"coopcycle.yml": text})
    file = os.path.join(directory, "members", "coopcycle.yml")

    assert problems_of(directory) == [
        f'{file}:{len(MEMBER.splitlines()) + 1}: node name "web1" is used twice in this member (first at {file}:5);'
        " node names must be unique within a member"
    ]


def test_a_second_file_claiming_a_member_is_refused_its_name_binds_it(tmp_path):
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER, "mallory.yml": MEMBER.replace("web1", "web2")})
    second = os.path.join(directory, "members", "mallory.yml")

    assert problems_of(directory) == [
        f'{second}:1: this file says member "coopcycle", and its name says "mallory": members/NAME.yml holds '
        "member NAME (rename the file, or correct member:)"
    ]


@pytest.mark.parametrize("make", ["dangling symlink", "symlink to a file outside", "directory", "fifo"])
def test_anything_but_a_regular_file_under_members_is_an_error_never_a_silent_skip(tmp_path, make):
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER})
    outside = tmp_path / "outside.yml"
    outside.write_text(MEMBER.replace("coopcycle", "x"))
    path = Path(directory) / "members" / "x.yml"
    if make == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere.yml")
    elif make == "symlink to a file outside":
        path.symlink_to(outside)
    elif make == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    [problem] = problems_of(directory)
    kind = {"directory": "a directory", "fifo": "not a regular file"}.get(make, "a symlink")
    assert problem == f"{path}:1: a member file must be a regular file, and this is {kind}; replace it with the file itself"


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("member: coopcycle\nnodes:\n  - name: web1\n   address: x\n", 4, "not valid YAML: "),
        ("member: coopcycle\nsite: [paris\n", 3, "not valid YAML: "),
        ("- member: coopcycle\n", 1, "the member file must be a mapping of keys (member, contact, site, admins, nodes)"),
        ("# nothing but a comment\n", 1, "the file is empty; it must hold member, site and nodes"),
        ("member: a\n---\nmember: b\n", 2, "not valid YAML: "),
        ("member: coopcycle\nsite: x\n", 1, 'the member file is missing the required key "nodes"'),
        ("member: coopcycle\nsite: x\nnodes: []\n", 3, "nodes must not be empty"),
    ],
    ids=["bad indentation", "unclosed list", "top level is a list", "empty", "two documents", "no nodes",
         "empty nodes"],
)
def test_a_member_file_that_is_not_a_member_mapping_is_one_problem(tmp_path, text, line, message):
    directory = write_inventory(tmp_path, {"coopcycle.yml": text})
    file = os.path.join(directory, "members", "coopcycle.yml")

    problems = problems_of(directory)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{file}:{line}: {message}"), problems


def test_a_member_file_that_is_not_utf8_is_one_problem_at_its_line(tmp_path):
    directory = write_inventory(tmp_path, {})
    (tmp_path / "members" / "coopcycle.yml").write_bytes(b"member: coopcycle\ncontact: caf\xe9\n")

    assert problems_of(directory) == [
        f"{os.path.join(directory, 'members', 'coopcycle.yml')}:2: is not UTF-8 text (save the file as UTF-8)"
    ]


def test_a_missing_federation_file_and_an_empty_members_directory_are_named(tmp_path):
    directory = str(tmp_path)
    (tmp_path / "members").mkdir()

    assert problems_of(directory) == [
        f"{os.path.join(directory, 'federation.yml')}:1: file not found",
        f"{os.path.join(directory, 'members')}:1: no member files (*.yml) found; add one MEMBER.yml per member",
    ]


def test_a_missing_members_directory_is_named(tmp_path):
    (tmp_path / "federation.yml").write_text(FEDERATION)

    assert problems_of(str(tmp_path)) == [
        f"{os.path.join(str(tmp_path), 'members')}:1: directory not found; it must hold one MEMBER.yml file per member"
    ]


def test_a_member_file_ending_in_yaml_is_refused_rather_than_silently_ignored(tmp_path):
    directory = write_inventory(tmp_path, {"coopcycle.yml": MEMBER, "other.yaml": MEMBER})

    assert problems_of(directory) == [
        f"{os.path.join(directory, 'members', 'other.yaml')}:1: member files must end in .yml,"
        " so this one would be ignored; rename it"
    ]


def test_a_wrong_default_is_reported_once_in_federation_yml_and_not_in_every_member(tmp_path):
    federation_text = FEDERATION + "  capacity: lots\n"
    member = edited(MEMBER, "      capacity: 500GiB\n", "")
    other = member.replace("coopcycle", "framasoft")
    directory = write_inventory(tmp_path, {"coopcycle.yml": member, "framasoft.yml": other}, federation_text)

    problems = problems_of(directory)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{os.path.join(directory, 'federation.yml')}:7: defaults.capacity: \"lots\"")


# --- everything at once ------------------------------------------------------------------


def test_every_problem_in_every_file_is_reported_at_once_in_file_and_line_order(tmp_path):
    federation_text = edited(FEDERATION, "state: /var/lib/mutualbackup", "state: relative")
    bad_name = edited(MEMBER, "name: web1", 'name: "a;rm -rf x"')
    bad_paths = edited(
        MEMBER.replace("coopcycle", "framasoft"), "paths: [/etc]", 'paths: ["/srv/$(touch /tmp/pwned)"]'
    )
    bad_paths = edited(bad_paths, "port: 22", "port: true")
    directory = write_inventory(tmp_path, {"coopcycle.yml": bad_name, "framasoft.yml": bad_paths}, federation_text)
    names = ("federation.yml", "members/coopcycle.yml", "members/framasoft.yml")
    where = {name: os.path.join(directory, *name.split("/")) for name in names}

    with pytest.raises(InventoryError) as caught:
        load_inventory(directory)

    lines = [problem.split(": ", 1)[0] for problem in caught.value.problems]
    assert lines == [
        f"{where['federation.yml']}:4",
        f"{where['members/coopcycle.yml']}:5",
        f"{where['members/framasoft.yml']}:7",
        f"{where['members/framasoft.yml']}:11",
    ]
    assert caught.value.exit_code == 2
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_problems_within_a_file_come_in_line_order_even_when_found_out_of_order(tmp_path):
    # "capacity is missing" is only known after the rest of storage: was read
    text = edited(edited(MEMBER, "      capacity: 500GiB\n", ""), "path: /srv/mutualbackup", "path: relative")
    federation_text = edited(FEDERATION, "  replicas: 1\n", "  replicas: 1\n  window: nope\n")
    directory = write_inventory(tmp_path, {"coopcycle.yml": text}, federation_text)

    problems = problems_of(directory)

    file = os.path.join(directory, "members", "coopcycle.yml")
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        f"{os.path.join(directory, 'federation.yml')}:7",
        f"{file}:{line_of(text, 'storage:')}",
        f"{file}:{line_of(text, 'path: relative')}",
    ]


def test_a_path_object_is_accepted_and_problems_name_files_under_it(tmp_path):
    write_inventory(tmp_path, {"coopcycle.yml": edited(MEMBER, "port: 22", "port: 0")})

    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path)

    assert caught.value.problems[0].startswith(f"{tmp_path / 'members' / 'coopcycle.yml'}:7: port must be")


def test_the_fixture_survives_a_copy_to_another_directory(tmp_path):
    shutil.copytree(FIXTURES / "three-members", tmp_path / "inventory")

    federation = load_inventory(str(tmp_path / "inventory"))

    assert federation.directory == str(tmp_path / "inventory")
    assert federation.node("coopcycle/web1").where.file == str(tmp_path / "inventory" / "members" / "coopcycle.yml")


# --- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("20GiB", 20 * 1024**3),
        ("1.5GiB", 1536 * 1024**2),
        ("1.5 GiB", 1536 * 1024**2),
        ("500GB", 500 * 10**9),
        ("2TB", 2 * 10**12),
        ("3TiB", 3 * 1024**4),
        ("10KiB", 10240),
        ("7MB", 7 * 10**6),
        ("4096", 4096),
        ("0", 0),
        ("12B", 12),
    ],
)
def test_sizes_parse_to_bytes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "20 apples", "-1GiB", "20gib", "1.5", "1,5GiB", "20 Gi B", "0x10"])
def test_things_that_are_not_sizes_are_refused_with_the_units_listed(text):
    with pytest.raises(ValueError, match=r"is not a size; .*units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"):
        parse_size(text)


@pytest.mark.parametrize(
    "text, seconds",
    [("26h", 26 * 3600), ("30s", 30), ("5m", 300), ("7d", 7 * 86400), ("2w", 14 * 86400), ("1h30m", 5400),
     ("1h 30m", 5400), ("1d 2h 3m 4s", 93784), ("0s", 0)],
)  # fmt: skip
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "3600", "1.5h", "1y", "26 hours", "-1h", "1h-30m"])
def test_things_that_are_not_durations_are_refused_with_the_units_listed(text):
    with pytest.raises(ValueError, match=r"is not a duration; .*units: s, m, h, d, w"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, bits",
    [("100Mbit", 10**8), ("1Gbit", 10**9), ("1.5Gbit", 15 * 10**8), ("512kbit", 512000), ("800bit", 800),
     ("100Mbit/s", 10**8)],
)  # fmt: skip
def test_bandwidths_parse_to_bits_per_second(text, bits):
    assert parse_bandwidth(text) == bits


@pytest.mark.parametrize("text", ["100", "100MB", "100Mbps", "fast", "100 Mbit/h"])
def test_things_that_are_not_bandwidths_are_refused(text):
    with pytest.raises(ValueError, match="is not a bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    "text, window",
    [("01:00-06:00", Window(60, 360)), ("22:00-04:00", Window(1320, 240)), ("00:00-23:59", Window(0, 1439)),
     ("22:30-24:00", Window(1350, 0)), ("1:05-2:10", Window(65, 130))],
)  # fmt: skip
def test_windows_parse_to_minutes_and_may_cross_midnight(text, window):
    assert parse_window(text) == window


@pytest.mark.parametrize(
    "text, message",
    [("01:00-01:00", "starts and ends at the same time"), ("00:00-24:00", "starts and ends at the same time"),
     ("25:00-06:00", "is not a window"), ("01:60-06:00", "is not a window"), ("01:00", "is not a window"),
     ("24:00-01:00", "is not a window"), ("1-6", "is not a window"), ("01:00-06:00-07:00", "is not a window")],
)  # fmt: skip
def test_things_that_are_not_windows_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_window(text)


@pytest.mark.parametrize(
    "size, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536 * 1024**2, "1.5 GiB"), (20 * 1024**3, "20 GiB"),
     (1024**2 - 1, "1 MiB"), (5 * 1024**4, "5 TiB"), (3000 * 1024**4, "3000 TiB"), (-2048, "-2 KiB")],
)  # fmt: skip
def test_sizes_format_for_humans(size, text):
    assert format_size(size) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (7500, "2h 5m"), (86400 + 7200, "1d 2h"), (30 * 86400, "30d"), (93784, "1d 2h 3m 4s"),
     (-90, "-1m 30s"), (59.9, "59s")],
)  # fmt: skip
def test_durations_format_for_humans(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, 1, 59, 60, 3599, 3600, 5400, 86399, 86400, 93784, 30 * 86400, 400 * 86400 + 1])
def test_formatted_durations_parse_back_to_the_same_seconds(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1536, 20 * 1024**3, 1536 * 1024**2, 7 * 1024**4])
def test_formatted_sizes_of_round_values_parse_back_to_the_same_bytes(size):
    assert parse_size(format_size(size).replace(" ", "")) == size


@pytest.mark.parametrize("size", [1000, 1100, 123_456_789, 10**12, 987_654_321_012])
def test_formatted_sizes_parse_back_within_the_rounding_of_one_decimal(size):
    # one decimal of a unit the value is at least 1 of: off by at most 0.05 of it, i.e. 5%
    assert abs(parse_size(format_size(size)) - size) <= 0.05 * size


def test_bandwidths_format_for_humans_and_parse_back():
    assert [format_bandwidth(bits) for bits in (800, 512_000, 10**8, 15 * 10**8)] == [
        "800 bit/s", "512 kbit/s", "100 Mbit/s", "1.5 Gbit/s",
    ]  # fmt: skip
    assert parse_bandwidth(format_bandwidth(15 * 10**8).replace(" ", "")) == 15 * 10**8


@pytest.mark.parametrize("workdir", ["/srv/mb%h", '/srv/"mb"', "~/%d"])
def test_a_workdir_that_ssh_would_expand_or_misquote_is_refused(workdir: str) -> None:
    from mutualbackup.inventory.value_checks import check_home_path

    with pytest.raises(ValueError, match="% or a double quote"):
        check_home_path(workdir)


# --- admins and node keys ------------------------------------------------------------------

NODE_KEY = "age1" + "q" * 58


def test_admins_and_a_node_key_are_read_into_the_model(tmp_path: Path):
    text = edited(MEMBER, "site: paris-nord\n",
                  f"site: paris-nord\nadmins:\n  - name: alice\n    key: {admin_key_line(7)} alice@coopcycle\n")
    text = edited(text, "    port: 22\n", f"    port: 22\n    node_key: {NODE_KEY}\n")
    federation = load_inventory(write_inventory(tmp_path, {"coopcycle.yml": text}))
    [member] = federation.members
    assert [(a.name, a.key) for a in member.admins] == [("alice", admin_key_line(7))]
    assert member.nodes[0].node_key == NODE_KEY


def admin_key_line(seed: int) -> str:
    """A real ``ssh-ed25519`` public key (of the private key ``seed`` repeated), as an admin's ``.pub`` has it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32).public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def rsa_key(bits: int, negative: bool = False) -> str:
    """An ``ssh-rsa`` public key line with a modulus of ``bits`` bits (not a real key: the loader reads its size);
    ``negative``: its modulus written without the zero byte that keeps it positive, which OpenSSH refuses."""
    modulus = ((1 << (bits - 1)) | 1).to_bytes(bits // 8 + (0 if negative else 1), "big")
    blob = ssh_string(b"ssh-rsa") + ssh_string(b"\x01\x00\x01") + ssh_string(modulus)
    return "ssh-rsa " + base64.b64encode(blob).decode()


@pytest.mark.parametrize("admins, message", [
    pytest.param("admins: []\n", "admins must not be empty", id="an empty list"),
    pytest.param("admins:\n  - name: alice\n", 'admins item 1 is missing the required key "key"', id="no key"),
    pytest.param("admins:\n  - name: alice\n    key: ssh-ed25519 AAAA\n", "admins.key", id="a key that does not parse"),
    pytest.param(f"admins:\n  - name: alice\n    key: {ed25519_host_key(1, b'ecdsa-sha2-nistp256')}\n",
                 "admins.key", id="a key type that cannot open a kit"),
    pytest.param(f"admins:\n  - name: Alice Smith\n    key: {admin_key_line(7)}\n", "admins.name", id="not a name"),
    pytest.param(f"admins:\n  - name: a\n    key: {admin_key_line(7)}\n  - name: a\n    key: {admin_key_line(8)}\n",
                 'admin "a" is listed twice', id="twice"),
])
def test_a_bad_admins_list_is_an_error_at_its_line(tmp_path: Path, admins: str, message: str):
    text = edited(MEMBER, "site: paris-nord\n", "site: paris-nord\n" + admins)
    problems = problems_of(write_inventory(tmp_path, {"coopcycle.yml": text}))
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize("key, why", [
    (ed25519_key(NEUTRAL_POINT), "not a point any private key makes"),
    (ed25519_key(bytes(32)), "not a point any private key makes"),
    (ed25519_key(bytes([7]) * 32), "not a point any private key makes"),
    (rsa_key(1016), "its ssh-rsa key has 1016 bits"),
    (rsa_key(2048, negative=True), "modulus reads as a negative number"),
], ids=["the neutral point", "a point of order 4", "not on the curve", "a small rsa key", "a negative rsa modulus"])
def test_an_admin_key_no_signature_can_be_trusted_from_is_read_but_refused_where_admins_are_trusted(
        tmp_path: Path, key: str, why: str):
    """Every command reads such an inventory (generated test federations write made-up keys); `check` names the
    admin, and nodes refuse the file (node tests) and join (join tests): an ed25519 point of small order signs
    any file, and OpenSSH verifies nothing with such RSA keys."""
    from mutualbackup.inventory.value_checks import check_signing_key

    text = edited(MEMBER, "site: paris-nord\n", f"site: paris-nord\nadmins:\n  - name: eve\n    key: {key}\n")
    [member] = load_inventory(write_inventory(tmp_path, {"coopcycle.yml": text})).members
    assert [a.key for a in member.admins] == [key]
    with pytest.raises(ValueError, match=why):
        check_signing_key(key)
    assert check_signing_key(admin_key_line(7)) == admin_key_line(7)


def test_a_node_key_that_is_not_an_age_recipient_is_an_error(tmp_path: Path):
    text = edited(MEMBER, "    port: 22\n", "    port: 22\n    node_key: ssh-ed25519 AAAA\n")
    problems = problems_of(write_inventory(tmp_path, {"coopcycle.yml": text}))
    assert len(problems) == 1 and "is not a node key" in problems[0], problems
