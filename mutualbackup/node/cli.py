"""``mutualbackup-node``: ``serve`` (the coordinator's forced command) and ``join`` (the member's admin, once)."""

from __future__ import annotations

import os
import signal
import sys

USAGE = """usage: mutualbackup-node serve [REQUEST] [--config DIR]
       mutualbackup-node join --node MEMBER/NODE --coordinator-key PUBFILE --member-file FILE [options]
       mutualbackup-node join --help"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        if os.geteuid() != 0:
            to_root(args[1:])
        if os.geteuid() == 0:
            os.chdir("/")  # not the login's directory (sshd starts there, sudo keeps it): nothing of root's runs there
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited: borg must stop cleanly on SIGINT
            signal.signal(signal.SIGINT, signal.default_int_handler)
        from mutualbackup.node.preload import on_hint

        kind, config_dir = serve_arguments(args[1:])
        early = on_hint(config_dir)  # a backup's or a restore's borg, before anything else is imported
        from mutualbackup.node.serve import serve

        return serve(kind, config_dir, preload=True, early=early)
    if args[:1] == ["join"]:
        from mutualbackup.node.join import main as join

        return join(args[1:])
    print(USAGE, file=sys.stderr)
    return 2


def serve_arguments(args: list[str]) -> tuple[str | None, str | None]:
    """(the request's name, the configuration directory) of ``serve [REQUEST] [--config DIR]``."""
    args = list(args)
    config_dir = None
    if "--config" in args:
        at = args.index("--config")
        config_dir = args[at + 1] if at + 1 < len(args) else None
        del args[at:at + 2]
    return (args[0] if args else None), config_dir


def console() -> None:
    """The ``mutualbackup-node`` executable: :func:`main`, then out at once (its reply is written and flushed;
    see :func:`mutualbackup.leave`)."""
    from mutualbackup import leave

    leave(main())


def to_root(args: list[str]) -> None:
    """As the node's login, exec ``serve`` as root through the node's one sudo rule, stdin untouched, when the
    node's configuration says so; return otherwise (``serve`` then says what is wrong).

    Every request of the coordinator pays this step: it reads one JSON file and imports nothing else of ours."""
    from mutualbackup.node.config_file import ConfigError, config_directory, read_config

    directory = config_directory(serve_arguments(args)[1])
    try:
        data = read_config(directory, trusted=False)
    except ConfigError:
        return
    program = data.get("program") if data.get("sudo") is True else None
    if isinstance(program, str) and program.startswith("/"):
        os.execvp("sudo", ["sudo", "-n", "--", program, "serve", "--config", directory])


if __name__ == "__main__":
    sys.exit(main())
