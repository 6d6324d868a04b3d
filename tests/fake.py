"""A fake federation for fast tests: a fake clock, and fake nodes that answer borg argv.

:class:`FakeWorld` plays every node of a federation. Its :meth:`FakeWorld.connect`
is a Context connector: it returns a :class:`FakeTransport`, which implements
:class:`mutualbackup.remote.transport.Transport`. Commands are matched by argv, never
by a shell line:

- the :mod:`mutualbackup.remote.supervision` wrapper is unwrapped (the pidfile is noted);
- scripted rules (:meth:`FakeWorld.script`) are asked first, in order; the first
  that returns a Result answers (a rule may also sleep on the fake clock);
- otherwise borg create / list / prune / info / check / compact / break-lock and
  the repository-facts, lock-listing, ps and stop scripts get plausible answers
  from an in-memory model of the repositories.

``borg create`` takes ``FakeWorld.duration(source, target)`` seconds of *fake*
time: the job's thread sleeps on the :class:`FakeClock` until the test advances
it. :meth:`FakeClock.settle` waits (in real time, polling) until every job
thread is asleep on the fake clock or has ended, so a test can step a daemon
through a week deterministically.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.errors import TransportError
from mutualbackup.inventory.model import Backup, Federation, Node, Retention
from mutualbackup.plan.retention import plan_prune
from mutualbackup.remote.transport import Result

HOME = "/home/fake"
ARCHIVE_BYTES = 100_000_000  # live bytes each fake archive adds
_URL = re.compile(r"ssh://[^@]+@(\[[^\]]+\]|[^:/]+):(\d+)(/.*)\Z")


class FakeClock:
    """Time that moves only when the test says so; threads can sleep on it."""

    def __init__(self, start: float):
        self._now = float(start)
        self._cond = threading.Condition()
        self.sleepers: dict[int, float] = {}

    def time(self) -> float:
        with self._cond:
            return self._now

    def sleep_until(self, deadline: float) -> None:
        ident = threading.get_ident()
        with self._cond:
            self.sleepers[ident] = deadline
            try:
                while self._now < deadline:
                    self._cond.wait()
            finally:
                del self.sleepers[ident]

    def advance_to(self, instant: float) -> None:
        with self._cond:
            if instant < self._now:
                raise ValueError("the fake clock never goes back")
            self._now = float(instant)
            self._cond.notify_all()

    def next_deadline(self) -> float | None:
        """The earliest instant a sleeping thread waits for."""
        with self._cond:
            return min(self.sleepers.values(), default=None)

    def settle(self, threads: Iterable[threading.Thread | None], timeout: float = 20.0) -> None:
        """Wait until each of ``threads`` has ended or sleeps on this clock for a future instant."""
        live = [t for t in threads if t is not None]
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                busy = [
                    t for t in live
                    if t.is_alive() and not (t.ident is not None and self.sleepers.get(t.ident, self._now) > self._now)
                ]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"threads never settled: {[t.name for t in busy]}")
            time.sleep(0.0005)


@dataclass
class FakeRepo:
    host: str
    path: str
    archives: dict[str, float] = field(default_factory=dict)  # name -> time (epoch)
    disk_bytes: int = 0
    last_write: float | None = None
    compactions: int = 0
    ids: dict[str, str] = field(default_factory=dict)  # name -> borg archive id (made at create)
    transactions: list[tuple[int, float]] = field(default_factory=list)  # the host's log: (number, time)

    def commit(self, when: float) -> None:
        """A write through the append-only key: one line in the host's transactions log."""
        number = self.transactions[-1][0] + 1 if self.transactions else 1
        self.transactions.append((number, when))

    def archive_id(self, name: str) -> str:
        return self.ids.get(name) or f"{abs(hash(name)):064x}"[:64]

    @property
    def live_bytes(self) -> int:
        return ARCHIVE_BYTES * len(self.archives)


@dataclass(frozen=True)
class Call:
    node: str
    argv: tuple[str, ...]  # unwrapped
    start: float
    end: float
    exit_code: int
    pidfile: str | None
    timeout: float | None


Rule = Callable[[Node, tuple[str, ...], "FakeWorld"], Result | None]


class FakeWorld:
    """Every node of ``federation``, answering on a :class:`FakeClock`."""

    def __init__(self, federation: Federation, clock: FakeClock):
        self.federation = federation
        self.clock = clock
        self.repos: dict[tuple[str, str], FakeRepo] = {}  # (host name, path)
        self.files: dict[tuple[str, str], bytes] = {}
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self.unreachable: set[str] = set()
        self.free: dict[str, int] = {}  # node -> bytes free on its storage's disk (default 10 TiB)
        self.local = False  # True: commands and files are run and kept on this machine, as on a real node
        self.modes: dict[tuple[str, str], int] = {}
        self.directories: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, dict]] = []  # (node, kind, args) of every request answered
        self.duration: Callable[[str, str], float] = lambda source, target: 600.0
        self._lock = threading.Lock()
        self._by_address = {(n.address, n.port): n for n in federation.nodes()}
        self.active: dict[str, int] = {}  # host -> borg sessions on its repositories now
        self.peak: dict[str, int] = {}
        self.sessions: list[tuple[str, str, str, float, float]] = []  # (kind, source, host, start, end)

    # -- scripting ---------------------------------------------------------

    def script(self, rule: Rule) -> None:
        """Answer some argv with ``rule`` (asked before the built-in answers)."""
        self.rules.append(rule)

    def repo(self, source: str, host: str) -> FakeRepo:
        src, dst = self.federation.node(source), self.federation.node(host)
        return self._repo(dst, borg.repository_path(src, dst))

    def _repo(self, host: Node, path: str) -> FakeRepo:
        key = (host.name, path)
        with self._lock:
            if key not in self.repos:
                self.repos[key] = FakeRepo(host.name, path)
            return self.repos[key]

    def connect(self, node: Node) -> FakeTransport:
        if node.name in self.unreachable:
            raise TransportError(f"cannot connect to {node.name} ({node.address}:{node.port}): connection refused (fake)")
        return FakeTransport(node, self)

    # -- answers -----------------------------------------------------------

    def answer(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        for rule in self.rules:
            result = rule(node, argv, self)
            if result is not None:
                return result
        if is_stop(argv):
            return Result(argv, 0, b"not running\n", b"")
        if argv[:1] == ("ps",):
            return Result(argv, 1, b"", b"")
        if argv[1:] == ("--version",):
            return Result(argv, 0, b"borg 1.4.5\n", b"")
        if argv[:2] == ("sh", "-c") and len(argv) >= 5:
            return self._script(node, argv)
        if argv[:2] == ("sh", "-c"):
            return Result(argv, 0, b"", b"")  # a before: command
        if len(argv) >= 2 and argv[1] in ("create", "list", "prune", "info", "check", "compact", "break-lock"):
            return getattr(self, "_borg_" + argv[1].replace("-", "_"))(node, argv, timeout)
        raise AssertionError(f"the fake does not know {argv!r} on {node.name}")

    def _script(self, node: Node, argv: tuple[str, ...]) -> Result:
        path = argv[4]
        repo = self.repos.get((node.name, path))
        if argv == borg.repository_facts_argv(path):
            if repo is None:
                return Result(argv, borg.REPOSITORY_MISSING, b"", b"")
            line = f"{repo.last_write or 0} {repo.disk_bytes}\n" if repo.disk_bytes else ""
            return Result(argv, 0, line.encode(), b"")
        if argv == borg.transactions_argv(path):
            if repo is None:
                return Result(argv, borg.REPOSITORY_MISSING, b"", b"")
            lines = [f"{int(self.clock.time())}"] + [
                f"transaction {n}, UTC time {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}.000000"
                for n, t in repo.transactions]
            return Result(argv, 0, ("\n".join(lines) + "\n").encode(), b"")
        if argv == borg.lock_listing_argv(path):
            return Result(argv, 0 if repo is not None else 3, b"fakehost.example@123456\n", b"")
        raise AssertionError(f"the fake does not know the script {argv[2][:40]!r}")

    def _locate(self, url: str) -> tuple[Node, str]:
        match = _URL.match(url.split("::", 1)[0])
        assert match, url
        host = self._by_address[(match.group(1).strip("[]"), int(match.group(2)))]
        return host, match.group(3)

    def _source_of(self, host: Node, path: str) -> str:
        member, slug = path.rstrip("/").split("/")[-2:]
        return f"{member}/{slug}"

    def _session(self, kind: str, source: str, host: str, seconds: float, timeout: float | None) -> bool:
        """Occupy ``host`` for ``seconds`` of fake time; False when ``timeout`` cut it short."""
        start = self.clock.time()
        with self._lock:
            self.active[host] = self.active.get(host, 0) + 1
            self.peak[host] = max(self.peak.get(host, 0), self.active[host])
        limit = seconds if timeout is None else min(seconds, timeout)
        cut = limit < seconds
        try:
            if limit > 0:
                self.clock.sleep_until(start + limit)
        finally:
            with self._lock:
                self.active[host] -= 1
                self.sessions.append((kind, source, host, start, self.clock.time()))
        return not cut

    def _borg_create(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        location = next(a for a in argv if "::" in a)
        host, path = self._locate(location)
        source = self._source_of(host, path)
        name = location.split("::", 1)[1]
        if not self._session("create", source, host.name, self.duration(source, host.name), timeout):
            return Result(argv, -1, b"", f"mutualbackup: {node.name}: timed out after {timeout:g}s\n".encode())
        repo = self._repo(host, path)
        now = self.clock.time()
        with self._lock:
            repo.archives[name] = now
            repo.ids[name] = f"{len(self.calls):08x}{abs(hash((repo.path, name, now))):056x}"[:64]
            repo.disk_bytes += ARCHIVE_BYTES
            repo.last_write = now
            repo.commit(now)
        out = {
            "archive": {"name": name, "id": repo.ids[name], "stats": {"original_size": 5 * ARCHIVE_BYTES, "compressed_size": 2 * ARCHIVE_BYTES,
                                                "deduplicated_size": ARCHIVE_BYTES, "nfiles": 42}},
            "cache": {"stats": {"unique_csize": repo.live_bytes}},
        }
        return Result(argv, 0, json.dumps(out).encode(), b"")

    def _borg_list(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        repo = self._repo(*self._locate(argv[-1]))
        archives = [
            {"name": name, "archive": name, "id": repo.archive_id(name),
             "start": time.strftime("%Y-%m-%dT%H:%M:%S.000000", time.gmtime(when))}
            for name, when in sorted(repo.archives.items(), key=lambda item: item[1])
        ]
        return Result(argv, 0, json.dumps({"archives": archives}).encode(), b"")

    def _borg_prune(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        host, path = self._locate(argv[-1])
        repo = self._repo(host, path)
        keep = {flag.split("=")[0][7:]: int(flag.split("=")[1]) for flag in argv if flag.startswith("--keep-")}
        glob = argv[argv.index("--glob-archives") + 1]
        matching = [borg.ArchiveEntry(n, _utc(t), "") for n, t in repo.archives.items() if n.startswith(glob.rstrip("*"))]
        plan = plan_prune(matching, Retention(**keep))
        with self._lock:
            for name in plan.delete:
                del repo.archives[name]
            repo.last_write = self.clock.time()
            repo.commit(self.clock.time())
        return Result(argv, 0, b"", b"")

    def _borg_info(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        repo = self._repo(*self._locate(argv[-1]))
        return Result(argv, 0, json.dumps({"cache": {"stats": {"unique_csize": repo.live_bytes}}}).encode(), b"")

    def _borg_check(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        return Result(argv, 0, b"", b"")

    def _borg_compact(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        repo = self._repo(node, argv[-1])
        with self._lock:
            repo.disk_bytes = repo.live_bytes
            repo.compactions += 1
        return Result(argv, 0, b"", b"")

    def _borg_break_lock(self, node: Node, argv: tuple[str, ...], timeout: float | None) -> Result:
        return Result(argv, 0, b"", b"")

    def commands(self, *words: str) -> list[Call]:
        """Calls whose argv contains every one of ``words``."""
        return [c for c in self.calls if all(w in c.argv for w in words)]


class FakeSystem:
    """A node's :class:`mutualbackup.node.system.System` in a :class:`FakeWorld`: commands are answered by
    the world (and recorded as calls), files are the world's, a stop is the stop script's answer."""

    def __init__(self, node: Node, world: "FakeWorld"):
        self.node = node
        self.world = world
        self.gone = threading.Event()

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            stdin: bytes | None = None, timeout: float | None = None,
            on_stderr_line: Callable[[str], None] | None = None, pidfile: str | None = None,
            run_id: int | None = None, pass_fds: Sequence[int] = ()) -> Result:
        argv = tuple(argv)
        start = self.world.clock.time()
        result = self.world.answer(self.node, argv, timeout)
        with self.world._lock:
            self.world.calls.append(Call(self.node.name, argv, start, self.world.clock.time(), result.exit_code,
                                         pidfile, timeout))
        if on_stderr_line is not None:
            for line in result.stderr.decode("utf-8", "replace").splitlines():
                on_stderr_line(line)
        return Result(argv, result.exit_code, result.stdout, result.stderr)

    def stop(self, pidfile: str, int_seconds: float, term_seconds: float, owner: str | None = None) -> tuple[bool, str]:
        said = self.run(stop_argv(pidfile))
        return said.ok, said.stdout.decode("utf-8", "replace").strip() or said.stderr_tail(2)

    def pidfile(self, path: str):  # noqa: ANN201
        from mutualbackup.node.system import parse_pidfile

        data = self.read(path)
        return parse_pidfile(data) if data is not None else None

    def read(self, path: str) -> bytes | None:
        if path.endswith("/identity") and (self.node.name, path) not in self.world.files:
            self.world.files[(self.node.name, path)] = (str(identity_of(self.node.name)) + "\n").encode()
        return self.world.files.get((self.node.name, path))

    def write(self, path: str, data: bytes, mode: int = 0o600) -> None:
        self.world.files[(self.node.name, path)] = data
        self.world.modes[(self.node.name, path)] = mode

    def create(self, path: str, data: bytes, mode: int = 0o600) -> bool:
        if (self.node.name, path) in self.world.files:
            return False
        self.write(path, data, mode)
        return True

    def alive(self, pids: Iterable[int]) -> set[int]:
        return set()

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        self.world.directories.add((self.node.name, path))

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for (n, p) in self.world.files if n == self.node.name
                       and p.startswith(prefix)})

    def free_space(self, path: str) -> int:
        return self.world.free.get(self.node.name, 10 * 1024**4)

    def remove_tree(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        for key in [k for k in self.world.files if k[0] == self.node.name and (k[1] == path or k[1].startswith(prefix))]:
            del self.world.files[key]


def node_config_of(node: Node, federation: Federation | None = None):  # noqa: ANN201
    """The configuration a fake node would have written at join (its member's admins pinned)."""
    from mutualbackup.node.config import Admin, NodeConfig

    admins: tuple = ()
    if federation is not None:
        try:
            admins = tuple(Admin(a.name, a.key) for a in federation.member(node.member).admins)
        except KeyError:
            admins = ()

    def expand_home(path: str, home: str) -> str:
        return home + path[1:] if path == "~" or path.startswith("~/") else path

    workdir = expand_home(node.workdir, HOME)
    return NodeConfig(member=node.member, node=node.slug, user=node.user,
                      authorized_keys=expand_home(node.authorized_keys, HOME), work=workdir, state=workdir,
                      borg=node.borg, storage=node.storage.path if node.storage is not None else "", admins=admins)


class FakeTransport:
    """A :class:`mutualbackup.remote.transport.Transport` onto one node of a :class:`FakeWorld`."""

    def __init__(self, node: Node, world: FakeWorld):
        self.node = node
        self.node_name = node.name
        self.world = world
        self.closed = False
        self.started = False

    def request(self, kind: str, args: Mapping[str, object], *, timeout: float | None = None,
                on_event: Callable[[Mapping[str, object]], None] | None = None,
                feed: Iterable[bytes] = ()):  # noqa: ANN201 - a Reply
        """The node's own request code, in-process, on a :class:`FakeSystem` (arguments and data go through JSON;
        ``feed`` is read as the request asks for it)."""
        from mutualbackup.node.protocol import Reply
        from mutualbackup.node.requests import Session, handle
        from mutualbackup.node.serve import import_handlers

        if self.node.name in self.world.unreachable:
            raise TransportError(f"cannot connect to {self.node.name}: connection refused (fake)")
        import_handlers()
        lines = _lines_of(feed)
        session = Session(node_config_of(self.node, self.world.federation), FakeSystem(self.node, self.world),
                          lambda event, fields: on_event({"event": event, **json.loads(json.dumps(fields))})
                          if on_event is not None else None,
                          lambda _timeout: next(lines, None))
        reply = handle(kind, json.loads(json.dumps(args)), session, self.node.name)
        with self.world._lock:
            self.world.requests.append((self.node.name, kind, json.loads(json.dumps(args))))
        return Reply(reply.kind, reply.code, reply.error, json.loads(json.dumps(dict(reply.data))))

    def connect(self) -> None:
        if self.node.name in self.world.unreachable:
            raise TransportError(f"cannot connect to {self.node.name}: connection refused (fake)")

    def start(self, kind: str | None = None) -> None:
        self.started = kind or True

    def close(self) -> None:
        self.closed = True


def _lines_of(feed: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of ``feed``, pulled from it only as they are asked for (it may block meanwhile)."""
    pending = b""
    for chunk in feed:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if pending:
        yield pending


def stop_argv(pidfile: str) -> tuple[str, ...]:
    """How the fake records a node's stop of a supervised command (the real node signals it in Python)."""
    return ("stop", pidfile)


def is_stop(argv: Sequence[str]) -> bool:
    return len(argv) == 2 and argv[0] == "stop"


def failing(exit_code: int, stderr: str, *, when: Callable[[Node, tuple[str, ...]], bool]) -> Rule:
    """A rule: every argv for which ``when(node, argv)`` holds fails with ``exit_code`` and ``stderr``."""

    def rule(node: Node, argv: tuple[str, ...], world: FakeWorld) -> Result | None:
        return Result(argv, exit_code, b"", stderr.encode()) if when(node, argv) else None

    return rule


def _utc(epoch: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


# --- federations for fake tests ------------------------------------------------------

_IDENTITIES: dict[str, object] = {}


def identity_of(node: str):  # noqa: ANN201 - a pyrage x25519 Identity
    """The fake node's sealing identity (made once per name in this process)."""
    from pyrage import x25519

    if node not in _IDENTITIES:
        _IDENTITIES[node] = x25519.Identity.generate()
    return _IDENTITIES[node]


def node_key_of(node: str) -> str:
    return str(identity_of(node).to_public())  # type: ignore[attr-defined]


_ADMIN: list[tuple[bytes, str]] = []


def admin_key() -> tuple[bytes, str]:
    """The fake members' admin: (OpenSSH private key file content, public key ``ssh-ed25519 BASE64``)."""
    if not _ADMIN:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _ADMIN.append((private, public.decode()))
    return _ADMIN[0]


def admin_identity_file(directory) -> str:  # noqa: ANN001
    """The admin's private key written (0600) into ``directory``, for ``--identity``."""
    import os

    path = os.path.join(str(directory), "admin_ed25519")
    with open(path, "wb") as handle:
        handle.write(admin_key()[0])
    os.chmod(path, 0o600)
    return path

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
GIB = 1024**3


def host_key_of(node: str) -> str:
    """A well-formed ed25519 public host key of its own for each fake node (one server, one node)."""
    import base64
    import hashlib
    import struct

    kind = b"ssh-ed25519"
    blob = struct.pack(">I", len(kind)) + kind + struct.pack(">I", 32) + hashlib.sha256(node.encode()).digest()
    return "ssh-ed25519 " + base64.b64encode(blob).decode("ascii")


def render_inventory(federation: Federation, directory: str) -> None:
    """``federation.yml`` and ``members/*.yml`` describing ``federation`` as far as its nodes read them, each member
    file signed by the fake admin: what the coordinator hands a node, as on a real federation."""
    import os

    import yaml

    from mutualbackup.inventory.signatures import sign

    os.makedirs(os.path.join(directory, "members"), exist_ok=True)
    coordinator = federation.coordinator
    with open(os.path.join(directory, "federation.yml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump({"federation": federation.name, "coordinator": {
            "ssh_key": coordinator.ssh_key, "state": coordinator.state, "timezone": coordinator.timezone}}, handle)
    key = os.path.join(directory, ".admin_ed25519")
    if not os.path.exists(key):
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as handle:
            handle.write(admin_key()[0])
    for member in federation.members:
        path = os.path.join(directory, "members", f"{member.name}.yml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"member": member.name, "contact": member.contact or f"ops@{member.name}.example",
                            "site": member.site, "admins": [{"name": a.name, "key": a.key} for a in member.admins],
                            "nodes": [_node_document(node) for node in member.nodes]}, handle, sort_keys=False)
        sign(path, key)


FEDERATION_YML = "federation: fake-federation\ncoordinator: {ssh_key: /nonexistent, state: /nonexistent}\n"


def signed_material(directory: str, document: dict[str, object], *, key: bytes | None = None,
                    federation: str = FEDERATION_YML) -> dict[str, str]:
    """What the coordinator sends a node with a request that depends on its member's file: ``document`` written
    as ``members/NAME.yml`` under ``directory``, signed with ``key`` (an OpenSSH private key; the fake admin's by
    default), and ``federation.yml``."""
    import os

    import yaml

    from mutualbackup.inventory.signatures import sign

    os.makedirs(os.path.join(directory, "members"), exist_ok=True)
    secret = os.path.join(directory, ".signer")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(key or admin_key()[0])
    path = os.path.join(directory, "members", f"{document['member']}.yml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    sign(path, secret)
    with open(path, encoding="utf-8") as text, open(path + ".sig", encoding="utf-8") as signature:
        return {"file": text.read(), "signature": signature.read(), "federation": federation}


def _node_document(node: Node) -> dict[str, object]:
    document: dict[str, object] = {"name": node.slug, "address": node.address, "port": node.port, "user": node.user,
                                   "host_key": node.host_key}
    if node.node_key:
        document["node_key"] = node.node_key
    if node.backup is not None:
        backup = node.backup
        section: dict[str, object] = {"paths": list(backup.paths), "compression": backup.compression}
        if backup.exclude:
            section["exclude"] = list(backup.exclude)
        if backup.before:
            section["before"] = list(backup.before)
        kept = {name: getattr(backup.retention, name) for name in ("hourly", "daily", "weekly", "monthly", "yearly")
                if getattr(backup.retention, name)}
        if kept:
            section["retention"] = kept
        document["backup"] = section
    if node.storage is not None:
        document["storage"] = {"path": node.storage.path, "capacity": f"{node.storage.capacity}B"}
    return document


def make_federation(
    members: int = 3,
    sources_per_member: int = 1,
    *,
    backup: Callable[[int, int], Backup] | None = None,
    max_concurrent: Callable[[int], int] = lambda m: 2,
    bandwidth: Callable[[int], int | None] = lambda m: 100_000_000,
    timezone: str = "Europe/Paris",
    directory: str = "",
) -> Federation:
    """``members`` members ``coopM``, each lending one host ``coopM/store`` and owning
    ``sources_per_member`` sources ``coopM/srcJ``; ``backup(m, j)`` gives each source's section."""
    from mutualbackup.inventory.model import Admin, Coordinator, Member, Storage

    def default_backup(m: int, j: int) -> Backup:
        return Backup(paths=("/etc", "/srv"), estimate=GIB, retention=Retention(daily=7))

    make_backup = backup or default_backup
    result = []
    for m in range(members):
        member = f"coop{m}"
        nodes = [Node(member=member, slug="store", address=f"192.0.2.{m + 1}", port=22, user="mutualbackup",
                      host_key=host_key_of(f"{member}/store"), site=f"site-{m}", node_key=node_key_of(f"{member}/store"),
                      storage=Storage(path="/srv/mutualbackup", capacity=2000 * GIB,
                                      max_concurrent=max_concurrent(m), bandwidth=bandwidth(m)))]
        for j in range(sources_per_member):
            nodes.append(Node(member=member, slug=f"src{j}", address=f"198.51.{m}.{j + 1}", port=22, user="root",
                              host_key=host_key_of(f"{member}/src{j}"), site=f"site-{m}", backup=make_backup(m, j),
                              node_key=node_key_of(f"{member}/src{j}")))
        result.append(Member(name=member, contact=f"ops@{member}.example", site=f"site-{m}", nodes=tuple(nodes),
                             admins=(Admin("admin", admin_key()[1]),)))
    federation = Federation(
        name="fake-federation",
        coordinator=Coordinator(ssh_key="/nonexistent", state="/nonexistent", timezone=timezone),
        members=tuple(result),
        directory=directory or _scratch_directory(),
    )
    render_inventory(federation, federation.directory)
    return federation


def signed_again(federation: Federation) -> Federation:
    """``federation`` (changed in memory by a test) written and signed again where its nodes read it."""
    render_inventory(federation, federation.directory)
    return federation


def _scratch_directory() -> str:
    import atexit
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="mutualbackup-fake-inventory-")
    atexit.register(shutil.rmtree, directory, True)
    return directory


class Harness:
    """A real :class:`mutualbackup.daemon.Daemon` on a :class:`FakeWorld`, stepped on a :class:`FakeClock`."""

    def __init__(self, federation: Federation, state_dir: str, start: float, **daemon_options: object):
        import datetime as dt

        from mutualbackup.context import Context
        from mutualbackup.daemon import Daemon
        from mutualbackup.state.history import History
        from mutualbackup.plan.placement import place

        self._dt = dt
        self.federation = federation
        self.clock = FakeClock(start)
        self.world = FakeWorld(federation, self.clock)
        self.history = History(state_dir)
        self.ctx = Context(federation, self.history, self.world.connect)
        self.placement = place(federation).replicas
        self.history.set_placement(self.placement, now=start)
        daemon_options.setdefault("drills_enabled", False)  # drills have their own tests (test_drill*.py)
        self.daemon = Daemon(self.ctx, clock=self.clock.time, **daemon_options)  # type: ignore[arg-type]
        self.steps = 0

    def now(self):
        return self._dt.datetime.fromtimestamp(self.clock.time(), self._dt.timezone.utc)

    def threads(self) -> list[threading.Thread | None]:
        return [job.thread for job in list(self.daemon.running.values())]

    def step(self) -> list:
        """One daemon tick at the fake now; returns the jobs started (settled: asleep or done)."""
        self.clock.settle(self.threads())
        started = self.daemon.step(self.now())
        self.steps += 1
        self.clock.settle(self.threads())
        return started

    def run_until(self, until: float) -> None:
        """Tick at every instant something can change (a job ends, a job becomes due) until ``until``."""
        while True:
            self.step()
            self.daemon.reap()
            wake = self.daemon.next_wakeup(self.now())
            events = [t for t in (self.clock.next_deadline(), wake.timestamp() if wake else None) if t is not None]
            following = min(events, default=until)
            following = max(following, self.clock.time() + 1)  # at least one second later
            if following > until:
                self.clock.advance_to(until)
                self.clock.settle(self.threads())
                self.daemon.reap()
                return
            self.clock.advance_to(following)

    def finish(self) -> None:
        """Let every running job end (advancing the fake clock), starting nothing new."""
        while self.daemon.running:
            self.clock.settle(self.threads())
            self.daemon.reap()
            deadline = self.clock.next_deadline()
            if deadline is not None:
                self.clock.advance_to(deadline)
