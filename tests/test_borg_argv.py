"""The argv and environment of every borg command, exactly, and the small host-side scripts run on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mutualbackup import borg
from mutualbackup.inventory.model import Backup, Node, Retention

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
URL = "ssh://mb@192.0.2.7:2222/srv/mb/coop/web1"


def test_init_argv_makes_a_repokey_blake2_repository() -> None:
    assert borg.init_argv("/usr/bin/borg", URL) == ("/usr/bin/borg", "init", "--encryption=repokey-blake2", URL)


def test_create_argv_logs_json_excludes_and_ends_with_the_paths_after_a_double_dash() -> None:
    backup = Backup(paths=("/etc", "-rf /", "/srv/it's \"here\""), exclude=("*.cache", "/srv/tmp"), compression="zstd,9")
    assert borg.create_argv("borg", URL, "web1-2025-01-02T03:04:05", backup) == (
        "borg", "create", "--json", "--log-json", "--lock-wait", "600", "--compression", "zstd,9",
        "--exclude", "*.cache", "--exclude", "/srv/tmp", f"{URL}::web1-2025-01-02T03:04:05",
        "--", "/etc", "-rf /", "/srv/it's \"here\"",
    )


def test_the_client_environment_reads_the_passphrase_file_and_trusts_only_pinned_host_keys() -> None:
    env = borg.client_env(borg.SourcePaths("/var/lib/mb work"))
    assert env == {
        "BORG_EXIT_CODES": "modern", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
        "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO", "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "NO",
        "BORG_DISPLAY_PASSPHRASE": "no",
        "BORG_PASSCOMMAND": "cat '/var/lib/mb work/passphrase'",
        "BORG_BASE_DIR": "/var/lib/mb work/borg",
        "BORG_RSH": (
            "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -i '/var/lib/mb work/id_ed25519' "
            "-o 'UserKnownHostsFile=\"/var/lib/mb work/known_hosts\"' -o GlobalKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=yes -o UpdateHostKeys=no -o ServerAliveInterval=10 -o ServerAliveCountMax=30 "
            "-o ConnectTimeout=20"
        ),
    }


def test_every_exit_code_is_classified_once_and_succeeded_means_success_or_warning() -> None:
    assert [c for c in (0, 1, 100, 105, 107) if borg.succeeded(c)] == [0, 1, 100, 105, 107]
    assert [c for c in (-1, 2, 13, 14, 20, 44, 73, 80, 255) if borg.succeeded(c)] == []
    assert borg.exit_hint(44).startswith("the repository's own key is missing")


def test_prune_argv_keeps_the_retention_flags_in_order_and_only_touches_the_sources_archives() -> None:
    argv = borg.prune_argv("/usr/bin/borg", URL, Retention(daily=7, weekly=4, monthly=6), "web1-*")
    assert argv == ("/usr/bin/borg", "prune", "--lock-wait", "600", "--glob-archives", "web1-*",
                    "--keep-daily=7", "--keep-weekly=4", "--keep-monthly=6", URL)


def test_the_archive_glob_matches_the_archive_names_the_coordinator_gives() -> None:
    node = Node(member="coop", slug="web1", address="a", port=22, user="u", host_key=HOST_KEY)
    assert borg.archive_glob(node) == "web1-*"
    import datetime as dt
    import fnmatch

    assert fnmatch.fnmatchcase(borg.archive_name(node, dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)), "web1-*")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ("borg", "check", "--lock-wait", "600", "/srv/mb/coop/web1")),
        ({"repository_only": True}, ("borg", "check", "--lock-wait", "600", "--repository-only", "/srv/mb/coop/web1")),
        ({"archives_only": True}, ("borg", "check", "--lock-wait", "600", "--archives-only", "/srv/mb/coop/web1")),
    ],
)
def test_check_argv_asks_for_the_part_of_the_check_wanted(kwargs: dict, expected: tuple) -> None:
    assert borg.check_argv("borg", "/srv/mb/coop/web1", **kwargs) == expected


def test_check_argv_refuses_both_halves_at_once() -> None:
    with pytest.raises(ValueError):
        borg.check_argv("borg", "/x", repository_only=True, archives_only=True)


def test_compact_and_break_lock_run_on_the_repository_path_of_the_host() -> None:
    assert borg.compact_argv("borg", "/srv/mb/a b/web1") == ("borg", "compact", "--lock-wait", "600", "/srv/mb/a b/web1")
    assert borg.break_lock_argv("borg", "/srv/mb/coop/web1") == ("borg", "break-lock", "/srv/mb/coop/web1")


def test_the_host_environment_has_no_passphrase_and_its_own_base_dir() -> None:
    env = borg.host_env("/home/mb/.mutualbackup")
    assert env["BORG_BASE_DIR"] == "/home/mb/.mutualbackup/borg"
    assert env["BORG_EXIT_CODES"] == "modern" and env["TZ"] == "UTC"
    assert not {"BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_RSH"} & set(env)


@pytest.mark.parametrize(("name", "expected"), [
    ("web1-2025-01-01T00:00:00", False), ("web1-2025-01-01T00:00:00.checkpoint", True),
    ("web1-2025-01-01T00:00:00.checkpoint.3", True), ("checkpoint-web1", False),
])
def test_checkpoint_archives_are_told_apart_by_their_suffix(name: str, expected: bool) -> None:
    assert borg.is_checkpoint(name) is expected


def test_a_lock_listing_names_the_host_and_every_holder_of_the_exclusive_lock_and_the_roster() -> None:
    stdout = (b"store1.example.org\n"
              b"exclusive store1.example.org@52242086474155.2345-0\n"
              b'roster {"shared": [], "exclusive": [["store1.example.org@52242086474155", 2345, 0]]}\n')
    hostname, holders = borg.parse_lock_listing(stdout)
    assert hostname == "store1.example.org"
    assert [(h.host, h.pid, h.thread, h.kind, h.hostname) for h in holders] == [
        ("store1.example.org@52242086474155", 2345, 0, "exclusive", "store1"),
        ("store1.example.org@52242086474155", 2345, 0, "roster-exclusive", "store1"),
    ]


def test_a_malformed_lock_file_name_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError):
        borg.parse_lock_listing(b"h\nexclusive garbage\n")


def fake_repository(root: Path) -> Path:
    repo = root / "it's a repo"
    (repo / "data" / "0").mkdir(parents=True)
    (repo / "config").write_text("[repository]\n")
    for n, size in ((1, 100), (2, 5000)):
        segment = repo / "data" / "0" / str(n)
        segment.write_bytes(b"x" * size)
        os.utime(segment, (1_700_000_000 + n, 1_700_000_000 + n))
    return repo


def run(argv: tuple[str, ...]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, timeout=30)


def test_the_repository_facts_script_sums_segments_and_finds_the_last_write(tmp_path: Path) -> None:
    repo = fake_repository(tmp_path)
    result = run(borg.repository_facts_argv(str(repo)))
    assert result.returncode == 0, result.stderr
    facts = borg.parse_repository_facts(result.stdout)
    assert facts == borg.RepositoryFacts(segments=2, bytes=5100, last_write=1_700_000_002.0)
    assert run(borg.repository_facts_argv(str(tmp_path / "gone"))).returncode == borg.REPOSITORY_MISSING
    (repo / "config").unlink()
    assert run(borg.repository_facts_argv(str(repo))).returncode == borg.REPOSITORY_NOT_BORG


def test_the_lock_listing_script_reads_borgs_lock_files(tmp_path: Path) -> None:
    repo = fake_repository(tmp_path)
    assert borg.parse_lock_listing(run(borg.lock_listing_argv(str(repo))).stdout)[1] == []
    (repo / "lock.exclusive").mkdir()
    (repo / "lock.exclusive" / "h.example@77.4242-0").touch()
    (repo / "lock.roster").write_text(json.dumps({"exclusive": [["h.example@77", 4242, 0]]}))
    result = run(borg.lock_listing_argv(str(repo)))
    hostname, holders = borg.parse_lock_listing(result.stdout)
    if shutil.which("python3") and "BORG_HOST_ID" not in os.environ:
        from borg.platform import hostid  # borg's own id, the one it writes into lock files

        assert hostname == hostid
    assert {(h.pid, h.kind) for h in holders} == {(4242, "exclusive"), (4242, "roster-exclusive")}
    assert run(borg.lock_listing_argv(str(tmp_path / "gone"))).returncode == 3


def test_new_exit_hints_say_that_a_closed_connection_is_retried() -> None:
    assert "retried" in borg.exit_hint(80) and "retried" in borg.exit_hint(81)
    assert borg.classify_exit(80) == "retry"
