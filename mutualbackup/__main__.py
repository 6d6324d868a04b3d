"""``mutualbackup``, the executable (and ``python -m mutualbackup``).

``mutualbackup run`` first asks the daemon of its state directory to run its jobs, when that directory is known
before the inventory is read (``--state``, or where the same command line kept its runs last time:
:mod:`mutualbackup.remote.hints`); the daemon then runs them and this process prints what it sends
(:mod:`mutualbackup.handoff`). Else it starts its first connection before anything else is imported, on what the
same command line connected to last time: the source's node program starts while this one imports its modules
and reads the inventory, which then decides whether that connection is used (and asks the daemon of the state
directory it names, if that is another). Then :func:`mutualbackup.cli.console`.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    hinted = handoff = asked = None
    try:
        cwd = os.getcwd()
    except OSError:  # a directory removed under the shell: the command says what it finds
        cwd = None
    if "run" in sys.argv[1:] and cwd is not None:  # hints are kept per whole command line and directory
        argv, environ = sys.argv[1:], os.environ
        try:
            asked = _ask_the_daemon(argv, environ, cwd)
            if asked is not None and asked[0] is not None:
                from mutualbackup import leave

                leave(asked[0])
            from mutualbackup.remote import hints

            hinted = hints.start(argv, environ, cwd, "backup")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception:  # noqa: BLE001 - only ever a head start: the run connects as it would have
            hinted = None
        tried = asked[1] if asked is not None else None

        def handoff(state: str) -> int | None:  # what cli.cmd_run asks once it knows the state directory
            from mutualbackup.handoff.client import hand_off

            return None if os.path.realpath(os.path.join(cwd, state)) == tried else hand_off(argv, environ, cwd, state)
    from mutualbackup.cli import console

    console(hinted, handoff)


def _ask_the_daemon(argv: list[str], environ: os._Environ[str], cwd: str) -> tuple[int | None, str] | None:
    """The exit code of the run handed to the daemon of the state directory known without the inventory (None:
    not handed off), and that directory; None when none is known."""
    from mutualbackup.handoff.client import hand_off, state_named
    from mutualbackup.remote import hints

    state = state_named(argv, environ, cwd)
    if state is None:
        path = hints.cache_file(environ)
        state = hints.recalled_state(path, hints.key(argv, environ, cwd)) if path else None
    if state is None:
        return None
    return hand_off(argv, environ, cwd, state), os.path.realpath(os.path.join(cwd, state))


if __name__ == "__main__":
    main()
