"""Shared fixtures. Add new ones here; keep each fixture's scope as narrow as it can be.

``lab`` gives a test its own real sshd nodes on 127.0.0.1 (see lab.nodes);
tests that use it are end-to-end and need root and /usr/sbin/sshd.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lab.nodes import Lab

# A shell that starts pytest in the background ignores SIGINT in it, and every command it starts would
# inherit that (borg would not stop cleanly on SIGINT); mutualbackup-node serve resets it the same way.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`mutualbackup run` remembers where it connected in the user's cache (remote/hints.py): the suite's runs,
    and the programs they start, keep theirs in the suite's own directory, not in the machine's."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def borg_path() -> str:
    """Absolute path of the borg executable: on PATH, else next to this Python."""
    found = shutil.which("borg") or shutil.which("borg", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("borg is not installed")
    return os.path.abspath(found)


@pytest.fixture
def lab(tmp_path: Path, borg_path: str) -> Iterator[Lab]:
    """An empty Lab in this test's tmp_path; every node it started is stopped afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    with Lab(tmp_path / "lab", borg=borg_path) as the_lab:
        yield the_lab
