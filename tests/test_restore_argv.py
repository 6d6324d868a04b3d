"""Restore building blocks by value: argv, the temporary authorized_keys line, the
passphrase pipe, borg's output. Fast: no lab (a few tiny local shell runs prove the
shell snippets do what they say)."""

from __future__ import annotations

from mutualbackup import borg
from mutualbackup.restore import node_commands

import contextlib
import datetime as dt
import os
import shlex
import subprocess
import threading
import sys
from pathlib import Path

import pytest

from mutualbackup.inventory.model import Node
from mutualbackup.borg import BEGIN, END, replace_block
from mutualbackup.restore.temporary_key import authorised
from mutualbackup.borg import url_of
from mutualbackup.remote.transport import Result

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


ADD_CASES = {
    "no file": None,
    "empty": "",
    "no block, no final newline": "ssh-ed25519 AAAA admin@laptop",
    "block with replica, stale and live restore lines": "\n".join([
        "# the member's admin", "ssh-ed25519 AAAA admin@laptop", BEGIN,
        f'command="borg serve",restrict {KEY} mutualbackup:coop/web1',
        borg.restore_line("borg", "/r", KEY, "coop/web1", "20260101T000000Z-dead"),  # stale
        borg.restore_line("borg", "/r", KEY, "coop/web1", "20260301T060000Z-beef"),  # exactly at the lifetime: stale
        borg.restore_line("borg", "/r", KEY, "coop/web1", "20260301T115900Z-cafe"),  # live
        f"{KEY} mutualbackup-restore:coop/web1:garbage",  # unreadable id: stale
        END, "ssh-rsa BBBB after\r", "",
    ]),
    "mine already there": f"{BEGIN}\n{borg.restore_line('borg', '/srv/it s', KEY, 'coop/web1', RID)}\n{END}\n",
    "a restore line outside the block stays": f"{KEY} mutualbackup-restore:coop/web1:20200101T000000Z-dead\n{BEGIN}\n{END}\n",
}


@pytest.mark.parametrize("case", sorted(ADD_CASES))
def test_adding_a_line_on_the_host_is_the_same_edit_as_the_coordinators(tmp_path: Path, case: str) -> None:
    from mutualbackup.borg import managed_lines
    text = ADD_CASES[case]
    path = tmp_path / "ssh dir" / "authorized_keys"
    if text is not None:
        path.parent.mkdir()
        path.write_bytes(text.encode())
    mine = borg.restore_line("borg", "/srv/it s", KEY, "coop/web1", RID)
    done = subprocess.run(node_commands.add_line_argv(str(path), mine, BEGIN, END, NOW), capture_output=True)
    assert done.returncode == 0, done.stderr
    before = text or ""
    expected = replace_block(before, borg.with_restore_line(managed_lines(before), mine, NOW))
    if not expected.endswith("\n"):
        expected += "\n"  # awk ends the last line
    assert path.read_bytes().decode() == expected
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text", [f"{BEGIN}\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", f"x\n{END}\n"])
def test_adding_a_line_to_a_damaged_block_changes_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(text)
    done = subprocess.run(node_commands.add_line_argv(str(path), "ssh-ed25519 AAAA x", BEGIN, END, NOW), capture_output=True)
    assert done.returncode == node_commands.BLOCK_DAMAGED
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["authorized_keys"]


def test_removing_a_line_takes_exactly_that_line_in_one_round_trip(tmp_path: Path) -> None:
    line = borg.restore_line("borg", "/srv/it's here", KEY, "coop/web1", RID)
    path = tmp_path / ".ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text(f"-e admin\n{BEGIN}\n{line}\n{line[:-1]}\n{END}\n")
    env = dict(os.environ, HOME=str(tmp_path))
    assert subprocess.run(node_commands.remove_line_argv("~/.ssh/authorized_keys", line), env=env).returncode == 0
    assert path.read_text() == f"-e admin\n{BEGIN}\n{line[:-1]}\n{END}\n"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert subprocess.run(node_commands.remove_line_argv("~/.ssh/authorized_keys", line), env=env).returncode == 0  # absent: no-op
    assert subprocess.run(node_commands.remove_line_argv("~/.ssh/missing", line), env=env).returncode == 0


class LocalHost:
    """A transport onto this machine, with HOME in a temporary directory (the SSH one, minus SSH)."""

    node_name = "picasoft/store1"

    def __init__(self, home: Path) -> None:
        self.home_dir = home
        self.closed = False

    def run(self, argv, *, env=None, stdin=None, cwd=None, timeout=None, on_stderr_line=None):  # noqa: ANN001, ANN201
        """Like the SSH transport: stdin streamed as it comes, stderr lines reported as they come."""
        process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=cwd, env=dict(os.environ, HOME=str(self.home_dir), **(env or {})))
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None

        def feed() -> None:
            try:
                for chunk in (stdin,) if isinstance(stdin, bytes) else (stdin or ()):
                    process.stdin.write(chunk)
                    process.stdin.flush()
            except BrokenPipeError:
                pass
            finally:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass

        threading.Thread(target=feed, daemon=True).start()
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True)
        reader.start()
        err = b""
        for raw in process.stderr:
            err += raw
            if on_stderr_line is not None:
                on_stderr_line(raw.decode().rstrip("\n"))
        reader.join()
        return Result(tuple(argv), process.wait(), out[0], err)

    def connect(self) -> None:
        pass

    def home(self) -> str:
        return str(self.home_dir)

    def read_file(self, path: str) -> bytes | None:
        return Path(path).read_bytes() if Path(path).exists() else None

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        Path(path).write_bytes(data)
        os.chmod(path, mode)

    def close(self) -> None:
        self.closed = True


class FakeContext:
    def __init__(self, host: LocalHost) -> None:
        self.host = host

    def connect(self, node: Node) -> LocalHost:
        return self.host


def test_the_temporary_line_is_removed_even_when_the_restore_fails(tmp_path: Path) -> None:
    outside = "# the member's admin\nssh-ed25519 AAAA admin@laptop\n"
    replica = f'command="borg serve",restrict {KEY} mutualbackup:coop/web1'
    stale = borg.restore_line("borg", "/r", KEY, "coop/web1", "20200101T000000Z-dead")
    path = tmp_path / ".ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text(replace_block(outside, [replica, stale]))
    host = LocalHost(tmp_path)
    node = Node(member="picasoft", slug="store1", address="127.0.0.1", port=22, user="root", host_key=KEY)
    seen = []
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), "abcd")
    with pytest.raises(RuntimeError):
        with authorised(FakeContext(host), node, "coop/web1", "/srv/mb/coop/web1", KEY, restore_id):  # type: ignore[arg-type]
            seen.append(path.read_text())
            raise RuntimeError("borg died")
    assert f"mutualbackup-restore:coop/web1:{restore_id}" in seen[0] and stale not in seen[0]
    after = path.read_text()
    assert after == replace_block(outside, [replica])  # back to the replica line alone, outside untouched
    assert after.index(BEGIN) < after.index(replica) < after.index(END)
    assert host.closed


# --- the delegated client ------------------------------------------------------------------


def test_the_delegated_environment_names_files_and_an_fd_never_a_passphrase() -> None:
    env = node_commands.delegated_env(node_commands.TemporaryPaths("/home/x/.mutualbackup/restore-ID.abc"))
    assert env["BORG_PASSPHRASE_FD"] == "3"
    assert "BORG_PASSPHRASE" not in env and "BORG_PASSCOMMAND" not in env
    assert env["BORG_BASE_DIR"] == "/home/x/.mutualbackup/restore-ID.abc/borg"
    rsh = shlex.split(env["BORG_RSH"])
    assert rsh[rsh.index("-i") + 1] == "/home/x/.mutualbackup/restore-ID.abc/id_ed25519"
    assert "UserKnownHostsFile=\"/home/x/.mutualbackup/restore-ID.abc/known_hosts\"" in rsh
    assert rsh[rsh.index("-F") + 1] == "/dev/null"
    assert "StrictHostKeyChecking=yes" in rsh and "BatchMode=yes" in rsh
    assert env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] == "no"


PROBE = """
import os, sys
d = sys.argv[1]
key = open(os.path.join(d, "id_ed25519"), "rb").read()
mode = oct(os.stat(d).st_mode & 0o777), oct(os.stat(os.path.join(d, "id_ed25519")).st_mode & 0o777)
fd3 = os.read(3, 100).decode() if sys.argv[2] == "fd3" else None
print(repr((key.decode(), open(os.path.join(d, "known_hosts")).read(), mode, fd3, sys.stdin.read(), os.getcwd(), sys.argv[3:])))
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


def delegated_run(tmp: node_commands.TemporaryPaths, stdin: bytes, *, target: tuple[str, bool] | None = None, fd3: bool = True,
                  exit_code: int = 0) -> subprocess.CompletedProcess[bytes]:
    argv = node_commands.delegated_argv(tmp, "[h]:2 ssh-ed25519 AAAA\n", [sys.executable, "-c", PROBE, tmp.directory,
                             "fd3" if fd3 else "stdin", "$(x)", "-n"], target=target, passphrase_on_fd3=fd3)
    return subprocess.run(argv, input=stdin, capture_output=True, env=dict(os.environ, PROBE_EXIT=str(exit_code)))


def test_a_delegated_command_gets_the_key_then_the_passphrase_on_stdin_and_leaves_nothing(tmp_path: Path) -> None:
    import base64

    private = b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    tmp = node_commands.TemporaryPaths(str(tmp_path / "work dir" / f"restore-{RID}.tmp"))
    done = delegated_run(tmp, base64.b64encode(private) + b"\n" + b"s3cret pass\nline 2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(node_commands.TEMPORARY_REMOVED)
    shown = eval(done.stdout[: -len(node_commands.TEMPORARY_REMOVED)].decode())  # noqa: S307 - our own probe's repr
    assert shown[0] == private.decode() and shown[1] == "[h]:2 ssh-ed25519 AAAA\n"
    assert shown[2] == ("0o700", "0o600")
    assert shown[3] == "s3cret pass\nline 2" and shown[4] == ""  # the passphrase on fd 3, stdin empty
    assert shown[6] == ["$(x)", "-n"]  # words stay words
    assert not Path(tmp.directory).exists() and (tmp_path / "work dir").is_dir()


def test_a_delegated_command_passes_borgs_exit_code_and_still_removes_its_directory(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    for code in (1, 2, 255):
        done = delegated_run(tmp, b"a2V5\npass", exit_code=code)
        assert done.returncode == code and done.stdout.endswith(node_commands.TEMPORARY_REMOVED)
        assert not Path(tmp.directory).exists()


def test_a_delegated_key_import_reads_its_payload_on_stdin(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    done = delegated_run(tmp, b"a2V5\nBORG_KEY 1234\nkey text\n", fd3=False)
    assert done.returncode == 0, done.stderr
    shown = eval(done.stdout[: -len(node_commands.TEMPORARY_REMOVED)].decode())  # noqa: S307
    assert shown[0] == "key" and shown[4] == "BORG_KEY 1234\nkey text\n"


def test_a_delegated_extract_checks_its_target_first_and_runs_there(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / "wd" / f"restore-{RID}.tmp"))
    target = tmp_path / "target dir"
    done = delegated_run(tmp, b"a2V5\np", target=(str(target), False))
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout[: -len(node_commands.TEMPORARY_REMOVED)].decode())[5] == str(target)  # noqa: S307
    (target / "precious").write_text("keep")
    refused = delegated_run(tmp, b"a2V5\np", target=(str(target), False))
    assert refused.returncode == node_commands.TARGET_NOT_EMPTY and refused.stdout == b""
    assert list((tmp_path / "wd").iterdir()) == []  # refused before the key was written
    assert delegated_run(tmp, b"a2V5\np", target=(str(target), True)).returncode == 0
    assert (target / "precious").read_text() == "keep"


def test_a_delegated_command_without_a_key_line_fails_before_borg_runs(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    done = delegated_run(tmp, b"")
    assert done.returncode == node_commands.TARGET_UNUSABLE and done.stdout == b""
    assert not Path(tmp.directory).exists()


def test_restore_keys_are_made_in_memory_and_are_valid_openssh_keys(tmp_path: Path) -> None:
    import base64

    from mutualbackup.restore.temporary_key import new_restore_key

    key = new_restore_key("mutualbackup-restore:coop/web1:" + RID)
    assert "BEGIN OPENSSH PRIVATE KEY" not in repr(key)
    private = tmp_path / "k"
    private.write_bytes(base64.b64decode(key.private_line))
    private.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, check=True).stdout.decode()
    assert derived.split()[:2] == key.public_key.split()[:2]
    assert key.public_key.split()[2] == "mutualbackup-restore:coop/web1:" + RID
    assert new_restore_key("c").public_key != new_restore_key("c").public_key


def test_a_restore_onto_the_source_checks_its_target_in_the_same_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "new dir"
    argv = node_commands.prepare_then_exec(str(target), False, ["sh", "-c", 'pwd; printf "%s|" "$@"', "sh", "-a", "$(b)"])
    done = subprocess.run(argv, capture_output=True)
    assert (done.returncode, done.stdout.decode()) == (0, f"{target}\n-a|$(b)|")
    (target / "x").write_text("x")
    assert subprocess.run(argv, capture_output=True).returncode == node_commands.TARGET_NOT_EMPTY
    assert subprocess.run(node_commands.prepare_then_exec(str(target), True, ["true"])).returncode == 0


def test_the_passphrase_is_read_on_the_node_with_its_home_expanded_there(tmp_path: Path) -> None:
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "passphrase").write_text("s3cret")
    done = subprocess.run(node_commands.read_passphrase_argv("~/wd"), capture_output=True, env=dict(os.environ, HOME=str(tmp_path)))
    assert done.stdout == b"s3cret"


def test_only_temporary_directories_are_ever_removed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    refused = subprocess.run(node_commands.remove_temporary_dir_argv(str(elsewhere)), capture_output=True)
    assert refused.returncode == 2 and elsewhere.exists()
    temporary = tmp_path / f"restore-{RID}.aBc123"
    temporary.mkdir()
    assert subprocess.run(node_commands.remove_temporary_dir_argv(str(temporary))).returncode == 0
    assert not temporary.exists()


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


# --- the temporary line is withdrawn as soon as borg is connected ----------------------------


class ExtractingNode:
    """A destination whose borg extract reports on the archive, then runs until the line is withdrawn."""

    node_name = "coop/web2"

    def __init__(self, withdrawn: threading.Event) -> None:
        self.withdrawn = withdrawn
        self.withdrawn_while_running = False
        self.lines: list[str] = []

    def run(self, argv, *, env=None, stdin=None, cwd=None, timeout=None, on_stderr_line=None):  # noqa: ANN001, ANN201
        assert on_stderr_line is not None
        on_stderr_line('{"type": "progress_message", "message": "Remote: starting"}')
        assert not self.withdrawn.wait(0.2), "withdrawn before borg reported on the archive"
        on_stderr_line('{"type": "progress_percent", "current": 0, "total": 10, "finished": false}')
        self.withdrawn_while_running = self.withdrawn.wait(10)  # borg goes on extracting meanwhile
        on_stderr_line('{"type": "log_message", "name": "borg.output.list", "levelname": "INFO", "message": "x"}')
        return Result(tuple(argv), 0, b"", b"")


def test_the_line_is_withdrawn_while_borg_extract_still_runs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mutualbackup.state.history import History
    from mutualbackup.restore.attempt import RestoreJob
    from mutualbackup.restore.temporary_key import Access

    withdrawn = threading.Event()
    grant = SimpleNamespace(wait=lambda: None, withdraw_soon=withdrawn.set)
    node = Node(member="coop", slug="web2", address="127.0.0.1", port=22, user="root", host_key=KEY)
    host = Node(member="picasoft", slug="store1", address="127.0.0.1", port=22, user="root", host_key=KEY)
    history = History(tmp_path)
    job = RestoreJob(SimpleNamespace(history=history), "coop/web1", node, "/restore", [host], lambda h: "/srv/mb/coop/web1",  # type: ignore[arg-type]
               "archive-1", (), False, {}, None, None, None)
    destination = ExtractingNode(withdrawn)
    access = Access(env={}, grant=lambda h, p: contextlib.nullcontext(grant), name="temporary key")
    result = job.run(destination, access)  # type: ignore[arg-type]
    assert destination.withdrawn_while_running
    assert result.result == "success" and result.files == 1
    job.release()


# --- the gate: borg starts at once, its ssh waits for the host's line and the passphrase ------------


GATED_PROBE = """
import os, shlex, subprocess, sys
rsh = shlex.split(os.environ["BORG_RSH"])
connected = subprocess.run(rsh, capture_output=True, text=True)  # as borg runs its ssh
secret = os.read(3, 100).decode() if connected.returncode == 0 else ""
print(repr((connected.returncode, connected.stdout, connected.stderr, secret)))
sys.exit(connected.returncode)
"""


def gated_run(tmp: node_commands.TemporaryPaths, stdin: bytes, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, BORG_RSH=shlex.join(node_commands.gated_command(tmp.gate, ["echo", "connected"])))
    argv = node_commands.delegated_argv(tmp, "", [sys.executable, "-c", GATED_PROBE], gated=True)
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=timeout)


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_the_gate_lets_ssh_connect_on_go_then_borg_reads_the_passphrase(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    done = gated_run(tmp, b"a2V5\n" + node_commands.GATE_OPEN + b"s3cret")
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout[: -len(node_commands.TEMPORARY_REMOVED)].decode()) == (0, "connected\n", "", "s3cret")  # noqa: S307
    assert not Path(tmp.directory).exists() and processes_naming(tmp.directory) == []


@pytest.mark.parametrize("stdin", [b"a2V5\n" + node_commands.GATE_REFUSED + b"s3cret", b"a2V5\n"], ids=["refused", "stdin closed"])
def test_a_closed_gate_makes_ssh_fail_as_unreachable_and_leaves_nothing(tmp_path: Path, stdin: bytes) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    done = gated_run(tmp, stdin)
    shown = eval(done.stdout[: -len(node_commands.TEMPORARY_REMOVED)].decode())  # noqa: S307
    assert done.returncode == 255 and shown[0] == 255 and shown[1] == "" and shown[3] == ""
    assert "not authorised" in shown[2]
    assert not Path(tmp.directory).exists() and processes_naming(tmp.directory) == []


def test_a_command_that_never_connects_leaves_no_process_waiting_at_the_gate(tmp_path: Path) -> None:
    tmp = node_commands.TemporaryPaths(str(tmp_path / f"restore-{RID}.tmp"))
    argv = node_commands.delegated_argv(tmp, "", ["sh", "-c", "exit 2"], gated=True)
    for stdin in (b"a2V5\n", b"a2V5\n" + node_commands.GATE_OPEN + b"s3cret"):
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=20)
        assert done.returncode == 2 and done.stdout == node_commands.TEMPORARY_REMOVED
        assert not Path(tmp.directory).exists() and processes_naming(tmp.directory) == []


def test_the_gated_borg_rsh_keeps_every_ssh_option() -> None:
    tmp = node_commands.TemporaryPaths("/home/x/.mutualbackup/restore-ID.tmp")
    words = shlex.split(node_commands.delegated_env(tmp, gated=True)["BORG_RSH"])
    assert words[:2] == ["sh", "-c"] and words[3] == tmp.gate
    assert words[4:] == shlex.split(node_commands.delegated_env(tmp)["BORG_RSH"])


# --- the host's session holding the line -----------------------------------------------------


@pytest.mark.parametrize("ending", ["stdin closes", "TERM", "HUP"])
def test_the_hosts_session_removes_its_line_however_it_ends(tmp_path: Path, ending: str) -> None:
    import signal

    path = tmp_path / "authorized_keys"
    outside = "ssh-ed25519 AAAA admin@laptop\n"
    path.write_text(replace_block(outside, ["replica line"]))
    mine = borg.restore_line("borg", "/r", KEY, "coop/web1", RID)
    session = subprocess.Popen(node_commands.grant_session_argv(str(path), mine, BEGIN, END, NOW),
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdin is not None and session.stderr is not None
    assert session.stderr.readline().decode().strip() == node_commands.LINE_ADDED
    assert path.read_text() == replace_block(outside, ["replica line", mine])
    if ending == "stdin closes":  # the coordinator said so, or its connection dropped
        session.stdin.close()
    else:
        session.send_signal(getattr(signal, "SIG" + ending))
    assert session.wait(timeout=10) == 0
    assert path.read_text() == replace_block(outside, ["replica line"])


def test_a_grant_holds_the_line_until_withdrawn_then_the_session_ends(tmp_path: Path) -> None:
    from mutualbackup.restore.temporary_key import authorised

    path = tmp_path / ".ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text(replace_block("", ["replica line"]))
    host = LocalHost(tmp_path)
    node = Node(member="picasoft", slug="store1", address="127.0.0.1", port=22, user="root", host_key=KEY)
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), "abcd")
    with authorised(FakeContext(host), node, "coop/web1", "/srv/mb/coop/web1", KEY, restore_id) as grant:  # type: ignore[arg-type]
        assert f"mutualbackup-restore:coop/web1:{restore_id}" in path.read_text()
        grant.withdraw_soon()
        for _ in range(200):
            if "mutualbackup-restore" not in path.read_text():
                break
            threading.Event().wait(0.02)
        assert "mutualbackup-restore" not in path.read_text()  # gone while the block still runs
    assert path.read_text() == replace_block("", ["replica line"]) and host.closed


def test_a_grant_on_a_damaged_block_raises_and_changes_nothing(tmp_path: Path) -> None:
    from mutualbackup.borg import DamagedBlock
    from mutualbackup.restore.temporary_key import authorised

    path = tmp_path / ".ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text(f"{BEGIN}\nx\n")
    node = Node(member="picasoft", slug="store1", address="127.0.0.1", port=22, user="root", host_key=KEY)
    restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), "abcd")
    with pytest.raises(DamagedBlock, match="damaged"):
        with authorised(FakeContext(LocalHost(tmp_path)), node, "coop/web1", "/r", KEY, restore_id):  # type: ignore[arg-type]
            pass
    assert path.read_text() == f"{BEGIN}\nx\n"


def test_removing_a_line_keeps_every_other_byte_even_in_a_file_grep_calls_binary(tmp_path: Path) -> None:
    line = borg.restore_line("borg", "/r", KEY, "coop/web1", RID)
    path = tmp_path / "authorized_keys"
    others = b"ssh-ed25519 AAAA ren\xe9@laptop\n", b"ssh-ed25519 BBBB odd\x00byte\n", b"ssh-rsa CCCC crlf\r\n"
    path.write_bytes(others[0] + BEGIN.encode() + b"\n" + line.encode() + b"\n" + END.encode() + b"\n" + others[1] + others[2])
    for env in (dict(os.environ, LC_ALL="C.UTF-8"), dict(os.environ, LC_ALL="C")):
        assert subprocess.run(node_commands.remove_line_argv(str(path), line), env=env).returncode == 0
        assert path.read_bytes() == others[0] + f"{BEGIN}\n{END}\n".encode() + others[1] + others[2]


def test_a_restore_id_with_digits_that_are_no_date_is_not_ours_and_stale() -> None:
    line = f"{KEY} mutualbackup-restore:coop/web1:20241399T250000Z-abcd"
    assert borg.restore_id_time("20241399T250000Z-abcd") is None
    assert borg.is_stale_restore_line(line, NOW)
