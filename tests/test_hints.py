"""Where `mutualbackup run` connected last time (remote/hints.py): only ever a head start. A hint is used only
when the inventory names that very endpoint for the source; any other is closed unused, and a run whose hint
is stale, malformed or unreachable connects as it would have."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from mutualbackup.remote import hints

ENDPOINT = hints.Endpoint("coop/web1", "127.0.0.1", 2222, "mutualbackup", "ssh-ed25519 AAAAC3Nza", "/etc/mb/id_ed25519")


class Node:
    """The attributes of an inventory's node that a connection is made of."""

    def __init__(self, **changes: object) -> None:
        values = dict(name="coop/web1", address="127.0.0.1", port=2222, user="mutualbackup", host_key="ssh-ed25519 AAAAC3Nza")
        values.update(changes)
        self.__dict__.update(values)


class Started:
    """A transport started on a hint, as far as the hint sees it."""

    def __init__(self) -> None:
        self.node: object = ENDPOINT
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_command_line_recalls_the_endpoint_it_connected_to_and_nothing_else(tmp_path: Path) -> None:
    path = str(tmp_path / "cache" / "connections.json")
    command = hints.key(["run", "coop/web1"], {"MUTUALBACKUP_STATE": "/s", "HOME": "/root"}, "/srv")
    assert hints.recall(path, command) is None  # nothing kept yet
    hints.remember(path, command, ENDPOINT)
    assert hints.recall(path, command) == ENDPOINT
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and oct(os.stat(Path(path).parent).st_mode & 0o777) == "0o700"
    for other in (hints.key(["run", "coop/web2"], {"MUTUALBACKUP_STATE": "/s"}, "/srv"),  # another source
                  hints.key(["run", "coop/web1"], {"MUTUALBACKUP_STATE": "/t"}, "/srv"),  # another state
                  hints.key(["run", "coop/web1"], {"MUTUALBACKUP_STATE": "/s"}, "/home")):  # relative paths differ
        assert hints.recall(path, other) is None
    assert hints.key(["run"], {"HOME": "/a"}, "/") == hints.key(["run"], {"HOME": "/b"}, "/")  # only our variables
    assert "/s" not in Path(path).read_text() and "coop/web1\"]" not in Path(path).read_text()[:80]  # a digest


def test_a_command_line_recalls_the_state_directory_it_used_with_its_endpoint(tmp_path: Path) -> None:
    """Where the daemon that may run it listens (mutualbackup/handoff): kept beside the endpoint, each kept when
    the other is learnt; a cache written before the state was kept still gives its endpoint."""
    path = str(tmp_path / "connections.json")
    assert hints.recalled_state(path, "c") is None
    hints.remember(path, "c", None, "/var/lib/mutualbackup")
    assert hints.recalled_state(path, "c") == "/var/lib/mutualbackup" and hints.recall(path, "c") is None
    hints.remember(path, "c", ENDPOINT)
    assert hints.recalled_state(path, "c") == "/var/lib/mutualbackup" and hints.recall(path, "c") == ENDPOINT
    hints.remember(path, "c", None, "relative/state")  # kept as given, but never recalled: not a place
    assert hints.recalled_state(path, "c") is None
    Path(path).write_text(json.dumps({"old": ENDPOINT.as_list()}))  # the format of before
    assert hints.recall(path, "old") == ENDPOINT and hints.recalled_state(path, "old") is None


def test_only_the_last_command_lines_are_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "connections.json")
    for n in range(hints.KEPT + 5):
        hints.remember(path, f"command {n}", ENDPOINT)
    kept = json.loads(Path(path).read_text())
    assert len(kept) == hints.KEPT and "command 0" not in kept and f"command {hints.KEPT + 4}" in kept
    hints.remember(path, "command 10", hints.Endpoint("coop/web2", "10.0.0.2", 22, "u", "ssh-ed25519 B", "/k"))
    assert list(json.loads(Path(path).read_text()))[-1] == "command 10"  # the latest used last


@pytest.mark.parametrize("content", ["not json", "[]", '{"c": "x"}', '{"c": ["a", "b"]}',
                                     '{"c": ["coop/web1", "127.0.0.1", "22", "u", "k", "f"]}',
                                     '{"c": ["coop/web1", "127.0.0.1", true, "u", "k", "f"]}'])
def test_a_damaged_cache_is_no_hint(tmp_path: Path, content: str) -> None:
    path = tmp_path / "connections.json"
    path.write_text(content)
    assert hints.recall(str(path), "c") is None
    hints.remember(str(path), "c", ENDPOINT)  # and is replaced by a good one
    assert hints.recall(str(path), "c") == ENDPOINT


def test_a_cache_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    hints.remember(str(blocker / "mutualbackup" / "connections.json"), "c", ENDPOINT)  # a file where a directory goes
    assert hints.cache_file({"XDG_CACHE_HOME": "/x"}) == "/x/mutualbackup/connections.json"
    assert hints.cache_file({"HOME": "/h"}) == "/h/.cache/mutualbackup/connections.json"
    assert hints.cache_file({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == "/h/.cache/mutualbackup/connections.json"
    assert hints.cache_file({"HOME": "relative"}) is None or hints.cache_file({"HOME": "relative"}).startswith("/")


@pytest.mark.parametrize("how", ["group-writable file", "group-writable directory", "symbolic link",
                                 "another owner", "linked directory"])
def test_a_cache_that_is_not_the_users_own_alone_is_no_hint_and_is_not_written(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "mutualbackup"
    directory.mkdir(mode=0o700)
    path = directory / "connections.json"
    hints.remember(str(path), "c", ENDPOINT)
    assert hints.recall(str(path), "c") == ENDPOINT
    if how == "group-writable file":
        path.chmod(0o620)
    elif how == "group-writable directory":
        directory.chmod(0o770)
    elif how == "symbolic link":
        real = tmp_path / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    elif how == "another owner":
        os.chown(path, 12345, -1)
    else:
        moved = tmp_path / "real"
        directory.rename(moved)
        directory.symlink_to(moved)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json") if p.is_file() and not p.is_symlink()}
    assert hints.recall(str(path), "c") is None
    hints.remember(str(path), "d", ENDPOINT)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json") if p.is_file() and not p.is_symlink()} == before


def test_a_hinted_key_file_that_is_no_regular_file_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo)  # opening it would wait forever for a writer
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = hints.key(["run", "coop/web1"], environ, "/")
    hints.remember(hints.cache_file(environ), command,
                   hints.Endpoint("coop/web1", "127.0.0.1", 22, "u", "ssh-ed25519 AAAA", str(fifo)))
    hinted = hints.start(["run", "coop/web1"], environ, "/", "backup")
    assert hinted.endpoint is not None and hinted.transport is None


def test_a_hinted_connection_that_does_not_start_in_time_is_dropped(tmp_path: Path) -> None:
    """A server that accepts the connection and never speaks: the run goes on after HINT_SECONDS."""
    import time

    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
        command = hints.key(["run", "coop/web1"], environ, "/")
        pinned = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
        hints.remember(hints.cache_file(environ), command,
                       hints.Endpoint("coop/web1", "127.0.0.1", silent.getsockname()[1], "u", pinned, str(key)))
        began = time.monotonic()
        hinted = hints.start(["run", "coop/web1"], environ, "/", "backup")
        assert hinted.transport is None and time.monotonic() - began < hints.HINT_SECONDS + 5


@pytest.mark.parametrize("change", [{}, {"address": "10.0.0.9"}, {"port": 22}, {"user": "other"},
                                    {"host_key": "ssh-ed25519 AAAAother"}, {"name": "coop/web2"}, "key file"],
                         ids=["the same", "moved", "another port", "another login", "another host key",
                              "another node", "another key file"])
def test_a_connection_started_on_a_hint_is_used_only_for_the_very_endpoint_the_inventory_names(
        tmp_path: Path, change: object) -> None:
    path = str(tmp_path / "connections.json")
    started = Started()
    hinted = hints.Hinted(path, "c", ENDPOINT, started)  # type: ignore[arg-type]
    node = Node(**change) if isinstance(change, dict) else Node()
    key_file = "/other/key" if change == "key file" else ENDPOINT.key_file
    taken = hinted.take(node, key_file)
    if change == {}:
        assert taken is started and started.node is node and not started.closed  # it now stands for that node
    else:
        assert taken is None and started.closed  # closed unused: nothing was sent on it
    assert hints.recall(path, "c") == hints.Endpoint.of(node, key_file)  # what the next run starts on
    assert hinted.transport is None


def test_a_hint_that_answers_nothing_is_dropped_at_once(tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    environ = {"XDG_CACHE_HOME": str(tmp_path)}
    command = hints.key(["run", "coop/web1"], environ, "/")
    key = tmp_path / "key"
    key.write_text("")
    hints.remember(hints.cache_file(environ), command, hints.Endpoint("coop/web1", "127.0.0.1", port, "u", "k", str(key)))
    hinted = hints.start(["run", "coop/web1"], environ, "/", "backup")
    assert hinted.endpoint is not None and hinted.transport is None
    assert hints.start(["run", "coop/web9"], environ, "/", "backup").endpoint is None  # never ran: no hint
