"""mutualbackup: encrypted backups of a federation's servers onto each other's disks."""

__version__ = "0.1.0"


def leave(code: int) -> None:
    """End the program now with ``code``, its output flushed: both executables call it once their work is
    recorded (SQLite commits as it goes), skipping the interpreter's cleanup — tens of milliseconds of every
    backup job spent collecting objects and joining finished threads."""
    import os
    import sys

    logging = sys.modules.get("logging")  # its handlers flushed, when something used it (not imported for this)
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def stdout_gone() -> None:
    """stdout's reader went away (``mutualbackup … | head``): what is still buffered goes nowhere, so that the
    interpreter's last flush does not fail again."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
