"""`mutualbackup run` on an operator's terminal shows the backup moving (files, bytes read, bytes new, rate),
rewritten on one line, and `verify` and `apply` which step they are at; piped, they print nothing but their
result lines. The whole program, on a pseudo-terminal,
against lab nodes over real ssh."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from lab.federation import LabFederation
from labkit import daemon_idle, mb
from mutualbackup.borg import CreateProgress
from mutualbackup.terminal import format_create_progress
from restorekit import build, node_doc, source, storage

pytestmark = pytest.mark.lab

SOURCE = "alpha/web"
PROGRAM = str(Path(sys.executable).with_name("mutualbackup"))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    lab, federation = build(tmp_path_factory.mktemp("progress"), borg_path, {
        "alpha": [node_doc("web", backup=source(["/srv"]))], "beta": [node_doc("store", storage=storage())]},
        replicas=1)
    new_data(federation, "first", 1)
    with lab:
        code, out, err = mb(federation, "apply")
        assert code == 0, out + err
        yield federation


def new_data(fed: LabFederation, name: str, megabytes: int) -> None:
    """Random data borg has never seen (so that it has something to read, and to send)."""
    directory = fed.data_path(SOURCE, "/srv") / name
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(megabytes // 8 or 1):
        (directory / f"blob-{index}").write_bytes(os.urandom(min(8, megabytes) * 1024 * 1024))


def on_a_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and all it wrote."""
    master, slave = os.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    written = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the program ended: the terminal is gone
                break
            if not chunk:
                break
            written += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=60), written


def test_a_backup_on_a_terminal_shows_its_progress_on_one_line(fed: LabFederation) -> None:
    new_data(fed, "second", 400)
    code, written = on_a_terminal([PROGRAM, "--inventory", str(fed.inventory), "run", SOURCE])
    text = written.decode("utf-8", "replace")
    assert code == 0, text
    updates = [part for part in text.split("\r") if " read  " in part and " new  " in part and "/s" in part]
    assert len(updates) >= 2, text  # moving: the line was rewritten as borg went on
    assert updates[0].startswith(f"{SOURCE} → beta/store  ")
    assert "success" in text.splitlines()[-1] or "success" in text  # then the result line


def test_a_backup_handed_to_the_daemon_shows_its_progress_on_the_terminal_as_well(
    fed: LabFederation, tmp_path: Path,
) -> None:
    from mutualbackup.state.history import History

    with (tmp_path / "daemon.log").open("ab") as log:
        daemon = subprocess.Popen([PROGRAM, "--inventory", str(fed.inventory), "daemon"], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log)
    try:
        daemon_idle(fed.inventory, fed.state)
        new_data(fed, "handed", 400)
        code, written = on_a_terminal([PROGRAM, "--inventory", str(fed.inventory), "run", SOURCE])
        [run] = History(fed.state).runs(kind="backup", source=SOURCE, limit=1)
    finally:
        daemon.terminate()
        daemon.wait(timeout=90)
    text = written.decode("utf-8", "replace")
    assert code == 0, text
    assert run.pid == daemon.pid and run.result == "success"  # the daemon ran it
    updates = [part for part in text.split("\r") if " read  " in part and " new  " in part and "/s" in part]
    assert len(updates) >= 2, text
    assert updates[0].startswith(f"{SOURCE} → beta/store  ")
    assert f"{SOURCE} → beta/store  success  " in text


def test_a_backup_piped_prints_only_its_result_lines(fed: LabFederation) -> None:
    new_data(fed, "third", 100)
    time.sleep(1.1)  # one archive a second
    done = subprocess.run([PROGRAM, "--inventory", str(fed.inventory), "run", SOURCE], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout + done.stderr and " read  " not in done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if line.strip()], done.stdout


def test_verify_and_apply_on_a_terminal_say_which_step_they_are_at(fed: LabFederation) -> None:
    code, written = on_a_terminal([PROGRAM, "--inventory", str(fed.inventory), "verify", SOURCE])
    text = written.decode("utf-8", "replace")
    assert code == 0, text
    assert f"\rverify 1 of 1: {SOURCE} on beta/store  (" in text, text
    code, written = on_a_terminal([PROGRAM, "--inventory", str(fed.inventory), "apply"])
    text = written.decode("utf-8", "replace")
    assert code == 0, text
    assert f"apply: preparing {SOURCE} (1 of 1 sources)" in text and "apply: the replica lines of beta/store" in text
    done = subprocess.run([PROGRAM, "--inventory", str(fed.inventory), "verify", SOURCE], capture_output=True, text=True)
    assert done.returncode == 0 and "\r" not in done.stdout + done.stderr and "verify 1 of 1" not in done.stderr


def test_the_coordinator_hears_how_far_a_backup_is_never_which_files(fed: LabFederation) -> None:
    """The node sends borg's progress without the path borg is at, and returns its stderr without them."""
    from mutualbackup.context import Context, ssh_connector
    from mutualbackup.inventory.load import load_inventory
    from mutualbackup.jobs import backup as jobs_backup
    from mutualbackup.state.history import History

    new_data(fed, "fourth", 200)
    time.sleep(1.1)
    heard: list[str] = []
    seen = jobs_backup.log_lines
    jobs_backup.log_lines = lambda event: heard.extend(seen(event)) or seen(event)  # type: ignore[assignment]
    try:
        federation = load_inventory(str(fed.inventory))
        ctx = Context(federation, History(fed.state), ssh_connector(federation))
        outcome = jobs_backup.run_backup(ctx, ctx.node(SOURCE), ctx.node("beta/store"), on_progress=lambda _p: None)
    finally:
        jobs_backup.log_lines = seen  # type: ignore[assignment]
    assert outcome.result == "success", outcome.error
    assert heard and all('"archive_progress"' in line for line in heard)
    assert not [line for line in heard if '"path"' in line or "blob-" in line or "/srv" in line]


def test_progress_lines_leave_the_node_without_their_paths() -> None:
    from mutualbackup.node.source import progress_numbers, without_progress

    line = ('{"type": "archive_progress", "original_size": 10, "compressed_size": 9, "deduplicated_size": 8, '
            '"nfiles": 2, "path": "srv/secret/salaries.ods", "time": 1.0}')
    assert "salaries" not in progress_numbers(line) and '"nfiles": 2' in progress_numbers(line)
    assert progress_numbers('{"type": "log_message", "message": "srv/secret"}') is None
    assert progress_numbers("not json") is None
    stderr = (line + '\n{"type": "log_message", "levelname": "WARNING", "message": "x"}\n').encode()
    assert without_progress(stderr) == b'{"type": "log_message", "levelname": "WARNING", "message": "x"}\n'


def test_borgs_progress_lines_make_the_progress_and_its_line() -> None:
    progress = CreateProgress()
    assert not progress.feed('{"type": "log_message", "levelname": "INFO", "message": "x"}')
    assert not progress.feed("not json")
    assert progress.feed('{"type": "archive_progress", "original_size": 3145728, "compressed_size": 3000000, '
                         '"deduplicated_size": 1048576, "nfiles": 12, "path": "srv/a", "time": 1.0}')
    assert not progress.feed('{"type": "archive_progress", "finished": true, "time": 2.0}')
    assert (progress.files, progress.original_bytes, progress.deduplicated_bytes) == (12, 3145728, 1048576)
    line = format_create_progress(progress, 2.0)
    assert line.startswith("12 file(s)  ") and " read  " in line and " new  " in line and line.endswith("/s")
