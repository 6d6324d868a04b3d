"""The small POSIX ``sh`` programs a restore runs on nodes, as argv: the delegated client on the
destination (temporary key on stdin, the gate, the passphrase on fd 3), and the host's session that
holds a temporary ``authorized_keys`` line. Pure: nothing here starts a process; tests assert the argv
and run the programs on real files.

Neither the temporary key nor the passphrase is ever in argv, in an environment value, or on a disk
of the coordinator: both travel on the SSH channel's stdin (see ARCHITECTURE.md, "Restores").
"""

from __future__ import annotations

import datetime as dt
import posixpath
import shlex
from dataclasses import dataclass
from typing import Sequence

from mutualbackup.borg import RESTORE_COMMENT_PREFIX, RESTORE_LINE_LIFETIME, base_env, ssh_words

PASSPHRASE_FD = 3


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
