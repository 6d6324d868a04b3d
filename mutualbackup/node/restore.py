"""Getting data back, on the nodes: extract onto this node, hold a restore's line on a host, seal secrets.

- ``extract`` (the destination, as root): borg extract into a new directory, with this node's own
  key and passphrase when it is the source, else with a key pair it makes for this one restore
  (the public half goes to the coordinator, which has the host accept it for a while) and the
  passphrase sealed for this node's key (by the source, or by an admin's recovery kit);
- ``grant`` (the replica's host): a temporary restricted line for that public key, held while the
  coordinator's session lasts, withdrawn when it says so or goes away;
- ``seal`` (the source): its passphrase sealed for another node of its member;
- ``export_kit`` (the source): the recovery kit, sealed for the member's admins pinned at join.

A passphrase leaves its source only sealed; the coordinator relays ciphertext.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import shlex
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

from mutualbackup import borg
from mutualbackup.node.requests import (
    Args, Failed, LineBatch, Refused, Session, flag, host_of, node_name, request, source_of, text,
)
from mutualbackup.node.source import paths, result_data

RESTORE_TIMEOUT = 24 * 3600
SECRET_WAIT = 600.0  # how long a sealed restore waits for its passphrase before it gives up
# borg's ssh, as BORG_RSH: waits until GATE.go (the host's line is in, the passphrase known) or GATE.no (give up)
GATE_SCRIPT = ('n=0; until [ -e "$0.go" ]; do [ -e "$0.no" ] && { echo "mutualbackup-node: the restore was called off" >&2; '
               'exit 255; }; n=$((n+1)); [ "$n" -gt 36000 ] && { echo "mutualbackup-node: no passphrase came" >&2; '
               'exit 255; }; sleep 0.02; done; exec "$@"')
"""borg's ssh command behind the gate: on ``GATE.go``; gives up on ``GATE.no``, or after at least 36 000 × 20 ms
(12 min, more than :data:`SECRET_WAIT`) whatever happened to the node program."""
TARGET_NOT_EMPTY = 202
STALE_AFTER = dt.timedelta(seconds=RESTORE_TIMEOUT + 3600)
"""Older than any restore can run: a restore directory this old was left by a node program killed mid-way."""


# --- extract -------------------------------------------------------------------------------------


@request("extract", "source")
def extract(session: Session, args: Args) -> Mapping[str, Any]:
    """Extract an archive (the latest when none is named) of ``source`` from ``host`` into ``target``."""
    host = host_of(args)
    source = source_of(args)
    target = _absolute(text(args, "target"))
    dry_run, force = flag(args, "dry_run"), flag(args, "force")
    archive = text(args, "archive", optional=True)
    wanted = args.get("paths", [])
    if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
        raise Refused("'paths' must be a list of paths")
    sealed = flag(args, "sealed")
    if not sealed and source != session.config.name:
        raise Refused(f"{session.config.name} restores {source} only with a sealed passphrase")
    if not dry_run:
        _prepare_target(session, target, force)
    member, slug = source.split("/")
    url = borg.url_of(host, posixpath.join(host.storage.path if host.storage else "", member, slug))
    if not sealed:
        return _extract(session, url, archive, wanted, target, dry_run, borg.client_env(paths(session)), _Known(None))
    _sweep_stale(session, dt.datetime.now(dt.timezone.utc))
    with _Temporary(session, host, source) as temporary:
        return _extract(session, url, archive, wanted, target, dry_run, temporary.env, temporary.secret)


def _sweep_stale(session: Session, now: dt.datetime) -> None:
    """Remove the directories restores killed mid-way (SIGKILL, a power cut) left in the state, once older than
    :data:`STALE_AFTER`: each holds a key the host no longer accepts (its line expires after 6 hours)."""
    try:
        names = session.system.listdir(session.config.state)
    except OSError:
        return
    for name in names:
        restore_id = _restore_id_of(name)
        made = borg.restore_id_time(restore_id) if restore_id is not None else None
        if made is not None and now - made > STALE_AFTER:
            session.system.remove_tree(posixpath.join(session.config.state, name))  # a link is not followed


def _restore_directory(restore_id: str) -> str:
    """The name of a restore's directory in the node's state (:func:`_restore_id_of` reads it back)."""
    return f"restore-{restore_id}.tmp"


def _restore_id_of(name: str) -> str | None:
    return name[len("restore-"):-len(".tmp")] if name.startswith("restore-") and name.endswith(".tmp") else None


def _absolute(path: str) -> str:
    """The target: an absolute path, never the root of the live system (also through a symlink)."""
    if not path.startswith("/") or "\x00" in path:
        raise Refused("the target must be an absolute path")
    if os.path.realpath(path) == "/":
        raise Refused("a restore goes into a new directory, never over the live system (/)")
    return os.path.normpath(path)


def _prepare_target(session: Session, target: str, force: bool) -> None:
    try:
        session.system.makedirs(target, 0o755)
        present = session.system.listdir(target)
    except OSError as exc:
        raise Failed(f"cannot create {target}: {exc.strerror}") from None
    if present and not force:
        raise Failed(f"target not empty: {target}")


def _extract(session: Session, url: str, archive: str, wanted: list[str], target: str, dry_run: bool,
             env: Mapping[str, str], secret: "_Known | _Awaited") -> Mapping[str, Any]:
    """List (for the latest archive), then extract; a kit's key imported if the repository lost its own.

    With a passphrase still to come (``_Awaited``), the first borg command starts at once: its ssh waits at
    the gate while the restore's key is made and the host's line and the sealed passphrase arrive, so that borg's
    start-up overlaps them."""
    config = session.config

    def run(argv, **options):  # noqa: ANN001, ANN202 - one borg command, the passphrase on a fresh pipe
        if secret.value is None and isinstance(secret, _Known):
            return session.system.run(argv, env=env, **options)
        read, write = os.pipe()
        given: list[bool] = []

        def give(value: dict[str, Any]) -> None:
            given.append(True)
            _give(write, value["passphrase"])

        try:
            secret.when_known(give)
            return session.system.run(argv, env={**env, "BORG_PASSPHRASE_FD": str(read)}, pass_fds=(read,), **options)
        finally:
            os.close(read)
            secret.finished()
            if not given:  # none came: the pipe's end, so that nothing waits on it
                os.close(write)

    def with_key(argv, **options):  # noqa: ANN001, ANN202 - a kit's key imported when the repository lost its own
        done = run(argv, **options)
        secret.raise_if_refused()
        key = secret.value.get("key") if secret.value else None
        if done.exit_code != borg.REPO_KEY_MISSING or not key:
            return done, None
        imported = session.system.run(borg.key_import_argv(config.borg, url), env=env, stdin=str(key).encode(),
                                      timeout=600)
        if not borg.succeeded(imported.exit_code):
            return None, {"list": result_data(imported), "step": "key import"}
        return run(argv, **options), None

    if not archive:
        listed, failed = with_key(borg.list_argv(config.borg, url), timeout=600)
        if failed or not borg.succeeded(listed.exit_code):
            return failed or {"list": result_data(listed), "step": "list"}
        names = [a.name for a in borg.parse_list_json(listed.stdout)]
        if not names:
            return {"no_archive": True}
        archive = names[-1]
    argv = borg.extract_argv(config.borg, url, archive, wanted, dry_run=dry_run)
    relayed = Relayed(LineBatch(session))
    try:
        done, failed = with_key(argv, cwd="/" if dry_run else target, timeout=RESTORE_TIMEOUT, on_stderr_line=relayed)
    finally:
        relayed.flush()
    if failed:
        return failed
    if done.exit_code == borg.ARCHIVE_DOES_NOT_EXIST:
        return {"no_such_archive": archive}
    return {"archive": archive, **result_data(done)}


PROGRESS_EVERY = 0.25
"""How often a restore's progress reaches the coordinator at most: borg says it at each 0.1 % and at each small file
(thousands of lines, read, relayed and parsed on the cores borg extracts with); a terminal's line needs a few a
second."""


class Relayed:
    """borg extract's stderr lines, relayed to the coordinator (``lines``, a :class:`LineBatch`) as they come: every
    item listed and every message of borg's, and how far it is at most every :data:`PROGRESS_EVERY` seconds (the
    last progress line held back goes before borg's last word, or at the end when borg stopped short). Neither items
    nor progress are kept for the reply's stderr: the coordinator has them already, and a restore of a million
    files would otherwise hold and send them all again at the end."""

    def __init__(self, lines: Callable[[str], None]) -> None:
        self.lines = lines
        self.sent = float("-inf")
        self.held: str | None = None
        self.lock = threading.Lock()

    def __call__(self, line: str) -> bool:
        """Relay ``line`` (now or later); False: not kept for the reply."""
        progress = '"type": "progress_percent"' in line  # (JSON escapes a quote in a path: no item passes for one)
        with self.lock:
            if progress and '"finished": true' in line:
                self._release()
            elif progress:
                now = time.monotonic()
                if now - self.sent < PROGRESS_EVERY:
                    self.held = line
                    return False
                self.sent, self.held = now, None
            self.lines(line)
        return not progress and '"name": "borg.output.list"' not in line

    def flush(self) -> None:
        with self.lock:
            self._release()
        flush = getattr(self.lines, "flush", None)
        if flush is not None:
            flush()

    def _release(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.lines(held)


def _give(write: int, passphrase: str) -> None:
    try:
        os.write(write, passphrase.encode("utf-8"))
    finally:
        os.close(write)


class _Known:
    """A passphrase already at hand (or none needed: the source's own file)."""

    def __init__(self, value: dict[str, Any] | None) -> None:
        self.value = value

    def when_known(self, give: Any) -> None:
        give(self.value)

    def finished(self) -> None:
        pass

    def raise_if_refused(self) -> None:
        pass


class _Awaited:
    """The sealed passphrase the coordinator relays, received (and opened) while borg starts; borg's ssh waits at
    a gate (``GATE.go``, or ``GATE.no`` to give up) until the host's line is in and the passphrase is known."""

    def __init__(self, session: Session, gate: str, prepare: Callable[[], None] | None = None) -> None:
        self.session, self.gate = session, gate
        self.prepare = prepare  # done first, once, in the thread: the restore's key, made while borg starts
        self.value: dict[str, Any] | None = None
        self.refused: Exception | None = None
        self.thread: threading.Thread | None = None

    def when_known(self, give: Any) -> None:
        def receive() -> None:
            try:
                if self.value is None and self.refused is None:
                    self._prepared()
                    self.value = self._receive()
            except (Failed, Refused) as exc:
                self.refused = exc
            except Exception as exc:  # noqa: BLE001 - whatever it was (a message nested too deep), borg hears no
                self.refused = Failed(f"the passphrase message could not be read ({type(exc).__name__})")
            finally:
                opened = self.gate + (".go" if self.value is not None else ".no")
                with open(opened, "w", encoding="ascii"):
                    pass
            if self.value is not None:
                give(self.value)

        self.thread = threading.Thread(target=receive, name="passphrase", daemon=True)
        self.thread.start()

    def finished(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def raise_if_refused(self) -> None:
        if self.refused is not None:
            raise self.refused

    def _prepared(self) -> None:
        prepare, self.prepare = self.prepare, None
        if prepare is None:
            return
        try:
            prepare()
        except (OSError, subprocess.SubprocessError) as error:  # the gate says no: borg's ssh gives up at once
            raise Failed(f"the restore's key could not be made: {error}") from None

    def _receive(self) -> dict[str, Any]:
        line = self.session.next_line(SECRET_WAIT)
        if line is None:
            raise Failed("the coordinator sent no passphrase: nothing was restored")
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Refused("the passphrase message is not JSON") from None
        if not isinstance(message, dict) or "refused" in message:
            raise Failed(str(message.get("refused") if isinstance(message, dict) else "no passphrase"))
        return open_sealed(self.session, str(message.get("sealed", "")))


class _Temporary:
    """A key pair for one restore, in a 0700 directory of the root-only state; gone when the restore ends."""

    def __init__(self, session: Session, host, source: str) -> None:  # noqa: ANN001
        self.session = session
        self.restore_id = borg.new_restore_id(dt.datetime.now(dt.timezone.utc), os.urandom(4).hex())
        self.directory = posixpath.join(session.config.state, _restore_directory(self.restore_id))
        self.host = host
        self.source = source
        self.secret = _Awaited(session, posixpath.join(self.directory, "gate"), prepare=self._key)

    def __enter__(self) -> "_Temporary":
        self.session.system.makedirs(self.directory, 0o700)
        return self

    def _key(self) -> None:
        """Make the key pair, write it and the host's pinned line, and tell the public half (the coordinator then
        asks the host for its line). Done while borg starts: its ssh waits at the gate, which opens only after."""
        private, public_key = _key_pair(f"mutualbackup-restore-{self.restore_id}", self.session.config.state)
        self.session.system.write(posixpath.join(self.directory, "id_ed25519"), private, 0o600)
        self.session.system.write(posixpath.join(self.directory, "known_hosts"),
                                  (borg.known_hosts_line(self.host) + "\n").encode(), 0o600)
        self.session.emit("key", public_key=public_key, restore_id=self.restore_id)

    def __exit__(self, *exc: object) -> None:
        self.session.system.remove_tree(self.directory)

    @property
    def env(self) -> dict[str, str]:
        """borg's environment: this restore's key and pinned host, its ssh behind the gate."""
        key, known = posixpath.join(self.directory, "id_ed25519"), posixpath.join(self.directory, "known_hosts")
        env = borg.base_env()
        env.update({"BORG_RSH": shlex.join(["sh", "-c", GATE_SCRIPT, self.secret.gate, *borg.ssh_words(key, known)]),
                    "BORG_BASE_DIR": posixpath.join(self.directory, "borg")})
        return env


def _key_pair(comment: str, state: str) -> tuple[bytes, str]:
    """A new ed25519 key pair, made by ``ssh-keygen`` (4 ms, where importing a Python library to make it costs
    30 ms of the restore's start) in a 0700 directory of the root-only ``state`` (the temporary directory only
    where there is none: a test's fake node): the private key (OpenSSH format) and the public ``TYPE BASE64``."""
    where = state if os.path.isdir(state) else None
    with tempfile.TemporaryDirectory(prefix="restore-key-", suffix=".tmp", dir=where) as scratch:
        path = os.path.join(scratch, "id_ed25519")
        done = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        if done.returncode != 0:
            raise Failed(f"ssh-keygen could not make the restore's key: {done.stderr.decode(errors='replace').strip()}")
        with open(path, "rb") as private, open(f"{path}.pub", encoding="ascii") as public:
            return private.read(), " ".join(public.read().split()[:2])


# --- the host's temporary line --------------------------------------------------------------------


@request("grant", "host")
def grant(session: Session, args: Args) -> Mapping[str, Any]:
    """Add a restore's temporary line for ``public_key`` on ``source``'s repository; hold it until the coordinator
    says ``withdraw`` or goes away; then remove it."""
    from mutualbackup.node.host import edit_block, remove_line, repository_of

    source, path = repository_of(session, args)
    key = text(args, "public_key")
    restore_id = text(args, "restore_id")
    if borg.restore_id_time(restore_id) is None:
        raise Refused("not a restore id")
    try:
        line = borg.restore_line(session.config.borg, path, key, source, restore_id)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    now = dt.datetime.now(dt.timezone.utc)
    edit_block(session, lambda lines: borg.with_restore_line(lines, line, now))
    session.emit("added")
    try:
        session.next_line(borg.RESTORE_LINE_LIFETIME.total_seconds())
    finally:
        remove_line(session, line)
    return {"removed": True}


# --- sealing ---------------------------------------------------------------------------------------


def open_sealed(session: Session, sealed: str) -> dict[str, Any]:
    """A secret sealed for this node (its age identity), as the JSON object it holds."""
    import pyrage
    from pyrage import x25519

    data = session.system.read(session.config.identity_file)
    if data is None:
        raise Failed("this node has no sealing identity: run `mutualbackup-node join` again")
    try:
        identity = x25519.Identity.from_str(data.decode("ascii").strip())
        opened = pyrage.decrypt(sealed.encode("ascii"), [identity])
        secret = json.loads(opened.decode("utf-8"))
    except Exception:  # noqa: BLE001 - pyrage raises its own types; say nothing of the content
        raise Failed("the passphrase was not sealed for this node (wrong node key?): nothing was restored") from None
    if not isinstance(secret, dict) or not isinstance(secret.get("passphrase"), str):
        raise Failed("the sealed message holds no passphrase")
    return secret


def seal_for_node(node_key: str, secret: Mapping[str, Any]) -> str:
    """``secret`` (a JSON object) sealed for a node's age key (``age1…``), armored."""
    import pyrage
    from pyrage import x25519

    return pyrage.encrypt(json.dumps(dict(secret)).encode("utf-8"), [x25519.Recipient.from_str(node_key)],
                          armored=True).decode("ascii")


def _passphrase(session: Session) -> str:
    data = session.system.read(paths(session).passphrase)
    if not data:
        raise Failed("this source has no passphrase yet (was `mutualbackup apply` run?)")
    return data.decode("utf-8").strip()


@request("seal", "source")
def seal(session: Session, args: Args) -> Mapping[str, Any]:
    """This source's passphrase sealed for another node of its own member (its ``node_key``, as the member signed it)."""
    from mutualbackup.inventory.value_checks import check_node_key
    from mutualbackup.node.authority import NotSigned, verified

    member, slug = node_name(args.get("node"), "node")
    if member != session.config.member:
        raise Refused(f"{member}/{slug} is not a node of {session.config.member}: a passphrase is sealed for the "
                      "member's own nodes only (another member restores with the admins' recovery kit)")
    try:
        node_key = check_node_key(text(args, "node_key"))
    except ValueError as exc:
        raise Refused(str(exc)) from None
    signed = verified(session, args)
    if not any(n.slug == slug and n.node_key == node_key for n in signed.member.nodes):
        raise NotSigned(f"{member}'s signed file has no node {slug} with that node_key: the passphrase is sealed "
                        "only for a node its admins declared; nothing was sealed")
    return {"sealed": seal_for_node(node_key, {"passphrase": _passphrase(session)})}


@request("export_kit", "source")
def export_kit(session: Session, args: Args) -> Mapping[str, Any]:
    """The recovery kit (passphrase and every replica's repository key), sealed for the admins pinned at join."""
    import pyrage
    from pyrage import ssh

    from mutualbackup.restore.kit import RecoveryFile, RecoveryRepository, render

    admins = session.config.admins
    if not admins:
        raise Failed("no admin is pinned on this node: run `mutualbackup-node join` with the member's file")
    hosts = args.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise Refused("'hosts' must list the replica hosts")
    repositories = []
    for value in hosts:
        host = host_of({"host": value})
        url = borg.repository_url_for(session.config.member, session.config.node, host)
        exported = session.system.run(borg.key_export_argv(session.config.borg, url), env=borg.client_env(paths(session)),
                                      timeout=300)
        if not borg.succeeded(exported.exit_code):
            raise Failed(f"{host.name}: borg key export exited {exported.exit_code}: {borg.exit_hint(exported.exit_code)}")
        repository_id, key = borg.parse_key_export(exported.stdout)
        path = posixpath.join(host.storage.path if host.storage else "", session.config.member, session.config.node)
        repositories.append(RecoveryRepository(host.name, path, url, repository_id, key))
    kit = RecoveryFile(source=session.config.name, federation=text(args, "federation", optional=True),
                       exported=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
                       passphrase=_passphrase(session), repositories=tuple(repositories))
    recipients = [ssh.Recipient.from_str(admin.key) for admin in admins]
    sealed = pyrage.encrypt(render(kit).encode("utf-8"), recipients, armored=True).decode("ascii")
    return {"kit": sealed, "admins": [a.name for a in admins],
            "repositories": [{"host": r.host, "path": r.path, "repository_id": r.repository_id} for r in repositories]}
