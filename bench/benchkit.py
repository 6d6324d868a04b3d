"""What the lab benches share: their common options, the root check, a work directory, the output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """``--root`` (work directory), ``--borg`` (the executable the lab's nodes run) and ``--json``."""
    parser.add_argument("--root", type=Path, help="work directory (default: a new temporary one, removed afterwards)")
    parser.add_argument("--borg", default=shutil.which("borg") or str(Path(sys.executable).with_name("borg")))
    parser.add_argument("--json", action="store_true")


def run_lab_bench(
    args: argparse.Namespace, prefix: str, run: Callable[[Path], dict[str, Any]], report: Callable[[dict[str, Any]], str]
) -> int:
    """Run ``run(root)`` in ``args.root`` or a new temporary directory; print its result (``report`` or JSON).

    Returns 2, printing why, when this machine cannot run a lab (it needs root and /usr/sbin/sshd).
    """
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        print("the bench needs root and /usr/sbin/sshd (it runs lab nodes)", file=sys.stderr)
        return 2
    compiled_as_installed()
    with contextlib.ExitStack() as stack:
        root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        result = run(root)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def compiled_as_installed() -> None:
    """mutualbackup's modules compiled to bytecode, as ``pip install`` leaves them: a process started from a source
    tree where nothing writes bytecode (a fresh clone, ``PYTHONDONTWRITEBYTECODE``) would otherwise compile every
    module it imports, each time (tens of milliseconds of a ``mutualbackup run``), which no installed coordinator pays."""
    import compileall

    import mutualbackup

    compileall.compile_dir(os.path.dirname(mutualbackup.__file__), quiet=1)


def cli(inventory: Path, *args: str) -> tuple[int, str, str]:
    """``mutualbackup --inventory INVENTORY ARGS`` in this process (everything but the interpreter's start)."""
    import io

    from mutualbackup.cli import main as mutualbackup_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mutualbackup_main(["--inventory", str(inventory), *args])
    return code, out.getvalue(), err.getvalue()


def applied_and_backed_up(inventory: Path) -> None:
    """``mutualbackup apply`` then ``run`` of the bench's federation; SystemExit with their words when one fails."""
    for args in (("apply",), ("run",)):
        code, out, err = cli(inventory, *args)
        if code != 0:
            raise SystemExit(f"mutualbackup {args[0]} failed:\n{out}{err}")


def timed(action: Callable[[], None]) -> float:
    """Seconds ``action`` took (wall clock)."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def source_env(state: Path) -> dict[str, str]:
    """borg's environment as a source has it (its key, pinned known_hosts, passphrase file), from its state directory."""
    from mutualbackup import borg

    return {**os.environ, **borg.client_env(borg.SourcePaths(str(state)))}


def write_data(directory: Path, size_mb: int, small_files: int = 300) -> int:
    """``size_mb`` MiB in 8 MiB random files, plus small files; returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    chunk = 8 * 1024 * 1024
    for index in range((size_mb * 1024 * 1024 + chunk - 1) // chunk):
        size = min(chunk, size_mb * 1024 * 1024 - index * chunk)
        (directory / f"blob-{index:04d}.bin").write_bytes(os.urandom(size))
        total += size
    small = directory / "small files"
    small.mkdir(exist_ok=True)
    for index in range(small_files):
        data = os.urandom(2000)
        (small / f"f{index:03d}").write_bytes(data)
        total += len(data)
    return total


def rotating(names: list[str], round_: int) -> list[str]:
    """``names`` starting at the ``round_``-th: each way runs first as often as the others."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]
