"""Requests about this node's own backups (it is a source): run as root, on its own key and passphrase.

The source's key (the one its replica hosts accept), its passphrase (generated here, mode 0600,
never sent anywhere) and the pinned host keys of its replica hosts live in the node's root-only
state directory; borg reads the passphrase itself (``BORG_PASSCOMMAND``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import time
from typing import Any, Mapping

from mutualbackup import borg
from mutualbackup.inventory import value_checks
from mutualbackup.inventory.model import Backup, Retention
from mutualbackup.node.protocol import pack
from mutualbackup.node.requests import (
    Args, Failed, LineBatch, Refused, Session, host_of, integer, node_name, number, request, text,
)
from mutualbackup.node.system import pidfile_path
from mutualbackup.remote.transport import Result

LIST_TIMEOUT = 900
PASSPHRASE_BYTES = 48


def paths(session: Session) -> borg.SourcePaths:
    return borg.SourcePaths(workdir=session.config.state)


def result_data(result: Result) -> dict[str, Any]:
    """A command's outcome as request data: its exit code and its streams (base64)."""
    return {"exit_code": result.exit_code, "stdout": pack(result.stdout), "stderr": pack(result.stderr)}


def source_pidfile(session: Session, host: str) -> str:
    return pidfile_path(session.config.state, f"src/{host}")


def borg_on(session: Session, args: Args, argv_of, *, timeout: float, supervised: bool = False,  # noqa: ANN001
            on_line: bool = False) -> dict[str, Any]:
    """Run the borg argv ``argv_of(borg, url)`` for the request's host with the source's environment."""
    host = host_of(args)
    url = borg.repository_url_for(session.config.member, session.config.node, host)
    extra: dict[str, Any] = {}
    if supervised:
        extra = {"pidfile": source_pidfile(session, host.name), "run_id": integer(args, "run_id", optional=True)}
    lines = LineBatch(session) if on_line else None
    if lines is not None:
        extra["on_stderr_line"] = lines
    try:
        result = session.system.run(argv_of(session.config.borg, url), env=borg.client_env(paths(session)),
                                    timeout=timeout, **extra)
    finally:
        if lines is not None:
            lines.flush()
    return result_data(result)


# --- provisioning ------------------------------------------------------------------------------


@request("prepare", "source")
def prepare(session: Session, args: Args) -> Mapping[str, Any]:
    """The source's key (made once), its passphrase (made once, here only), and its replica hosts pinned;
    the member's signed file checked (and its admins re-pinned when a pinned admin signed new ones)."""
    from mutualbackup.node.authority import verified

    verified(session, args)
    hosts = args.get("hosts")
    if not isinstance(hosts, list):
        raise Refused("'hosts' must be a list of hosts")
    pinned = sorted((host_of({"host": h}) for h in hosts), key=lambda h: h.name)
    where = paths(session)
    changes: list[str] = []
    system = session.system
    if system.read(where.key + ".pub") is None:
        made = system.run(("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mutualbackup:{session.config.name}",
                           "-f", where.key), timeout=60)
        if not made.ok:
            raise Failed(f"cannot generate the source's SSH key: {made.stderr_tail(3)}")
        changes.append("key")
    public_key = (system.read(where.key + ".pub") or b"").decode("utf-8", "replace").strip()
    if not re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [\x20-\x7e]*)?", public_key):
        raise Failed(f"the public key {where.key}.pub is not one ed25519 key on one line; move it away and run "
                     "`mutualbackup apply` again to generate a new one")
    if system.read(where.passphrase) is None:
        secret = base64.b64encode(os.urandom(PASSPHRASE_BYTES))
        if system.create(where.passphrase, secret, 0o600):
            changes.append("passphrase")
    elif not system.read(where.passphrase):
        raise Failed(f"{where.passphrase} exists but is empty: remove it")
    known = "".join(borg.known_hosts_line(h) + "\n" for h in pinned).encode()
    if system.read(where.known_hosts) != known:
        system.write(where.known_hosts, known, 0o600)
        changes.append(f"known_hosts:{len(pinned)}")
    return {"public_key": public_key, "changes": changes}


@request("init", "source")
def init(session: Session, args: Args) -> Mapping[str, Any]:
    """``borg init`` of the repository on the host, unless borg can already open it."""
    listed = borg_on(session, args, lambda b, url: borg.list_argv(b, url) + ("--short",), timeout=120)
    if borg.succeeded(listed["exit_code"]):
        return {"created": False}
    if listed["exit_code"] not in (13, 15, 2):
        return {"created": False, "listed": listed}
    made = borg_on(session, args, borg.init_argv, timeout=300)
    return {"created": borg.succeeded(made["exit_code"]), "init": made}


# --- backups and what they left ---------------------------------------------------------------------


@request("backup", "source")
def backup(session: Session, args: Args) -> Mapping[str, Any]:
    """The ``before:`` commands, then ``borg create`` of the named archive, supervised, within ``timeout``."""
    from mutualbackup.node.authority import must_match, verified

    host = host_of(args)
    asked = _backup_spec(args)
    signed = verified(session, args)
    spec = signed.backup
    for field in ("paths", "exclude", "before", "compression"):
        must_match(signed, field, getattr(asked, field), getattr(spec, field))
    archive = text(args, "archive")
    if not re.fullmatch(rf"{re.escape(session.config.node)}-\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d", archive):
        raise Refused(f"archive names are {session.config.node}-YYYY-MM-DDTHH:MM:SS, not {archive!r}")
    deadline = time.monotonic() + (number(args, "timeout") or 1.0)
    run_id = integer(args, "run_id", optional=True)
    pidfile = source_pidfile(session, host.name)
    for command in spec.before:
        done = session.system.run(("sh", "-c", command), timeout=max(1.0, deadline - time.monotonic()),
                                  pidfile=pidfile, run_id=run_id)
        if not done.ok:
            return {"before": {"command": command, **result_data(done)}}
    url = borg.repository_url_for(session.config.member, session.config.node, host)
    progress = args.get("progress") is True  # an operator watches: how far borg is, sent as it goes
    lines = LineBatch(session, every=0.0) if progress else None
    last = [0.0]

    def heard(line: str) -> bool:
        """Send how far borg is, every PROGRESS_EVERY seconds at most; keep no progress line (False)."""
        numbers = progress_numbers(line)
        if numbers is None:
            return True
        if lines is not None and time.monotonic() - last[0] >= PROGRESS_EVERY:
            last[0] = time.monotonic()
            lines(numbers)
        return False

    try:
        created = session.system.run(borg.create_argv(session.config.borg, url, archive, spec, progress=progress),
                                     env=borg.client_env(paths(session)),
                                     timeout=max(1.0, deadline - time.monotonic()), pidfile=pidfile, run_id=run_id,
                                     on_stderr_line=heard if progress else None)
    finally:
        if lines is not None:
            lines.flush()
    if progress:
        created = dataclasses.replace(created, stderr=without_progress(created.stderr))
    return {"create": result_data(created)}


PROGRESS_EVERY = 1.0  # seconds: a terminal's line, not a record of each file's size
PROGRESS_FIELDS = ("type", "original_size", "compressed_size", "deduplicated_size", "nfiles", "time", "finished")


def progress_numbers(line: str) -> str | None:
    """borg's ``archive_progress`` line, without the path it is at: the coordinator learns how far a backup
    is, never which files a member has. None for any other line."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "archive_progress":
        return None
    return json.dumps({key: event[key] for key in PROGRESS_FIELDS if key in event})


def without_progress(stderr: bytes) -> bytes:
    """borg's stderr without its progress lines (they name files; the streamed numbers said all of it)."""
    return b"\n".join(line for line in stderr.split(b"\n") if b'"archive_progress"' not in line)


def _backup_spec(args: Args) -> Backup:
    """The backup's paths, excludes, compression and ``before:`` commands, checked as the inventory checks them."""
    spec = args.get("backup")
    if not isinstance(spec, dict):
        raise Refused("'backup' must describe the backup")
    try:
        backup_paths = tuple(value_checks.check_absolute_path(p) for p in _strings(spec, "paths"))
        exclude = tuple(value_checks.check_pattern(p) for p in _strings(spec, "exclude"))
        before = tuple(value_checks.check_command(c) for c in _strings(spec, "before"))
        compression = value_checks.check_compression(str(spec.get("compression", "zstd,3")))
    except ValueError as exc:
        raise Refused(f"backup: {exc}") from None
    if not backup_paths:
        raise Refused("backup: no paths")
    return Backup(paths=backup_paths, exclude=exclude, compression=compression, before=before)


def _strings(spec: Mapping[str, Any], key: str) -> list[str]:
    value = spec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Refused(f"backup.{key} must be a list of text")
    return value


@request("list", "source")
def list_archives(session: Session, args: Args) -> Mapping[str, Any]:
    return borg_on(session, args, borg.list_argv, timeout=LIST_TIMEOUT)


@request("info", "source")
def info(session: Session, args: Args) -> Mapping[str, Any]:
    return borg_on(session, args, borg.info_argv, timeout=LIST_TIMEOUT)


@request("prune", "source")
def prune(session: Session, args: Args) -> Mapping[str, Any]:
    """``borg prune`` of this source's archives with the retention its member signed, supervised."""
    from mutualbackup.node.authority import must_match, verified

    signed = verified(session, args)
    retention = signed.retention
    must_match(signed, "retention", _retention(args), retention)
    glob = f"{session.config.node}-*"
    return borg_on(session, args, lambda b, url: borg.prune_argv(b, url, retention, glob),
                   timeout=number(args, "timeout") or 1.0, supervised=True)


def _retention(args: Args) -> Retention:
    value = args.get("retention")
    if not isinstance(value, dict) or set(value) - {"hourly", "daily", "weekly", "monthly", "yearly"}:
        raise Refused("'retention' must give hourly, daily, weekly, monthly or yearly counts")
    counts = {k: integer(value, k) or 0 for k in value}
    if not any(counts.values()):
        raise Refused("a retention that keeps nothing")
    return Retention(**counts)


@request("check", "source")
def check(session: Session, args: Args) -> Mapping[str, Any]:
    """``borg check --archives-only`` from the source, supervised."""
    return borg_on(session, args, lambda b, url: borg.check_argv(b, url, archives_only=True),
                   timeout=number(args, "timeout") or 1.0, supervised=True)


# --- clean-up after a crash ------------------------------------------------------------------------


ROLES = ("src", "drill", "repo")


def role_pidfile(session: Session, args: Args) -> str:
    """The pidfile of a job of this node: ``src/HOST`` and ``drill/HOST`` (as a source), ``repo/SOURCE`` (as a host)."""
    role = text(args, "role")
    kind, _, peer = role.partition("/")
    node_name(peer, "the role's node")
    if kind not in ROLES:
        raise Refused(f"a role is one of {', '.join(ROLES)} then a node's name")
    if kind == "drill":
        return pidfile_path(session.config.state, "drill-" + peer.replace("/", "."))
    return pidfile_path(session.config.work if kind == "repo" else session.config.state, role)


@request("leftover", "source")
def leftover(session: Session, args: Args) -> Mapping[str, Any]:
    """The run a job's pidfile names, if one is left (pid, run id)."""
    found = session.system.pidfile(role_pidfile(session, args))
    return {} if found is None else {"pid": found.pid, "run_id": found.run_id}


@request("stop", "source")
def stop(session: Session, args: Args) -> Mapping[str, Any]:
    """Stop the job of a pidfile (SIGINT, then SIGTERM, then SIGKILL), only while it is the process started."""
    owner = session.config.user if text(args, "role").startswith("repo/") else None  # the login's own pidfiles
    stopped, said = session.system.stop(role_pidfile(session, args),
                                        number(args, "int_seconds", optional=True, default=20.0) or 20.0,
                                        number(args, "term_seconds", optional=True, default=10.0) or 10.0, owner)
    return {"stopped": stopped, "said": said}


@request("hello", "any")
def hello(session: Session, args: Args) -> Mapping[str, Any]:
    """Who this node is, its versions and clock (``mutualbackup doctor``), and whether it accepts the member file
    it is given (``signed``); ``{"borg": false}`` skips borg's."""
    from mutualbackup import __version__

    answer: dict[str, Any] = {"node": session.config.name, "member": session.config.member, "version": __version__,
                              "time": time.time()}
    if session.config.storage:
        try:
            answer["storage_free"] = session.system.free_space(session.config.storage)
        except OSError as exc:
            answer["storage_error"] = f"{session.config.storage}: {exc.strerror}"
    if args.get("borg", True) is not False:
        version = session.system.run((session.config.borg, "--version"), timeout=60)
        answer["borg"] = version.stdout.decode("utf-8", "replace").strip() if version.ok else None
    if "signed" in args:  # would this node obey its member's file as the coordinator has it?
        from mutualbackup.node.authority import NotSigned, verified

        try:
            answer["member_file"] = verified(session, args).signer
        except NotSigned as exc:
            answer["member_file_error"] = str(exc)
    return answer
