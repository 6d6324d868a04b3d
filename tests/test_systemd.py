"""The systemd unit shipped with the project (checked by ``systemd-analyze verify``), and the notify protocol
the daemon speaks to it: READY=1 once /metrics answers, WATCHDOG=1 from its loop, STOPPING=1 on SIGTERM —
against a real datagram socket, from a real ``mutualbackup daemon`` process."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab.federation import free_port
from mutualbackup.systemd_notify import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "mutualbackup.service"


def directives(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key.strip()] = value.strip()
    return found


def test_the_unit_says_what_a_sysadmin_expects() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Type"] == "notify" and unit["WatchdogSec"] and unit["Restart"] == "on-failure"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID" and unit["User"] == "mutualbackup"
    assert unit["ProtectSystem"] == "strict" and unit["ReadWritePaths"] == "/var/lib/mutualbackup"
    assert unit["NoNewPrivileges"] == unit["PrivateTmp"] == unit["ProtectHome"] == "yes"
    assert " daemon " in unit["ExecStart"] + " "


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    program = Path(sys.executable).parent / "mutualbackup"
    unit = tmp_path / "mutualbackup.service"
    unit.write_text(UNIT.read_text().replace("/opt/mutualbackup/bin/mutualbackup", str(program)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mutualbackup.service" not in done.stderr, done.stderr  # no warning about our unit


def listening(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    return sock


def test_the_notifier_speaks_the_protocol_and_is_silent_without_systemd(tmp_path: Path) -> None:
    sock = listening(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"})
    assert notifier.ready("3 source(s)")
    assert sock.recv(1024) == b"READY=1\nSTATUS=3 source(s)"
    notifier.ping()
    notifier.ping()  # within half the interval: not sent again
    assert sock.recv(1024) == b"WATCHDOG=1"
    assert notifier.stopping() and sock.recv(1024) == b"STOPPING=1"
    assert Notifier({}).ready("x") is False and Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog is None
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0mutualbackup-test-{tmp_path.name}")
    assert Notifier({"NOTIFY_SOCKET": f"@mutualbackup-test-{tmp_path.name}"}).stopping()
    assert abstract.recv(64) == b"STOPPING=1"


def test_the_daemon_is_ready_once_metrics_answer_pings_the_watchdog_and_says_when_it_stops(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory"
    shutil.copytree(REPO / "tests" / "inventories" / "three-members", inventory)
    port = free_port()
    federation = inventory / "federation.yml"
    federation.write_text(federation.read_text().replace("127.0.0.1:9468", f"127.0.0.1:{port}"))
    sock = listening(tmp_path)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000", "PATH": "/usr/bin:/bin"}
    daemon = subprocess.Popen([sys.executable, "-m", "mutualbackup.cli", "--inventory", str(inventory), "--state",
                               str(tmp_path / "state"), "daemon", "--tick", "0.1", "--grace", "1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=REPO)
    try:
        messages = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(sock.recv(1024))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200  # ready means serving
        pings = 0
        deadline = time.monotonic() + 10
        while pings < 3 and time.monotonic() < deadline:
            pings += sock.recv(1024) == b"WATCHDOG=1"
        assert pings == 3
        daemon.send_signal(signal.SIGTERM)
        while sock.recv(1024) != b"STOPPING=1":
            pass
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sock.close()
