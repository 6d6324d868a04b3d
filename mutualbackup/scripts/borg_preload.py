"""borg, started before its command line is known (mutualbackup-node's ``node/preload.py``).

Run as ``PYTHON -I THIS GATE PROGRAM COMMAND`` with borg's own Python (the interpreter of PROGRAM, borg's
console script) and the environment borg will have (COMMAND, borg's, is there for ``ps`` to show): it
imports borg, the largest part of borg's start, while the node program checks the request; then it reads
the gate (file descriptor GATE) to its end. Nothing of borg runs before that: an empty gate (the request was
refused, or needs no borg) ends it at once. Otherwise the gate holds the command line and the working
directory, as JSON (``{"argv": [...], "cwd": DIR or null}``), and this process becomes that borg: what
``PROGRAM ARGS`` run in DIR would do, ``sys.argv[0]`` included. When borg could not even be imported here,
the command line is handed to PROGRAM itself, whose own start says what is wrong.
"""

import os
import sys

gate, program = int(sys.argv[1]), sys.argv[2]
try:
    from borg.archiver import main
except BaseException:  # noqa: BLE001 - said by PROGRAM's own start, below
    main = None
received = b""
while chunk := os.read(gate, 1 << 16):
    received += chunk
os.close(gate)
if not received:
    sys.exit(0)
import json  # noqa: E402

wanted = json.loads(received)
argv, cwd = wanted["argv"], wanted.get("cwd")
if cwd is not None:
    try:
        os.chdir(cwd)
    except OSError as error:  # as a process started in a directory that is not there is refused
        sys.stderr.write(f"{program}: {error.strerror}\n")
        sys.exit(127 if isinstance(error, FileNotFoundError) else 126)
if main is None:
    os.execv(program, [program, *argv[1:]])
try:
    with open("/proc/self/comm", "w") as comm:  # `ps -e`, `top` and `pgrep borg` name it as they name borg
        comm.write(os.path.basename(program)[:15])
except OSError:
    pass
sys.argv = [program, *argv[1:]]
sys.exit(main())
