"""Every request a node answers: its side, and the module that answers it.

Read before anything else is imported: a request that needs root is handed to ``sudo`` at once,
and the root side imports the one module that answers it, so that each request pays the node
program's start only once, and a small one (:mod:`requests` checks this table against the
handlers as they register).

Sides: ``source`` requests act on this node's own backups and need root (they read every file
of its paths, and the root-only state); ``host`` requests act on the repositories this node
stores, as the unprivileged login that owns them; ``any`` needs nothing.
"""

from __future__ import annotations

SOURCE, HOST, ANY = "source", "host", "any"

KINDS: dict[str, tuple[str, str]] = {
    # kind: (side, module under mutualbackup.node)
    "hello": (ANY, "source"),
    "prepare": (SOURCE, "source"),
    "init": (SOURCE, "source"),
    "backup": (SOURCE, "source"),
    "list": (SOURCE, "source"),
    "info": (SOURCE, "source"),
    "prune": (SOURCE, "source"),
    "check": (SOURCE, "source"),
    "leftover": (SOURCE, "source"),
    "stop": (SOURCE, "source"),
    "drill": (SOURCE, "drill"),
    "extract": (SOURCE, "restore"),
    "seal": (SOURCE, "restore"),
    "export_kit": (SOURCE, "restore"),
    "authorize": (HOST, "host"),
    "repo_facts": (HOST, "host"),
    "repositories": (HOST, "host"),
    "repo_check": (HOST, "host"),
    "transactions": (HOST, "host"),
    "compact": (HOST, "host"),
    "unlock": (HOST, "host"),
    "grant": (HOST, "restore"),
}


def needs_root(kind: str) -> bool:
    return KINDS.get(kind, (ANY, ""))[0] == SOURCE


def module_of(kind: str) -> str | None:
    """The module that answers ``kind`` (None for a request no node takes)."""
    found = KINDS.get(kind)
    return f"mutualbackup.node.{found[1]}" if found else None
