"""How borg on a restore's destination reaches a repository: the source's own key, or a temporary key.

A temporary key pair is made in the coordinator's memory; the replica's host holds a temporary
restricted line for it (:class:`Grant`, withdrawn once borg has connected); the private key and
the passphrase reach borg on the destination through the SSH channel's stdin
(:class:`Access`), never argv, an environment value, a log, the history or a file of the
coordinator. The whole story, step by step, is in ARCHITECTURE.md ("Restores").
"""

from __future__ import annotations

from mutualbackup.restore import node_commands

import base64
import contextlib
import datetime as dt
import logging
import posixpath
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mutualbackup import borg
from mutualbackup.restore.node_commands import TemporaryPaths
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed, TransportError, UsageError
from mutualbackup.inventory.model import Node
from mutualbackup.borg import BEGIN, END, DamagedBlock
from mutualbackup.remote.transport import Result, Transport, resolve_path

log = logging.getLogger("mutualbackup.restore.extract")


@dataclass(frozen=True)
class RestoreKey:
    """A temporary key pair: the private half only in memory here, and in the destination's 0700 directory."""

    private_line: bytes = field(repr=False)  # base64 of the OpenSSH private key file, one line
    public_key: str  # "ssh-ed25519 BASE64 COMMENT"


def new_restore_key(comment: str) -> RestoreKey:
    """A new ed25519 key pair for one restore, never written on the coordinator's disk."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return RestoreKey(base64.b64encode(private), f"{public.decode('ascii')} {comment}")


@dataclass
class Delegated:
    """What a destination needs to run borg with a temporary key (see :func:`node_commands.delegated_argv`)."""

    tmp: TemporaryPaths
    known_hosts: str
    key: RestoreKey
    left_behind: bool = False  # a command was cut off before removing ``tmp``

    @staticmethod
    def under(workdir: str, restore_id: str, hosts: Sequence[Node], key: RestoreKey) -> "Delegated":
        known_hosts = "".join(borg.known_hosts_line(h) + "\n" for h in hosts)
        return Delegated(TemporaryPaths(posixpath.join(workdir, f"restore-{restore_id}.tmp")), known_hosts, key)


class GateClosed(Exception):
    """borg's ssh was not let through: the host's line, or the passphrase, could not be had.

    ``cause`` says why (a TransportError when the host could not be reached);
    ``from_grant`` when the host's line could not be had (else the passphrase);
    ``recorded`` once the history has the failed run.
    """

    def __init__(self, cause: BaseException, *, from_grant: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.from_grant = from_grant
        self.recorded = False


@dataclass
class Access:
    """How borg runs on the destination: environment, passphrase, temporary key, the host grant, the target check."""

    env: Mapping[str, str]  # with the source's key (a delegated access makes its own)
    passphrase: Callable[[], bytes] | None = field(default=None, repr=False)  # may wait for it, or raise
    grant: Callable[[Node, str], contextlib.AbstractContextManager[HostGrant | None]] = (
        lambda host, path: contextlib.nullcontext()
    )
    name: str = "source key"
    prepare: tuple[str, bool] | None = None  # (directory, force): checked in the extract's own round trip
    delegated: Delegated | None = None

    def run(
        self, transport: Transport, argv: Sequence[str], *, in_target: bool = False, payload: bytes | None = None,
        grant: HostGrant | None = None, **kwargs: object,
    ) -> Result:
        """Run borg's ``argv`` on the destination.

        ``in_target``: check the target (``prepare``) and run there, in the same
        round trip. ``payload``: what borg reads on its stdin (then no passphrase
        on fd 3), for ``borg key import -``. With a temporary key, borg starts at
        once and its ssh waits until ``grant`` is in place on the host and the
        passphrase is known (:func:`node_commands.delegated_argv`'s gate): raises
        GateClosed when either failed.
        """
        target = self.prepare if in_target else None
        if self.delegated is None:
            if target is not None:
                argv = node_commands.prepare_then_exec(target[0], target[1], argv)
            return transport.run(argv, env=self.env, stdin=payload, **kwargs)  # type: ignore[arg-type]
        delegated = self.delegated
        gated = payload is None
        if not gated and grant is not None:
            grant.wait()
        env = node_commands.delegated_env(delegated.tmp, gated=gated)
        if payload is not None:
            env.pop("BORG_PASSPHRASE_FD", None)
        refused: list[GateClosed] = []

        def stdin() -> Iterator[bytes]:
            yield delegated.key.private_line + b"\n"
            if payload is not None:
                yield payload
                return
            try:
                if grant is not None:
                    grant.wait()
            except BaseException as exc:  # noqa: BLE001 - told to the caller below
                refused.append(GateClosed(exc, from_grant=True))
                yield node_commands.GATE_REFUSED
                return
            try:
                secret = self.passphrase() if self.passphrase is not None else b""
            except BaseException as exc:  # noqa: BLE001 - told to the caller below
                refused.append(GateClosed(exc, from_grant=False))
                yield node_commands.GATE_REFUSED
                return
            yield node_commands.GATE_OPEN + secret

        wrapped = node_commands.delegated_argv(
            delegated.tmp, delegated.known_hosts, argv, target=target, passphrase_on_fd3=gated, gated=gated
        )
        delegated.left_behind = True
        result = transport.run(wrapped, env=env, stdin=stdin(), **kwargs)  # type: ignore[arg-type]
        if result.stdout.endswith(node_commands.TEMPORARY_REMOVED):
            delegated.left_behind = False
            result = Result(result.argv, result.exit_code, result.stdout[: -len(node_commands.TEMPORARY_REMOVED)], result.stderr)
        if refused and result.exit_code not in (node_commands.TARGET_UNUSABLE, node_commands.TARGET_NOT_EMPTY):
            raise refused[0]  # the target's own verdict, when there is one, says more
        return result


def expanded(transport: Transport, path: str) -> str:
    """``path`` with ``~`` expanded on the node (asking for its home only when needed)."""
    return resolve_path(path, transport)


def refuse_target(code: int, node: str, directory: str, stderr: str) -> None:
    """Raise for the target-check exit codes of :mod:`~mutualbackup.restore.node_commands`."""
    if code == node_commands.TARGET_NOT_EMPTY:
        raise UsageError(f"{node}:{directory} is not empty; restore into a new directory, or add --force to write over it")
    if code == node_commands.TARGET_UNUSABLE:
        raise OperationFailed(f"cannot create {directory} (or a temporary directory) on {node}: {stderr}")


def remove_temporary(transport: Transport, destination: Node, tmp: TemporaryPaths) -> None:
    """Remove the temporary key directory; when the destination is gone, say where it stays."""
    try:
        removed = transport.run(node_commands.remove_temporary_dir_argv(tmp.directory), timeout=120)
        if removed.ok:
            return
        problem = removed.stderr_tail(3)
    except MutualBackupError as exc:
        problem = str(exc)
    log.warning(
        "could not remove the temporary key directory %s on %s (%s); its key no longer opens anything: remove it by hand",
        tmp.directory, destination.name, problem,
    )


class Grant:
    """A temporary restore line on a host, held there by one SSH session (:func:`node_commands.grant_session_argv`).

    The session adds the line, says so, and removes it when told to, when the
    coordinator's connection drops, or when the remote ``timeout`` ends it: the
    host cleans up even after a coordinator killed mid-restore. sshd reads
    ``authorized_keys`` only when a key logs in, so once borg is connected the
    line has done its work: :meth:`withdraw_soon` tells the session then, while
    the extract goes on; :meth:`close` tells it if that has not happened yet and
    waits for the session to end.
    """

    def __init__(self, transport: Transport, host: Node, source: str, restore_id: str, line: str) -> None:
        self._transport = transport
        self._host = host
        self._comment = borg.restore_comment(source, restore_id)
        self._argv = node_commands.grant_session_argv(
            host.authorized_keys, line, BEGIN, END, dt.datetime.now(dt.timezone.utc)
        )
        self._added = False
        self._settled = threading.Event()  # added, or the session ended without adding it
        self._release = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="restore-line", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _hold(self) -> None:
        def stdin() -> Iterator[bytes]:
            self._release.wait()
            yield b"withdraw\n"

        def heard(text: str) -> None:
            if text == node_commands.LINE_ADDED:
                self._added = True
                self._settled.set()

        try:
            self._result = self._transport.run(
                self._argv, stdin=stdin(), on_stderr_line=heard, timeout=borg.RESTORE_LINE_LIFETIME.total_seconds()
            )
        except BaseException as exc:  # noqa: BLE001 - raised by wait()
            self._error = exc
        finally:
            self._settled.set()

    def wait(self) -> None:
        """Until the line is in place; raises TransportError, DamagedBlock or OperationFailed when it cannot be."""
        self._settled.wait()
        if self._added:
            return
        if self._error is not None:
            raise self._error
        assert self._result is not None
        host = self._host
        if self._result.exit_code == node_commands.BLOCK_DAMAGED:
            raise DamagedBlock(
                f"cannot authorise the restore on {host.name}: the mutualbackup block of {host.authorized_keys} is "
                "damaged (its BEGIN and END marker lines must be exactly one pair in that order): fix the file by "
                "hand; nothing was changed"
            )
        raise OperationFailed(
            f"cannot add the temporary restore line to {host.authorized_keys} on {host.name} "
            f"(exit {self._result.exit_code}): {self._result.stderr_tail(3)}"
        )

    def withdraw_soon(self) -> None:
        """Tell the session to remove the line now (it goes on in the background)."""
        self._release.set()

    def close(self) -> None:
        """Withdraw the line unless already told; wait until the session has ended; log the outcome."""
        self._release.set()
        self._thread.join()
        if not self._added:
            return
        result = self._result
        if result is not None and result.ok:
            log.info("temporary restore line %s removed from %s", self._comment, self._host.name)
            return
        problem = str(self._error) if result is None else f"exit {result.exit_code}: {result.stderr_tail(3)}"
        log.error(
            "could not remove the temporary restore line %s from %s (%s): sshd refuses it after its "
            "expiry-time, and the next `mutualbackup apply` or restore through %s removes it",
            self._comment, self._host.name, problem, self._host.name,
        )


@contextlib.contextmanager
def authorised(
    ctx: Context, host: Node, source: str, repository: str, public_key: str, restore_id: str,
) -> Iterator[Grant]:
    """A temporary restore line for ``public_key`` on ``host`` while the block runs.

    Added to the managed block of the host's authorized_keys (stale restore lines
    found there are dropped at the same time) and withdrawn when the block ends,
    whatever happens in it, or earlier through the yielded :class:`Grant`.
    Raises TransportError when the host cannot be reached, DamagedBlock when its
    block is damaged (nothing was changed then). A failed withdrawal is logged:
    sshd refuses the line after its ``expiry-time`` anyway, and the next
    ``apply`` or restore through that host drops it.
    """
    try:
        line = borg.restore_line(host.borg, repository, public_key, source, restore_id)
    except ValueError as exc:  # a control character: it would start another line in authorized_keys
        raise UsageError(f"refusing to write a restore line on {host.name}: {exc}") from None
    transport = ctx.connect(host)
    try:
        grant = Grant(transport, host, source, restore_id, line)
        grant.start()
        try:
            grant.wait()
            log.info("temporary restore line %s added on %s", borg.restore_comment(source, restore_id), host.name)
            yield grant
        finally:
            grant.close()
    finally:
        transport.close()


class PendingGrant:
    """A :class:`Grant` still being made in the background: :meth:`wait` until it is (or raise why not)."""

    def __init__(self, future: Future[Grant]) -> None:
        self.future = future

    def wait(self) -> None:
        self.future.result()

    def withdraw_soon(self) -> None:
        if self.future.done() and self.future.exception() is None:
            self.future.result().withdraw_soon()


HostGrant = Grant | PendingGrant


class EarlyGrant:
    """:func:`authorised` for the first replica, entered in the background while the rest is prepared.

    :meth:`take` hands it over at once, as a :class:`PendingGrant`, and withdraws
    it when the restore is done with it; :meth:`close` withdraws it if the
    restore never took it.
    """

    def __init__(self, pool: ThreadPoolExecutor, manager: contextlib.AbstractContextManager[Grant]) -> None:
        self._manager = manager
        self._taken = False
        self.future: Future[Grant] = pool.submit(manager.__enter__)

    @contextlib.contextmanager
    def take(self) -> Iterator[PendingGrant]:
        self._taken = True
        try:
            yield PendingGrant(self.future)
        finally:
            if self.future.exception() is None:  # waits until it was made; nothing to undo if that failed
                self._manager.__exit__(None, None, None)

    def close(self) -> None:
        if self._taken:
            return
        self._taken = True
        if self.future.exception() is None:
            self._manager.__exit__(None, None, None)


def read_source_passphrase(ctx: Context, source: Node) -> bytes:
    """The passphrase from the source's 0600 file, into memory only; OperationFailed with advice otherwise."""
    try:
        transport = ctx.connect(source)
        try:
            result = transport.run(node_commands.read_passphrase_argv(source.workdir), timeout=60)
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
