"""``mutualbackup-node``: ``serve`` (the coordinator's forced command) and ``join`` (the member's admin, once)."""

from __future__ import annotations

import sys

USAGE = """usage: mutualbackup-node serve [REQUEST] [--config DIR]
       mutualbackup-node join --node MEMBER/NODE --coordinator-key PUBFILE --member-file FILE [options]
       mutualbackup-node join --help"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from mutualbackup.node.serve import main as serve

        return serve(args[1:])
    if args[:1] == ["join"]:
        from mutualbackup.node.join import main as join

        return join(args[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
