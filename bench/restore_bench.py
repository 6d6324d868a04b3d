"""Restore time: ``mutualbackup restore`` against bare ``borg extract`` over the same SSH.

Builds a small lab federation (coopcycle/web1, the source; coopcycle/web2, another
node; picasoft/store1, the replica host), backs up SIZE MiB of incompressible data
plus a few hundred small files, then, REPEAT rounds, each running the three ways
below once in a rotating order (so that caches, the disk's write-back and the
neighbours' load affect each alike). Before each timed run the previous target is
removed and the page cache written back (``sync``): only the restore is timed.

- ``bare``: ``borg extract`` of the archive, run as the source would (its key, its
  pinned known_hosts, its passphrase file), into an empty directory;
- ``source``: ``mutualbackup restore SOURCE --to SOURCE:DIR --archive NAME``
  (the CLI's ``main``, in this process: everything but the interpreter start);
- ``other node``: the same onto coopcycle/web2 (temporary key and authorisation);
- ``bare over ssh``, for context: the bare extract started on the source by the
  ``ssh`` command an operator would type on the coordinator.

Prints the median times, the ratios of the medians to ``bare`` (goal: ≤ 1.05) and
the median of each round's own ratio (a paired measure, less sensitive to a slow
moment of the machine). Needs root and /usr/sbin/sshd, like the lab. Usage::

    .venv/bin/python bench/restore_bench.py [--size-mb 300] [--repeat 9] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchkit import add_lab_arguments, run_lab_bench
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives beside the product
from lab import federation as labfed
from mutualbackup.cli import main as mutualbackup_main
from lab.nodes import Lab

GOAL = 1.05
SOURCE = "coopcycle/web1"
OTHER = "coopcycle/web2"
HOST = "picasoft/store1"


def cli(inventory: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mutualbackup_main(["--inventory", str(inventory), *args])
    return code, out.getvalue(), err.getvalue()


def build(root: Path, borg: str) -> tuple[Lab, labfed.LabFederation]:
    node = {"address": "x", "user": "x", "host_key": "x"}
    federation = {
        "federation": "bench",
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "UTC"},
        "defaults": {"replicas": 1, "every": "24h", "rpo": "26h", "retention": {"daily": 7}, "compression": "lz4"},
    }
    members = {
        "coopcycle": {"member": "coopcycle", "contact": "a@b.c", "site": "paris", "nodes": [
            {"name": "web1", **node, "backup": {"paths": ["/srv/data"], "estimate": "1GiB"}},
            {"name": "web2", **node},
        ]},
        "picasoft": {"member": "picasoft", "contact": "a@b.c", "site": "compiegne", "nodes": [
            {"name": "store1", **node, "storage": {"path": "/srv/mb", "capacity": "100GiB"}},
        ]},
    }
    lab = Lab(root / "lab", borg=borg)
    return lab, labfed.build(lab, federation, members, root)


def write_data(directory: Path, size_mb: int) -> int:
    """``size_mb`` MiB in 8 MiB random files, plus 300 small files; returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    chunk = 8 * 1024 * 1024
    for index in range((size_mb * 1024 * 1024 + chunk - 1) // chunk):
        size = min(chunk, size_mb * 1024 * 1024 - index * chunk)
        (directory / f"blob-{index:04d}.bin").write_bytes(os.urandom(size))
        total += size
    small = directory / "small files"
    small.mkdir(exist_ok=True)
    for index in range(300):
        data = os.urandom(2000)
        (small / f"f{index:03d}").write_bytes(data)
        total += len(data)
    return total


def bare_env(fed: labfed.LabFederation) -> dict[str, str]:
    """borg's environment as the source has it: its key, pinned known_hosts, passphrase file."""
    work = Path(fed.nodes[SOURCE].workdir)
    return {
        "BORG_RSH": f"ssh -o BatchMode=yes -o IdentitiesOnly=yes -i {work}/id_ed25519 -o UserKnownHostsFile={work}/known_hosts "
        "-o StrictHostKeyChecking=yes",
        "BORG_PASSCOMMAND": f"cat {work}/passphrase",
        "BORG_BASE_DIR": str(work / "borg"),
        "BORG_EXIT_CODES": "modern",
        "LANG": "C.UTF-8",
    }


def bare_extract(fed: labfed.LabFederation, url: str, target: Path) -> None:
    target.mkdir(parents=True)
    subprocess.run([fed.lab.borg, "extract", url], cwd=target, env={**os.environ, **bare_env(fed)}, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)


def bare_extract_over_ssh(fed: labfed.LabFederation, url: str, target: Path, known_hosts: Path) -> None:
    """What an operator would type on the coordinator: ``ssh NODE 'cd DIR && borg extract …'``."""
    node = fed.nodes[SOURCE]
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in bare_env(fed).items())
    command = f"mkdir -p {shlex.quote(str(target))} && cd {shlex.quote(str(target))} && env {env} {shlex.quote(fed.lab.borg)} extract {shlex.quote(url)}"
    subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(fed.lab.coordinator_key),
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-p", str(node.port),
         "root@127.0.0.1", command],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(size_mb: int, repeat: int, root: Path, borg: str) -> dict[str, Any]:
    lab, fed = build(root, borg)
    with lab:
        data = fed.data_path(SOURCE, "/srv/data")
        written = write_data(data, size_mb)
        for args in (("apply",), ("run",)):
            code, out, err = cli(fed.inventory, *args)
            if code != 0:
                raise SystemExit(f"mutualbackup {args[0]} failed:\n{out}{err}")
        code, out, err = cli(fed.inventory, "archives", SOURCE, "--json")
        archive = json.loads(out)["archives"][-1]["name"]
        node = fed.nodes[HOST]
        url = f"ssh://root@127.0.0.1:{node.port}{node.storage}/coopcycle/web1::{archive}"
        scratch = root / "targets"
        counter = iter(range(10**6))

        def through_cli(destination: str) -> Callable[[Path], None]:
            def restore(target: Path) -> None:
                code, out, err = cli(fed.inventory, "restore", SOURCE, "--to", f"{destination}:{target}", "--archive", archive)
                if code != 0:
                    raise SystemExit(f"mutualbackup restore failed:\n{out}{err}")
            return restore

        known_hosts = root / "operator_known_hosts"
        source_node = fed.nodes[SOURCE]
        known_hosts.write_text(f"[127.0.0.1]:{source_node.port} {source_node.host_key}\n")

        ways: dict[str, Callable[[Path], None]] = {
            "bare": lambda target: bare_extract(fed, url, target),
            "bare over ssh": lambda target: bare_extract_over_ssh(fed, url, target, known_hosts),
            "source": through_cli(SOURCE),
            "other node": through_cli(OTHER),
        }
        names = list(ways)

        def timed_once(name: str) -> float:
            target = scratch / f"t{next(counter)}"
            os.sync()
            seconds = timed(lambda: ways[name](target))
            shutil.rmtree(target)
            return seconds

        timed_once("bare")  # warm-up: page cache, borg's security directory
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_ in range(repeat):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                times[name].append(timed_once(name))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "bytes": written,
        "repeat": repeat,
        "seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "median_seconds": {name: round(v, 3) for name, v in medians.items()},
        "ratio_source": round(medians["source"] / medians["bare"], 3),
        "ratio_other_node": round(medians["other node"] / medians["bare"], 3),
        "paired_ratio_source": round(statistics.median(s / b for s, b in zip(times["source"], times["bare"])), 3),
        "paired_ratio_other_node": round(statistics.median(o / b for o, b in zip(times["other node"], times["bare"])), 3),
        "ratio_source_to_bare_over_ssh": round(medians["source"] / medians["bare over ssh"], 3),
        "goal": GOAL,
    }


def report(result: dict[str, Any]) -> str:
    m = result["median_seconds"]
    mib = result["bytes"] / 1024**2
    return "\n".join([
        f"restore of {mib:.0f} MiB, median of {result['repeat']} run(s) each:",
        f"  bare borg extract                       {m['bare']:7.2f} s  ({mib / m['bare']:.0f} MiB/s)",
        f"  bare borg extract started over ssh      {m['bare over ssh']:7.2f} s  (an operator's `ssh NODE borg extract`)",
        f"  mutualbackup restore onto the source    {m['source']:7.2f} s  ratio {result['ratio_source']:.3f}"
        f"  (+{m['source'] - m['bare']:.2f} s; paired {result['paired_ratio_source']:.3f})",
        f"  mutualbackup restore onto another node  {m['other node']:7.2f} s  ratio {result['ratio_other_node']:.3f}"
        f"  (+{m['other node'] - m['bare']:.2f} s; paired {result['paired_ratio_other_node']:.3f})",
        f"  goal: ratio ≤ {result['goal']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=9)
    add_lab_arguments(parser)
    args = parser.parse_args(argv)
    return run_lab_bench(args, "restore-bench-", lambda root: run(args.size_mb, args.repeat, root, args.borg), report)


if __name__ == "__main__":
    sys.exit(main())
