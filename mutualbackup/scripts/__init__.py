"""The small programs a node runs on its own files, kept as readable files (``sh -n`` and a real run test
each: tests/test_scripts.py): what a host reads of a repository without a key, and a drill's inspection.

:func:`text` gives a program's text, passed to ``sh -c`` (or ``python3 -c``) with its arguments after it.
"""

from __future__ import annotations

import os
from functools import cache


@cache
def text(name: str) -> str:
    """The program ``name`` (e.g. ``"repository_facts.sh"``) as it ships in this package."""
    with open(path(name), encoding="utf-8") as handle:
        return handle.read()


def path(name: str) -> str:
    """Where the program ``name`` is: the package is installed as files (importlib.resources would cost 10 ms of
    imports to every node request that runs one)."""
    return os.path.join(os.path.dirname(__file__), name)
