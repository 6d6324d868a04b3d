"""The supervisor wrapper and the stop script, run here with /bin/sh as they run on a node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mutualbackup.remote import supervision
from mutualbackup.remote.transport import Result

from labkit import wait_for

PY_WAITS_FOR_SIGINT = (sys.executable, "-c",
                       "import signal, sys, time\n"
                       "signal.signal(signal.SIGINT, lambda *a: sys.exit(42))\n"
                       "print('started', flush=True)\n"
                       "time.sleep(120)\n")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_the_wrapper_passes_status_and_output_through_and_removes_its_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "peer.pid"
    argv = supervision.supervised_argv(str(pidfile), 17, ("sh", "-c", 'cat "$1"; echo oops >&2; exit 3', "sh", "/etc/hostname"))
    result = subprocess.run(list(argv), capture_output=True, timeout=30)
    assert result.returncode == 3
    assert result.stdout == Path("/etc/hostname").read_bytes()
    assert result.stderr.strip() == b"oops"
    assert not pidfile.exists()


def test_the_pidfile_names_the_command_its_run_and_its_start_time(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "peer.pid"
    proc = subprocess.Popen(list(supervision.supervised_argv(str(pidfile), 99, PY_WAITS_FOR_SIGINT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        info = wait_for(lambda: pidfile.exists() and supervision.parse_pidfile(pidfile.read_bytes()), 20)
        assert info.run_id == 99 and alive(info.pid) and info.started
        assert Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")[0] == sys.executable.encode()
        assert oct(pidfile.parent.stat().st_mode & 0o777) == "0o700"
    finally:
        proc.kill()
        proc.wait()


def test_when_the_session_is_gone_the_wrapper_stops_the_command_with_sigint(tmp_path: Path) -> None:
    pidfile = tmp_path / "peer.pid"
    argv = supervision.supervised_argv(str(pidfile), 1, PY_WAITS_FOR_SIGINT, heartbeat=1, grace=5)
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info = wait_for(lambda: pidfile.exists() and supervision.parse_pidfile(pidfile.read_bytes()), 20)
    assert proc.stdout.readline() == b"started\n"
    proc.stderr.close()  # what sshd does when the coordinator's connection dies
    proc.stdout.close()
    wait_for(lambda: not alive(info.pid), 15)
    assert proc.wait(timeout=15) == 42  # the command's own SIGINT handling ran
    assert not pidfile.exists()


def test_the_stop_script_escalates_to_sigterm_for_a_command_that_ignores_sigint(tmp_path: Path) -> None:
    pidfile = tmp_path / "peer.pid"
    ignores_int = (sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)\n")
    proc = subprocess.Popen(list(supervision.supervised_argv(str(pidfile), 1, ignores_int)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    info = wait_for(lambda: pidfile.exists() and supervision.parse_pidfile(pidfile.read_bytes()), 20)
    stopped = subprocess.run(list(supervision.stop_argv(str(pidfile), 1, 5)), capture_output=True, timeout=30)
    assert stopped.returncode == 0
    assert stopped.stdout.strip() == b"stopped by SIGTERM"
    assert not alive(info.pid)
    assert proc.wait(timeout=10) == 128 + 15


def test_the_stop_script_never_signals_a_pid_that_now_belongs_to_another_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "peer.pid"
    pidfile.write_text(f"{os.getpid()}\n5\nThu Jan  1 00:00:00 1970\n")  # this test process, started later
    stopped = subprocess.run(list(supervision.stop_argv(str(pidfile), 1, 1)), capture_output=True, timeout=30)
    assert stopped.returncode == 0 and stopped.stdout.strip() == b"not running"
    assert not pidfile.exists()


def test_unwrap_gives_back_the_inner_argv_pidfile_and_run() -> None:
    inner = ("borg", "create", "ssh://h/x::a", "--", "/etc")
    assert supervision.unwrap(supervision.supervised_argv("/w/run/p.pid", 12, inner)) == (inner, "/w/run/p.pid", 12)
    assert supervision.unwrap(inner) == (inner, None, None)


def test_pidfile_names_are_unambiguous_per_peer() -> None:
    assert supervision.pidfile_path("/w", "coop-a/web-1") == "/w/run/coop-a.web-1.pid"
    assert supervision.pidfile_path("/w", "coop/a-web-1") != supervision.pidfile_path("/w", "coop-a/web-1")


def test_heartbeat_lines_are_dropped_from_stderr_and_garbled_pidfiles_are_ignored() -> None:
    result = Result(("x",), 2, b"", b"\n\nerror: one\n\n\nerror: two\n\n")
    assert supervision.without_heartbeats(result).stderr == b"error: one\nerror: two\n"
    assert supervision.parse_pidfile(b"") is None and supervision.parse_pidfile(b"abc\n") is None
    assert supervision.parse_pidfile(b"12\n\n") == supervision.PidFile(12, None, "")
