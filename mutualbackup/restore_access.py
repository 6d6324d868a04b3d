"""How borg on a restore's destination reaches a repository: the temporary authorisation.

For a restore onto any node but the source itself (see :mod:`mutualbackup.restore`):

- on the destination, one round trip checks the target directory and makes a
  0700 temporary directory holding a new key pair (made there; the private half
  never leaves it) and the pinned host keys (:func:`setup_destination`);
- on the replica's host, a temporary restricted line for that key inside the
  managed block of ``authorized_keys`` (:func:`authorised`), withdrawn whatever
  happens, in one round trip;
- the passphrase, read from the source's 0600 file into memory only
  (:func:`read_source_passphrase`), is written by :class:`Access` to the SSH
  channel's stdin, which borg reads as fd 3.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from . import borg, borg_restore
from .borg_restore import TemporaryPaths
from .context import Context
from .errors import MutualBackupError, OperationFailed, TransportError, UsageError
from .model import Node
from .provision import managed_lines, replace_block
from .transport import Result, Transport, resolve_path

log = logging.getLogger("mutualbackup.restore")


def repository_url(host: Node, path: str) -> str:
    """The ``ssh://`` URL of the repository at ``path`` on ``host`` (as :func:`borg.repository_url`)."""
    address = f"[{host.address}]" if ":" in host.address else host.address
    return f"ssh://{host.user}@{address}:{host.port}{path}"


@dataclass
class Access:
    """How borg runs on the destination: environment, the passphrase pipe, the host grant, the target check."""

    env: Mapping[str, str]
    passphrase: bytes | None = field(default=None, repr=False)  # sent on stdin, read by borg from fd 3
    grant: Callable[[Node, str], contextlib.AbstractContextManager[None]] = lambda host, path: contextlib.nullcontext()
    name: str = "source key"
    prepare: tuple[str, bool] | None = None  # (directory, force): checked in the extract's own round trip

    def run(self, transport: Transport, argv: Sequence[str], **kwargs: object) -> Result:
        if self.passphrase is None:
            return transport.run(argv, env=self.env, **kwargs)  # type: ignore[arg-type]
        return transport.run(
            borg_restore.with_passphrase_on_fd3(argv), env=self.env, stdin=self.passphrase, **kwargs  # type: ignore[arg-type]
        )


def expanded(transport: Transport, path: str) -> str:
    """``path`` with ``~`` expanded on the node (asking for its home only when needed)."""
    return resolve_path(path, transport)


def refuse_target(code: int, node: str, directory: str, stderr: str) -> None:
    """Raise for the target-check exit codes of :mod:`borg_restore`'s scripts."""
    if code == borg_restore.TARGET_NOT_EMPTY:
        raise UsageError(f"{node}:{directory} is not empty; restore into a new directory, or add --force to write over it")
    if code == borg_restore.TARGET_UNUSABLE:
        raise OperationFailed(f"cannot create {directory} (or a temporary directory) on {node}: {stderr}")


def setup_destination(
    transport: Transport, destination: Node, directory: str | None, force: bool, source: str, restore_id: str,
    hosts: Sequence[Node],
) -> tuple[TemporaryPaths, str]:
    """Check the target, make the temporary key and pinned known_hosts on the destination (one round trip).

    Returns the temporary directory and the public key line.
    """
    known_hosts = "".join(borg.known_hosts_line(h) + "\n" for h in hosts)
    made = transport.run(
        borg_restore.setup_destination_argv(
            destination.workdir, directory, force, restore_id, borg_restore.restore_comment(source, restore_id), known_hosts
        ),
        timeout=120,
    )
    refuse_target(made.exit_code, destination.name, directory or "", made.stderr_tail(3))
    lines = made.stdout.decode("utf-8", "replace").splitlines()
    if not made.ok or len(lines) != 2 or not lines[0].startswith("/") or len(lines[1].split()) < 2:
        raise OperationFailed(
            f"cannot create a temporary key on {destination.name} under {destination.workdir} (exit {made.exit_code}): "
            f"{made.stderr_tail(5)}"
        )
    return TemporaryPaths(lines[0]), lines[1]


def remove_temporary(transport: Transport, destination: Node, tmp: TemporaryPaths) -> None:
    """Remove the temporary key directory; when the destination is gone, say where it stays."""
    try:
        removed = transport.run(borg_restore.remove_temporary_dir_argv(tmp.directory), timeout=120)
        if removed.ok:
            return
        problem = removed.stderr_tail(3)
    except MutualBackupError as exc:
        problem = str(exc)
    log.warning(
        "could not remove the temporary key directory %s on %s (%s); its key no longer opens anything: remove it by hand",
        tmp.directory, destination.name, problem,
    )


@contextlib.contextmanager
def authorised(
    ctx: Context, host: Node, source: str, repository: str, public_key: str, restore_id: str,
    prefetched: "Prefetched | None" = None,
) -> Iterator[None]:
    """A temporary restore line for ``public_key`` on ``host`` while the block runs.

    Added to (and removed from) the managed block of the host's authorized_keys,
    whatever happens in the block; stale restore lines found there are dropped at
    the same time. Raises TransportError when the host cannot be reached (nothing
    was changed then). A failed removal is logged: sshd refuses the line after its
    ``expiry-time`` anyway, and the next ``apply`` or restore through that host drops it.
    ``prefetched``: a connection to the host opened, and its file read, beforehand.
    """
    try:
        line = borg_restore.restore_line(host.borg, repository, public_key, source, restore_id)
    except ValueError as exc:  # a control character: it would start another line in authorized_keys
        raise UsageError(f"refusing to write a restore line on {host.name}: {exc}") from None
    transport = prefetched.transport if prefetched is not None else ctx.connect(host)
    try:
        _edit_block(transport, host, lambda lines, now: borg_restore.with_restore_line(lines, line, now),
                    current=prefetched.result() if prefetched is not None else None)
        log.info("temporary restore line for %s added on %s (%s)", source, host.name, restore_id)
        try:
            yield
        finally:
            try:
                removed = transport.run(borg_restore.remove_line_argv(host.authorized_keys, line), timeout=60)
                if not removed.ok:
                    raise OperationFailed(f"exit {removed.exit_code}: {removed.stderr_tail(3)}")
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
    transport: Transport, host: Node, change: Callable[[list[str], dt.datetime], list[str]],
    current: tuple[str, bytes | None] | None = None,
) -> None:
    """Read-modify-write of the managed block of ``host``'s authorized_keys (written atomically).

    ``current``: (path, content) read a moment ago, to save a round trip.
    """
    path, data = current if current is not None else _read_authorized_keys(transport, host)
    text = (data or b"").decode("utf-8", errors="surrogateescape")
    wanted = replace_block(text, change(managed_lines(text), dt.datetime.now(dt.timezone.utc)))
    if wanted != text:
        transport.write_file(path, wanted.encode("utf-8", errors="surrogateescape"), 0o600)


def _read_authorized_keys(transport: Transport, host: Node) -> tuple[str, bytes | None]:
    path = expanded(transport, host.authorized_keys)
    return path, transport.read_file(path)


class Prefetched:
    """A connection to a replica's host, opened and its authorized_keys read in the background."""

    def __init__(self, ctx: Context, host: Node, pool: ThreadPoolExecutor) -> None:
        self.host = host
        self.transport = ctx.connect(host)
        self.future = pool.submit(_read_authorized_keys, self.transport, host)

    def result(self) -> tuple[str, bytes | None]:
        return self.future.result()


def read_source_passphrase(ctx: Context, source: Node) -> bytes:
    """The passphrase from the source's 0600 file, into memory only; OperationFailed with advice otherwise."""
    try:
        transport = ctx.connect(source)
        try:
            result = transport.run(borg_restore.read_passphrase_argv(source.workdir), timeout=60)
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
