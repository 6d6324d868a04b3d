"""A federation at scale, as whole processes: a generated, signed inventory of MEMBERS members × 3 nodes (a
host and two sources, 2 replicas each), and ``mutualbackup check`` and ``plan --json`` (empty state) timed
at MEMBERS/4 and MEMBERS members side by side (goal: < 3 s at 1 000 members, and ≤ ×5 the time for ×4 the
members). Then placement in-process: the indexed search against the plain one it replaced (same
decisions, asserted) at MEMBERS/4, and SOURCES sources onto HOSTS hosts (goal: < 2 s). Usage::

    .venv/bin/python bench/scale_bench.py [--members 1000] [--sources 10000 --hosts 3000] [--json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is importable as a package
from bench.placement_bench import member as bench_member
from bench.plain_placement import plain_place
from mutualbackup.inventory.model import Coordinator, Federation
from mutualbackup.inventory.signatures import sign
from mutualbackup.plan.placement import place

CAPACITIES = ("200GiB", "500GiB", "1TiB", "2TiB")


def host_key(number: int) -> str:
    """A well-formed ed25519 public key of its own for node ``number`` (each server is one node)."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + hashlib.sha256(str(number).encode()).digest()
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def address(number: int) -> str:
    return f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"


def write_inventory(directory: Path, members: int) -> Path:
    """A signed inventory of ``members`` members (one admin key signs them all, as the bench's only admin)."""
    (directory / "members").mkdir(parents=True)
    admin = directory / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin", "-f", str(admin)], check=True)
    public = " ".join(admin.with_suffix(".pub").read_text().split()[:2])
    (directory / "federation.yml").write_text(yaml.safe_dump({
        "federation": "scale", "coordinator": {"ssh_key": "/etc/mutualbackup/id_ed25519", "state": str(directory / "state")},
        "defaults": {"replicas": 2, "every": "24h", "window": "01:00-06:00", "rpo": "26h"}}))
    for index in range(members):
        name = f"m{index:04d}"
        document = {
            "member": name, "contact": f"ops@{name}.example", "site": f"site-{index % 97}",
            "admins": [{"name": "admin", "key": public}],
            "nodes": [
                {"name": "store", "address": address(3 * index), "user": "mutualbackup", "host_key": host_key(3 * index),
                 "storage": {"path": "/srv/mutualbackup", "capacity": CAPACITIES[index % len(CAPACITIES)]}},
                *({"name": f"web{j}", "address": address(3 * index + 1 + j), "user": "mutualbackup",
                   "host_key": host_key(3 * index + 1 + j),
                   "backup": {"paths": ["/etc", "/srv"], "estimate": f"{5 + (index * 7 + j) % 40}GiB"}}
                  for j in range(2)),
            ],
        }
        path = directory / "members" / f"{name}.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        sign(str(path), str(admin))
    return directory


def timed_command(inventory: Path, *command: str) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("mutualbackup")), "--inventory", str(inventory), *command],
                          capture_output=True, env={**os.environ, "MUTUALBACKUP_INVENTORY": str(inventory)})
    if done.returncode not in (0, 1):
        raise SystemExit(f"mutualbackup {' '.join(command)} failed: {done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started, done.returncode


@dataclass
class Figures:
    members: int
    check_small: float
    check_large: float
    plan_small: float
    plan_large: float
    plain_seconds: float
    indexed_seconds: float
    placement_sources: int
    placement_hosts: int
    placement_seconds: float

    def lines(self) -> str:
        small = self.members // 4
        return (
            f"whole processes, empty state ({small} and {self.members} members × 3 nodes, signed):\n"
            f"  check      {self.check_small:6.2f} s  {self.check_large:6.2f} s  ×{self.check_large / self.check_small:.1f}"
            f" (goal: < 3 s, ≤ ×5)\n"
            f"  plan --json {self.plan_small:5.2f} s  {self.plan_large:6.2f} s  ×{self.plan_large / self.plan_small:.1f}"
            f" (goal: < 3 s, ≤ ×5)\n"
            f"placement in-process at {small} members, from scratch: indexed {self.indexed_seconds:.3f} s, the plain "
            f"search {self.plain_seconds:.2f} s (×{self.plain_seconds / max(self.indexed_seconds, 1e-9):.0f}), "
            f"same decisions\n"
            f"{self.placement_sources} sources onto {self.placement_hosts} hosts: {self.placement_seconds:.2f} s "
            f"(goal: < 2 s)"
        )


def placement_federation(sources: int, hosts: int) -> Federation:
    """``hosts`` members, each a host and its share of ``sources`` sources."""
    members = []
    for index in range(hosts):
        share = sources // hosts + (1 if index < sources % hosts else 0)
        members.append(bench_member(index, share))
    return Federation("bench", Coordinator("/k", "/s"), tuple(members))


def run(members: int, sources: int, hosts: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="mutualbackup-scale-") as scratch:
        small = write_inventory(Path(scratch) / "small", members // 4)
        large = write_inventory(Path(scratch) / "large", members)
        check = [timed_command(inventory, "check")[0] for inventory in (small, large)]
        plan = [timed_command(inventory, "plan", "--json")[0] for inventory in (small, large)]
    fed = placement_federation(members // 4 * 2, members // 4)
    started = time.perf_counter()
    indexed = place(fed)
    indexed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    plain = plain_place(fed)
    plain_seconds = time.perf_counter() - started
    assert indexed.replicas == plain.replicas and indexed.used == plain.used, "the indexed search decided otherwise"
    big = placement_federation(sources, hosts)
    started = time.perf_counter()
    placed = place(big)
    placement_seconds = time.perf_counter() - started
    assert not placed.problems, placed.problems[:3]
    return Figures(members, *check, *plan, plain_seconds, indexed_seconds, sources, hosts, placement_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=10000)
    parser.add_argument("--hosts", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.members, args.sources, args.hosts)
    print(json.dumps(asdict(figures), indent=2) if args.json else figures.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
