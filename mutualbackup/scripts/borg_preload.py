"""borg, started before its command line is known (mutualbackup-node's ``node/preload.py``).

Run as root as ``PYTHON -I THIS GATE READY PROGRAM COMMAND`` with borg's own Python (the interpreter of
PROGRAM, borg's console script, its absolute path) and the environment borg will have (PROGRAM and COMMAND,
borg's, are there for ``ps`` to show). It imports borg, the largest part of borg's start, while the node
program checks the request; a failure to import ends it there (the node then starts borg as it always did).
Then it says so on READY (one byte) and reads a header on the gate (file descriptor GATE): its length (8 hex
digits), then JSON: ``{"argv": [...], "cwd": DIR or null, "env": ENV or null, "passphrase_on_gate": BOOL}``.
Nothing of borg runs before that: an empty gate (the request was refused, or needs no borg) ends it at once.
Otherwise this process becomes that borg: what ``ARGV`` run in DIR would do, ``sys.argv`` included, with ENV
when given (a restore onto another node: it differs only in what borg reads once it runs). With
``passphrase_on_gate`` the rest of the gate is borg's passphrase (``BORG_PASSPHRASE_FD``), which borg reads
when it needs it; otherwise the gate is closed. SIGINT is ignored until then (a stop arrives only once borg
runs, and borg's own handling of it starts with borg).
"""

import os
import signal
import sys

signal.signal(signal.SIGINT, signal.SIG_IGN)
gate, ready, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

from borg.archiver import main  # noqa: E402 - after the signal: anything that fails here ends this process

os.write(ready, b"r")
os.close(ready)


def received(size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := os.read(gate, size - len(data))):
        data += chunk
    return data


length = received(8)
if len(length) < 8:
    sys.exit(0)
if not all(digit in b"0123456789abcdef" for digit in length):
    sys.exit("borg_preload: a bad header on the gate")
import json  # noqa: E402

wanted = json.loads(received(int(length, 16)))
if wanted.get("env") is not None:  # a restore onto another node: its own ssh command, base directory, passphrase
    os.environ.clear()  # replaced, never merged: nothing of the node's own (its passphrase command) may remain
    os.environ.update(wanted["env"])
if wanted.get("passphrase_on_gate"):
    os.set_inheritable(gate, False)  # borg's own, not its ssh's
    os.environ["BORG_PASSPHRASE_FD"] = str(gate)  # borg reads the rest of the gate, the passphrase, when it needs it
else:
    os.close(gate)
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
