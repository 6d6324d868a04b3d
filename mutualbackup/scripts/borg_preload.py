"""borg, started before its command line is known (mutualbackup-node's ``node/preload.py``).

Run as root as ``PYTHON -I THIS GATE READY PROGRAM COMMAND`` with borg's own Python (the interpreter of
PROGRAM, borg's console script, its absolute path) and the environment borg will have (PROGRAM and COMMAND,
borg's, are there for ``ps`` to show). It imports borg, the largest part of borg's start, while the node
program checks the request; a failure to import ends it there (the node then starts borg as it always did).
Then it says so on READY (one byte) and reads the gate (file descriptor GATE) to its end. Nothing of borg
runs before that: an empty gate (the request was refused, or needs no borg) ends it at once. Otherwise the
gate holds the command line and the working directory, as JSON (``{"argv": [...], "cwd": DIR or null}``),
and this process becomes that borg: what ``ARGV`` run in DIR would do, ``sys.argv`` included. SIGINT is
ignored until then (a stop arrives only once borg runs, and borg's own handling of it starts with borg).
"""

import os
import signal
import sys

signal.signal(signal.SIGINT, signal.SIG_IGN)
gate, ready, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

from borg.archiver import main  # noqa: E402 - after the signal: anything that fails here ends this process

os.write(ready, b"r")
os.close(ready)
received = b""
while chunk := os.read(gate, 1 << 16):
    received += chunk
os.close(gate)
if not received:
    sys.exit(0)
import json  # noqa: E402

wanted = json.loads(received)
if wanted.get("cwd") is not None:
    try:
        os.chdir(wanted["cwd"])
    except OSError as error:  # as a process started in a directory that is not there is refused
        sys.stderr.write(f"{wanted['argv'][0]}: {error.strerror}\n")
        sys.exit(127 if isinstance(error, FileNotFoundError) else 126)
try:
    with open("/proc/self/comm", "w") as comm:  # `ps -e`, `top` and `pgrep borg` name it as they name borg
        comm.write(os.path.basename(program)[:15])
except OSError:
    pass
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = list(wanted["argv"])
sys.exit(main())
