"""A damaged state database: damaged pages, a file truncated to 0 bytes, a file gone while its copy is there.
Each gives a clear message with the way back — never a traceback, never a silent fresh start — and the way
back (the daemon's copy) works."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from fake import Harness, make_federation
from labkit import mb
from mutualbackup.state.history import COPY, FILENAME, History, StateDamaged

START = 1_750_000_000.0


def filled(state: Path, runs: int = 3000) -> History:
    history = History(state)
    for i in range(runs):
        run = history.start_run("backup", f"coop{i % 7}/src0", "coop9/store", started=START + i)
        history.finish_run(run, "success", ended=START + i + 1, error="x" * 200)
    return history


def damage_pages(path: Path) -> None:
    """Garbage over the middle of the file, as a failing disk leaves it (the header stays, so SQLite opens it)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 3)
        handle.write(os.urandom(size // 3))


def test_damaged_pages_are_reported_with_the_way_back_and_the_copy_brings_the_state_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    history = filled(state)
    assert history.save_copy() and (state / COPY).is_file()
    history._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    history.close()
    damage_pages(state / FILENAME)
    with pytest.raises(StateDamaged) as raised:
        History(state).runs(kind="backup")
    message = str(raised.value)
    assert f"{state / FILENAME} is damaged" in message or "cannot be read" in message
    assert f"mv {state / FILENAME} {state / FILENAME}.damaged && cp {state / COPY} {state / FILENAME}" in message
    shutil.move(state / FILENAME, state / f"{FILENAME}.damaged")  # the way back, as the message says
    for extra in ("-wal", "-shm"):
        (state / f"{FILENAME}{extra}").unlink(missing_ok=True)
    shutil.copy(state / COPY, state / FILENAME)
    assert len(History(state).runs(kind="backup")) == 3000


def test_a_state_truncated_to_nothing_is_not_a_fresh_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    filled(state, 10).close()
    (state / FILENAME).write_bytes(b"")
    with pytest.raises(StateDamaged) as raised:
        History(state)
    assert "is empty (truncated to 0 bytes)" in str(raised.value) and "no copy" in str(raised.value)
    assert (state / FILENAME).stat().st_size == 0  # nothing written over it


def test_a_state_file_gone_while_its_copy_is_there_is_not_a_fresh_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    history = filled(state, 10)
    history.save_copy()
    history.close()
    for name in (FILENAME, f"{FILENAME}-wal", f"{FILENAME}-shm"):
        (state / name).unlink(missing_ok=True)
    with pytest.raises(StateDamaged, match="is missing, while the daemon's copy of it is there"):
        History(state)
    assert not (state / FILENAME).exists()


def test_a_copy_is_never_replaced_by_a_damaged_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    history = filled(state)
    assert history.save_copy()
    good = (state / COPY).read_bytes()
    history._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    history.close()
    damage_pages(state / FILENAME)
    try:
        damaged = History(state)
    except StateDamaged:
        return  # damaged where SQLite reads at open: nothing to copy from, the copy is untouched
    assert damaged.save_copy() is False
    assert (state / COPY).read_bytes() == good


def test_every_command_says_so_without_a_traceback(tmp_path: Path) -> None:
    inventory = Path(__file__).parent / "inventories" / "three-members"
    state = tmp_path / "state"
    filled(state, 10).close()
    (state / FILENAME).write_bytes(b"")
    for command in (("status",), ("ledger",), ("plan",)):
        code, out, err = mb(inventory, "--state", str(state), *command)
        assert code == 1, (command, out, err)
        assert "is empty (truncated to 0 bytes)" in err and "Traceback" not in err


def test_the_daemon_keeps_a_copy_and_stops_saying_why_when_the_state_is_damaged(tmp_path: Path) -> None:
    h = Harness(make_federation(3, 1), str(tmp_path / "state"), START)
    h.daemon.keep_copy()
    copy = tmp_path / "state" / COPY
    assert copy.is_file() and sqlite3.connect(copy).execute("PRAGMA quick_check").fetchone()[0] == "ok"
    h.daemon.tick = 0.01

    def broken(*_args, **_kwargs):  # noqa: ANN002, ANN003
        raise StateDamaged("the state database X is damaged (database disk image is malformed); nothing was changed.")

    h.history.snapshot = broken  # type: ignore[method-assign]  # what the daemon reads at every tick
    assert h.daemon.serve() == 1
    assert h.daemon.stop.is_set()
