"""``mutualbackup-node join``: a member's admin makes this server a node of the federation, once.

As root, on the node: reads the member file for this node's login, paths and storage; pins the
node's own name and the member's admins; makes the node's sealing key (age X25519, in the
root-only state directory); installs the coordinator's forced-command line in the login's
``authorized_keys`` (every other line kept), which runs ``mutualbackup-node serve`` as root (through a
sudo rule for that one command line when the login is not root: backups read every file); and prints the
``host_key:`` and ``node_key:`` lines to paste into the member file. Running it again keeps the
sealing key and changes only what differs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mutualbackup.node.config import (
    CONFIG_FILE, DEFAULT_CONFIG, DEFAULT_STATE, Admin, NodeConfig, config_directory, write_config,
)

COORDINATOR_COMMENT = "mutualbackup-coordinator"
DEFAULT_SUDOERS = "/etc/sudoers.d/mutualbackup-node"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Where root's tools are, whatever PATH the admin's session has (Ansible's over SSH may lack the sbin ones)."""


def only_roots(program: str) -> None:
    """Refuse a program that someone other than root could replace: the sudo rule runs it as root, so whoever may
    write it, or the directory it is in (the link the rule names, and the file it leads to), would be root."""
    import stat

    for path in dict.fromkeys((program, os.path.dirname(program), os.path.realpath(program),
                               os.path.dirname(os.path.realpath(program)))):
        try:
            info = os.stat(path)
        except OSError as exc:
            raise JoinError(f"{path}: {exc.strerror} (the sudo rule would name it)") from None
        sticky_directory = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_uid != 0 or (info.st_mode & 0o022 and not sticky_directory):
            raise JoinError(f"{path} is not root's alone (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): "
                            "the sudo rule runs mutualbackup-node as root, so whoever can replace it would be root. "
                            "Install it where only root can write (chown root, chmod go-w); nothing was installed")


def system_tool(name: str) -> str | None:
    """The absolute path of one of root's tools: the system's directories first, then the session's PATH (never
    the current directory, which an empty PATH entry would mean)."""
    directories = [d for d in (*SYSTEM_PATH.split(":"), *os.environ.get("PATH", "").split(":")) if d.startswith("/")]
    return shutil.which(name, path=":".join(directories))


PROGRAM = "mutualbackup-node"
_SUDOERS_SAFE = re.compile(r"/[A-Za-z0-9/._-]+")
DEFAULT_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


class JoinError(Exception):
    """Why this node could not join (nothing was changed after the first problem found)."""


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mutualbackup-node join", description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, metavar="MEMBER/NODE", help="this node's name in the federation")
    parser.add_argument("--coordinator-key", required=True, metavar="PUBFILE", help="the coordinator's public key")
    parser.add_argument("--member-file", required=True, metavar="FILE", help="the member's file (members/MEMBER.yml)")
    parser.add_argument("--config", metavar="DIR", help="configuration directory (default /etc/mutualbackup-node)")
    parser.add_argument("--state", metavar="DIR", default=DEFAULT_STATE, help=f"root-only state (default {DEFAULT_STATE})")
    parser.add_argument("--host-key", metavar="FILE", default=DEFAULT_HOST_KEY, help="this server's public host key")
    parser.add_argument("--sudoers", metavar="FILE", default=DEFAULT_SUDOERS, help="where the sudo rule goes")
    parser.add_argument("--program", metavar="PATH", help="mutualbackup-node's absolute path (default: this one)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        host_key, node_key, changed = join(args)
    except JoinError as exc:
        print(f"mutualbackup-node join: {exc}", file=sys.stderr)
        return 2
    if not changed:
        print("# nothing changed: this node had already joined so")
    print(f"# paste into the member file, under node {args.node.split('/')[-1]}:")
    print(f"host_key: {host_key}")
    print(f"node_key: {node_key}")
    return 0


def join(args: argparse.Namespace) -> tuple[str, str, bool]:
    """Do the join; (host_key, node_key) to paste, and whether anything changed. JoinError says what is wrong."""
    if os.geteuid() != 0:
        raise JoinError("run it as root (it writes the login's authorized_keys, a sudo rule and root-only keys)")
    member, slug = _split(args.node)
    node, admins = _node_of_member_file(Path(args.member_file), member, slug)
    user = str(node.get("user") or "")
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise JoinError(f"the member file says node {slug} logs in as {user!r}, and there is no such user here") from None
    coordinator_key = _public_key(Path(args.coordinator_key), "the coordinator's key")
    host_key = _public_key(Path(args.host_key), "this server's host key")
    program = os.path.abspath(args.program or _this_program())
    config = NodeConfig(
        member=member, node=slug, user=user,
        authorized_keys=_home(str(node.get("authorized_keys") or "~/.ssh/authorized_keys"), account.pw_dir),
        work=_home(str(node.get("workdir") or "~/.mutualbackup"), account.pw_dir), state=os.path.abspath(args.state),
        borg=str(node.get("borg") or "borg"), storage=str((node.get("storage") or {}).get("path") or ""),
        admins=admins, coordinator_key=coordinator_key, sudo=account.pw_uid != 0, program=program,
    )
    directory = os.path.abspath(config_directory(args.config))
    for path in (program, directory):
        if not _SUDOERS_SAFE.fullmatch(path):
            raise JoinError(f"{path!r}: the forced command and the sudo rule name it, so it may hold only letters, "
                            "digits and / . _ - (install mutualbackup-node, or put its configuration, elsewhere)")
    sudo = None
    if config.sudo:
        only_roots(program)
        sudo = system_tool("sudo")
        if sudo is None:
            raise JoinError(f"{user} is not root, and sudo is not installed: install it (the node program reaches "
                            "root through one sudo rule, for backups that read every file)")
        if not _SUDOERS_SAFE.fullmatch(sudo):
            raise JoinError(f"{sudo!r}: the forced command names sudo, so its path may hold only letters, digits "
                            "and / . _ -")
    watched = (config.authorized_keys, os.path.join(directory, CONFIG_FILE), args.sudoers, config.identity_file,
               config.state, config.work, config.storage)
    before = _footprint(watched)
    node_key = _sealing_key(config)
    for path in (config.work, config.storage):
        if path:
            _owned_directory(path, account)
    if config.sudo:
        _install_sudo_rule(Path(args.sudoers), config, directory)
    _install_forced_line(config, account, forced_command(config, directory, sudo))
    write_config(config, directory)
    return host_key, node_key, _footprint(watched) != before


def _footprint(paths: tuple[str, ...]) -> list[tuple[object, ...]]:
    """What join may change of ``paths``: mode, owner, content."""
    found: list[tuple[object, ...]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            found.append((path, None))
            continue
        content = Path(path).read_bytes() if os.path.isfile(path) else b""
        found.append((path, st.st_mode, st.st_uid, st.st_gid, content))
    return found


def _split(name: str) -> tuple[str, str]:
    from mutualbackup.inventory.value_checks import check_slug

    member, sep, slug = name.partition("/")
    try:
        if not sep:
            raise ValueError("expected MEMBER/NODE")
        return check_slug(member), check_slug(slug)
    except ValueError as exc:
        raise JoinError(f"--node {name!r}: {exc}") from None


def _node_of_member_file(path: Path, member: str, slug: str) -> tuple[dict[str, Any], tuple[Admin, ...]]:
    """This node's entry in the member file, and the member's admins (checked as the inventory checks them)."""
    import yaml

    from mutualbackup.inventory.value_checks import check_admin_key, check_signing_key

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise JoinError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("member") != member:
        raise JoinError(f"{path} is not the file of member {member} (it must say `member: {member}`)")
    nodes = [n for n in document.get("nodes") or [] if isinstance(n, dict) and n.get("name") == slug]
    if len(nodes) != 1:
        raise JoinError(f"{path} has no node named {slug}")
    admins = []
    for entry in document.get("admins") or []:
        try:
            admins.append(Admin(str(entry["name"]), check_signing_key(check_admin_key(str(entry["key"])))))
        except (KeyError, TypeError, ValueError) as exc:
            raise JoinError(f"{path}: admin {entry.get('name', '?') if isinstance(entry, dict) else '?'} cannot be "
                            f"pinned: {exc}") from None
    if not admins:
        raise JoinError(f"{path} names no admins: the member's admins sign its file and open its recovery kits")
    return nodes[0], tuple(admins)


def _public_key(path: Path, what: str) -> str:
    from mutualbackup.inventory.value_checks import check_host_key

    try:
        return check_host_key(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        raise JoinError(f"cannot read {what} from {path}: {exc}") from None


def _this_program() -> str:
    found = Path(sys.argv[0])
    return str(found if found.is_absolute() else Path.cwd() / found)


def _home(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home.rstrip("/") + path[1:]
    return path


def _sealing_key(config: NodeConfig) -> str:
    """The node's age identity, made once in the root-only state directory; its public key (``age1…``)."""
    from pyrage import x25519

    os.makedirs(config.state, mode=0o700, exist_ok=True)
    os.chmod(config.state, 0o700)
    path = Path(config.identity_file)
    if not path.exists():
        identity = x25519.Identity.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(str(identity) + "\n")
    identity = x25519.Identity.from_str(path.read_text(encoding="ascii").strip())
    return str(identity.to_public())


def _owned_directory(path: str, account: pwd.struct_passwd) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(path, 0o700)


def forced_command(config: NodeConfig, directory: str, sudo: str | None = None) -> str:
    """What sshd runs for the coordinator's key, whatever it asks. When the login is not root, the one sudo rule's
    command line itself, through ``sudo`` (its absolute path): ``/usr/bin/sudo -n -- PROGRAM serve --config DIR``,
    so that no program of ours starts as the login only to hand over (``cli.to_root`` still does for a line written
    before). As root: ``mutualbackup-node serve`` (its absolute path when the program is not the one on the PATH;
    ``--config`` when the directory is not the default)."""
    if config.sudo and sudo is not None:
        return f"{sudo} -n -- {config.program} serve --config {directory}"
    on_path = shutil.which(PROGRAM)
    program = PROGRAM if on_path and os.path.realpath(on_path) == os.path.realpath(config.program) else config.program
    return f"{program} serve" + (f" --config {directory}" if directory != DEFAULT_CONFIG else "")


def _install_forced_line(config: NodeConfig, account: pwd.struct_passwd, command: str) -> None:
    """The coordinator's line first in the login's ``authorized_keys``; any older line of that key replaced."""
    from mutualbackup import borg

    path = Path(config.authorized_keys)
    key_data = config.coordinator_key.split()[1]
    line = borg.forced_command_line(command, config.coordinator_key, COORDINATOR_COMMENT)
    current = path.read_text(encoding="utf-8", errors="surrogateescape") if path.exists() else ""
    kept = [ln for ln in current.split("\n") if ln and key_data not in ln.split()]
    wanted = "\n".join([line, *kept]) + "\n"
    if wanted == current:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent == Path(account.pw_dir) / ".ssh":
        os.chown(path.parent, account.pw_uid, account.pw_gid)
        os.chmod(path.parent, 0o700)
    fd, temporary = tempfile.mkstemp(prefix=".mutualbackup-tmp.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(wanted)
    os.chown(temporary, account.pw_uid, account.pw_gid)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def sudo_rule(config: NodeConfig, directory: str) -> str:
    """The one sudo rule: the login may run ``mutualbackup-node serve --config DIR`` as root, with exactly
    these arguments (sudo matches them whole), and nothing else. sudo keeps ``SSH_ORIGINAL_COMMAND`` for that
    program alone (``join``, run through sudo by an admin, ignores it): what the coordinator asked sshd to run,
    a hint of the request to come (``node/preload.py``)."""
    return (f'Defaults!{config.program} env_keep += "SSH_ORIGINAL_COMMAND"\n'  # (sudo takes no arguments here)
            f"{config.user} ALL=(root) NOPASSWD: {config.program} serve --config {directory}\n")


def _install_sudo_rule(path: Path, config: NodeConfig, directory: str) -> None:
    rule = sudo_rule(config, directory)
    if path.exists() and path.read_text(encoding="utf-8") == rule:
        return
    visudo = system_tool("visudo")
    if visudo is None:
        raise JoinError("visudo is not installed (it comes with sudo): install sudo; nothing was installed")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".mutualbackup-tmp.", dir=path.parent)  # sudo skips names with a dot
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(rule)
        os.chmod(temporary, 0o440)
        checked = subprocess.run([visudo, "-cf", temporary], capture_output=True, text=True)
        if checked.returncode != 0:
            raise JoinError(f"the sudo rule does not check ({checked.stdout.strip()} {checked.stderr.strip()}); "
                            "nothing was installed")
        os.replace(temporary, path)
    except BaseException:  # an interrupted join leaves nothing half-written in sudoers.d
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
