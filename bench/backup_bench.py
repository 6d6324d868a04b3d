"""A backup of unchanged data: ``mutualbackup run`` through the node program against bare ``borg create``.

Builds a two-node lab federation (alpha/web, the source, backed up onto beta/store; real sshd on
127.0.0.1, nodes joined as a member joins them, the source's login unprivileged and the backup run
as root through the join's sudo rule), backs up SIZE MiB plus a few hundred small files once, then,
REPEAT rounds in a rotating order, with the data unchanged:

- ``bare``: ``borg create`` run on the source as the node program runs it (its key, its pinned
  known_hosts, its passphrase file, the same options), straight from this process;
- ``mutualbackup``: ``run_backup`` as ``mutualbackup run`` and the daemon call it: the SSH session
  to the source, ``mutualbackup-node serve backup`` (and its ``sudo`` to the root side), the same
  ``borg create``, the reply, the run and the archive recorded in the state.

Prints the medians, the median of each round's own difference, and the goal: at most +0.15 s.
Also times the node program's start alone: ``mutualbackup-node serve`` answering ``hello`` on a
kept connection against ``true`` through a plain login (the cost of each request, whatever it asks).
Needs root and /usr/sbin/sshd, like the lab. Usage::

    .venv/bin/python bench/backup_bench.py [--size-mb 100] [--repeat 9] [--json]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import paramiko

from benchkit import (
    add_lab_arguments, applied_and_backed_up, rotating, run_lab_bench, source_env, timed, write_data,
)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives beside the product
from lab import federation as labfed
from lab.nodes import Lab
from mutualbackup.remote.ssh import SSHTransport, parse_host_key
from mutualbackup.state.history import History

GOAL_SECONDS = 0.15
SOURCE, HOST = "alpha/web", "beta/store"


def build(root: Path, borg: str) -> tuple[Lab, labfed.LabFederation]:
    node = {"address": "x", "user": "x", "host_key": "x"}
    federation = {
        "federation": "bench",
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "UTC"},
        "defaults": {"replicas": 1, "every": "24h", "rpo": "26h", "retention": {"daily": 7}, "compression": "lz4"},
    }
    members = {
        "alpha": {"member": "alpha", "contact": "a@b.c", "site": "a", "nodes": [
            {"name": "web", **node, "backup": {"paths": ["/srv/data"], "estimate": "1GiB"}}]},
        "beta": {"member": "beta", "contact": "a@b.c", "site": "b", "nodes": [
            {"name": "store", **node, "storage": {"path": "/srv/mb", "capacity": "100GiB"}}]},
    }
    lab = Lab(root / "lab", borg=borg)
    return lab, labfed.build(lab, federation, members, root)


def run(size_mb: int, repeat: int, root: Path, borg: str, full_mb: int = 1024, full_repeat: int = 3) -> dict[str, Any]:
    from mutualbackup import borg as borg_layer
    from mutualbackup.context import Context, ssh_connector
    from mutualbackup.inventory.load import load_inventory
    from mutualbackup.jobs.backup import run_backup
    lab, fed = build(root, borg)
    with lab:
        written = write_data(fed.data_path(SOURCE, "/srv/data"), size_mb)
        applied_and_backed_up(fed.inventory)
        federation = load_inventory(str(fed.inventory))
        ctx = Context(federation, History(fed.state), ssh_connector(federation))
        source, host = ctx.node(SOURCE), ctx.node(HOST)
        url = borg_layer.repository_url(source, host)
        env = source_env(fed.nodes[SOURCE].state)
        counter = iter(range(10**6))

        def bare() -> None:
            argv = borg_layer.create_argv(borg, url, f"bare-{next(counter)}", source.backup)
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
            if done.returncode != 0:
                raise SystemExit(f"bare borg create failed: {done.stderr.decode()[-2000:]}")

        def through_serve() -> None:
            outcome = run_backup(ctx, source, host)
            if outcome.result != "success":
                raise SystemExit(f"mutualbackup run failed: {outcome.error}")

        program = str(Path(sys.executable).with_name("mutualbackup"))

        def whole_process(handoff: str = "no") -> None:
            done = subprocess.run([program, "--inventory", str(fed.inventory), "run", SOURCE],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env={**os.environ, "MUTUALBACKUP_HANDOFF": handoff})
            if done.returncode != 0:
                raise SystemExit(f"mutualbackup run failed: {done.stdout.decode()[-1000:]}{done.stderr.decode()[-2000:]}")

        def handed_off() -> None:
            whole_process("yes")  # the same command, which the daemon serving the inventory runs

        daemon = _daemon(program, fed, root / "daemon.log")
        try:
            probe = _probe(root, fed)
            kept = SSHTransport(source, str(lab.coordinator_key))
        except BaseException:
            daemon.kill()
            raise

        def hello() -> None:
            if not kept.request("hello", {"borg": False}, timeout=60).ok:
                raise SystemExit("hello failed")

        def plain_true() -> None:
            _, stdout, _ = probe.exec_command("true")
            if stdout.channel.recv_exit_status() != 0:
                raise SystemExit("true failed through the plain login")

        ways: dict[str, Callable[[], None]] = {"bare": bare, "mutualbackup": through_serve, "process": whole_process,
                                               "handed": handed_off}
        starts: dict[str, Callable[[], None]] = {"serve hello, kept connection": hello,
                                                 "plain login, kept connection": plain_true}
        try:
            for action in (*ways.values(), *starts.values()):  # warm-up: caches, sshd's first connection
                wait_for_next_second()
                action()
            times: dict[str, list[float]] = {name: [] for name in (*ways, *starts)}
            for round_ in range(repeat):
                for name in rotating(list(ways), round_):
                    wait_for_next_second()  # archive names carry the second: one backup per second
                    times[name].append(timed(ways[name]))
                for name in rotating(list(starts), round_):
                    times[name].append(timed(starts[name]))
            full: dict[str, list[float]] = {"bare": [], "process": []}
            data = fed.data_path(SOURCE, "/srv/data")
            for round_ in range(full_repeat):  # new data each time: borg finds nothing to deduplicate
                for name in rotating(list(full), round_):
                    write_data(data / "new", full_mb, small_files=0)
                    subprocess.run(["sync"], check=True)  # its writeback is not timed, whichever way runs next
                    wait_for_next_second()
                    full[name].append(timed(ways[name]))
        finally:
            kept.close()
            probe.close()
            daemon.terminate()
            daemon.wait(timeout=90)
        handed = History(fed.state).runs(kind="backup", source=SOURCE)
        if sum(1 for run in handed if run.pid == daemon.pid) < repeat:
            raise SystemExit("the daemon did not run the handed-off backups")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "bytes": written,
        "repeat": repeat,
        "seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "median_seconds": {name: round(v, 3) for name, v in medians.items()},
        "overhead_seconds": round(medians["mutualbackup"] - medians["bare"], 3),
        "paired_overhead_seconds": round(statistics.median(
            m - b for m, b in zip(times["mutualbackup"], times["bare"])), 3),
        "process_overhead_seconds": round(medians["process"] - medians["bare"], 3),
        "paired_process_overhead_seconds": round(statistics.median(
            m - b for m, b in zip(times["process"], times["bare"])), 3),
        "handed_overhead_seconds": round(medians["handed"] - medians["bare"], 3),
        "paired_handed_overhead_seconds": round(statistics.median(
            m - b for m, b in zip(times["handed"], times["bare"])), 3),
        "full_mb": full_mb,
        "full_seconds": {name: [round(v, 3) for v in values] for name, values in full.items()},
        "full_ratio": round(statistics.median(full["process"]) / statistics.median(full["bare"]), 3) if full_repeat else None,
        "serve_start_seconds": round(medians["serve hello, kept connection"] - medians["plain login, kept connection"], 3),
        "goal_seconds": GOAL_SECONDS,
    }


def _daemon(program: str, fed: labfed.LabFederation, log: Path) -> subprocess.Popen[bytes]:
    """The daemon of the bench's inventory, once it serves handed-off runs (nothing is due: it idles)."""
    from mutualbackup.handoff import address

    with log.open("ab") as out:
        proc = subprocess.Popen([program, "--inventory", str(fed.inventory), "daemon"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, address(str(fed.state)) as where:
            if probe.connect_ex(where) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the daemon did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    time.sleep(1.0)  # its first tick starts what is due (the source's first drill): not while timing
    history = History(fed.state)
    while history.runs(result="running"):
        if proc.poll() is not None or time.monotonic() > deadline + 120:
            proc.kill()
            raise SystemExit(f"the daemon's first jobs did not end: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return proc


def wait_for_next_second() -> None:
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _probe(root: Path, fed: labfed.LabFederation) -> paramiko.SSHClient:
    """A connection to the source with a plain login (a key of the bench's own, added to its authorized_keys)."""
    node = fed.nodes[SOURCE]
    key = root / "probe"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with node.authorized_keys.open("a") as keys:
        keys.write(Path(f"{key}.pub").read_text())
    client = paramiko.SSHClient()
    pinned = parse_host_key(node.host_key)
    client.get_host_keys().add(f"[127.0.0.1]:{node.port}", pinned.get_name(), pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=node.port, username=node.user, key_filename=str(key), look_for_keys=False,
                   allow_agent=False, timeout=10)
    return client


def report(result: dict[str, Any]) -> str:
    m = result["median_seconds"]
    mib = result["bytes"] / 1024**2
    return "\n".join([
        f"a backup of {mib:.0f} MiB of unchanged data, median of {result['repeat']} run(s) each:",
        f"  bare borg create on the source                  {m['bare']:6.3f} s",
        f"  mutualbackup run (SSH, serve, sudo, state)      {m['mutualbackup']:6.3f} s"
        f"  +{result['overhead_seconds']:.3f} s (paired +{result['paired_overhead_seconds']:.3f} s)",
        f"  mutualbackup run, the whole process             {m['process']:6.3f} s"
        f"  +{result['process_overhead_seconds']:.3f} s (paired +{result['paired_process_overhead_seconds']:.3f} s)",
        f"  the same, handed to the running daemon          {m['handed']:6.3f} s"
        f"  +{result['handed_overhead_seconds']:.3f} s (paired +{result['paired_handed_overhead_seconds']:.3f} s)",
        f"  goal: at most +{result['goal_seconds']} s",
        *([f"a full backup of {result['full_mb']} MiB of new data, median of {len(result['full_seconds']['bare'])}: "
           f"bare {statistics.median(result['full_seconds']['bare']):.2f} s, the whole mutualbackup run "
           f"{statistics.median(result['full_seconds']['process']):.2f} s: ×{result['full_ratio']} (goal: ≤ ×1.03)"]
          if result["full_ratio"] else []),
        f"  the node program's start: serve answering hello {m['serve hello, kept connection'] * 1000:6.1f} ms, "
        f"`true` on a plain login {m['plain login, kept connection'] * 1000:6.1f} ms "
        f"(+{result['serve_start_seconds'] * 1000:.0f} ms)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--full-mb", type=int, default=1024, help="new data per full backup (default 1 GiB)")
    parser.add_argument("--full-repeat", type=int, default=3, help="full backups each way (0: none)")
    add_lab_arguments(parser)
    args = parser.parse_args(argv)
    return run_lab_bench(args, "backup-bench-", lambda root: run(args.size_mb, args.repeat, root, args.borg,
                                                                       args.full_mb, args.full_repeat), report)


if __name__ == "__main__":
    sys.exit(main())
