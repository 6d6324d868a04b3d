"""``mutualbackup-node``: ``serve`` (the coordinator's forced command) and ``join`` (the member's admin, once)."""

from __future__ import annotations

import os
import sys

USAGE = """usage: mutualbackup-node serve [REQUEST] [--config DIR]
       mutualbackup-node join --node MEMBER/NODE --coordinator-key PUBFILE --member-file FILE [options]
       mutualbackup-node join --help"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        if os.geteuid() != 0:
            to_root(args[1:])
        from mutualbackup.node.serve import main as serve

        return serve(args[1:])
    if args[:1] == ["join"]:
        from mutualbackup.node.join import main as join

        return join(args[1:])
    print(USAGE, file=sys.stderr)
    return 2


def console() -> None:
    """The ``mutualbackup-node`` executable: :func:`main`, then out at once (its reply is written and flushed;
    see :func:`mutualbackup.leave`)."""
    from mutualbackup import leave

    leave(main())


def to_root(args: list[str]) -> None:
    """As the node's login, exec ``serve`` as root through the node's one sudo rule, stdin untouched, when the
    node's configuration says so; return otherwise (``serve`` then says what is wrong).

    Every request of the coordinator pays this step: it reads one JSON file and imports nothing of ours."""
    import json

    from mutualbackup.node import CONFIG_FILE, DEFAULT_CONFIG, ENVIRONMENT

    directory = args[args.index("--config") + 1] if "--config" in args[:-1] else os.environ.get(ENVIRONMENT, DEFAULT_CONFIG)
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return
    program = data.get("program") if isinstance(data, dict) and data.get("sudo") is True else None
    if isinstance(program, str) and program.startswith("/"):
        os.execvp("sudo", ["sudo", "-n", "--", program, "serve", "--config", directory])


if __name__ == "__main__":
    sys.exit(main())
