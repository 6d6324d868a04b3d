"""Listing archives and restoring them onto any node of the federation.

Borg always runs on the node that needs the files (the *destination*) and reads
the repository on a replica's host over SSH: plaintext never passes through the
host or the coordinator. Two ways to reach the repository:

- **source key**: the destination is the source itself, with its own key and
  0600 passphrase file (the lines ``apply`` wrote already accept it);
- **temporary key** (any other node, or ``--recovery``): a key pair generated *on
  the destination* in a 0700 temporary directory; the host accepts it through a
  temporary restricted line in its managed ``authorized_keys`` block
  (``mutualbackup-restore:SOURCE:ID``, one repository, append-only, a 10M quota,
  sshd ``expiry-time``), removed when the restore ends, failed or not. The
  passphrase is read from the source's 0600 file (or from the recovery file the
  operator holds) into the coordinator's memory and written to borg's fd 3
  through the SSH channel's stdin: never in argv, an environment value, a log,
  the history or a file of the coordinator.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from . import borg, borg_restore
from .borg_restore import ExtractProgress, TemporaryPaths
from .context import Context
from .errors import MutualBackupError, OperationFailed, TransportError, UsageError
from .keys import Recovery
from .model import Node
from .provision import managed_lines, replace_block
from .status import FAILING_AFTER
from .transport import Result, Transport, expand_home

log = logging.getLogger("mutualbackup.restore")

RESTORE_TIMEOUT = 24 * 3600
UNREACHABLE = (255, 80, 81, 87)
"""borg exit codes meaning the repository's host could not be reached (or the connection to it broke)."""
REPO_KEY_MISSING = 44
"""borg's RepoKeyNotFoundError: the repository's own key is gone (``--recovery`` imports the exported one)."""


@dataclass(frozen=True)
class RestoreResult:
    source: str
    replica: str
    archive: str
    node: str
    directory: str
    dry_run: bool
    listed: tuple[str, ...]  # paths written (or that would be, with --dry-run)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    result: str = "success"  # success or warning
    access: str = "source key"  # or "temporary key"
    recovery: bool = False
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data["listed"] = list(self.listed)
        data["warnings"] = list(self.warnings)
        data["rate_bytes_per_second"] = round(self.bytes / self.seconds) if self.seconds > 0 else None
        return data


# --- choosing a replica ---------------------------------------------------------------


def replica_order(ctx: Context, source: str, candidates: Sequence[str]) -> list[str]:
    """``candidates`` best first: healthy before failing, then the freshest successful backup."""

    def key(target: str) -> tuple[bool, float]:
        run = ctx.history.last_run("backup", source, target, successful=True)
        healthy = ctx.history.consecutive_failures("backup", source, target) < FAILING_AFTER
        return (healthy, run.started if run else 0.0)

    return sorted(candidates, key=key, reverse=True)


def choose_replica(ctx: Context, source: Node | str, requested: str | None, among: Sequence[str] | None = None) -> list[Node]:
    """Replicas to try, best first: the requested one, else freshest healthy first.

    ``among`` replaces the recorded replicas (the hosts of a recovery file).
    """
    name = source if isinstance(source, str) else source.name
    replicas = tuple(among) if among is not None else ctx.replicas_of(name)
    if not replicas:
        raise OperationFailed(f"{name} has no provisioned replica: run `mutualbackup apply` first")
    if requested is not None:
        if requested not in replicas:
            raise UsageError(f"{requested} holds no replica of {name} (replicas: {', '.join(replicas)})")
        return [ctx.node(requested)]
    return [ctx.node(t) for t in replica_order(ctx, name, replicas)]


def list_archives(ctx: Context, source: Node, replica: str | None = None) -> tuple[Node, list[borg.ArchiveEntry]]:
    """The archives of ``source`` on the chosen replica (falls back to the next when one is down)."""
    errors = []
    for host in choose_replica(ctx, source, replica):
        transport = ctx.connect(source)
        try:
            paths = ctx.source_paths(transport, source)
            result = transport.run(
                borg.list_argv(source.borg, borg.repository_url(source, host)), env=borg.client_env(paths), timeout=600
            )
        finally:
            transport.close()
        if result.exit_code in (0, 1):
            return host, borg.parse_list_json(result.stdout)
        errors.append(f"{host.name}: borg list exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}")
    raise OperationFailed(f"cannot list the archives of {source.name}:\n" + "\n".join(errors))


# --- how borg reaches the repository from the destination --------------------------


def repository_url(host: Node, path: str) -> str:
    """The ``ssh://`` URL of the repository at ``path`` on ``host`` (as :func:`borg.repository_url`)."""
    address = f"[{host.address}]" if ":" in host.address else host.address
    return f"ssh://{host.user}@{address}:{host.port}{path}"


@dataclass
class _Access:
    """How borg runs on the destination: environment, stdin and argv wrapping, and the host grant."""

    env: Mapping[str, str]
    passphrase: bytes | None = field(default=None, repr=False)  # sent on stdin, read by borg from fd 3
    grant: Callable[[Node, str], contextlib.AbstractContextManager[None]] = lambda host, path: contextlib.nullcontext()
    name: str = "source key"

    def run(self, transport: Transport, argv: Sequence[str], **kwargs: object) -> Result:
        if self.passphrase is None:
            return transport.run(argv, env=self.env, **kwargs)  # type: ignore[arg-type]
        return transport.run(
            borg_restore.with_passphrase_on_fd3(argv), env=self.env, stdin=self.passphrase, **kwargs  # type: ignore[arg-type]
        )


@contextlib.contextmanager
def temporary_key(ctx: Context, transport: Transport, destination: Node, source: str, restore_id: str) -> Iterator[tuple[TemporaryPaths, str]]:
    """A key pair made on ``destination`` in a 0700 temporary directory, removed on exit.

    Yields the directory and the public key line. When the destination cannot be
    reached at the end, the directory stays (its key is useless once the host's
    line is gone) and a warning says where.
    """
    workdir = expand_home(destination.workdir, transport.home())
    made = transport.run(
        borg_restore.make_temporary_dir_argv(workdir, restore_id, borg_restore.restore_comment(source, restore_id)),
        timeout=60,
    )
    directory = made.stdout.decode("utf-8", "replace")
    if not made.ok or not directory.startswith("/"):
        raise OperationFailed(
            f"cannot create a temporary key on {destination.name} under {workdir} (exit {made.exit_code}): {made.stderr_tail(5)}"
        )
    tmp = TemporaryPaths(directory)
    try:
        public = (transport.read_file(tmp.key + ".pub") or b"").decode().strip()
        if len(public.split()) < 2:
            raise OperationFailed(f"the temporary key {tmp.key}.pub on {destination.name} is unreadable")
        yield tmp, public
    finally:
        try:
            removed = transport.run(borg_restore.remove_temporary_dir_argv(directory), timeout=120)
            if not removed.ok:
                log.warning("could not remove %s on %s: %s", directory, destination.name, removed.stderr_tail(3))
        except MutualBackupError as exc:
            log.warning(
                "could not remove the temporary key directory %s on %s (%s); its key no longer opens anything: "
                "remove it by hand", directory, destination.name, exc,
            )


@contextlib.contextmanager
def authorised(ctx: Context, host: Node, source: str, repository: str, public_key: str, restore_id: str) -> Iterator[None]:
    """A temporary restore line for ``public_key`` on ``host`` while the block runs.

    Added to (and removed from) the managed block of the host's authorized_keys;
    stale restore lines found there are dropped at the same time. Raises
    TransportError when the host cannot be reached (nothing was changed then).
    """
    line = borg_restore.restore_line(host.borg, repository, public_key, source, restore_id)
    transport = ctx.connect(host)
    try:
        _edit_block(transport, host, lambda lines, now: borg_restore.with_restore_line(lines, line, now), expect=line)
        log.info("temporary restore line for %s added on %s (%s)", source, host.name, restore_id)
        try:
            yield
        finally:
            try:
                _edit_block(
                    transport, host,
                    lambda lines, now: borg_restore.without_restore_line(lines, source, restore_id, now), absent=line,
                )
                log.info("temporary restore line for %s removed from %s (%s)", source, host.name, restore_id)
            except MutualBackupError as exc:
                log.error(
                    "could not remove the temporary restore line %s from %s (%s): sshd refuses it after its "
                    "expiry-time, and the next `mutualbackup apply` or restore through %s removes it",
                    borg_restore.restore_comment(source, restore_id), host.name, exc, host.name,
                )
    finally:
        transport.close()


def _edit_block(
    transport: Transport,
    host: Node,
    change: Callable[[list[str], dt.datetime], list[str]],
    *,
    expect: str | None = None,
    absent: str | None = None,
    attempts: int = 3,
) -> None:
    """Read-modify-write of the managed block, re-read to confirm (another writer may race us)."""
    path = expand_home(host.authorized_keys, transport.home())
    for _ in range(attempts):
        current = (transport.read_file(path) or b"").decode("utf-8", errors="surrogateescape")
        wanted = replace_block(current, change(managed_lines(current), dt.datetime.now(dt.timezone.utc)))
        if wanted != current:
            transport.write_file(path, wanted.encode("utf-8", errors="surrogateescape"), 0o600)
        confirmed = managed_lines((transport.read_file(path) or b"").decode("utf-8", errors="surrogateescape"))
        if (expect is None or expect in confirmed) and (absent is None or absent not in confirmed):
            return
    raise OperationFailed(f"cannot update the managed block of {path} on {host.name}: it keeps changing under us")


def read_source_passphrase(ctx: Context, source: Node) -> bytes:
    """The passphrase from the source's 0600 file, into memory only; OperationFailed with advice otherwise."""
    try:
        transport = ctx.connect(source)
        try:
            paths = ctx.source_paths(transport, source)
            result = transport.run(("cat", "--", paths.passphrase), timeout=60)
        finally:
            transport.close()
    except TransportError as exc:
        raise OperationFailed(
            f"restoring onto another node needs {source.name}'s passphrase, and {source.name} cannot be reached ({exc}).\n"
            f"Restore with the member's recovery file instead: --recovery FILE (made by `mutualbackup keys export`)."
        ) from None
    if not result.ok or not result.stdout.strip():
        raise OperationFailed(
            f"cannot read the passphrase file on {source.name} (exit {result.exit_code}); "
            "restore with --recovery FILE instead"
        )
    return result.stdout


# --- restore --------------------------------------------------------------------------


def restore(
    ctx: Context,
    source: Node | str,
    destination: Node,
    directory: str,
    *,
    archive: str | None = None,
    paths: Sequence[str] = (),
    replica: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_other_member: bool = False,
    recovery: Recovery | None = None,
    requested_by: str = "",
    on_progress: Callable[[ExtractProgress], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Extract ``archive`` (default: the latest) of ``source`` into ``directory`` on ``destination``.

    ``source`` is a Node, or only its name when it is gone from the inventory
    (then ``recovery`` is required). Raises UsageError (exit 2) for a refused
    request (another member without ``allow_other_member``, a non-empty target
    without ``force``, a relative directory) and OperationFailed when borg fails;
    the history records every attempted restore, with who asked.
    """
    source_name = source if isinstance(source, str) else source.name
    source_node = source if isinstance(source, Node) else None
    if not directory.startswith("/"):
        raise UsageError(f"the target directory must be absolute, got {directory!r}")
    if recovery is not None and recovery.source != source_name:
        raise UsageError(f"the recovery file is for {recovery.source}, not {source_name}")
    if source_node is None and recovery is None:
        raise UsageError(f"{source_name} is not in the inventory: restore it with --recovery FILE")
    source_member = source_name.split("/", 1)[0]
    other_member = destination.member != source_member
    if other_member and not allow_other_member:
        raise UsageError(
            f"restoring {source_name} onto {destination.name} would show {source_member}'s plaintext to {destination.member}.\n"
            f"Add --allow-other-member once {source_member} agreed; the history records it and who asked."
        )

    delegated = recovery is not None or destination.name != source_name
    if recovery is not None:
        known = {n.name for n in ctx.federation.nodes()}
        among = [r.host for r in recovery.repositories if r.host in known]
        if not among:
            raise OperationFailed(
                f"none of the hosts in the recovery file ({', '.join(r.host for r in recovery.repositories)}) is in the inventory"
            )
        hosts = choose_replica(ctx, source_name, replica, among)
    else:
        hosts = choose_replica(ctx, source_name, replica)

    def repository_path(host: Node) -> str:
        if recovery is not None:
            entry = recovery.repository(host.name)
            assert entry is not None
            return entry.path
        assert source_node is not None
        return borg.repository_path(source_node, host)

    detail = {
        "to": f"{destination.name}:{directory}", "paths": list(paths), "dry_run": dry_run,
        "requested_by": requested_by, "other_member": other_member, "recovery": recovery is not None,
        "access": "temporary key" if delegated else "source key",
    }
    transport = ctx.connect(destination)
    try:
        if not dry_run:
            _prepare_target(transport, directory, force)
        if not delegated:
            assert source_node is not None
            access = _Access(env=borg.client_env(ctx.source_paths(transport, source_node)))
            return _restore_from(ctx, transport, access, source_name, destination, directory, hosts, repository_path,
                                 archive, paths, dry_run, detail, recovery, on_progress, on_line)
        if recovery is not None:
            passphrase = recovery.passphrase.encode("utf-8")
        else:
            assert source_node is not None
            passphrase = read_source_passphrase(ctx, source_node)
        restore_id = borg_restore.new_restore_id(dt.datetime.now(dt.timezone.utc), secrets.token_hex(4))
        with temporary_key(ctx, transport, destination, source_name, restore_id) as (tmp, public_key):
            known_hosts = "".join(borg.known_hosts_line(h) + "\n" for h in hosts).encode()
            transport.write_file(tmp.known_hosts, known_hosts, 0o600)
            access = _Access(
                env=borg_restore.delegated_env(tmp),
                passphrase=passphrase,
                grant=lambda host, path: authorised(ctx, host, source_name, path, public_key, restore_id),
                name="temporary key",
            )
            return _restore_from(ctx, transport, access, source_name, destination, directory, hosts, repository_path,
                                 archive, paths, dry_run, detail, recovery, on_progress, on_line)
    finally:
        transport.close()


class _HostUnusable(Exception):
    """This replica could not be used, and nothing was written yet: try the next one."""


class _RecordedFailure(OperationFailed):
    """A failed restore already recorded in the history."""


def _restore_from(
    ctx: Context,
    transport: Transport,
    access: _Access,
    source: str,
    destination: Node,
    directory: str,
    hosts: Sequence[Node],
    repository_path: Callable[[Node], str],
    archive: str | None,
    paths: Sequence[str],
    dry_run: bool,
    detail: dict[str, object],
    recovery: Recovery | None,
    on_progress: Callable[[ExtractProgress], None] | None,
    on_line: Callable[[str], None] | None,
) -> RestoreResult:
    """Try each replica in turn until one is reached; extract from the first that is.

    The archive list is read first when no archive is named (to find the latest)
    or with a recovery file (to find out whether a repository lost its key);
    otherwise borg extract goes first, and a host that cannot be reached before
    anything was written passes the turn to the next replica.
    """
    errors: list[str] = []
    tried = ""
    try:
        for host in hosts:
            tried = host.name
            path = repository_path(host)
            url = repository_url(host, path)
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(access.grant(host, path))
                except TransportError as exc:
                    errors.append(f"{host.name}: cannot be reached to authorise the restore: {exc}")
                    continue
                chosen = archive
                if archive is None or recovery is not None:
                    chosen, error = _pick_archive(transport, access, destination, host, url, archive, recovery, source)
                    if chosen is None:
                        errors.append(error)
                        continue
                try:
                    return _extract(ctx, transport, access, source, destination, directory, host, url, chosen, paths,
                                    dry_run, detail, on_progress, on_line)
                except _HostUnusable as exc:
                    errors.append(str(exc))
    except (_RecordedFailure, UsageError):
        raise
    except MutualBackupError as exc:
        run_id = ctx.history.start_run("restore", source, tried)
        ctx.history.finish_run(run_id, "failure", error=str(exc), detail=detail)
        raise OperationFailed(
            f"restore of {source} into {destination.name}:{directory} failed: {exc}\n"
            f"Run it again once {destination.name} is reachable (add --force if something was written)."
        ) from None
    run_id = ctx.history.start_run("restore", source, "")
    message = f"no replica of {source} could be used:\n" + "\n".join(errors)
    ctx.history.finish_run(run_id, "failure", error=message, detail=detail)
    raise OperationFailed(message)


def _pick_archive(
    transport: Transport, access: _Access, destination: Node, host: Node, url: str, archive: str | None,
    recovery: Recovery | None, source: str,
) -> tuple[str | None, str]:
    """The archive to extract (the latest when none is asked), or (None, why this replica cannot be used)."""
    result = access.run(transport, borg.list_argv(destination.borg, url), timeout=600)
    if result.exit_code == REPO_KEY_MISSING and recovery is not None:
        _import_key(transport, access, destination, host, url, recovery)
        result = access.run(transport, borg.list_argv(destination.borg, url), timeout=600)
    if result.exit_code not in (0, 1):
        return None, f"{host.name}: borg list exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}"
    archives = borg.parse_list_json(result.stdout)
    if not archives:
        return None, f"{host.name}: no archive of {source} yet"
    if archive is None:
        return archives[-1].name, ""
    if archive not in {a.name for a in archives}:
        raise UsageError(f"no archive {archive!r} of {source} on {host.name}; see `mutualbackup archives {source}`")
    return archive, ""


def _import_key(transport: Transport, access: _Access, destination: Node, host: Node, url: str, recovery: Recovery) -> None:
    """Put the exported key back into a repository whose own key is missing."""
    entry = recovery.repository(host.name)
    assert entry is not None
    log.warning("the repository of %s on %s has lost its key: importing the one from the recovery file", recovery.source, host.name)
    env = {k: v for k, v in access.env.items() if k != "BORG_PASSPHRASE_FD"}
    result = transport.run(borg_restore.key_import_argv(destination.borg, url), env=env, stdin=entry.key.encode(), timeout=600)
    if result.exit_code not in (0, 1):
        raise OperationFailed(
            f"the repository on {host.name} has no key and `borg key import` failed (exit {result.exit_code}): {result.stderr_tail(5)}"
        )


def _extract(
    ctx: Context, transport: Transport, access: _Access, source: str, destination: Node, directory: str, host: Node,
    url: str, archive: str, paths: Sequence[str], dry_run: bool, detail: dict[str, object],
    on_progress: Callable[[ExtractProgress], None] | None, on_line: Callable[[str], None] | None,
) -> RestoreResult:
    progress = ExtractProgress(keep_listed=dry_run)

    def feed(line: str) -> None:
        if on_line is not None:
            on_line(line)
        if progress.feed(line) and on_progress is not None:
            on_progress(progress)

    started = time.time()
    run_id = ctx.history.start_run("restore", source, host.name, started=started)
    log.info("restore start %s from %s into %s:%s (%s)", source, host.name, destination.name, directory, access.name)
    try:
        result = access.run(
            transport,
            borg_restore.extract_argv(destination.borg, url, archive, paths, dry_run=dry_run),
            cwd=directory if not dry_run else "/",
            timeout=RESTORE_TIMEOUT,
            on_stderr_line=feed,
        )
    except MutualBackupError as exc:
        ctx.history.finish_run(run_id, "failure", error=str(exc), archive=archive, detail=detail)
        raise _RecordedFailure(
            f"restore of {source} from {host.name} into {destination.name}:{directory} was cut off: {exc}\n"
            f"{progress.files} item(s) were written before; run the restore again with --force once {destination.name} is back"
        ) from None
    seconds = time.time() - started
    verdict = borg.classify_exit(result.exit_code)
    detail = dict(detail, files=progress.files, bytes=progress.bytes_done, seconds=round(seconds, 3))
    if verdict not in ("success", "warning") and result.exit_code in UNREACHABLE and progress.files == 0:
        error = f"{host.name}: borg extract exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{progress.tail(5)}"
        ctx.history.finish_run(run_id, "failure", exit_code=result.exit_code, error=error, archive=archive, detail=detail)
        raise _HostUnusable(error)
    if verdict not in ("success", "warning"):
        error = f"borg extract exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{progress.tail()}".strip()
        ctx.history.finish_run(run_id, "failure", exit_code=result.exit_code, error=error, archive=archive, detail=detail,
                               nfiles=progress.files, original_bytes=progress.bytes_done)
        raise _RecordedFailure(f"restore of {source} from {host.name} into {destination.name}:{directory} failed: {error}")
    warnings = tuple(progress.messages) if verdict == "warning" else ()
    ctx.history.finish_run(
        run_id, verdict, exit_code=result.exit_code, archive=archive, detail=detail, nfiles=progress.files,
        original_bytes=progress.bytes_done, error="\n".join(warnings[-15:]) or None,
    )
    log.info("restore end   %s from %s: %s, %d item(s), %.1fs", source, host.name, verdict, progress.files, seconds)
    return RestoreResult(
        source=source, replica=host.name, archive=archive, node=destination.name, directory=directory, dry_run=dry_run,
        listed=tuple(progress.listed), files=progress.files, bytes=progress.bytes_done, seconds=round(seconds, 3),
        result=verdict, access=access.name, recovery=bool(detail.get("recovery")), warnings=warnings,
    )


def _prepare_target(transport: Transport, directory: str, force: bool) -> None:
    """Create ``directory``; refuse a non-empty one unless ``force``."""
    check = transport.run(
        ("sh", "-c", 'mkdir -p -- "$1" && [ -z "$(ls -A -- "$1")" ]', "sh", directory), timeout=60
    )
    if check.exit_code != 0:
        if check.stderr.strip():
            raise OperationFailed(f"cannot create {directory} on {transport.node_name}: {check.stderr_tail()}")
        if not force:
            raise UsageError(
                f"{transport.node_name}:{directory} is not empty; restore into a new directory, or add --force to write over it"
            )


# --- for the command line --------------------------------------------------------------


def requested_by() -> str:
    """Who runs this command, for the history: ``user@host`` (and the sudo caller, if any)."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    who = f"{user}@{socket.gethostname()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{who} (sudo by {sudo})" if sudo and sudo != user else who


def format_progress(progress: ExtractProgress, seconds: float) -> str:
    """One progress line: items, bytes (of the total), rate."""
    from .units import format_size

    rate = progress.bytes_done / seconds if seconds > 0 else 0.0
    total = f" of {format_size(progress.bytes_total)}" if progress.bytes_total else ""
    return f"{progress.files} item(s)  {format_size(progress.bytes_done)}{total}  {format_size(int(rate))}/s"


class TerminalProgress:
    """Rewrites one line of a terminal (at most 5 times a second) as borg extract progresses."""

    def __init__(self, stream, clock: Callable[[], float] = time.monotonic) -> None:  # noqa: ANN001
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.shown = 0.0
        self.width = 0

    def __call__(self, progress: ExtractProgress) -> None:
        now = self.clock()
        if now - self.shown < 0.2:
            return
        self.shown = now
        self._write(format_progress(progress, now - self.started))

    def _write(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width))
        self.width = len(text)
        self.stream.flush()

    def done(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
