"""Restore building blocks by value: argv, the temporary authorized_keys line, borg's output, the
progress line. Fast: no lab."""

from __future__ import annotations

from mutualbackup import borg

import datetime as dt
import shlex

import pytest

from mutualbackup.inventory.model import Node
from mutualbackup.borg import url_of

from labkit import dequote_command

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
RID = "20260301T120000Z-abcd1234"


# --- the temporary line ------------------------------------------------------------------


def test_a_restore_id_says_when_it_was_made_and_carries_a_random_token() -> None:
    assert borg.new_restore_id(NOW, "abcd1234") == RID
    assert borg.restore_id_time(RID) == NOW
    assert borg.restore_id_time("not-an-id") is None
    with pytest.raises(ValueError):
        borg.new_restore_id(NOW, "ZZ; rm -rf /")


@pytest.mark.parametrize("repository", ["/srv/mb/coop/web1", "/srv/it's \"here\" now/coop/web1", "/srv/été -- --append-only=no/x"])
def test_the_restore_line_confines_the_key_to_one_repository_read_mostly_and_expires(repository: str) -> None:
    line = borg.restore_line("/opt/borg", repository, KEY + " user@dest", "coop/web1", RID)
    command, rest = dequote_command(line)
    assert shlex.split(command) == [
        "/opt/borg", "serve", "--restrict-to-repository", repository, "--append-only", "--storage-quota", "10M"
    ]
    assert rest == f',restrict,expiry-time="20260301180000Z" {KEY} mutualbackup-restore:coop/web1:{RID}'


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028"])
@pytest.mark.parametrize("part", ["borg", "repository", "public_key", "source"])
def test_a_control_character_in_any_part_of_the_restore_line_is_refused(part: str, char: str) -> None:
    parts = {"borg": "/opt/borg", "repository": "/srv/mb/coop/web1", "public_key": KEY, "source": "coop/web1"}
    parts[part] += f"{char}ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIATTACKER x\n#"
    with pytest.raises(ValueError):
        borg.restore_line(parts["borg"], parts["repository"], parts["public_key"], parts["source"], RID)


def test_restore_lines_are_recognised_and_expire_after_their_lifetime() -> None:
    line = borg.restore_line("borg", "/r", KEY, "coop/web1", RID)
    parsed = borg.parse_restore_line(line)
    assert parsed == borg.RestoreLine("coop/web1", RID, NOW)
    assert borg.parse_restore_line(f'command="borg serve",restrict {KEY} mutualbackup:coop/web1') is None
    assert not borg.is_stale_restore_line(line, NOW + borg.RESTORE_LINE_LIFETIME - dt.timedelta(seconds=1))
    assert borg.is_stale_restore_line(line, NOW + borg.RESTORE_LINE_LIFETIME)
    assert borg.is_stale_restore_line(f"{KEY} mutualbackup-restore:coop/web1:garbage", NOW)  # unreadable id: stale
    replica = f'command="borg serve",restrict {KEY} mutualbackup:coop/web1'
    assert borg.live_restore_lines([replica, line], NOW) == [line]
    assert borg.live_restore_lines([replica, line], NOW + dt.timedelta(days=1)) == []


def test_adding_a_restore_line_keeps_other_lines_and_drops_stale_ones() -> None:
    replica = f'command="borg serve",restrict {KEY} mutualbackup:coop/web1'
    old = borg.restore_line("borg", "/r", KEY, "coop/web1", "20260101T000000Z-dead")
    mine = borg.restore_line("borg", "/r", KEY, "coop/web1", RID)
    other = borg.restore_line("borg", "/r", KEY, "coop/web1", "20260301T115900Z-beef")
    assert borg.with_restore_line([replica, old, other], mine, NOW) == [replica, other, mine]


# --- argv ------------------------------------------------------------------------------


def test_extract_passes_paths_as_literal_prefixes_so_hostile_names_arrive_unchanged() -> None:
    argv = borg.extract_argv("borg", "ssh://u@h:22/r", "web1-2026", ["/etc/re:x", "-rf", "/srv/a b/sh:*"])
    assert argv == (
        "borg", "extract", "--lock-wait", "600", "--log-json", "--list", "--progress", "ssh://u@h:22/r::web1-2026",
        "--", "pp:etc/re:x", "pp:-rf", "pp:srv/a b/sh:*",
    )
    assert borg.extract_argv("borg", "U", "A", dry_run=True, progress=False) == (
        "borg", "extract", "--lock-wait", "600", "--log-json", "--list", "--dry-run", "U::A"
    )
    assert borg.extract_argv("borg", "U", "A", ["/x"], progress=False, exact=True)[-1] == "pf:x"


def test_the_drill_lists_compactly_then_hashes_exactly_the_sample() -> None:
    assert borg.catalogue_argv("borg", "U", "A") == (
        "borg", "list", "--lock-wait", "600", "--format", "{mode}{NUL}{size}{NUL}{path}{NUL}", "U::A"
    )
    assert borg.hashes_argv("borg", "U", "A", ["etc/a", "-b"]) == (
        "borg", "list", "--lock-wait", "600", "--json-lines", "--format",
        "{type}{mode}{path}{size}{mtime}{linktarget}{source}{sha256}", "U::A", "--", "pf:etc/a", "pf:-b",
    )


def test_key_export_prints_to_stdout_and_key_import_reads_stdin() -> None:
    assert borg.key_export_argv("borg", "U") == ("borg", "key", "export", "U")
    assert borg.key_import_argv("borg", "U") == ("borg", "key", "import", "U", "-")


def test_the_repository_url_brackets_ipv6_addresses() -> None:
    node = Node(member="m", slug="h", address="2001:db8::1", port=2222, user="mb", host_key=KEY)
    assert url_of(node, "/srv/mb/c/w") == "ssh://mb@[2001:db8::1]:2222/srv/mb/c/w"


# --- parsing -----------------------------------------------------------------------------


def test_the_catalogue_parses_any_file_name() -> None:
    raw = b"drwxr-xr-x\x000\x00etc\x00-rw-r--r--\x0012\x00etc/new\nline \xc3\xa9\x00hrw-r--r--\x000\x00etc/hard\x00"
    assert borg.parse_catalogue(raw) == [
        borg.Entry("d", 0, "etc"), borg.Entry("-", 12, "etc/new\nline é"), borg.Entry("h", 0, "etc/hard")
    ]
    with pytest.raises(ValueError):
        borg.parse_catalogue(b"-rw-r--r--\x0012\x00")


def test_items_parse_with_their_checksum_and_mtime_in_utc() -> None:
    line = (b'{"type": "-", "mode": "-rwsr-x---", "path": "etc/a b", "size": 2, "mtime": "2026-03-01T12:00:00.250000", '
            b'"linktarget": "", "source": "", "sha256": "ab"}\n')
    [item] = borg.parse_items(line)
    assert item == borg.Item("etc/a b", "-", "-rwsr-x---", 2, NOW.timestamp() + 0.25, "", "", "ab")
    assert item.permissions == 0o4750
    with pytest.raises(ValueError):
        borg.parse_items(b"not json\n")


@pytest.mark.parametrize("mode, bits", [("-rw-r--r--", 0o644), ("drwxrwxrwt", 0o1777), ("-rwSr-Sr-T", 0o7644), ("lrwxrwxrwx", 0o777)])
def test_mode_strings_become_permission_bits(mode: str, bits: int) -> None:
    assert borg.mode_bits(mode) == bits


def test_extract_progress_counts_items_and_bytes_and_keeps_borgs_messages() -> None:
    progress = borg.ExtractProgress(keep_listed=True)
    lines = [
        '{"message": "Calculating total", "current": 0, "total": 0, "type": "progress_percent", "finished": false}',
        '{"type": "log_message", "message": "src/a b", "levelname": "INFO", "name": "borg.output.list"}',
        '{"message": " 50%", "current": 100, "total": 200, "type": "progress_percent", "finished": false}',
        '{"type": "log_message", "message": "src/c", "levelname": "INFO", "name": "borg.output.list"}',
        '{"type": "log_message", "message": "some file vanished", "levelname": "WARNING", "name": "borg.archiver"}',
        '{"type": "progress_percent", "finished": true}',
        "Remote: ssh: connect to host 127.0.0.1 port 1: Connection refused",
    ]
    changed = [progress.feed(line) for line in lines]
    assert changed == [True, True, True, True, False, True, False]
    assert (progress.files, progress.bytes_done, progress.bytes_total) == (2, 200, 200)
    assert progress.listed == ["src/a b", "src/c"]
    assert progress.tail() == "WARNING: some file vanished\nRemote: ssh: connect to host 127.0.0.1 port 1: Connection refused"


def test_a_restores_lines_reach_the_coordinator_thinned_and_are_not_kept_for_the_reply(monkeypatch) -> None:
    """The node relays every listed item and every message of borg's, and how far borg is at most every
    PROGRESS_EVERY seconds, its last word and the last held line included: the coordinator counts what it
    counted from every line. The reply's stderr keeps only borg's messages (not a million listed items)."""
    import json

    from mutualbackup.node import restore

    clock = [0.0]
    monkeypatch.setattr(restore.time, "monotonic", lambda: clock[0])
    relayed: list[str] = []
    relay = restore.Relayed(relayed.append)

    def line(**fields: object) -> str:
        return json.dumps(fields)  # as borg's --log-json writes them

    def progress(current: int, path: str = "srv/big") -> str:
        return line(message=f"{current}%", current=current, total=300, info=[path], operation=1, msgid="extract",
                    type="progress_percent", finished=False)

    listed = [line(type="log_message", message=f"srv/f{i}", levelname="INFO", name="borg.output.list") for i in range(3)]
    warning = line(type="log_message", message="srv/x: vanished", levelname="WARNING", name="borg.archiver")
    finished = line(operation=1, msgid="extract", type="progress_percent", finished=True)
    kept = [relay(progress(0)), relay(listed[0])]
    kept += [relay(progress(n)) for n in range(1, 100)]  # within 0.25 s: held back, superseded
    clock[0] = 0.1
    kept += [relay(listed[1]), relay(progress(150)), relay(warning)]
    clock[0] = 0.4
    kept += [relay(progress(200)), relay(progress(250)), relay(listed[2]), relay(finished)]
    assert relayed == [progress(0), listed[0], listed[1], warning, progress(200), listed[2], progress(250), finished]
    assert kept.count(True) == 1 and kept.index(True) == 103  # only the warning is kept for the reply
    ours, theirs = borg.ExtractProgress(), borg.ExtractProgress()
    everything = [progress(0), listed[0], *map(progress, range(1, 100)), listed[1], progress(150), warning,
                  progress(200), progress(250), listed[2], finished]
    for said in everything:
        theirs.feed(said)
    for said in relayed:
        ours.feed(said)
    assert (ours.files, ours.bytes_done, ours.bytes_total, ours.messages) == \
        (theirs.files, theirs.bytes_done, theirs.bytes_total, theirs.messages) == (3, 300, 300, ["WARNING: srv/x: vanished"])
    held = restore.Relayed(relayed.append)
    relayed.clear()
    held(progress(1))
    held(progress(2))  # borg killed here: flush sends how far it got
    held.flush()
    assert relayed == [progress(1), progress(2)]


def test_a_key_export_is_recognised_by_its_header() -> None:
    key_id = "e4ab17b9008f422cea378131e97051073b96449e800405fe204f6181310071cb"
    assert borg.parse_key_export(f"BORG_KEY {key_id}\nhqlhbGdv\n".encode()) == (key_id, f"BORG_KEY {key_id}\nhqlhbGdv\n")
    with pytest.raises(ValueError):
        borg.parse_key_export(b"Error: something\n")


def test_borg_errors_are_shown_without_traceback_or_platform_report() -> None:
    stderr = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise X\n"
        "borg.helpers.errors.IntegrityError: Data integrity error: Segment entry checksum mismatch [segment 2, offset 676]\n"
        "\nPlatform: Linux vm\nBorg: 1.4.5\nsys.argv: ['borg', 'list', 'SECRET-LOOKING ARGV']\n"
    )
    assert borg.error_lines(stderr) == (
        "borg.helpers.errors.IntegrityError: Data integrity error: Segment entry checksum mismatch [segment 2, offset 676]"
    )
    assert borg.exit_hint(90).startswith("data integrity error") and borg.exit_hint(255).startswith("ssh failed")


# --- progress on a terminal ----------------------------------------------------------------


def test_the_progress_line_shows_items_bytes_of_total_and_rate_and_is_rewritten_in_place() -> None:
    import io

    from mutualbackup.terminal import TerminalProgress, format_progress

    progress = borg.ExtractProgress(files=12, bytes_done=3 * 1024**2, bytes_total=6 * 1024**2)
    assert format_progress(progress, 2.0) == "12 item(s)  3 MiB of 6 MiB  1.5 MiB/s"
    ticks = iter([0.0, 0.1, 0.5, 0.6, 1.0])
    stream = io.StringIO()
    show = TerminalProgress(stream, clock=lambda: next(ticks))
    show(progress)  # 0.1 s after the start: too soon after the last line (at 0)
    show(progress)  # 0.5 s: shown
    show(progress)  # 0.6 s: too soon again
    line = "12 item(s)  3 MiB of 6 MiB  6 MiB/s"
    assert stream.getvalue() == "\r" + line
    show.done()
    assert stream.getvalue() == "\r" + line + "\r" + " " * len(line) + "\r"


def test_a_log_line_goes_above_the_progress_line_which_is_drawn_again_under_it() -> None:
    import io
    import logging

    from mutualbackup.terminal import TerminalProgress

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test-progress-beside-logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        ticks = iter([0.0, 1.0])
        show = TerminalProgress(stream, clock=lambda: next(ticks))
        with show.beside_logs(logger):
            show(borg.ExtractProgress(files=3, bytes_done=1024**2))  # at 1.0 s: shown
            logger.warning("restore end")
            assert handler.stream.isatty() is False  # the terminal's own answers pass through
        line = "3 item(s)  1 MiB  1 MiB/s"
        blank = "\r" + " " * len(line) + "\r"
        assert stream.getvalue() == "\r" + line + blank + "restore end\n" + "\r" + line + blank
        assert handler.stream is stream  # given back on leaving
        logger.warning("after")
        assert stream.getvalue().endswith(blank + "after\n")
    finally:
        logger.removeHandler(handler)


def test_a_restore_id_with_digits_that_are_no_date_is_not_ours_and_stale() -> None:
    line = f"{KEY} mutualbackup-restore:coop/web1:20241399T250000Z-abcd"
    assert borg.restore_id_time("20241399T250000Z-abcd") is None
    assert borg.is_stale_restore_line(line, NOW)
