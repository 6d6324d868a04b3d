"""A laboratory federation: real ``sshd`` daemons on 127.0.0.1, one per node.

Used by the end-to-end tests and the demo. A :class:`Lab` owns one directory:
it creates the coordinator's key there and, for each node, a host key, an
``sshd_config``, an ``authorized_keys`` file and the node's own directories
(data to back up, storage for repositories, a workdir). Each node's sshd runs in
the foreground as a child of this process, so the lab knows every PID it has to
stop; it only ever signals those processes and their descendants (the sshd
per-connection children and the commands they run, such as ``borg serve``).

Needs root (sshd, useradd, sudo) and ``/usr/sbin/sshd``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.accounts import LAB_USER, give, lab_account, reachable, sudoers_file, the_python
from mutualbackup.inventory.model import Node

SSHD = "/usr/sbin/sshd"
ADDRESS = "127.0.0.1"
COORDINATOR_COMMENT = "mutualbackup-coordinator"
READY_TIMEOUT = 10.0
STOP_GRACE = 5.0
_POLL = 0.02
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")


class LabError(RuntimeError):
    """A lab node could not be created, started or stopped."""


@dataclass
class LabNode:
    """One node of the lab: its sshd, its files and the inventory fields describing it."""

    member: str
    slug: str
    port: int
    dir: Path
    host_key: str  # "TYPE BASE64"
    authorized_keys: Path
    workdir: Path
    data: Path
    storage: Path
    sshd_log: Path
    config: Path
    host_key_file: Path
    borg: str
    state: Path  # root-only: the source's key and passphrase, the node's sealing identity
    node_config: Path  # the node program's configuration directory (join writes node.json there)
    user: str = LAB_USER
    node_key: str = ""  # "age1…", once joined
    pid: int | None = None  # of the listening sshd; None when stopped
    extra_host_key_files: list[Path] = field(default_factory=list)
    admin_keys: Path | None = None  # root's authorized_keys when an admin may log in (Lab.allow_admin_login)

    @property
    def name(self) -> str:
        return f"{self.member}/{self.slug}"

    def inventory_fields(self) -> dict[str, object]:
        """The node's connection fields for a ``members/*.yml`` inventory entry."""
        return {
            "address": ADDRESS,
            "port": self.port,
            "user": self.user,
            "host_key": self.host_key,
            **({"node_key": self.node_key} if self.node_key else {}),
            "workdir": str(self.workdir),
            "authorized_keys": str(self.authorized_keys),
            "borg": self.borg,
        }

    def as_node(self) -> Node:
        """The node as a :class:`mutualbackup.inventory.model.Node` (no backup or storage section)."""
        return Node(
            member=self.member,
            slug=self.slug,
            address=ADDRESS,
            port=self.port,
            user=self.user,
            host_key=self.host_key,
            node_key=self.node_key,
            workdir=str(self.workdir),
            authorized_keys=str(self.authorized_keys),
            borg=self.borg,
        )


class Lab:
    """Real sshd nodes on 127.0.0.1, each joined as a member's admin joins a node; a context manager
    that stops them all.

    The coordinator and peers log in as the unprivileged :data:`LAB_USER`; the node program reaches
    root through the sudo rule of its join. ``borg`` is the borg executable the nodes use; its
    directory (the virtualenv, with ``mutualbackup-node``) is put first on the PATH of every session.
    """

    def __init__(self, root: Path, *, borg: str) -> None:
        self.root = Path(root).absolute()
        self.borg = str(Path(borg).absolute())
        self.program = str(Path(self.borg).with_name("mutualbackup-node"))
        self.root.mkdir(parents=True, exist_ok=True)
        lab_account()
        reachable(self.root, self.borg, *the_python(), Path(__file__).resolve().parent.parent)
        self.nodes: dict[str, LabNode] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ports: set[int] = set()
        key = self.root / "coordinator" / "id_ed25519"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            _keygen(key, COORDINATOR_COMMENT)
        self._coordinator_key = key
        atexit.register(self.stop_all)

    @property
    def coordinator_key(self) -> Path:
        """The coordinator's private key (ed25519, OpenSSH format, no passphrase)."""
        return self._coordinator_key

    @property
    def coordinator_public_key(self) -> str:
        """The coordinator's public key line, ``ssh-ed25519 AAAA… mutualbackup-coordinator``."""
        return self._coordinator_key.with_suffix(".pub").read_text().strip()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node; the lab's files stay."""
        self.stop_all()
        atexit.unregister(self.stop_all)

    # -- nodes --------------------------------------------------------------

    def add_node(self, member: str, slug: str) -> LabNode:
        """Create the files of node ``MEMBER/NODE`` (not started); ValueError on a bad or taken name."""
        for word in (member, slug):
            if not _SLUG.match(word):
                raise ValueError(f"not a valid slug: {word!r}")
        name = f"{member}/{slug}"
        if name in self.nodes:
            raise ValueError(f"lab node {name} already exists")
        base = self.root / "nodes" / member / slug
        dirs = {sub: base / sub for sub in ("etc", "data", "storage", "work", "log", "run", "state", "keys")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
        for owned in ("storage", "work", "keys"):  # the login's, as on a real node
            give(dirs[owned])
        dirs["state"].chmod(0o700)
        host_key_file = dirs["etc"] / "ssh_host_ed25519_key"
        authorized_keys = dirs["keys"] / "authorized_keys"
        authorized_keys.touch()
        give(authorized_keys, 0o600)
        node = LabNode(
            member=member,
            slug=slug,
            port=self._free_port(),
            dir=base,
            host_key="",
            authorized_keys=authorized_keys,
            workdir=dirs["work"],
            data=dirs["data"],
            storage=dirs["storage"],
            sshd_log=dirs["log"] / "sshd.log",
            config=dirs["etc"] / "sshd_config",
            host_key_file=host_key_file,
            borg=self.borg,
            state=dirs["state"],
            node_config=dirs["etc"] / "node",
        )
        self._make_host_key(node)
        self._write_config(node)
        self.nodes[name] = node
        return node

    def admin_key(self, member: str, name: str = "admin") -> Path:
        """The private key of one of ``member``'s admins (made for the lab: they sign its file, open its kits)."""
        key = self.root / "admins" / f"{member}-{name}_ed25519"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            _keygen(key, f"{name}@{member}")
        return key

    def admin_public_key(self, member: str, name: str = "admin") -> str:
        kind, blob = self.admin_key(member, name).with_suffix(".pub").read_text().split()[:2]
        return f"{kind} {blob}"

    def allow_admin_login(self, node: LabNode) -> Path:
        """Let ``node``'s member's admin log in as root with their key, as Ansible does to prepare a node (the
        coordinator and peers never can); the admin's private key. Restarts the node when it runs."""
        key = self.admin_key(node.member)
        node.admin_keys = node.dir / "keys" / "admin_authorized_keys"
        node.admin_keys.parent.mkdir(parents=True, exist_ok=True)
        node.admin_keys.write_text(key.with_suffix(".pub").read_text())
        if node.pid is not None:
            self.restart(node)
        return key

    def join(self, node: LabNode, member_file: Path) -> str:
        """``mutualbackup-node join`` of ``node`` as its member's admin would run it; the node_key it printed."""
        done = subprocess.run(
            [self.program, "join", "--node", node.name, "--coordinator-key", str(self.coordinator_key) + ".pub",
             "--member-file", str(member_file), "--config", str(node.node_config), "--state", str(node.state),
             "--host-key", str(node.host_key_file) + ".pub", "--sudoers", self.sudoers_file(node),
             "--program", self.program],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "PATH": f"{Path(self.program).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
        )  # the admin has mutualbackup-node on the PATH, as the nodes' sshd has
        if done.returncode != 0:
            raise LabError(f"join of {node.name} failed: {done.stderr.strip()}")
        printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and not line.startswith("#"))
        node.node_key = printed["node_key"]
        return node.node_key

    def join_alone(self, node: LabNode, *, storage: bool = True) -> str:
        """Join ``node`` with a member file of its own naming only it (lending its storage unless told
        not to); the node_key. For tests of one node; a federation joins through :mod:`lab.federation`."""
        return self.join(node, self.member_file_alone(node, storage=storage))

    def member_file_alone(self, node: LabNode, *, storage: bool = True) -> Path:
        """A member file naming only ``node`` (lending its storage unless told not to), with one admin."""
        import yaml

        entry: dict[str, object] = {"name": node.slug, **node.inventory_fields()}
        if storage:
            entry["storage"] = {"path": str(node.storage), "capacity": "1GiB"}
        document = {"member": node.member, "contact": f"ops@{node.member}.example", "site": node.member,
                    "admins": [{"name": "admin", "key": self.admin_public_key(node.member)}], "nodes": [entry]}
        path = self.root / "members" / f"{node.member}-{node.slug}.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def sudoers_file(self, node: LabNode) -> str:
        """Where ``node``'s sudo rule goes (one file per lab node, removed when the lab's process ends)."""
        return sudoers_file(f"{id(self):x}-{node.member}-{node.slug}")

    def change_host_key(self, node: LabNode) -> str:
        """Give ``node`` a new host key (restarting it if it runs); returns the new ``TYPE BASE64``."""
        running = node.pid is not None
        if running:
            self.stop(node)
        self._make_host_key(node)
        if running:
            self.start(node)
        return node.host_key

    def add_host_key(self, node: LabNode, key_type: str) -> str:
        """Give ``node`` one more host key of ``key_type`` (``ecdsa``, ``rsa``…), as servers
        usually have several; restarts it if it runs. Returns the new key as ``TYPE BASE64``.
        ``node.host_key`` stays the ed25519 one.
        """
        path = node.host_key_file.with_name(f"ssh_host_{key_type}_key")
        if path in node.extra_host_key_files:
            raise ValueError(f"{node.name} already has an extra {key_type} host key")
        running = node.pid is not None
        if running:
            self.stop(node)
        _keygen(path, f"lab-host-{node.member}-{node.slug}", key_type)
        node.extra_host_key_files.append(path)
        if running:
            self.start(node)
        kind, blob = path.with_suffix(".pub").read_text().split()[:2]
        return f"{kind} {blob}"

    def _make_host_key(self, node: LabNode) -> None:
        for path in (node.host_key_file, node.host_key_file.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        _keygen(node.host_key_file, f"lab-host-{node.member}-{node.slug}")
        kind, blob = node.host_key_file.with_suffix(".pub").read_text().split()[:2]
        node.host_key = f"{kind} {blob}"

    def _write_config(self, node: LabNode) -> None:
        path = f"{Path(self.borg).parent}:/usr/local/bin:/usr/bin:/bin"
        node.config.write_text(
            "\n".join(
                [
                    f"Port {node.port}",
                    f"ListenAddress {ADDRESS}",
                    f"HostKey {node.host_key_file}",
                    *(f"HostKey {extra}" for extra in node.extra_host_key_files),
                    f"AuthorizedKeysFile {node.authorized_keys}"
                    + (" .ssh/authorized_keys" if node.admin_keys is not None else ""),  # a login the admin made
                    f"PidFile {node.dir / 'run' / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin no",
                    "MaxStartups 100:30:200",
                    "MaxSessions 50",
                    # SHLVL=1: bash skips ~/.bashrc, which sshd otherwise makes it source even for
                    # commands: the machine's own shell set-up (pyenv, a PATH of its own) is not a
                    # node's, would override PATH here, and costs ~0.1 s of CPU per SSH session.
                    f"SetEnv SHLVL=1 PATH={path}",
                    "LogLevel VERBOSE",
                    *(["Match User root", "    PermitRootLogin prohibit-password",
                       f"    AuthorizedKeysFile {node.admin_keys}"] if node.admin_keys is not None else []),
                    "",
                ]
            )
        )

    def _free_port(self) -> int:
        """A TCP port of 127.0.0.1 that was free a moment ago and no other lab node uses."""
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((ADDRESS, 0))
                port = sock.getsockname()[1]
            if port not in self._ports:
                self._ports.add(port)
                return port
        raise LabError("no free port on 127.0.0.1")

    # -- processes ----------------------------------------------------------

    def start(self, node: LabNode) -> None:
        """Start the node's sshd and wait until it answers with an SSH banner.

        Retries once on another port when the chosen one was taken meanwhile.
        Raises LabError with the tail of the sshd log when it does not come up.
        """
        running = self._procs.get(node.name)
        if running is not None and running.poll() is None:
            return
        self._stop_tree(node, signal.SIGKILL)  # leftovers of an sshd that died by itself
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for attempt in (1, 2):
            self._write_config(node)
            log_start = node.sshd_log.stat().st_size if node.sshd_log.exists() else 0
            with open(node.sshd_log, "ab") as log:
                proc = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(node.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self._procs[node.name] = proc
            node.pid = proc.pid
            problem = self._wait_ready(node, proc)
            if problem is None:
                return
            self._stop_tree(node, signal.SIGKILL)
            tail = _tail(node.sshd_log, log_start)
            if attempt == 1 and "Address already in use" in tail:
                self._ports.discard(node.port)
                node.port = self._free_port()
                continue
            raise LabError(f"sshd of {node.name} (port {node.port}) {problem}; log {node.sshd_log}:\n{tail}")

    def _wait_ready(self, node: LabNode, proc: subprocess.Popen[bytes]) -> str | None:
        """None once sshd sends its banner; otherwise what went wrong."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"exited with status {proc.returncode}"
            try:
                with socket.create_connection((ADDRESS, node.port), timeout=1.0) as sock:
                    banner = sock.recv(256)
                if banner.startswith(b"SSH-2.0") and proc.poll() is None:
                    return None
            except OSError:
                pass
            time.sleep(_POLL)
        return f"did not answer within {READY_TIMEOUT:g}s"

    def stop(self, node: LabNode) -> None:
        """Stop the node's sshd and every process it started (SIGTERM, then SIGKILL)."""
        self._stop_tree(node, signal.SIGTERM)

    def kill(self, node: LabNode) -> None:
        """SIGKILL the node's sshd and every process it started, as if the host died."""
        self._stop_tree(node, signal.SIGKILL)

    def restart(self, node: LabNode) -> None:
        """Stop then start the node (same port, same host key)."""
        self.stop(node)
        self.start(node)

    def start_all(self) -> None:
        """Start every node that is not running."""
        for node in self.nodes.values():
            self.start(node)

    def stop_all(self) -> None:
        """Stop every running node (also run at interpreter exit)."""
        for node in self.nodes.values():
            self.stop(node)

    def processes(self, node: LabNode) -> list[int]:
        """PIDs of the node's sshd and all its descendants, the sshd first; [] when stopped."""
        proc = self._procs.get(node.name)
        if proc is None or proc.poll() is not None:
            return []
        return [proc.pid, *sorted(_descendants({proc.pid}, _process_table()))]

    def _stop_tree(self, node: LabNode, first: signal.Signals) -> None:
        """Freeze the node's process tree, send ``first`` to all of it, SIGKILL what outlives the grace."""
        proc = self._procs.pop(node.name, None)
        node.pid = None
        if proc is None:
            return
        tree = _freeze_tree(proc.pid)
        for pid, started in tree.items():
            _signal(pid, started, first)
        for pid, started in tree.items():
            _signal(pid, started, signal.SIGCONT)
        if not _wait_gone(proc, tree, STOP_GRACE) and first != signal.SIGKILL:
            for pid, started in tree.items():
                _signal(pid, started, signal.SIGKILL)
            _wait_gone(proc, tree, STOP_GRACE)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired as error:
            raise LabError(f"sshd of {node.name} (pid {proc.pid}) does not die") from error


# -- /proc --------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc/PID/stat, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _process_table() -> dict[int, tuple[str, int, int]]:
    """Every live (non-zombie) process: pid → (state, ppid, start time)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                table[int(entry)] = stat
    return table


def _descendants(roots: set[int], table: dict[int, tuple[str, int, int]]) -> set[int]:
    """PIDs whose parent chain leads to one of ``roots`` (roots excluded)."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in roots:
                found.add(child)
                todo.append(child)
    return found


def is_alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, the one started at ``started`` if given."""
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return started is None or stat[2] == started


def _signal(pid: int, started: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process started at ``started``."""
    if is_alive(pid, started):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _freeze_tree(root: int) -> dict[int, int]:
    """SIGSTOP ``root`` and its descendants until no new one appears; pid → start time."""
    frozen: dict[int, int] = {}
    todo = {root}
    while todo:
        for pid in todo:
            stat = _stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            frozen[pid] = stat[2]
        todo = _descendants(set(frozen), _process_table()) - set(frozen)
    return frozen


def _wait_gone(proc: subprocess.Popen[bytes], tree: dict[int, int], seconds: float) -> bool:
    """Poll until every process of ``tree`` is gone (reaping ``proc``); False on timeout."""
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()
        if not any(is_alive(pid, started) for pid, started in tree.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


def _keygen(path: Path, comment: str, key_type: str = "ed25519") -> None:
    """A new key pair at ``path`` and ``path.pub``, without passphrase."""
    keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
    subprocess.run(
        [keygen, "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _tail(path: Path, start: int = 0, lines: int = 20) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``start``."""
    try:
        with path.open("rb") as log:
            log.seek(start)
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(nothing logged)"
