"""The recovery file by value: format, round trip, damage, and a private, never-overwritten file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from mutualbackup.errors import UsageError
from mutualbackup.keys import FORMAT, Recovery, RecoveryRepository, parse, read_recovery, render, write_private

KEY_ID = "e4ab17b9008f422cea378131e97051073b96449e800405fe204f6181310071cb"


def sample(passphrase: str = "Zm9vYmFy+/=") -> Recovery:
    return Recovery(
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
    assert read_recovery(str(path)) == sample()
    with pytest.raises(UsageError):
        write_private(str(path), "other")
    assert read_recovery(str(path)) == sample()
    with pytest.raises(UsageError):
        read_recovery(str(tmp_path / "absent"))
