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
- ``other node``: the same onto coopcycle/web2 (a key made there for this restore, the host's
  temporary line, the passphrase sealed by the source for web2).

Prints the median times, the ratios of the medians to ``bare`` (goal: ≤ 1.05) and
the median of each round's own ratio (a paired measure, less sensitive to a slow
moment of the machine). Needs root and /usr/sbin/sshd, like the lab. Usage::

    .venv/bin/python bench/restore_bench.py [--size-mb 300] [--repeat 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from benchkit import (
    add_lab_arguments, applied_and_backed_up, cli, rotating, run_lab_bench, source_env, timed, write_data,
)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives beside the product
from lab import federation as labfed
from lab.nodes import Lab

GOAL = 1.05
SOURCE = "coopcycle/web1"
OTHER = "coopcycle/web2"
HOST = "picasoft/store1"


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


def bare_extract(fed: labfed.LabFederation, url: str, target: Path) -> None:
    target.mkdir(parents=True)
    subprocess.run([fed.lab.borg, "extract", url], cwd=target, env=source_env(fed.nodes[SOURCE].state), check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)


def run(size_mb: int, repeat: int, root: Path, borg: str) -> dict[str, Any]:
    lab, fed = build(root, borg)
    with lab:
        data = fed.data_path(SOURCE, "/srv/data")
        written = write_data(data, size_mb)
        applied_and_backed_up(fed.inventory)
        code, out, err = cli(fed.inventory, "archives", SOURCE, "--json")
        archive = json.loads(out)["archives"][-1]["name"]
        node = fed.nodes[HOST]
        url = f"ssh://{node.user}@127.0.0.1:{node.port}{node.storage}/coopcycle/web1::{archive}"
        scratch = root / "targets"
        counter = iter(range(10**6))

        def through_cli(destination: str) -> Callable[[Path], None]:
            def restore(target: Path) -> None:
                code, out, err = cli(fed.inventory, "restore", SOURCE, "--to", f"{destination}:{target}", "--archive", archive)
                if code != 0:
                    raise SystemExit(f"mutualbackup restore failed:\n{out}{err}")
            return restore

        ways: dict[str, Callable[[Path], None]] = {
            "bare": lambda target: bare_extract(fed, url, target),
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
            for name in rotating(names, round_):
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
        "goal": GOAL,
    }


def report(result: dict[str, Any]) -> str:
    m = result["median_seconds"]
    mib = result["bytes"] / 1024**2
    return "\n".join([
        f"restore of {mib:.0f} MiB, median of {result['repeat']} run(s) each:",
        f"  bare borg extract                       {m['bare']:7.2f} s  ({mib / m['bare']:.0f} MiB/s)",
        f"  mutualbackup restore onto the source    {m['source']:7.2f} s  ratio {result['ratio_source']:.3f}"
        f"  (+{m['source'] - m['bare']:.2f} s; paired {result['paired_ratio_source']:.3f})",
        f"  mutualbackup restore onto another node  {m['other node']:7.2f} s  ratio {result['ratio_other_node']:.3f}"
        f"  (+{m['other node'] - m['bare']:.2f} s; paired {result['paired_ratio_other_node']:.3f})",
        f"  goal: ratio ≤ {result['goal']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=15)
    add_lab_arguments(parser)
    args = parser.parse_args(argv)
    return run_lab_bench(args, "restore-bench-", lambda root: run(args.size_mb, args.repeat, root, args.borg), report)


if __name__ == "__main__":
    sys.exit(main())
