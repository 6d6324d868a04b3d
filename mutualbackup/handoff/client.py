"""The command's side: ``mutualbackup run`` asks the daemon to run its jobs, then prints what the daemon sends.

Asked twice at most: by the executable before anything else is imported, when the state directory is known
without the inventory (``--state``, or where the same command line found it last time: ``remote/hints.py``);
else by ``cli.cmd_run`` once it has read the inventory. It reads the command line itself, and only its plain
forms (:func:`parse`): anything else — ``-v``, ``--help``, an abbreviated option, an error — is left to the
command, which runs the jobs itself and says what argparse says.

Nothing is sent unless the socket is in a directory of this user's (or root's) that nobody else may write, and
the daemon is this user or root (:mod:`mutualbackup.handoff`). Until the daemon has said "accepted", any
failure (no daemon, a refusal, no answer within :data:`ANSWER_SECONDS`) gives the jobs back to the command.
Once it has, they are the daemon's: the command prints, and an interruption (Ctrl-C) closes the connection, on
which the daemon stops the job as it would stop the command's own (its connection to the node closed).
"""

from __future__ import annotations

import json
import os
import socket
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: this runs before the program imports
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import BinaryIO

from mutualbackup import __version__, stdout_gone
from mutualbackup.handoff import PROTOCOL, address, peer_user, private_directory, trusted


ANSWER_SECONDS = 2.0
"""How long the daemon may take to accept or decline (it answers at once: its checks are a few stat calls)."""
VALUED = {"--inventory": "inventory", "--state": "state", "--replica": "replica"}


def parse(argv: Sequence[str], environ: Mapping[str, str], cwd: str) -> dict[str, object] | None:
    """The request of ``mutualbackup ARGV`` when it is ``run`` in a plain form argparse reads the same way
    (``[--inventory DIR] [--state DIR] run [SOURCE…] [--replica HOST] [--json]``, options also as ``--opt=VALUE``,
    in any order but with the sources together); None for anything else, and when ``MUTUALBACKUP_HANDOFF=no``."""
    if environ.get("MUTUALBACKUP_HANDOFF") == "no":
        return None  # the operator's choice: run it here
    values: dict[str, str] = {}
    sources: list[str] = []
    seen_run = json_out = False
    ended_sources = False
    words = list(argv)
    while words:
        word = words.pop(0)
        name, equals, value = word.partition("=")
        if name in VALUED and (name != "--replica" or seen_run):
            if not equals:
                if not words:
                    return None
                value = words.pop(0)
            if not value or value.startswith("-"):
                return None
            values[VALUED[name]] = value
            ended_sources = ended_sources or bool(sources)
        elif word == "--json" and seen_run:
            json_out = True
            ended_sources = ended_sources or bool(sources)
        elif word.startswith("-"):
            return None
        elif not seen_run:
            if word != "run":
                return None
            seen_run = True
        elif ended_sources:
            return None  # argparse takes the sources only together
        else:
            sources.append(word)
    if not seen_run:
        return None
    inventory = values.get("inventory") or environ.get("MUTUALBACKUP_INVENTORY") or "inventory"
    inventory = os.path.realpath(os.path.join(cwd, inventory))
    if not os.path.isdir(inventory):
        return None  # the command says so
    state = values.get("state")
    return {"sources": sources, "replica": values.get("replica"), "json": json_out,
            "inventory": inventory, "state": os.path.realpath(os.path.join(cwd, state)) if state else None}


def state_named(argv: Sequence[str], environ: Mapping[str, str], cwd: str) -> str | None:
    """The state directory the command line names (``--state``), when it is one :func:`hand_off` would take."""
    request = parse(argv, environ, cwd)
    return str(request["state"]) if request is not None and request["state"] else None


def hand_off(argv: Sequence[str], environ: Mapping[str, str], cwd: str, state: str) -> int | None:
    """``mutualbackup ARGV`` run by the daemon of the state directory ``state`` (where the command would keep its
    runs: ``--state``, else the inventory's ``coordinator.state``): the exit code; None when the command is to run
    it itself (not handed off)."""
    request = parse(argv, environ, cwd)
    if request is None or sys.stdout is None or sys.stderr is None:  # a closed stream (`>&-`): the command copes
        return None
    state = os.path.realpath(os.path.join(cwd, state))
    if not private_directory(state):
        return None
    request["state_named"] = request["state"] is not None  # else the inventory's coordinator.state
    request["state"] = state
    request["progress"] = sys.stderr.isatty()
    request["journal"] = bool(environ.get("JOURNAL_STREAM"))
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(ANSWER_SECONDS)
        try:
            with address(state) as where:
                connection.connect(where)
            if not trusted(peer_user(connection)):
                return None
            connection.sendall(json.dumps({"protocol": PROTOCOL, "version": __version__, "run": request}).encode()
                               + b"\n")
            replies = connection.makefile("rb")
            answer = _message(replies.readline())
        except (OSError, ValueError):
            return None
        if not isinstance(answer, dict) or "accepted" not in answer:
            return None
        connection.settimeout(None)
        daemon = answer["accepted"]
        try:
            return Printer(bool(request["json"]), bool(request["progress"])).follow(replies, daemon)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `mutualbackup run | head`: the reader has what it wanted
            stdout_gone()
            return 0
        except Exception as exc:  # noqa: BLE001 - never run again what the daemon took: say so, and stop
            print(f"mutualbackup: the daemon (process {daemon}) ran this command's backups, and its connection "
                  f"failed: {exc}; `mutualbackup status` says what it recorded", file=sys.stderr)
            return 1
    finally:
        connection.close()


def _message(line: bytes) -> object:
    if not line.endswith(b"\n"):
        raise ValueError("the daemon's line ended short")
    return json.loads(line)


class Printer:
    """Prints what the daemon sends, as the command would have printed it."""

    def __init__(self, json_out: bool, progress: bool) -> None:
        self.json = json_out
        self.wants_progress = progress
        self.progress = None  # the terminal's progress line of the backup under way
        self.outcomes: list[object] = []

    def follow(self, replies: BinaryIO, daemon: object) -> int:
        """Each message until the exit code; 1 when the daemon goes away before it."""
        for line in replies:
            message = _message(line)
            if not isinstance(message, dict):
                raise ValueError(f"the daemon sent {line[:80]!r}")
            code = self.take(message)
            if code is not None:
                return code
        self.ended()
        print(f"mutualbackup: the daemon (process {daemon}) stopped answering before the backup ended; "
              "`mutualbackup status` says what it recorded", file=sys.stderr)
        return 1

    def take(self, message: dict[str, object]) -> int | None:
        if "err" in message:
            self.write(sys.stderr, str(message["err"]))
        if "out" in message:
            self.write(sys.stdout, str(message["out"]))
        if "started" in message and self.wants_progress:
            self.started(*message["started"])  # type: ignore[misc]
        if "progress" in message and self.progress is not None:
            from types import SimpleNamespace

            files, original, deduplicated = message["progress"]  # type: ignore[misc]
            self.progress(SimpleNamespace(files=files, original_bytes=original, deduplicated_bytes=deduplicated))
        if "log" in message:
            self.write(sys.stderr, f"{message['log']}\n")  # formatted as this command's logging would have
        if "ended" in message:
            self.ended()
        if "outcome" in message:
            self.outcomes.append(message["outcome"])
        if "error" in message:
            self.ended()
            print(f"mutualbackup: {message['error']}", file=sys.stderr)
            return int(message.get("code", 1))  # type: ignore[call-overload]
        if "exit" in message:
            self.ended()
            if self.json:
                print(json.dumps(self.outcomes, indent=2))
            sys.stdout.flush()
            return int(message["exit"])  # type: ignore[call-overload]
        return None

    def write(self, stream, text: str) -> None:  # noqa: ANN001
        if self.progress is not None and stream is sys.stderr:
            self.progress.write_above(text)
        else:
            stream.write(text)

    def started(self, source: str, target: str) -> None:
        from mutualbackup.terminal import backup_progress

        self.progress = backup_progress(source, target)

    def ended(self) -> None:
        if self.progress is not None:
            self.progress.done()
            self.progress = None
