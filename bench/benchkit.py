"""What the lab benches share: their common options, the root check, a work directory, the output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
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
    with contextlib.ExitStack() as stack:
        root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        result = run(root)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0
