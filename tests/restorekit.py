"""Helpers for the restore, recovery and drill tests on the lab: small federations,
trees with awkward names, exact tree comparison, and a process watcher."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from lab import federation as labfed
from mutualbackup.borg import RESTORE_COMMENT_PREFIX
from lab.nodes import Lab
from lab.federation import LabFederation
from mutualbackup.borg import managed_lines
AWKWARD_DIR = "/srv/données à voir"
HOSTILE_NAMES = ("-rf leading dash", "re:not a pattern", "sh:*", "pf:x", "$(touch pwned)", "it's a \"quoted\" name — été.txt")


def node_doc(name: str, **sections: Any) -> dict[str, Any]:
    return {"name": name, "address": "x", "user": "x", "host_key": "x", **sections}


def federation_docs(
    nodes: dict[str, list[dict[str, Any]]], *, replicas: int = 2, sites: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An inventory from ``{member: [node docs]}``; every member on its own site."""
    federation = {
        "federation": "restore-lab",
        "coordinator": {"ssh_key": "/nonexistent", "state": "/nonexistent", "timezone": "UTC"},
        "defaults": {"replicas": replicas, "every": "24h", "rpo": "26h", "retention": {"daily": 7}, "drill_every": "30d"},
    }
    members = {
        member: {"member": member, "contact": f"ops@{member}.example", "site": (sites or {}).get(member, f"site-{member}"),
                 "nodes": docs}
        for member, docs in nodes.items()
    }
    return federation, members


def source(paths: list[str]) -> dict[str, Any]:
    return {"paths": paths, "exclude": ["*.cache"], "estimate": "1GiB"}


def storage() -> dict[str, Any]:
    return {"path": "/srv/mb", "capacity": "100GiB"}


def build(root: Path, borg: str, nodes: dict[str, list[dict[str, Any]]], **options: Any) -> tuple[Lab, LabFederation]:
    lab = Lab(root / "lab", borg=borg)
    fed_doc, members = federation_docs(nodes, **options)
    return lab, labfed.build(lab, fed_doc, members, root)


def backed_up(root: Path, borg: str, nodes: dict[str, list[dict[str, Any]]], source_name: str,
              **options: Any) -> Iterator[LabFederation]:
    """A started lab federation whose ``source_name`` holds two written trees, applied and backed up once.

    A generator for module fixtures: ``yield from backed_up(...)``; the lab stops afterwards.
    """
    import pytest

    from labkit import mb

    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    lab, federation = build(root, borg, nodes, **options)
    write_tree(federation.data_path(source_name, "/etc"))
    write_tree(federation.data_path(source_name, AWKWARD_DIR), seed=1)
    with lab:
        for command in ("apply", "run"):
            code, out, err = mb(federation, command)
            assert code == 0, out + err
        yield federation


def write_tree(root: Path, seed: int = 0, big: int = 300_000) -> None:
    """Files worth restoring: text, binary, empty, nested, awkward names, symlinks, modes, old mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "plain.txt").write_text(f"hello {seed}\n")
    for index, name in enumerate(HOSTILE_NAMES):
        (root / name).write_text(f"awkward {index} {seed}\n")
    (root / "empty").write_bytes(b"")
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(big))
    (root / "skip.cache").write_text("excluded\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    secret = root / "nested" / "secret"
    secret.write_text("only me\n")
    secret.chmod(0o600)
    os.utime(root / "plain.txt", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    for link, target in (("link-to-plain", "plain.txt"), ("dangling link", "nowhere/été")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)
    os.utime(root / "link-to-plain", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_001), follow_symlinks=False)


def tree_differences(a: Path, b: Path, ignore_suffixes: tuple[str, ...] = (".cache",)) -> list[str]:
    """Everything that differs between two trees: names, types, bytes, modes, mtimes (ns), symlink targets."""
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(a):
        rel = Path(dirpath).relative_to(a)
        for name in sorted(dirnames + filenames):
            if name.endswith(ignore_suffixes):
                continue
            pa, pb = Path(dirpath) / name, b / rel / name
            if not os.path.lexists(pb):
                problems.append(f"missing {rel / name}")
                continue
            sa, sb = pa.lstat(), pb.lstat()
            if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode) or stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
                problems.append(f"type or mode differs {rel / name}: {sa.st_mode:o} vs {sb.st_mode:o}")
            if pa.is_symlink():
                if os.readlink(pa) != os.readlink(pb):
                    problems.append(f"symlink target differs {rel / name}")
            elif pa.is_file() and pa.read_bytes() != pb.read_bytes():
                problems.append(f"content differs {rel / name}")
            if not pa.is_dir() and sa.st_mtime_ns != sb.st_mtime_ns:
                problems.append(f"mtime differs {rel / name}: {sa.st_mtime_ns} vs {sb.st_mtime_ns}")
    for dirpath, dirnames, filenames in os.walk(b):
        rel = Path(dirpath).relative_to(b)
        for name in dirnames + filenames:
            if not os.path.lexists(a / rel / name):
                problems.append(f"unexpected {rel / name}")
    return problems


def restored(target: Path, original: Path) -> Path:
    """Where borg puts ``original`` (an absolute path) when extracting into ``target``."""
    return Path(str(target) + str(original))


def restore_lines(fed: LabFederation) -> list[str]:
    """Temporary restore lines left in any node's managed block."""
    found = []
    for node in fed.nodes.values():
        path = Path(node.authorized_keys)
        if path.exists():
            found += [line for line in managed_lines(path.read_text()) if RESTORE_COMMENT_PREFIX in line]
    return found


def keys_snapshot(fed: LabFederation) -> dict[str, bytes]:
    return {name: Path(node.authorized_keys).read_bytes() for name, node in fed.nodes.items()}


def copy_tree(src: Path, dst: Path) -> None:
    """A copy keeping modes, mtimes and symlinks (to compare with after the original is destroyed)."""
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for name in dirnames + filenames:
            s = Path(dirpath) / name
            if s.is_symlink():
                st = s.lstat()
                os.utime(dst / rel / name, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@contextlib.contextmanager
def watch_processes() -> Iterator[list[bytes]]:
    """Collect the command line and environment of every process seen while the block runs."""
    seen: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    for part in ("cmdline", "environ"):
                        try:
                            seen.append(Path(f"/proc/{pid}/{part}").read_bytes())
                        except OSError:
                            pass
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()

