"""The recovery file by value: format, round trip, damage, and a private, never-overwritten file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.restore.kit import FORMAT, RecoveryFile, RecoveryRepository, parse, render
from mutualbackup.restore.recovery_file import open_kit, write_private

KEY_ID = "e4ab17b9008f422cea378131e97051073b96449e800405fe204f6181310071cb"


def sample(passphrase: str = "Zm9vYmFy+/=") -> RecoveryFile:
    return RecoveryFile(
        source="coop/web1",
        federation="fed",
        exported="2026-03-01T12:00:00Z",
        passphrase=passphrase,
        repositories=(
            RecoveryRepository("pica/store1", "/srv/mb/coop/web1", "ssh://mb@10.0.0.2:22/srv/mb/coop/web1", KEY_ID,
                               f"BORG_KEY {KEY_ID}\nhqlhbGdvcml0aG2m\nc2hhMjU2pGRhdGHa\n"),
            RecoveryRepository("ouv/mail1", "/srv/it's here/coop/web1", "ssh://mb@10.0.0.3:22/srv/it's here/coop/web1", KEY_ID,
                               f"BORG_KEY {KEY_ID}\nAAAA\n"),
        ),
    )


@pytest.mark.parametrize("passphrase", ["Zm9vYmFy+/=", "a: b # not a comment", "'quoted' \"too\" été", "-leading"])
def test_a_recovery_file_round_trips_any_passphrase_and_key(passphrase: str) -> None:
    recovery = sample(passphrase)
    assert parse(render(recovery)) == recovery


def test_the_file_starts_with_a_warning_and_instructions_and_is_plain_yaml() -> None:
    text = render(sample())
    header = text.split("\nformat:")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    for words in ("SECRET", "OFFLINE", "mutualbackup restore coop/web1", "--recovery", "borg key import"):
        assert words in header
    assert yaml.safe_load(text)["format"] == FORMAT


def test_the_passphrase_is_never_in_the_repr() -> None:
    assert "Zm9vYmFy" not in repr(sample()) and "hidden" in repr(sample())


@pytest.mark.parametrize(
    "text, message",
    [
        ("hello: world\n", "not a mutualbackup recovery file"),
        ("[unclosed\n", "not YAML"),
        (f"format: {FORMAT}\nsource: coop/web1\n", "'passphrase' is missing; 'repositories' is missing"),
        (f"format: {FORMAT}\nsource: s\npassphrase: p\nrepositories: [{{host: h, path: rel, key: k}}]\n", "path must be absolute"),
        (f"format: {FORMAT}\nsource: s\npassphrase: p\nrepositories: [{{host: h}}]\n", "needs host, path and key"),
    ],
)
def test_a_damaged_or_foreign_file_is_refused_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        parse(text, "safe.txt")
    assert message in str(error.value) and "safe.txt" in str(error.value)


def test_the_file_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "recovery"
    write_private(str(path), render(sample()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse(path.read_text()) == sample()
    with pytest.raises(UsageError):
        write_private(str(path), "other")
    assert parse(path.read_text()) == sample()
    with pytest.raises(UsageError):
        open_kit(str(tmp_path / "absent"), str(path))


# --- damage: never the file's text, never a traceback --------------------------------------

SECRET = "Zm9vYmFyU2VjcmV0UGFzcw"


def document(passphrase_line: str = f"passphrase: {SECRET}", repositories: str = "") -> str:
    """A recovery file whose passphrase is on line 4."""
    repositories = repositories or f"repositories: [{{host: pica/store1, path: /srv/mb/coop/web1, key: 'BORG_KEY {KEY_ID}'}}]"
    return f"# header\nformat: {FORMAT}\nsource: coop/web1\n{passphrase_line}\n{repositories}\n"


@pytest.mark.parametrize(
    "line",
    [
        f'passphrase: "{SECRET}\\q"',  # an unknown escape
        f"passphrase: *{SECRET}",  # an alias: YAML's problem itself quotes it
        f"passphrase: !!python/name:{SECRET} x",  # a tag: quoted too
        f"passphrase: !!python/name:{SECRET}'s x",  # quoted with double quotes, then
        f"passphrase: {SECRET}: x",  # a mapping where a value was expected
        f"passphrase: '{SECRET}",  # unclosed quote
    ],
)
def test_a_broken_passphrase_line_is_reported_by_its_line_number_never_by_its_text(line: str) -> None:
    with pytest.raises(UsageError) as error:
        parse(document(line), "safe.txt")
    message = str(error.value)
    assert SECRET not in message and SECRET[:8] not in message
    assert "safe.txt" in message and "not YAML" in message and "line " in message


def test_a_yaml_error_names_the_line_where_yaml_found_it() -> None:
    with pytest.raises(UsageError) as error:
        parse(document(f'passphrase: "{SECRET}\\q"'), "safe.txt")
    assert "unknown escape character" in str(error.value) and "line 4" in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"repositories": "repositories: 5"}, "'repositories' must be a list"),
        ({"repositories": "repositories: {host: pica/store1}"}, "'repositories' must be a list"),
        ({"repositories": "repositories: [5]"}, "repository #1 needs host, path and key"),
        ({"passphrase_line": "passphrase: 12345"}, "'passphrase' must be text, not int"),
        ({"passphrase_line": "passphrase: [a, b]"}, "'passphrase' must be text, not list"),
        ({"repositories": "repositories: [{host: 7, path: /srv/mb/coop/web1, key: k}]"}, "repository #1: host must be text"),
        ({"repositories": "repositories: [{host: pica/store1, path: [/srv], key: k}]"}, "repository #1: path must be text"),
        ({"repositories": "repositories: [{host: pica/store1, path: /srv, key: {a: 1}}]"}, "repository #1: key must be text"),
        ({"repositories": "repositories: [{host: pica/store1, path: /srv, key: k, url: [x]}]"}, "repository #1: url must be text"),
        ({"repositories": "repositories: [{host: pica/store1, path: /srv, key: k, repository_id: 5}]"}, "repository_id must be text"),
        ({"repositories": "repositories: [{host: pica/store1, path: /a, key: k}, {host: pica/store1, path: /a, key: k}]"},
         "host pica/store1 appears twice"),
        ({"repositories": "repositories: [{host: Pica/store1, path: /a, key: k}]"}, "repository #1: host: \"Pica\" is not a valid name"),
        ({"repositories": "repositories: [{host: pica, path: /a, key: k}]"}, "is not a MEMBER/NODE name"),
        ({"passphrase_line": "passphrase: p\nexported: 2026-13-01"}, "a value cannot be read"),
        ({"passphrase_line": "passphrase: p\nfederation: {a: b}"}, "'federation' must be text"),
        ({"passphrase_line": "passphrase: p\nx: " + "[" * 5000}, "not YAML"),
    ],
)
def test_every_field_of_a_damaged_file_is_checked_for_its_type_without_a_traceback(change: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as error:
        parse(document(**change), "safe.txt")
    assert message in str(error.value) and "safe.txt" in str(error.value)
    assert error.value.exit_code == 2


@pytest.mark.parametrize(
    "source",
    ["coop/web1\nssh-ed25519 AAAA attacker", "coop", "coop/web1/x", "../etc/passwd", "coop/Web1", "coop/", "/web1", "coop/web 1"],
)
def test_the_source_name_of_a_recovery_file_follows_the_slug_rules(source: str) -> None:
    text = document().replace("source: coop/web1", f"source: {json.dumps(source)}")
    with pytest.raises(UsageError) as error:
        parse(text, "safe.txt")
    assert "'source'" in str(error.value) and "\n" not in str(error.value).split("damaged: ", 1)[1]


def test_a_file_that_is_not_a_sealed_kit_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "safe.txt"
    path.write_text(render(sample()))  # a kit in clear is no kit: the coordinator never holds one
    key = admin_key(tmp_path, "alice")
    with pytest.raises(UsageError) as error:
        open_kit(str(path), str(key))
    assert str(path) in str(error.value) and "is not a recovery kit" in str(error.value)


def admin_key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / f"{name}_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def sealed_kit(tmp_path: Path, *keys: Path) -> Path:
    import pyrage
    from pyrage import ssh

    recipients = [ssh.Recipient.from_str(key.with_suffix(".pub").read_text().strip()) for key in keys]
    path = tmp_path / "web1.kit"
    path.write_bytes(pyrage.encrypt(render(sample()).encode(), recipients, armored=True))
    return path


def test_a_kit_opens_with_any_admins_key_and_with_age_itself(tmp_path: Path) -> None:
    alice, bob = admin_key(tmp_path, "alice"), admin_key(tmp_path, "bob")
    kit = sealed_kit(tmp_path, alice, bob)
    assert open_kit(str(kit), str(alice)) == open_kit(str(kit), str(bob)) == sample()
    assert shutil.which("age"), "Debian's age is missing: scripts/setup installs it"
    opened = subprocess.run(["age", "-d", "-i", str(bob), str(kit)], check=True, capture_output=True)
    assert parse(opened.stdout.decode()) == sample()


def test_a_key_that_is_not_an_admins_does_not_open_the_kit(tmp_path: Path) -> None:
    kit = sealed_kit(tmp_path, admin_key(tmp_path, "alice"))
    with pytest.raises(UsageError) as error:
        open_kit(str(kit), str(admin_key(tmp_path, "mallory")))
    assert "does not open" in str(error.value) and "passphrase" not in str(error.value).split("(")[0]


# --- a secret file is complete, or absent ----------------------------------------------------


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_no_partial_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    path = tmp_path / "recovery"

    def fail(fd: int) -> None:
        raise failure

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises((OperationFailed, KeyboardInterrupt)) as error:
        write_private(str(path), render(sample()))
    assert not path.exists()
    if isinstance(failure, OSError):
        assert error.type is OperationFailed and "No space left on device" in str(error.value)
