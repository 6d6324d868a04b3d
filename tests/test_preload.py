"""borg started while the node program checks a request (node/preload.py): it runs the command line it is
given as borg itself, nothing before, and only the run it was started for."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import wait_for
from mutualbackup.node import preload
from mutualbackup.node.system import LocalSystem
from mutualbackup.scripts import path

BORG = str(Path(sys.executable).with_name("borg"))  # the virtualenv's console script, as pip writes it
PRELOADER = "borg_preload.py"  # on the command line of every borg started early


@pytest.fixture(autouse=True)
def none_left_behind():  # noqa: ANN201
    """A test that fails half-way leaves no borg waiting at its gate for the next ones: those this process started
    (its descendants) are killed, never another's (a lab's, another test run's, a real node's)."""
    before = preloaders()
    yield
    for pid in preloaders() - before:
        if descends_from_us(int(pid)):
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descends_from_us(pid: int) -> bool:
    """Whether ``pid`` is a child, grandchild… of this process."""
    for _ in range(32):
        parent = parent_of(pid)
        if parent is None or parent <= 1:
            return False
        if parent == os.getpid():
            return True
        pid = parent
    return False


def preloaded(env: dict[str, str] | None = None) -> preload.Preloaded:
    started = preload.start(BORG, env if env is not None else preload.base_environment(), "create")
    assert started is not None
    return started



def test_borgs_console_script_is_started_early_with_its_own_python() -> None:
    python = Path(BORG).read_text().splitlines()[0][2:].strip()
    assert preload.console_script(BORG, os.defpath) == (BORG, python)
    assert preload.console_script("borg", str(Path(BORG).parent)) == (BORG, python)  # found on the PATH given
    assert preload.console_script("borg", "/nonexistent") is None


LAUNCHER = """#!/bin/sh
'''exec' PYTHON "$0" "$@"
' '''
import sys
from borg.archiver import main
sys.exit(main())
"""


@pytest.mark.parametrize("program", ["shell wrapper", "pip's launcher for long paths", "single-file binary",
                                     "env shebang", "missing"])
def test_any_other_borg_is_run_as_before(tmp_path: Path, program: str) -> None:
    path = tmp_path / "borg"
    if program == "shell wrapper":
        path.write_text('#!/bin/sh\nexec /usr/bin/borg "$@"\n')
    elif program == "pip's launcher for long paths":  # sh would run the preloader's Python as shell commands
        path.write_text(LAUNCHER.replace("PYTHON", sys.executable))
    elif program == "single-file binary":
        path.write_bytes(Path("/bin/true").read_bytes())
    elif program == "env shebang":
        path.write_text("#!/usr/bin/env python3\nfrom borg.archiver import main\nmain()\n")
    if path.exists():
        path.chmod(0o755)
    assert preload.console_script(str(path), os.defpath) is None
    assert preload.start(str(path), preload.base_environment(), "create") is None


def test_a_borg_started_early_runs_the_command_line_it_is_given_as_borg_itself() -> None:
    started = preloaded()
    try:
        seen = wait_for(lambda: PRELOADER.encode() in (line := Path(f"/proc/{started.process.pid}/cmdline").read_bytes())
                        and line, what="the preloader's command line").split(b"\0")  # once it has exec'd
        assert seen[-3:-1] == [BORG.encode(), b"create"] and seen[-6].endswith(PRELOADER.encode())  # what `ps` shows
    except BaseException:
        started.discard()
        raise
    process = started.release([BORG, "--version"])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and out.decode().startswith("borg 1.4"), err


def test_a_borg_started_early_is_named_borg_once_it_runs(tmp_path: Path) -> None:
    process = preloaded().release([BORG, "with-lock", str(tmp_path / "none"), "sleep", "30"])
    wait_for(lambda: Path(f"/proc/{process.pid}/comm").read_text().strip() == "borg", what="the name borg")
    process.kill()
    process.communicate(timeout=60)


def test_a_borg_started_early_and_not_needed_runs_nothing_and_ends() -> None:
    started = preloaded()
    started.discard()
    assert started.process.returncode is not None
    assert not [p for p in os.listdir("/proc") if p.isdigit() and p == str(started.process.pid)]
    empty = preloaded()
    os.close(empty._gate)  # the gate closed with nothing in it: the preloader leaves by itself
    empty._gate = None
    out, err = empty.process.communicate(timeout=120)
    assert empty.process.returncode == 0 and out == b"" and err == b""


def test_a_borg_that_does_not_import_early_is_started_as_before() -> None:
    """Under a memory limit the login set, say: the preloader is never handed anything; borg starts as always."""
    gate_read, gate = os.pipe()
    ready, ready_write = os.pipe()
    process = subprocess.Popen([sys.executable, "-I", "-S", path(PRELOADER), str(gate_read), str(ready_write), BORG,
                                "create"], pass_fds=(gate_read, ready_write), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)  # -S: no borg to import
    os.close(gate_read)
    os.close(ready_write)
    failing = preload.Preloaded(BORG, preload.base_environment(), process, gate, ready)
    system = LocalSystem(preloaded=failing)
    done = system.run((BORG, "--version"))
    assert done.exit_code == 0 and done.stdout.decode().startswith("borg 1.4")
    assert failing.process.returncode not in (None, 0) and system.preloaded is None


def test_an_interrupt_before_borg_runs_leaves_the_borg_started_early_as_it_was() -> None:
    started = preloaded()
    assert select.select([started._ready], [], [], 120)[0]  # it has imported borg and waits at its gate
    os.kill(started.process.pid, signal.SIGINT)  # what a stop would send; borg is not running yet
    process = started.release([BORG, "--version"])
    assert process is not None
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and out.decode().startswith("borg 1.4"), err


@pytest.mark.parametrize("kind, args, command", [
    ("backup", {}, "create"), ("extract", {"source": "coop/web1", "target": "/srv/restore"}, "extract"),
    ("extract", {"source": "coop/db1", "sealed": True}, "extract"),  # another's: the environment changes at the gate
    ("extract", {"source": "coop/db1"}, None),  # another node's, unsealed: refused anyway
    ("prune", {}, None), ("hello", {}, None), ("grant", {}, None),
])
def test_borg_is_started_early_for_a_backup_and_a_restore_onto_this_node(kind: str, args: dict,
                                                                         command: str | None) -> None:
    assert preload.command_for(kind, args, "coop/web1") == command


def test_a_borg_started_early_runs_in_the_directory_it_is_given_and_says_when_there_is_none(tmp_path: Path) -> None:
    env = {"BORG_BASE_DIR": str(tmp_path / "base")}
    system = LocalSystem(preloaded=preloaded({**preload.base_environment(), **env}))
    done = system.run((BORG, "init", "--encryption=none", "here"), env=env, cwd=str(tmp_path))  # a relative path
    assert done.exit_code == 0 and system.preloaded is None, done.stderr
    assert (tmp_path / "here" / "config").is_file()
    process = preloaded().release([BORG, "--version"], str(tmp_path / "none"))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 127 and err.decode() == f"{BORG}: No such file or directory\n"  # as Popen says


def test_a_restore_onto_another_node_changes_borgs_environment_at_the_gate_and_relays_its_passphrase(
        tmp_path: Path) -> None:
    """Started with this node's own source environment, the borg is handed a sealed restore's: its base directory,
    no passphrase command, the passphrase on a pipe, written once the run has begun (borg reads it on the gate)."""
    own = {**preload.base_environment(), "BORG_BASE_DIR": str(tmp_path / "own"), "BORG_PASSCOMMAND": "cat /nonexistent"}
    started = preload.start(BORG, own, "extract")
    assert started is not None
    system = LocalSystem(preloaded=started)
    read, write = os.pipe()
    env = {"BORG_BASE_DIR": str(tmp_path / "restore")}
    try:
        assert not started.fits((BORG, "init"), {**own, "BORG_OTHER": "1", "BORG_PASSPHRASE_FD": str(read)}, None,
                                (read,))  # anything else changed: a borg of its own
        assert not started.fits((BORG, "init"), {**own, "BORG_BASE_DIR": "x"}, None, ())  # no passphrase pipe
        import threading

        threading.Timer(0.5, lambda: (os.write(write, b"s3cret"), os.close(write))).start()  # after the run began
        done = system.run((BORG, "init", "--encryption=repokey", str(tmp_path / "repo")),
                          env={**env, "BORG_PASSPHRASE_FD": str(read)}, pass_fds=(read,))
    finally:
        os.close(read)
    assert done.exit_code == 0 and system.preloaded is None and started.process.returncode == 0, done.stderr
    assert (tmp_path / "restore" / ".config" / "borg" / "security").is_dir() and not (tmp_path / "own").exists()
    check = {**preload.base_environment(), **env, "BORG_PASSPHRASE": "s3cret"}
    info = subprocess.run([BORG, "info", str(tmp_path / "repo")], env=check, capture_output=True, timeout=120)
    assert info.returncode == 0, info.stderr
    wrong = subprocess.run([BORG, "info", str(tmp_path / "repo")], env={**check, "BORG_PASSPHRASE": "other"},
                           capture_output=True, timeout=120)
    assert wrong.returncode != 0


def test_a_borg_started_early_that_cannot_take_the_passphrase_pipe_is_ended_and_not_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = {**preload.base_environment(), "BORG_BASE_DIR": str(tmp_path / "own")}
    started = preload.start(BORG, own, "extract")
    assert started is not None
    read, write = os.pipe()
    other = {**own, "BORG_BASE_DIR": str(tmp_path / "restore"), "BORG_PASSPHRASE_FD": str(read)}
    assert started.fits((BORG, "--version"), other, None, (read,))

    def no_more_descriptors(fd: int) -> int:
        raise OSError(24, "Too many open files")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(preload.os, "dup", no_more_descriptors)
            assert started.release([BORG, "--version"], None, other, (read,)) is None  # the caller starts its own
    finally:
        os.close(read)
        os.close(write)
    assert started.process.returncode is not None and started._gate is None  # ended at its gate, nothing left open


def test_the_node_hands_a_borg_started_early_only_to_the_run_it_was_started_for(tmp_path: Path) -> None:
    started = preloaded()
    system = LocalSystem(preloaded=started)
    before = system.run(("sh", "-c", "echo before"))  # a backup's `before:` command: not borg
    assert before.exit_code == 0 and system.preloaded is started
    other = system.run((BORG, "--version"), env={"BORG_OTHER": "1"})  # another environment: a borg of its own
    assert other.exit_code == 0 and system.preloaded is started
    pidfile = tmp_path / "run" / "backup.pid"
    done = system.run((BORG, "--version"), pidfile=str(pidfile), run_id=7)
    assert done.exit_code == 0 and done.stdout.decode().startswith("borg 1.4") and system.preloaded is None
    assert started.process.returncode == 0 and not pidfile.exists()  # supervised as any run, then forgotten


def test_a_refused_backup_leaves_no_borg_started_early_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_node_requests import serve

    request = {"protocol": 1, "request": "backup", "node": "coop/store", "args": {"host": {}}}
    path = f"{Path(BORG).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    already = preloaders()
    code, lines = serve(tmp_path, "backup", json.dumps(request).encode() + b"\n", PATH=path)
    assert code != 0 and lines[-1]["event"] == "result" and not lines[-1]["ok"]
    assert preloaders() <= already
    from mutualbackup.node.config import load_config
    from mutualbackup.node.protocol import decode_request
    from mutualbackup.node.serve import _preloaded

    monkeypatch.setenv("PATH", path)  # what that serve saw: it did start borg early for the request
    config = load_config(str(tmp_path / "etc"))
    started = _preloaded(decode_request(json.dumps(request).encode()), config)
    assert started is not None and config.name == "coop/store"  # the request above is meant for it
    started.discard()


def preloaders() -> set[str]:
    """The borgs started early with this checkout's borg and still alive on this machine (PIDs): a lab or another
    test run from another checkout has its own."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(word.endswith(PRELOADER.encode()) for word in command) and BORG.encode() in command:
            found.add(pid)
    return found


# --- on the coordinator's hint, before the request is read ----------------------------------------------------------

BACKUP_HINT = "mutualbackup-node serve backup"  # what the coordinator asks sshd to run for a backup


def configured(tmp_path: Path) -> str:
    """A node's configuration directory (root's, as join leaves it) whose borg is the virtualenv's."""
    from test_node_requests import config

    from mutualbackup.node.config import write_config

    write_config(config(tmp_path, borg=BORG), str(tmp_path / "etc"))
    return str(tmp_path / "etc")


def children_preloading(pid: int) -> list[int]:
    """The borgs started early whose parent is ``pid``."""
    return [int(child) for child in preloaders() if parent_of(int(child)) == pid]


@pytest.mark.parametrize("hint", ["", "mutualbackup-node serve hello", "mutualbackup-node serve prune",
                                  "mutualbackup-node serve", "backup", "mutualbackup-node serve extract now",
                                  "mutualbackup-node serve backup; reboot", "mutualbackup-node serve backup extra"])
def test_no_borg_starts_on_any_other_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hint: str) -> None:
    monkeypatch.setenv(preload.HINT, hint)
    assert preload.on_hint(configured(tmp_path)) is None
    assert preload.HINT not in os.environ  # nothing this process starts sees it


def test_the_hint_of_a_backup_starts_borg_as_the_request_would_and_is_not_passed_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preload.HINT, BACKUP_HINT)
    directory = configured(tmp_path)
    started = preload.on_hint(directory)
    try:
        assert started is not None and preload.HINT not in os.environ
        from mutualbackup.node.config import load_config
        from mutualbackup.node.protocol import decode_request
        from mutualbackup.node.serve import _preloaded

        again = preload.for_source(BORG, load_config(directory).state, "create")  # what the request starts
        assert again is not None and (started.program, started.env, started.command) == (again.program, again.env, "create")
        again.discard()
        backup = json.dumps({"protocol": 1, "request": "backup", "node": "coop/store", "args": {}}).encode()
        assert _preloaded(decode_request(backup), load_config(directory), started) is started  # used, not another
    except BaseException:
        started.discard() if started is not None else None
        raise
    started.discard()


def test_the_hint_of_a_restore_starts_borgs_extract_used_by_a_restore_onto_this_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mutualbackup.node.config import load_config
    from mutualbackup.node.protocol import decode_request
    from mutualbackup.node.serve import _preloaded

    directory = configured(tmp_path)
    for args, used in (({"source": "coop/store", "target": "/srv/restore"}, True),
                       ({"source": "coop/web1", "target": "/srv/restore", "sealed": True}, True),  # another's
                       ({"source": "coop/web1", "target": "/srv/restore"}, False)):  # another's, unsealed: refused
        monkeypatch.setenv(preload.HINT, "mutualbackup-node serve extract")
        started = preload.on_hint(directory)
        assert started is not None and started.command == "extract"
        line = json.dumps({"protocol": 1, "request": "extract", "node": "coop/store", "args": args}).encode()
        kept = _preloaded(decode_request(line), load_config(directory), started)
        assert (kept is started) == used and (started.process.returncode is None) == used
        if kept is not None:
            kept.discard()


@pytest.mark.parametrize("request_line", [
    {"protocol": 1, "request": "hello", "node": "coop/store", "args": {"borg": False}},  # needs no borg
    {"protocol": 1, "request": "backup", "node": "coop/other", "args": {}},  # meant for another node
    {"protocol": 1, "request": "extract", "node": "coop/store", "args": {"source": "coop/store"}},  # another borg
], ids=["hello", "another node's backup", "a restore"])
def test_a_borg_started_on_the_hint_and_not_asked_for_is_ended_having_run_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_line: dict) -> None:
    from mutualbackup.node.config import load_config
    from mutualbackup.node.protocol import decode_request
    from mutualbackup.node.serve import _preloaded

    monkeypatch.setenv(preload.HINT, BACKUP_HINT)
    directory = configured(tmp_path)
    started = preload.on_hint(directory)
    assert started is not None
    instead = _preloaded(decode_request(json.dumps(request_line).encode()), load_config(directory), started)
    assert started.process.returncode is not None  # killed at its gate: it ran nothing
    assert (instead is None) == (request_line["request"] != "extract")  # a restore starts its own
    if instead is not None:
        assert instead.command == "extract"
        instead.discard()


def test_the_node_program_starts_borg_on_the_hint_before_the_request_comes(tmp_path: Path) -> None:
    directory = configured(tmp_path)
    env = {**os.environ, preload.HINT: BACKUP_HINT}
    program = subprocess.Popen([sys.executable, "-m", "mutualbackup.node.cli", "serve", "--config", directory],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        [early] = wait_for(lambda: children_preloading(program.pid), seconds=60, what="borg started on the hint")
        hello = {"protocol": 1, "request": "hello", "node": "coop/store", "args": {"borg": False}}
        out, err = program.communicate(json.dumps(hello).encode() + b"\n", timeout=60)
    finally:
        if program.poll() is None:
            program.kill()
            program.communicate()
    assert program.returncode == 0 and json.loads(out.splitlines()[-1])["ok"], err
    assert not Path(f"/proc/{early}").exists()  # the request needed none: ended with the program


def test_a_session_that_sends_no_request_keeps_no_borg_of_roots_waiting(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from mutualbackup.node import serve

    monkeypatch.setattr(serve, "EARLY_SECONDS", 0.3)
    monkeypatch.setenv(preload.HINT, BACKUP_HINT)
    started = preload.on_hint(configured(tmp_path))
    assert started is not None
    read, write = os.pipe()
    os.write(write, b'{"protocol": 1, "req')  # half a line, then nothing for a while
    later = threading.Timer(1.0, lambda: os.write(write, b'uest": "hello"}\n'))
    later.start()
    try:
        line, still = serve._request_line(serve.LineReader(read), started)
    finally:
        later.join()
        os.close(read)
        os.close(write)
    assert still is None and started.process.returncode is not None  # killed at its gate after EARLY_SECONDS
    assert line == b'{"protocol": 1, "request": "hello"}\n'  # and the request, when it came, was read whole
