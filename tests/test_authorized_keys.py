"""The managed block of authorized_keys and the forced-command line, by value."""

from __future__ import annotations

import shlex

import pytest

from labkit import dequote_command

from mutualbackup.borg import authorized_keys_line
from mutualbackup.borg import BEGIN, END, managed_lines, replace_block, replica_quota
from mutualbackup.jobs.provision import quota_size
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"


def openssh_command_option(line: str) -> str:
    command, rest = dequote_command(line)
    assert rest.startswith(",restrict ")
    return command


@pytest.mark.parametrize(
    "repository",
    ["/srv/mb/coop/web1", "/srv/it's \"here\" now/coop/web1", "/srv/back\\slash \\\"/x", "/srv/été -- --append-only=no/x"],
)
def test_the_forced_command_gives_borg_serve_exactly_the_repository_path(repository: str) -> None:
    line = authorized_keys_line("/opt/borg", repository, 20 * 1024**3, KEY + " comment", "mutualbackup:coop/web1")
    argv = shlex.split(openssh_command_option(line))
    assert argv == [
        "/opt/borg", "serve", "--restrict-to-repository", repository, "--append-only", "--storage-quota", str(20 * 1024**3)
    ]
    assert line.endswith(f",restrict {KEY} mutualbackup:coop/web1")


def test_the_block_is_added_at_the_end_and_other_lines_are_kept_byte_for_byte() -> None:
    original = "# admin\nssh-ed25519 AAAA admin@laptop\n\n  odd   spacing  \n"
    updated = replace_block(original, ["line-a", "line-b"])
    assert updated == original + f"{BEGIN}\nline-a\nline-b\n{END}\n"
    assert managed_lines(updated) == ["line-a", "line-b"]


def test_the_block_is_replaced_in_place() -> None:
    text = f"first\n{BEGIN}\nold\n{END}\nlast\n"
    assert replace_block(text, ["new"]) == f"first\n{BEGIN}\nnew\n{END}\nlast\n"


def test_an_empty_block_is_removed_and_a_missing_file_stays_empty() -> None:
    assert replace_block(f"first\n{BEGIN}\nold\n{END}\n", []) == "first\n"
    assert replace_block("", []) == ""


def test_replacing_twice_is_idempotent() -> None:
    once = replace_block("keep\n", ["a"])
    assert replace_block(once, ["a"]) == once


@pytest.mark.parametrize(
    "size, capacity, quota",
    [(0, 500 * 1024**3, 10 * 1024**3), (20 * 1024**3, 500 * 1024**3, 40 * 1024**3), (400 * 1024**3, 500 * 1024**3, 500 * 1024**3)],
)
def test_the_quota_is_twice_the_size_at_least_10_gib_at_most_the_host(size: int, capacity: int, quota: int) -> None:
    assert replica_quota(size, capacity) == quota


@pytest.mark.parametrize(
    "measured, estimate, size",
    [(None, 5 * 1024**3, 5 * 1024**3), (3 * 1024**3, 5 * 1024**3, 5 * 1024**3), (8 * 1024**3, 5 * 1024**3, 8 * 1024**3),
     (None, None, 0), (2 * 1024**3, None, 2 * 1024**3)],
)
def test_the_quota_follows_the_larger_of_the_measured_size_and_the_estimate(
    measured: int | None, estimate: int | None, size: int
) -> None:
    from mutualbackup.inventory.model import Backup, Node, Retention

    backup = Backup(paths=("/srv",), estimate=estimate, retention=Retention(daily=7))
    source = Node(member="alpha", slug="web", address="web.example", port=22, user="mb", host_key=KEY, backup=backup)
    sizes = {} if measured is None else {"alpha/web": measured}
    assert quota_size(source, sizes) == size


@pytest.mark.parametrize(
    "text",
    [
        f"keep\n{BEGIN}\nold line\n",  # END lost
        f"keep\n{END}\n{BEGIN}\nx\n",  # markers in the wrong order
        f"{BEGIN}\na\n{END}\n{BEGIN}\nb\n{END}\n",  # two blocks
    ],
)
def test_a_damaged_block_is_refused_rather_than_guessed(text: str) -> None:
    from mutualbackup.borg import DamagedBlock
    with pytest.raises(DamagedBlock, match="fix the file by hand"):
        replace_block(text, ["new"])
    with pytest.raises(DamagedBlock):
        managed_lines(text)


def test_lines_outside_the_block_keep_crlf_and_unusual_characters() -> None:
    original = "ssh-ed25519 AAAA admin\r\n# note\u2028still the same line\nlast without newline"
    updated = replace_block(original, ["managed"])
    assert updated.startswith(original + "\n")
    assert replace_block(updated, []) == original + "\n"


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028"])
@pytest.mark.parametrize("part", ["borg", "repository", "public_key", "comment"])
def test_a_control_character_in_any_part_of_the_line_is_refused(part: str, char: str) -> None:
    parts = {"borg": "/opt/borg", "repository": "/srv/mb/coop/web1", "public_key": KEY, "comment": "mutualbackup:coop/web1"}
    parts[part] += f"{char}ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIATTACKER x"
    with pytest.raises(ValueError):
        authorized_keys_line(parts["borg"], parts["repository"], 20 * 1024**3, parts["public_key"], parts["comment"])
