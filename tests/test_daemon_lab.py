"""The daemon on real sshd nodes and real borg: a host dying mid-backup, kill -9, SIGTERM.

Two federations for the module:

- three members (five nodes, three sources x two replicas), driven in-process by a
  real Daemon whose clock is shifted, so that two daily rounds and a retry take
  seconds, not days;
- two members (alpha/web backs up onto beta/store), driven by ``mutualbackup
  daemon`` subprocesses, killed with SIGKILL and stopped with SIGTERM.

A backup is caught "in the middle" deterministically: once the host's
``borg serve`` holds the repository lock, the test freezes it (SIGSTOP).
Everything else polls; nothing sleeps blindly.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from mutualbackup import borg
from lab import federation as labfed
from mutualbackup.context import Context, ssh_connector
from mutualbackup.daemon import Daemon
from mutualbackup.state.history import History
from mutualbackup.inventory.load import load_inventory
from lab.nodes import Lab, LabNode
from lab.federation import LabFederation
from mutualbackup.jobs.maintenance import check_replica
from mutualbackup.restore.replicas import list_archives
from mutualbackup.plan.windows import jitter_seconds
from mutualbackup.report.status import compute_status

from labkit import alpha_beta, daemon_idle, mb, wait_for, write_tree

pytestmark = pytest.mark.lab


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def serve_holding_lock(lab: Lab, host: LabNode, repository: Path) -> int | None:
    """The pid of the host's ``borg serve`` of ``repository`` once the repository is locked."""
    if not any((repository / "lock.exclusive").glob("*")):
        return None
    for pid in lab.processes(host):
        words = cmdline(pid)
        if "serve" in words and str(repository) in words:
            return pid
    return None


def borg_creates(lab: Lab, source: LabNode) -> list[int]:
    """borg create processes started through the source's sshd."""
    return [pid for pid in lab.processes(source) if "create" in cmdline(pid) and any("borg" in w for w in cmdline(pid))]


def repository(fed: LabFederation, source: str, host: str) -> Path:
    member, slug = source.split("/")
    return Path(fed.nodes[host].storage) / member / slug


def borg_url(fed: LabFederation, source: str, host: str) -> str:
    node = fed.nodes[host]
    return f"ssh://{node.user}@127.0.0.1:{node.port}{repository(fed, source, host)}"


def borg_as(fed: LabFederation, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """borg run on this machine exactly as ``source`` runs it: its key, pinned hosts, passphrase and cache."""
    env = {**os.environ, **borg.client_env(borg.SourcePaths(str(fed.nodes[source].state)))}
    return subprocess.run([fed.lab.borg, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def skip_without_lab() -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")


# --- in-process daemon, three members -----------------------------------------------------


class ShiftedClock:
    """Real time plus a shift the test moves forward (a day in a second)."""

    def __init__(self) -> None:
        self.shift = 0.0

    def time(self) -> float:
        return time.time() + self.shift


def trio_members() -> tuple[dict, dict]:
    """alpha/web has a replica on beta/box and on gamma/box; beta/box (also a source) one on gamma/box."""
    federation = {
        "federation": "daemon-trio",
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "Europe/Paris"},
        "defaults": {"replicas": 2, "every": "24h", "rpo": "26h", "retention": {"daily": 7}},
    }
    members = {
        "alpha": {"member": "alpha", "contact": "ops@alpha.example", "site": "a",
                  "nodes": [{"name": "web", "address": "x", "user": "x", "host_key": "x",
                             "backup": {"paths": ["/srv/web"], "estimate": "1GiB"}}]},
        "beta": {"member": "beta", "contact": "ops@beta.example", "site": "b",
                 "nodes": [{"name": "box", "address": "x", "user": "x", "host_key": "x",
                            "backup": {"paths": ["/srv/box"], "estimate": "1GiB", "replicas": 1},
                            "storage": {"path": "/srv/mb", "capacity": "100GiB"}}]},
        "gamma": {"member": "gamma", "contact": "ops@gamma.example", "site": "c",
                  "nodes": [{"name": "box", "address": "x", "user": "x", "host_key": "x",
                             "storage": {"path": "/srv/mb", "capacity": "100GiB"}}]},
    }
    return federation, members


DATA = (("alpha/web", "/srv/web"), ("beta/box", "/srv/box"))


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    skip_without_lab()
    root = tmp_path_factory.mktemp("daemon3")
    with Lab(root / "lab", borg=borg_path) as lab:
        fed = labfed.build(lab, *trio_members(), root)
        for node, path in DATA:
            write_tree(fed.data_path(node, path))
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        yield fed


def run_jobs(daemon: Daemon, done: Callable[[], bool], seconds: float, what: str,
             watch: Callable[[], None] | None = None) -> None:
    """Tick the daemon at its clock's now until ``done()``; ``watch`` runs between ticks."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        daemon.step(daemon.now())
        if watch is not None:
            watch()
        daemon.wake.wait(0.1)
        daemon.wake.clear()
    while daemon.running:  # let what is running end; start nothing more
        assert time.monotonic() < deadline, f"timed out waiting for the jobs of {what} to end"
        daemon.reap()
        daemon.wake.wait(0.1)
        daemon.wake.clear()


def test_two_rounds_where_a_host_dies_mid_backup_fail_only_its_replica_which_recovers_when_it_returns(
    trio: LabFederation, caplog: pytest.LogCaptureFixture,
) -> None:
    fed = trio
    federation = load_inventory(str(fed.inventory))
    history = History(fed.state)
    ctx = Context(federation, history, ssh_connector(federation))
    pairs = [(s, t) for s, targets in history.placement().items() for t in targets]
    assert sorted(pairs) == [("alpha/web", "beta/box"), ("alpha/web", "gamma/box"), ("beta/box", "gamma/box")]
    clock = ShiftedClock()
    daemon = Daemon(ctx, clock=clock.time)

    # Round 1: never backed up; first runs start at each source's slot of the hour (jitter).
    latest_slot = max(jitter_seconds(s.name, 3600) for s in federation.sources())
    assert latest_slot < 3000  # leaves the round time to start every replica within the hour
    hour = (time.time() // 3600 + 1) * 3600
    clock.shift = hour + latest_slot + 1 - time.time()

    def successes(since: float) -> set[tuple[str, str]]:
        return {(r.source, r.target) for r in history.runs(kind="backup", result="success") if r.started >= since}

    round1 = clock.time() - 1
    run_jobs(daemon, lambda: successes(round1) == set(pairs), 120, "round 1")
    assert {r.result for r in history.runs(kind="prune")} == {"success"}

    # Round 2, a day later, with new data; gamma/box dies in the middle of alpha/web's backup into it.
    for node, path in DATA:
        (fed.data_path(node, path) / "day2.bin").write_bytes(os.urandom(16_000_000))  # a backup long enough to catch
    victim_source, victim_host = "alpha/web", "gamma/box"
    victim_repo = repository(fed, victim_source, victim_host)
    clock.shift += 24 * 3600 + 60
    round2 = clock.time() - 1
    killed: list[int] = []

    def kill_the_host_mid_backup() -> None:
        if killed:
            return
        pid = serve_holding_lock(fed.lab, fed.nodes[victim_host], victim_repo)
        if pid:
            os.kill(pid, signal.SIGSTOP)  # frozen: whatever holds the lock cannot finish now
            if not history.runs(kind="backup", source=victim_source, target=victim_host, result="running"):
                os.kill(pid, signal.SIGCONT)  # the prune after the backup, not the backup: not this one
                return
            killed.append(pid)  # the backup is now certainly in the middle
            fed.lab.kill(fed.nodes[victim_host])

    def round2_settled() -> bool:
        victim_failed = any(r.result == "failure" for r in history.runs(kind="backup", source=victim_source, target=victim_host)
                            if r.started >= round2)
        return bool(killed) and ("alpha/web", "beta/box") in successes(round2) and victim_failed

    run_jobs(daemon, round2_settled, 180, "round 2 with a host killed", watch=kill_the_host_mid_backup)
    failed = [r for r in history.runs(kind="backup", source=victim_source, target=victim_host) if r.started >= round2]
    assert [r.result for r in failed] == ["failure"]
    assert failed[0].exit_code not in (0, 1) and failed[0].error
    others = [r for r in history.runs(kind="backup") if r.started >= round2 and r.target != victim_host]
    assert others and {r.result for r in others} == {"success"}  # the other replicas are not affected

    # The host comes back; after the back-off (5 min) the next attempt succeeds.
    fed.lab.start(fed.nodes[victim_host])
    clock.shift += 600
    run_jobs(daemon, lambda: successes(round2) == set(pairs), 120, "the retries")
    assert [r.result for r in history.runs(kind="backup", source=victim_source, target=victim_host)
            if r.started >= round2] == ["success", "failure"]
    alerts = [a for a in history.alerts() if a["kind"] == "stale-lock-broken"]
    notes = [r.getMessage() for r in caplog.records if r.name == "mutualbackup.jobs.crash_cleanup"]
    assert alerts and alerts[0]["target"] == victim_host, notes  # the killed borg serve's lock, certainly dead
    # borg check is clean (with a history of its own: the host's mtimes are in real time, not shifted).
    scratch = Context(federation, History(fed.state.parent / "scratch-state"), ctx.connector)
    repo_check, archives_check = check_replica(scratch, federation.node(victim_source), federation.node(victim_host))
    assert repo_check.ok and archives_check.ok, (repo_check.error, archives_check.error)
    _, present = list_archives(ctx, federation.node(victim_source), victim_host)
    known = history.known_archives(victim_source, victim_host)
    assert {n for n, (_, pruned) in known.items() if pruned is None} <= {a.name for a in present}  # none lost
    states = {(r.source, r.target): r.state for r in compute_status(federation, history.placement(), history, clock.time())}
    assert set(states.values()) == {"ok"}


# --- daemon subprocesses, two members ---------------------------------------------------


def two_members(window: str) -> tuple[dict, dict]:
    return alpha_beta("daemon-lab", {"window": window, "retention": {"daily": 7}})


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    skip_without_lab()
    root = tmp_path_factory.mktemp("daemon2")
    now = dt.datetime.now(dt.timezone.utc)
    window = f"{now - dt.timedelta(hours=1):%H:%M}-{now + dt.timedelta(hours=3):%H:%M}"  # open now: first runs start at once
    with Lab(root / "lab", borg=borg_path) as lab:
        fed = labfed.build(lab, *two_members(window), root)
        write_tree(fed.data_path("alpha/web", "/srv/data"))
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        yield fed


class DaemonProcess:
    """``mutualbackup daemon`` in a subprocess of this test; its log goes to a file."""

    def __init__(self, fed: LabFederation, log: Path, *args: str, env: dict[str, str] | None = None):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mutualbackup.cli", "--inventory", str(fed.inventory), "daemon", "--tick", "0.5", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**os.environ, **(env or {})},
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)


SOURCE, HOST = "alpha/web", "beta/store"


def test_kill_9_of_the_daemon_mid_backup_leaves_no_borg_behind_and_the_restarted_daemon_recovers(
    two: LabFederation, tmp_path: Path,
) -> None:
    fed = two
    repo = repository(fed, SOURCE, HOST)
    first = DaemonProcess(fed, tmp_path / "first.log")
    try:
        serve = wait_for(lambda: serve_holding_lock(fed.lab, fed.nodes[HOST], repo), 60, "a backup in progress")
        os.kill(serve, signal.SIGSTOP)
        first.proc.kill()  # kill -9 of the coordinator in the middle of the backup
        assert first.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    os.kill(serve, signal.SIGCONT)
    # The supervisor on the source notices the lost session and stops borg (SIGINT: it keeps a checkpoint).
    wait_for(lambda: not borg_creates(fed.lab, fed.nodes[SOURCE]), 60, "the orphaned borg create to stop")
    wait_for(lambda: not (repo / "lock.exclusive").exists(), 30, "the repository lock to be released")  # no stale lock
    history = History(fed.state)
    assert [r.result for r in history.runs(kind="backup")] == ["running"]  # what the dead daemon left

    second = DaemonProcess(fed, tmp_path / "second.log", env={"JOURNAL_STREAM": "8:1234"})
    try:
        wait_for(lambda: history.last_run("backup", SOURCE, HOST, successful=True), 90, "the next backup to succeed")
    finally:
        assert second.stop() == 0
    runs = history.runs(kind="backup")
    assert [r.result for r in runs] == ["success", "interrupted"]
    assert "killed or crashed" in runs[1].error
    assert not history.runs(result="running")
    log = second.text()
    assert f"backup  start  {SOURCE} -> {HOST}" in log and f"backup  end    {SOURCE} -> {HOST}  success" in log
    assert "was interrupted by a previous crash; marked" in log
    assert "\x1b[" not in log  # plain lines for the journal: a level word, no colour, no timestamp
    assert all(line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in log.splitlines()
               if line and not line[0].isspace())
    # Nothing lost: every archive the coordinator recorded and did not prune is there, and borg check is clean.
    code, out, err = mb(fed, "verify")
    assert code == 0, err
    federation = load_inventory(str(fed.inventory))
    ctx = Context(federation, history, ssh_connector(federation))
    _, present = list_archives(ctx, federation.node(SOURCE), HOST)
    known = history.known_archives(SOURCE, HOST)
    assert known and {n for n, (_, pruned) in known.items() if pruned is None} <= {a.name for a in present}


def test_sigterm_during_a_backup_aborts_it_cleanly_and_exits_0_within_the_grace_period(
    two: LabFederation, tmp_path: Path,
) -> None:
    fed = two
    inventory = fed.inventory / "federation.yml"
    doc = yaml.safe_load(inventory.read_text())
    doc["defaults"]["every"] = "5s"  # due again at once
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    big = fed.data_path(SOURCE, "/srv/data") / "sparse"
    big.mkdir()
    for i in range(64):  # 64 GiB of holes: borg reads zeros for a long while, the disk stays empty;
        with open(big / f"part{i:02d}.img", "wb") as f:  # many files, as SIGINT takes effect between files
            f.truncate(1024**3)
    repo = repository(fed, SOURCE, HOST)
    history = History(fed.state)
    before = len(history.runs(kind="backup"))
    grace = 8.0  # half of it for the job to end by itself, half to abort it cleanly
    daemon = DaemonProcess(fed, tmp_path / "daemon.log", "--grace", str(grace))
    try:
        wait_for(lambda: serve_holding_lock(fed.lab, fed.nodes[HOST], repo), 60, "a backup in progress")
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(timeout=60)
        elapsed = time.monotonic() - began
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        shutil.rmtree(big)
        doc["defaults"]["every"] = "24h"
        inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    log = daemon.text()
    assert code == 0, log
    assert elapsed < grace + 1.5, elapsed
    assert "aborting 1 job(s)" in log
    assert f"aborted backup {SOURCE} -> {HOST} on {SOURCE}: stopped by SIGINT" in log  # borg's clean stop
    assert len(history.runs(kind="backup")) == before + 1
    aborted = history.runs(kind="backup")[0]
    assert aborted.result == "interrupted" and "aborted" in aborted.error and "checkpoint" in aborted.error
    assert not history.runs(result="running")
    assert not borg_creates(fed.lab, fed.nodes[SOURCE])
    listed = borg_as(fed, SOURCE, "list", "--short", "--consider-checkpoints", borg_url(fed, SOURCE, HOST))
    assert listed.returncode == 0, listed.stderr
    assert any(name.endswith(".checkpoint") for name in listed.stdout.split())  # SIGINT: borg kept what it had sent
    code, out, err = mb(fed, "run")  # the lock was released: the next backup works
    assert code == 0, err


def test_a_failing_before_command_fails_the_backup_with_its_stderr_tail_and_makes_no_archive(two: LabFederation) -> None:
    fed = two
    members = fed.inventory / "members" / "alpha.yml"
    original = members.read_text()
    doc = yaml.safe_load(original)
    doc["nodes"][0]["backup"]["before"] = ["echo \"dumping 'db'\"; echo 'pg_dump: error: connection refused' >&2; exit 3"]
    signature = Path(f"{members}.sig").read_bytes()
    labfed.write_signed(fed.lab, members, doc)  # alpha's admin signs the new command
    try:
        history = History(fed.state)
        archives_before = set(history.known_archives(SOURCE, HOST))
        code, out, err = mb(fed, "run", SOURCE)
    finally:
        members.write_text(original)
        Path(f"{members}.sig").write_bytes(signature)
    assert code == 1
    assert "the before: command failed with exit 3, so no backup was made" in err
    assert "pg_dump: error: connection refused" in err
    run = history.runs(kind="backup")[0]
    assert run.result == "failure" and "pg_dump: error: connection refused" in run.error
    assert set(history.known_archives(SOURCE, HOST)) == archives_before


def test_sighup_during_a_backup_re_reads_the_inventory_and_the_backup_ends_success(
    two: LabFederation, tmp_path: Path,
) -> None:
    fed = two
    code, out, err = mb(fed, "run", SOURCE)  # a success first: a failed run before would hold the next one back
    assert code == 0, out + err
    big = fed.data_path(SOURCE, "/srv/data") / "holes"
    big.mkdir()
    for i in range(3):  # 3 GiB of holes: a backup of a few seconds that writes nearly nothing
        with open(big / f"part{i}.img", "wb") as f:
            f.truncate(1024**3)
    repo = repository(fed, SOURCE, HOST)
    history = History(fed.state)
    before = {r.id for r in history.runs(kind="backup")}
    inventory = fed.inventory / "federation.yml"
    doc = yaml.safe_load(inventory.read_text())
    original = inventory.read_text()
    doc["defaults"]["every"] = "5s"
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    daemon = DaemonProcess(fed, tmp_path / "daemon.log")
    try:
        wait_for(lambda: serve_holding_lock(fed.lab, fed.nodes[HOST], repo), 60, "a backup in progress")
        [running] = [r for r in history.runs(kind="backup", result="running")]
        code, out, err = mb(fed, "run", SOURCE)  # one job per replica: `run` says who holds it, starts nothing
        assert code == 1 and f"{SOURCE} → {HOST}  not started: its backup (run {running.id}" in err, err
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "inventory reloaded" in daemon.text(), 30, "the reload")
        def finished():  # noqa: ANN202
            [run] = [r for r in history.runs(kind="backup") if r.id == running.id]
            return run if run.result != "running" else None

        ended = wait_for(finished, 120, "the backup to end")
        assert daemon.proc.poll() is None  # still serving
    finally:
        shutil.rmtree(big)
        inventory.write_text(original)
        code = daemon.stop()
    log = daemon.text()
    assert code == 0, log
    assert "received SIGHUP: re-reading the inventory" in log
    assert ended.result == "success", ended.error
    assert running.id not in before and not history.runs(result="running")


def handed_off_run(fed: LabFederation, cache: Path, *args: str, handoff: str = "yes") -> subprocess.Popen[str]:
    """The ``mutualbackup`` executable (``__main__``: where a run is handed to the daemon), ``run ARGS``."""
    return subprocess.Popen([sys.executable, "-m", "mutualbackup", "--inventory", str(fed.inventory), "run", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "XDG_CACHE_HOME": str(cache), "MUTUALBACKUP_HANDOFF": handoff})


def printed(command: subprocess.Popen[str]) -> tuple[int, str, str]:
    """What a command printed, its digits (times, sizes, run ids) made alike."""
    import re

    out, err = command.communicate(timeout=120)
    return command.returncode, re.sub(r"\d+", "N", out), re.sub(r"\d+", "N", err)


def test_a_run_while_the_daemon_serves_the_inventory_is_run_by_the_daemon_and_ctrl_c_stops_it_there(
    two: LabFederation, tmp_path: Path,
) -> None:
    import re

    fed = two
    code, out, err = mb(fed, "run", SOURCE)  # in-process: a success first, so that the daemon has nothing due
    assert code == 0, out + err
    history = History(fed.state)
    daemon = DaemonProcess(fed, tmp_path / "daemon.log")
    big = fed.data_path(SOURCE, "/srv/data") / "holes"
    cache = tmp_path / "cache"
    try:
        daemon_idle(fed.inventory, fed.state)
        itself = printed(handed_off_run(fed, cache, SOURCE, handoff="no"))  # MUTUALBACKUP_HANDOFF=no: in the command
        assert history.runs(kind="backup", source=SOURCE, limit=1)[0].pid != daemon.proc.pid
        time.sleep(1.1)  # one archive a second
        first = printed(handed_off_run(fed, cache, SOURCE))  # handed over once the inventory is read (cli.cmd_run)
        assert history.runs(kind="backup", source=SOURCE, limit=1)[0].pid == daemon.proc.pid
        kept = (cache / "mutualbackup" / "connections.json").read_text()
        assert json.dumps(str(fed.state)) in kept  # the state directory the command line used, for next time
        time.sleep(1.1)
        again = printed(handed_off_run(fed, cache, SOURCE))  # handed over before anything is imported (__main__)
        [run] = history.runs(kind="backup", source=SOURCE, limit=1)
        assert run.result == "success" and run.pid == daemon.proc.pid  # the daemon ran it
        assert itself[0] == 0, itself
        assert re.fullmatch(rf"{SOURCE} → {HOST}  success  \S+  \S+ \S+ read, \S+ \S+ new  N.Ns\n", itself[1])
        assert "INFO    backup  start  " in itself[2] and "INFO    backup  end    " in itself[2], itself
        assert first == itself and again == itself  # the same lines, log lines included

        big.mkdir()
        for i in range(16):  # 16 GiB of holes: a backup that reads zeros for a long while
            with open(big / f"part{i:02d}.img", "wb") as f:
                f.truncate(1024**3)
        repo = repository(fed, SOURCE, HOST)
        command = handed_off_run(fed, cache, SOURCE)
        wait_for(lambda: serve_holding_lock(fed.lab, fed.nodes[HOST], repo), 60, "the handed-off backup in progress")
        [running] = history.runs(kind="backup", source=SOURCE, result="running")
        assert running.pid == daemon.proc.pid
        command.send_signal(signal.SIGINT)  # the operator's Ctrl-C
        out, err = command.communicate(timeout=60)
        assert command.returncode == 1 and "interrupted" in err, out + err
        wait_for(lambda: not borg_creates(fed.lab, fed.nodes[SOURCE]), 60, "the source's borg create to stop")
        [stopped] = [r for r in history.runs(kind="backup", source=SOURCE) if r.id == running.id]
        assert stopped.result in ("failure", "interrupted"), stopped
        assert daemon.proc.poll() is None  # the daemon goes on
        shutil.rmtree(big)
        command = handed_off_run(fed, cache, SOURCE)  # and the next handed-off run works (the lock is gone)
        out, err = command.communicate(timeout=120)
        assert command.returncode == 0, out + err
        assert history.runs(kind="backup", source=SOURCE, limit=1)[0].pid == daemon.proc.pid
    finally:
        shutil.rmtree(big, ignore_errors=True)
        code = daemon.stop()
    assert code == 0, daemon.text()
