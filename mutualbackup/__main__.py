"""``mutualbackup``, the executable (and ``python -m mutualbackup``).

``mutualbackup run`` is first offered to the daemon serving the same inventory, if one does
(:mod:`mutualbackup.handoff`): it then runs the jobs and this process prints what it sends. Else:
``mutualbackup run`` starts its first connection before anything else is imported, on what the same command
line connected to last time (:mod:`mutualbackup.remote.hints`): the source's node program starts while this
one imports its modules and reads the inventory, which then decides whether that connection is used. Then
:func:`mutualbackup.cli.console`.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    hinted = None
    if "run" in sys.argv[1:]:  # the hint is kept per whole command line: another command never finds one
        from mutualbackup.handoff.client import hand_off

        try:
            handed = hand_off(sys.argv[1:], os.environ, os.getcwd())
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(1) from None
        if handed is not None:
            from mutualbackup import leave

            leave(handed)
        from mutualbackup.remote import hints

        try:
            hinted = hints.start(sys.argv[1:], os.environ, os.getcwd(), "backup")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception:  # noqa: BLE001 - only ever a head start: the run connects as it would have
            hinted = None
    from mutualbackup.cli import console

    console(hinted)


if __name__ == "__main__":
    main()
