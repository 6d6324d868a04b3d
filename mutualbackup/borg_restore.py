"""Argv, environment, ``authorized_keys`` lines and output parsing for restores, drills and key export.

Pure, like :mod:`mutualbackup.borg` (which it extends without editing): nothing
here starts a process. Tests assert the exact argv.

Two ways borg reaches a repository for a restore:

- *as the source*: on the source node itself, with its own key and its 0600
  passphrase file (:func:`mutualbackup.borg.client_env`);
- *delegated*: on any other node (or on a rebuilt source), with a temporary key
  made in the coordinator's memory and sent on the SSH channel's stdin into a 0700
  temporary directory of that node (:class:`TemporaryPaths`), which the replica's
  host accepts through a temporary restricted line (:func:`restore_line`, held by
  :func:`grant_session_argv`), and the passphrase read by borg from file
  descriptor 3, the rest of that stdin (:func:`delegated_argv`). Neither is ever in
  argv, in an environment value, or on a disk of the coordinator.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from mutualbackup.borg import LOCK_WAIT, archive_path, base_env, ssh_words
from mutualbackup.inventory.value_checks import check_line

RESTORE_COMMENT_PREFIX = "mutualbackup-restore:"
"""Comment of a temporary restore line: ``mutualbackup-restore:SOURCE:ID``."""

RESTORE_LINE_LIFETIME = dt.timedelta(hours=6)
"""A temporary line expires (``expiry-time``) this long after it was written; ``apply`` then drops it.

Borg opens its SSH connection at the start of a list, extract or key import, so
only the start of a restore must fall within this time, not its end.
"""

RESTORE_QUOTA = "10M"
"""Storage quota of a temporary line: borg's minimum. Reads are unaffected; a
repository already larger than this refuses every write through that key."""

PASSPHRASE_FD = 3

_ID = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{4,32}\Z")


# --- the temporary authorisation ------------------------------------------------------


def new_restore_id(now: dt.datetime, token: str) -> str:
    """``YYYYMMDDTHHMMSSZ-TOKEN``: when it was made (UTC) and a random hex token."""
    if not re.fullmatch(r"[0-9a-f]{4,32}", token):
        raise ValueError(f"the token must be 4 to 32 lowercase hex digits, got {token!r}")
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{token}"


def restore_comment(source: str, restore_id: str) -> str:
    return f"{RESTORE_COMMENT_PREFIX}{source}:{restore_id}"


def restore_line(borg: str, repository: str, public_key: str, source: str, restore_id: str) -> str:
    """The temporary ``authorized_keys`` line letting a restore key read ``repository``.

    Same forced command as a replica line (one repository, append-only) with the
    smallest quota borg accepts, ``restrict``, and ``expiry-time`` so that sshd
    itself refuses the key once :data:`RESTORE_LINE_LIFETIME` has passed, even if
    the coordinator died before removing the line. A control character in any part
    (a newline would start another, unrestricted line) is a ValueError.
    """
    for part in (borg, repository, public_key, source, restore_id):
        check_line(part)
    created = restore_id_time(restore_id)
    if created is None:
        raise ValueError(f"not a restore id: {restore_id!r}")
    expires = created + RESTORE_LINE_LIFETIME
    command = shlex.join(
        [borg, "serve", "--restrict-to-repository", repository, "--append-only", "--storage-quota", RESTORE_QUOTA]
    ).replace('"', '\\"')
    key_type, key_data = public_key.split()[:2]
    return (
        f'command="{command}",restrict,expiry-time="{expires:%Y%m%d%H%M%S}Z" '
        f"{key_type} {key_data} {restore_comment(source, restore_id)}"
    )


def restore_id_time(restore_id: str) -> dt.datetime | None:
    """When a restore id was made (UTC), or None when it is not one."""
    match = _ID.match(restore_id)
    if match is None:
        return None
    try:
        return dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:  # digits that are no date (month 13...): not one of ours
        return None


@dataclass(frozen=True)
class RestoreLine:
    source: str
    restore_id: str
    created: dt.datetime | None  # None when the id does not parse (then it is treated as stale)


def parse_restore_line(line: str) -> RestoreLine | None:
    """The source and id of a temporary restore line, or None for any other line."""
    comment = line.rsplit(" ", 1)[-1]
    if not comment.startswith(RESTORE_COMMENT_PREFIX):
        return None
    source, _, restore_id = comment[len(RESTORE_COMMENT_PREFIX):].rpartition(":")
    return RestoreLine(source, restore_id, restore_id_time(restore_id))


def is_stale_restore_line(line: str, now: dt.datetime) -> bool:
    """True for a restore line past its lifetime (or with an unreadable id); False for other lines."""
    parsed = parse_restore_line(line)
    if parsed is None:
        return False
    return parsed.created is None or now - parsed.created >= RESTORE_LINE_LIFETIME


def live_restore_lines(lines: Iterable[str], now: dt.datetime) -> list[str]:
    """The restore lines among ``lines`` that are still within their lifetime (``apply`` keeps those)."""
    return [line for line in lines if parse_restore_line(line) is not None and not is_stale_restore_line(line, now)]


def with_restore_line(lines: Sequence[str], new: str, now: dt.datetime) -> list[str]:
    """Managed lines with ``new`` added and stale restore lines dropped.

    The reference for the host's own edit (:func:`add_line_argv`), which tests compare with it.
    """
    return [line for line in lines if not is_stale_restore_line(line, now) and line != new] + [new]


# --- the delegated client --------------------------------------------------------------


@dataclass(frozen=True)
class TemporaryPaths:
    """The temporary directory of a delegated restore on the destination (mode 0700)."""

    directory: str

    @property
    def key(self) -> str:
        return posixpath.join(self.directory, "id_ed25519")

    @property
    def known_hosts(self) -> str:
        return posixpath.join(self.directory, "known_hosts")

    @property
    def base_dir(self) -> str:
        return posixpath.join(self.directory, "borg")

    @property
    def gate(self) -> str:
        return posixpath.join(self.directory, "gate")


TARGET_UNUSABLE = 201
"""Exit code of the scripts below when the target or temporary directory cannot be created."""
TARGET_NOT_EMPTY = 202
"""Exit code of the scripts below when the target directory is not empty (and not forced)."""

_EXPAND = 'case "$1" in "~") w=$HOME ;; "~/"*) w=$HOME/${1#"~/"} ;; *) w=$1 ;; esac'
_TARGET = (
    'if [ -n "$2" ]; then mkdir -p -- "$2" || exit 201; '
    'if [ "$3" != force ]; then l=$(ls -A -- "$2") || exit 201; [ -z "$l" ] || exit 202; fi; fi'
)


def prepare_then_exec(directory: str, force: bool, argv: Sequence[str]) -> tuple[str, ...]:
    """Run ``argv`` in ``directory``, created first; exit 202 when it is not empty (unless ``force``).

    Lets a restore onto the source itself check its target and extract in one round trip.
    """
    script = 'set -- "" "$@"; ' + _TARGET + '; d=$2; shift 3; cd -- "$d" || exit 201; exec "$@"'
    return ("sh", "-c", script, "sh", directory, "force" if force else "empty", *argv)


BLOCK_DAMAGED = 3
"""Exit code of :func:`add_line_argv` when the managed block's markers are not one ordered pair."""

_ADD_LINE_AWK = r"""
function stale(l,    n, f, id) {
    n = split(l, f, " ")
    if (index(f[n], prefix) != 1) return 0
    id = f[n]; sub(/.*:/, "", id)
    if (length(id) > 49 || id !~ /^[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]+$/) return 1
    return substr(id, 1, 16) <= cutoff
}
BEGIN { line = ARGV[1]; begin = ARGV[2]; end = ARGV[3]; ARGV[1] = ARGV[2] = ARGV[3] = ""; inside = 0; n = 0 }
$0 == begin { b++; if (e || b > 1) bad = 1; inside = 1; out[++n] = $0; next }
$0 == end { e++; if (!b || e > 1) bad = 1; if (inside) out[++n] = line; inside = 0; out[++n] = $0; next }
inside && ($0 == line || stale($0)) { next }
{ out[++n] = $0 }
END {
    if (bad || b != e) exit 3
    if (!b) { out[++n] = begin; out[++n] = line; out[++n] = end }
    for (i = 1; i <= n; i++) print out[i]
}
"""


_LINE_FUNCTIONS = "\n".join([
    _EXPAND,
    "umask 077",
    "add() {",
    '  d=$(dirname -- "$w") && { [ -d "$d" ] || mkdir -p -m 700 -- "$d"; } || return 1',
    '  if [ -e "$w" ]; then src=$w; else src=/dev/null; fi',
    '  t=$(mktemp "$d/.mutualbackup-tmp.XXXXXX") || return 1',
    '  LC_ALL=C awk -v prefix="$6" -v cutoff="$7" "$2" "$3" "$4" "$5" "$src" > "$t"; rc=$?',
    '  if [ "$rc" -ne 0 ]; then rm -f -- "$t"; return "$rc"; fi',
    '  chmod 600 "$t" && mv -f -- "$t" "$w"',
    "}",
    "remove() {",
    '  [ -e "$w" ] || return 0',
    '  t=$(mktemp "$(dirname -- "$w")/.mutualbackup-tmp.XXXXXX") || return 1',
    # awk in the C locale: every other byte kept, whatever the file holds (grep -v would
    # print "binary file matches" instead of a line that is not UTF-8, or of a file with a NUL)
    '  LC_ALL=C awk \'BEGIN { line = ARGV[1]; ARGV[1] = "" } $0 == line { found = 1; next } { print } '
    'END { exit found ? 0 : 10 }\' "$3" "$w" > "$t"; rc=$?',
    '  if [ "$rc" -ne 0 ]; then rm -f -- "$t"; [ "$rc" -eq 10 ] && return 0; return "$rc"; fi',
    '  chmod 600 "$t" && mv -f -- "$t" "$w"',
    "}",
])

LINE_ADDED = "mutualbackup: restore line added"
"""What :func:`grant_session_argv` prints on stderr once its line is in place."""


def _line_args(path: str, line: str, begin: str, end: str, now: dt.datetime) -> tuple[str, ...]:
    cutoff = f"{(now - RESTORE_LINE_LIFETIME).astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    return (path, _ADD_LINE_AWK, line, begin, end, RESTORE_COMMENT_PREFIX, cutoff)


def add_line_argv(path: str, line: str, begin: str, end: str, now: dt.datetime) -> tuple[str, ...]:
    """Add ``line`` at the end of the managed block of the file at ``path``, in one round trip.

    The same edit as :func:`with_restore_line` through :func:`mutualbackup.jobs.provision.replace_block`,
    done on the host: restore lines past their lifetime at ``now`` are dropped from
    the block, the block is appended when the file has none (the file is created
    when missing), every line outside the block stays. The file is replaced
    atomically (temporary file, mode 0600, rename). Exit :data:`BLOCK_DAMAGED`,
    changing nothing, when the markers are not exactly one ordered pair.
    """
    return ("sh", "-c", _LINE_FUNCTIONS + '\nadd "$@"', "sh", *_line_args(path, line, begin, end, now))


def remove_line_argv(path: str, line: str) -> tuple[str, ...]:
    """Remove the exact ``line`` from the file at ``path`` (``~`` expanded there) in one round trip.

    Every other byte stays; the file is replaced atomically (temporary file, then
    rename) and only when the line is present.
    """
    return ("sh", "-c", _LINE_FUNCTIONS + '\nremove "$@"', "sh", path, "", line)


def grant_session_argv(path: str, line: str, begin: str, end: str, now: dt.datetime) -> tuple[str, ...]:
    """Add ``line`` (as :func:`add_line_argv`), hold it while the session lasts, then remove it.

    Prints :data:`LINE_ADDED` on stderr once the line is in place, then waits for
    a line on stdin or its end: the coordinator's word, or its connection
    closing (a coordinator killed mid-restore: at once when its process dies, when
    TCP gives up if its machine lost power), or a TERM/HUP/INT (the remote
    ``timeout``, after :data:`RESTORE_LINE_LIFETIME`, when sshd's ``expiry-time``
    has made the line useless anyway). Then removes the line (as
    :func:`remove_line_argv`) and exits with that removal's status.
    """
    script = "\n".join([
        _LINE_FUNCTIONS,
        "trap '' PIPE",
        'add "$@" || exit $?',
        "trap 'remove \"$@\"; exit $?' TERM HUP INT",
        f'echo "{LINE_ADDED}" >&2',
        "IFS= read -r done",
        "trap - TERM HUP INT",
        'remove "$@"',
    ])
    return ("sh", "-c", script, "sh", *_line_args(path, line, begin, end, now))


def read_passphrase_argv(workdir: str) -> tuple[str, ...]:
    """``cat`` of ``WORKDIR/passphrase`` (``~`` expanded on the node); its stdout is the secret."""
    return ("sh", "-c", _EXPAND + '; exec cat -- "$w/passphrase"', "sh", workdir)


def remove_temporary_dir_argv(directory: str) -> tuple[str, ...]:
    """``rm -rf`` of a temporary directory, refusing anything not named like one."""
    script = 'case "$1" in */restore-*.*|*/drill-*.*) exec rm -rf -- "$1" ;; *) echo "refusing to remove $1" >&2; exit 2 ;; esac'
    return ("sh", "-c", script, "sh", directory)


TEMPORARY_REMOVED = b"mutualbackup: temporary directory removed\n"
"""What :func:`delegated_argv` prints last on stdout once its temporary directory is gone."""

UNREACHABLE = (255, 80, 81, 87)
"""borg exit codes meaning the repository's host could not be reached (or the
connection to it broke): a restore may try the next replica."""

_DELEGATED = "\n".join([
    'd=$1 k=$2 t=$3 f=$4 p=$5 g=$6 gp=; shift 6',
    "umask 077",
    'if [ -n "$t" ]; then mkdir -p -- "$t" || exit 201; '
    'if [ "$f" != force ]; then l=$(ls -A -- "$t") || exit 201; [ -z "$l" ] || exit 202; fi; '
    'cd -- "$t" || exit 201; fi',
    'mkdir -p -m 700 -- "${d%/*}" && rm -rf -- "$d" && mkdir -m 700 -- "$d" || exit 201',
    'IFS= read -r key || { rm -rf -- "$d"; exit 201; }',
    'printf "%s\\n" "$key" | base64 -d > "$d/id_ed25519" && printf %s "$k" > "$d/known_hosts" '
    '|| { rm -rf -- "$d"; exit 201; }',
    "key=",
    # the gate: the next line of stdin ("go", or anything else to refuse), handed to ssh through a FIFO
    'if [ "$g" = gate ]; then',
    '  mkfifo -m 600 "$d/gate" || { rm -rf -- "$d"; exit 201; }',
    '  exec 4<&0',
    '  { if IFS= read -r go <&4; then printf "%s\\n" "$go"; else echo closed; fi > "$d/gate"; } &',
    '  gp=$!',
    '  exec 4<&-',
    'fi',
    'if [ "$p" = fd3 ]; then exec 3<&0 </dev/null; fi',
    '"$@"; rc=$?',
    'exec 3<&-',
    'if [ -n "$gp" ]; then kill "$gp" 2>/dev/null; fi',
    'rm -rf -- "$d" && printf "%s\\n" "' + TEMPORARY_REMOVED.decode().rstrip("\n") + '"',
    'exit $rc',
])

_GATED_SSH = (
    'IFS= read -r go < "$0" && [ "$go" = go ] && exec "$@"; '
    'echo "mutualbackup: the restore was not authorised on the repository host" >&2; exit 255'
)

def gated_command(gate: str, words: Sequence[str]) -> list[str]:
    """``words`` run once the FIFO ``gate`` says ``go``; exit 255 (as ssh does when it cannot connect) otherwise."""
    return ["sh", "-c", _GATED_SSH, gate, *words]


GATE_OPEN = b"go\n"
"""The stdin line of a gated :func:`delegated_argv` letting borg's ssh connect."""
GATE_REFUSED = b"no\n"


def delegated_argv(
    tmp: TemporaryPaths, known_hosts: str, argv: Sequence[str], *, target: tuple[str, bool] | None = None,
    passphrase_on_fd3: bool = True, gated: bool = False,
) -> tuple[str, ...]:
    """Run borg's ``argv`` on a restore's destination with a temporary key, in one round trip.

    What the command reads on stdin: first one line, the private key (base64 of
    its OpenSSH file), written into the new 0700 directory ``tmp`` with the
    pinned ``known_hosts``; with ``gated``, then a line :data:`GATE_OPEN` that
    lets borg's ssh connect (see :func:`delegated_env`: borg starts at once and
    its ssh waits for it, so the host's line can be written meanwhile; any
    other line, or the end of stdin, makes ssh fail); then the rest, which borg
    reads as fd 3 (the passphrase; with ``passphrase_on_fd3``) or as its own
    stdin (``borg key import -``). With ``target`` = (directory, force) the
    directory is checked first (created; exit 202 when not empty unless forced)
    and borg runs there. ``tmp`` is removed when borg ends, and
    :data:`TEMPORARY_REMOVED` printed last on stdout then; it stays only when
    the command itself is killed. Exit 201: a directory could not be made.
    """
    directory, force = target if target is not None else ("", False)
    return (
        "sh", "-c", _DELEGATED, "sh", tmp.directory, known_hosts, directory, "force" if force else "empty",
        "fd3" if passphrase_on_fd3 else "stdin", "gate" if gated else "open", *argv,
    )


def delegated_env(tmp: TemporaryPaths, *, gated: bool = False) -> dict[str, str]:
    """Environment of borg on a destination: the temporary key, pinned hosts, passphrase on fd 3.

    With ``gated``, borg's ssh first waits for the gate of :func:`delegated_argv`.
    """
    words = ssh_words(tmp.key, tmp.known_hosts)
    if gated:
        words = gated_command(tmp.gate, words)
    env = base_env()
    env.update({"BORG_RSH": shlex.join(words), "BORG_BASE_DIR": tmp.base_dir, "BORG_PASSPHRASE_FD": str(PASSPHRASE_FD)})
    return env


# --- argv ---------------------------------------------------------------------------


def path_pattern(path: str, *, exact: bool = False) -> str:
    """A path as a literal borg pattern, so that ``re:x`` or ``sh:*`` in a name stay literal.

    ``pp:`` (the path and everything under it) by default; ``pf:`` (exactly that
    path, a dictionary lookup in borg, fast for hundreds of sampled files) with ``exact``.
    """
    return ("pf:" if exact else "pp:") + archive_path(path)


def extract_argv(
    borg: str,
    url: str,
    archive: str,
    paths: Sequence[str] = (),
    *,
    dry_run: bool = False,
    progress: bool = True,
    exact: bool = False,
) -> tuple[str, ...]:
    """``borg extract`` into the current directory, logging JSON lines on stderr.

    ``--list`` names every item (counted as files), ``--progress`` reports bytes.
    ``paths`` are absolute or archive paths, passed as literal patterns.
    """
    argv: list[str] = [borg, "extract", "--lock-wait", str(LOCK_WAIT), "--log-json", "--list"]
    if dry_run:
        argv.append("--dry-run")
    if progress:
        argv.append("--progress")
    argv.append(f"{url}::{archive}")
    if paths:
        argv.append("--")
        argv += [path_pattern(p, exact=exact) for p in paths]
    return tuple(argv)


CATALOGUE_FORMAT = "{mode}{NUL}{size}{NUL}{path}{NUL}"
HASH_FORMAT = "{type}{mode}{path}{size}{mtime}{linktarget}{source}{sha256}"


def catalogue_argv(borg: str, url: str, archive: str) -> tuple[str, ...]:
    """``borg list`` of every item as NUL-separated ``mode size path`` (compact, any file name)."""
    return (borg, "list", "--lock-wait", str(LOCK_WAIT), "--format", CATALOGUE_FORMAT, f"{url}::{archive}")


def hashes_argv(borg: str, url: str, archive: str, paths: Sequence[str]) -> tuple[str, ...]:
    """``borg list --json-lines`` of exactly ``paths``, with each file's sha256.

    Hashing reads (and authenticates) the files' data from the repository, so it
    is asked only for a drill's bounded sample.
    """
    return (
        borg, "list", "--lock-wait", str(LOCK_WAIT), "--json-lines", "--format", HASH_FORMAT, f"{url}::{archive}",
        "--", *(path_pattern(p, exact=True) for p in paths),
    )


def key_export_argv(borg: str, url: str) -> tuple[str, ...]:
    """``borg key export`` to stdout: the repository key, still encrypted by the passphrase."""
    return (borg, "key", "export", url)


def key_import_argv(borg: str, url: str) -> tuple[str, ...]:
    """``borg key import`` from stdin: restores a damaged repository key from an export."""
    return (borg, "key", "import", url, "-")


# --- parsing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One item of ``borg list --json-lines``."""

    path: str  # archive form: no leading slash
    type: str  # "-" file, "d" directory, "l" symlink, "h" hardlink, ...
    mode: str  # "-rw-r--r--"
    size: int
    mtime: float  # seconds since the epoch (borg ran with TZ=UTC)
    linktarget: str = ""
    source: str = ""  # hardlink master, or symlink target
    sha256: str = ""

    @property
    def permissions(self) -> int:
        """The permission bits (with setuid, setgid and sticky) of ``mode``."""
        return mode_bits(self.mode)


def parse_items(stdout: bytes) -> list[Item]:
    """Items of ``borg list --json-lines``; ValueError when a line is not an item."""
    items = []
    for number, raw in enumerate(stdout.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw.decode("utf-8"))
            when = dt.datetime.fromisoformat(data["mtime"])
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            items.append(
                Item(
                    path=data["path"],
                    type=data["type"],
                    mode=data["mode"],
                    size=int(data.get("size") or 0),
                    mtime=when.timestamp(),
                    linktarget=data.get("linktarget") or "",
                    source=data.get("source") or "",
                    sha256=data.get("sha256") or "",
                )
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"borg list printed an unexpected line {number}: {exc}") from None
    return items


@dataclass(frozen=True)
class Entry:
    """One item of :func:`catalogue_argv`: ``kind`` is the first letter of its mode."""

    kind: str  # "-" file, "d" directory, "l" symlink, "h" hardlink to an earlier file, ...
    size: int
    path: str


def parse_catalogue(stdout: bytes) -> list[Entry]:
    """Entries of :func:`catalogue_argv`'s output; ValueError when it does not parse."""
    fields = stdout.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 3:
        raise ValueError("borg list printed an incomplete item list")
    entries = []
    for i in range(0, len(fields), 3):
        mode, size, path = fields[i : i + 3]
        try:
            entries.append(Entry(mode[:1].decode("ascii"), int(size), path.decode("utf-8", "surrogateescape")))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"borg list printed an unexpected item: {fields[i:i + 3]!r}") from None
    return entries


def mode_bits(mode: str) -> int:
    """``-rwsr-x--T`` → 0o5754: the permission bits of an ``ls``-style mode string."""
    if len(mode) != 10:
        raise ValueError(f"not a mode string: {mode!r}")
    bits = 0
    for index, char in enumerate(mode[1:]):
        shift = 8 - index
        if char in "rwxst":
            bits |= 1 << shift
    special = {3: 0o4000, 6: 0o2000, 9: 0o1000}
    for index, flag in special.items():
        if mode[index] in "sStT":
            bits |= flag
    return bits


@dataclass
class ExtractProgress:
    """What ``borg extract --log-json --list --progress`` has said so far (fed line by line)."""

    files: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    listed: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # borg's own log lines (warnings, errors), and non-JSON lines
    keep_listed: bool = False
    opened: bool = False  # borg reported on the archive: its connection to the repository is up

    def feed(self, line: str) -> bool:
        """Take one stderr line; True when it changed the progress (files or bytes)."""
        if not line.strip():
            return False
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.messages.append(line)
            return False
        if not isinstance(event, dict):
            self.messages.append(line)
            return False
        kind = event.get("type")
        if kind == "log_message" and event.get("name") == "borg.output.list":
            self.opened = True
            self.files += 1
            if self.keep_listed:
                self.listed.append(str(event.get("message", "")))
            return True
        if kind == "progress_percent":
            self.opened = True
            if event.get("total"):
                self.bytes_total = int(event["total"])
            if event.get("current") is not None:
                self.bytes_done = int(event["current"])
            if event.get("finished") and self.bytes_total:
                self.bytes_done = self.bytes_total
                return True
            return event.get("current") is not None
        if kind == "log_message":
            level = event.get("levelname", "")
            self.messages.append(f"{level}: {event.get('message', '')}" if level not in ("INFO", "") else str(event.get("message", "")))
            return False
        if kind in ("progress_message",):
            return False
        self.messages.append(line)
        return False

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.messages[-lines:])


def parse_key_export(stdout: bytes) -> tuple[str, str]:
    """(repository id, key text) of ``borg key export``; ValueError when it is not one."""
    text = stdout.decode("utf-8", "replace")
    first = text.splitlines()[0] if text.strip() else ""
    parts = first.split()
    if len(parts) != 2 or parts[0] != "BORG_KEY" or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
        raise ValueError("borg key export did not print a key (expected a first line 'BORG_KEY <repository id>')")
    return parts[1], text if text.endswith("\n") else text + "\n"


# --- borg's errors, for a tired operator ---------------------------------------------------

EXTRA_HINTS: dict[int, str] = {
    31: "that archive does not exist in this repository: see `mutualbackup archives SOURCE`",
    44: "the repository's own key is missing: restore with --recovery FILE (it holds an exported copy)",
    90: "data integrity error: the repository is damaged on the host",
    91: "data integrity error: the repository is damaged on the host",
    92: "data integrity error: the repository is damaged on the host",
}


def hint(code: int) -> str:
    """What borg's exit ``code`` means for a restore or a drill (falls back to borg.exit_hint)."""
    from mutualbackup.borg import exit_hint

    return EXTRA_HINTS.get(code) or exit_hint(code)


def error_lines(text: str, lines: int = 6) -> str:
    """The informative end of borg's stderr: no traceback frames, no platform report, no argv dump."""
    kept: list[str] = []
    for line in text.splitlines():
        if line.startswith("Platform: "):
            break  # borg's report after an error: platform, versions, PID, CWD, sys.argv...
        stripped = line.strip()
        if not stripped or line.startswith(("Traceback ", "  File ", "    ")) or stripped.startswith("^"):
            continue
        kept.append(stripped)
    return "\n".join(kept[-lines:])
