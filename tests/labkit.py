"""Helpers for end-to-end tests on a lab federation: a standard layout, running the CLI
in-process, comparing trees."""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import io
import json
import os
import sys
import time
from types import ModuleType
from pathlib import Path
from typing import Any, Callable

import pytest

from mutualbackup.cli import main
from lab.federation import LabFederation

AWKWARD_PATH = "/srv/it's \"here\" now"


def three_members(*, window: str | None = None, replicas: int = 2) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """coopcycle (paris) and ouvaton (lyon) lend one node each, picasoft (compiegne) two.

    Every member has a source; coopcycle's backs up a path with spaces and quotes.
    """
    defaults: dict[str, Any] = {"replicas": replicas, "every": "24h", "rpo": "26h", "retention": {"daily": 7}}
    if window:
        defaults["window"] = window
    federation = {
        "federation": "test-federation",
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "Europe/Paris"},
        "defaults": defaults,
    }
    members = {
        "coopcycle": {
            "member": "coopcycle", "contact": "ops@coopcycle.example", "site": "paris",
            "nodes": [{"name": "web1", "address": "x", "user": "x", "host_key": "x",
                       "backup": {"paths": ["/etc", AWKWARD_PATH], "exclude": ["*.cache"], "estimate": "1GiB"},
                       "storage": {"path": "/srv/mb", "capacity": "100GiB"}}],
        },
        "ouvaton": {
            "member": "ouvaton", "contact": "admin@ouvaton.example", "site": "lyon",
            "nodes": [{"name": "mail1", "address": "x", "user": "x", "host_key": "x",
                       "backup": {"paths": ["/var/mail"], "estimate": "1GiB"},
                       "storage": {"path": "/srv/mb", "capacity": "100GiB"}}],
        },
        "picasoft": {
            "member": "picasoft", "contact": "tech@picasoft.example", "site": "compiegne",
            "nodes": [
                {"name": "app1", "address": "x", "user": "x", "host_key": "x",
                 "backup": {"paths": ["/srv/app"], "estimate": "1GiB"}},
                {"name": "store1", "address": "x", "user": "x", "host_key": "x",
                 "storage": {"path": "/srv/mb", "capacity": "200GiB"}},
                {"name": "store2", "address": "x", "user": "x", "host_key": "x",
                 "storage": {"path": "/srv/mb", "capacity": "200GiB"}},
            ],
        },
    }
    return federation, members


def alpha_beta(name: str, defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The smallest federation: alpha/web (a source) backs up onto beta/store (a host)."""
    federation = {
        "federation": name,
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "UTC"},
        "defaults": {"replicas": 1, "every": "24h", **defaults},
    }
    members = {
        "alpha": {"member": "alpha", "contact": "ops@alpha.example", "site": "a",
                  "nodes": [{"name": "web", "address": "x", "user": "x", "host_key": "x",
                             "backup": {"paths": ["/srv/data"], "estimate": "1GiB"}}]},
        "beta": {"member": "beta", "contact": "ops@beta.example", "site": "b",
                 "nodes": [{"name": "store", "address": "x", "user": "x", "host_key": "x",
                            "storage": {"path": "/srv/mb", "capacity": "100GiB"}}]},
    }
    return federation, members


def dequote_command(line: str) -> tuple[str, str]:
    """(command, the rest) of a ``command="…"`` line, dequoted as OpenSSH does (only \\" is special)."""
    assert line.startswith('command="')
    out, i = [], len('command="')
    while line[i] != '"':
        if line[i] == "\\" and line[i + 1] == '"':
            i += 1
        out.append(line[i])
        i += 1
    return "".join(out), line[i + 1 :]


def mb(inventory: LabFederation | Path | str, *args: str) -> tuple[int, str, str]:
    """Run ``mutualbackup --inventory … ARGS`` in-process; return (exit code, stdout, stderr)."""
    directory = inventory.inventory if isinstance(inventory, LabFederation) else inventory
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--inventory", str(directory), *args])
    return code, out.getvalue(), err.getvalue()


def mb_json(inventory: LabFederation | Path | str, *args: str) -> tuple[int, Any]:
    code, out, err = mb(inventory, *args, "--json")
    try:
        return code, json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON (exit {code}): {out!r} {err!r}") from exc


def write_tree(root: Path, seed: int = 0) -> None:
    """Files worth restoring: text, binary, empty, nested, awkward names, a symlink, modes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "plain.txt").write_text(f"hello {seed}\n")
    (root / "it's a \"quoted\" name — été.txt").write_text("awkward but valid\n")
    (root / "empty").write_bytes(b"")
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "skip.cache").write_text("excluded\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    link = root / "link-to-plain"
    if not link.exists():
        link.symlink_to("plain.txt")


def same_tree(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Differences between two trees (names, bytes, modes, symlink targets); empty when equal."""
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(a):
        rel = Path(dirpath).relative_to(a)
        for name in dirnames + filenames:
            if any(name.endswith(i) for i in ignore):
                continue
            pa, pb = Path(dirpath) / name, b / rel / name
            if not os.path.lexists(pb):
                problems.append(f"missing {rel / name}")
                continue
            if pa.is_symlink():
                if not pb.is_symlink() or os.readlink(pa) != os.readlink(pb):
                    problems.append(f"symlink differs {rel / name}")
                continue
            if pa.stat().st_mode != pb.stat().st_mode:
                problems.append(f"mode differs {rel / name}")
            if pa.is_file() and not filecmp.cmp(pa, pb, shallow=False):
                problems.append(f"content differs {rel / name}")
    return problems


def wait_for(condition: Callable[[], Any], seconds: float = 10.0, what: str = "the condition", step: float = 0.02) -> Any:
    """Poll ``condition`` every ``step`` seconds until it returns something truthy (returned); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")


def daemon_idle(inventory: Path, state: Path, seconds: float = 120.0) -> None:
    """Wait until the daemon of ``inventory`` and ``state`` takes handed-off runs (mutualbackup/handoff) and, its first tick
    past, has no job running (what its first tick found due, a drill say, has ended)."""
    import socket

    from mutualbackup.handoff import address
    from mutualbackup.state.history import History

    def serving() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, address(str(state)) as where:
            return probe.connect_ex(where) == 0

    wait_for(serving, 60, "the daemon to take handed-off runs")
    time.sleep(1.0)  # its first tick
    history = History(state)
    wait_for(lambda: not history.runs(result="running"), seconds, "the daemon's first jobs to end", step=0.2)


BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str) -> ModuleType:
    """The bench script ``bench/NAME.py`` as a module (skips the test where a lab cannot run)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("the bench needs root and /usr/sbin/sshd")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # for bench/benchkit.py
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
