"""The lines of a host's ``authorized_keys`` that let a key reach one repository, and the managed block.

Every line has the same forced command (``borg serve --restrict-to-repository PATH
--append-only --storage-quota Q``) and ``restrict``; :func:`forced_command_line` is the only
place a command is escaped into ``command="…"``. A replica's line stays (``apply``); a
restore's temporary line expires (``expiry-time``, and the restore withdraws it). Pure.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from dataclasses import dataclass
from typing import Iterable, Sequence

from mutualbackup.errors import OperationFailed
from mutualbackup.inventory.value_checks import check_line


BEGIN = "# BEGIN mutualbackup: managed by the coordinator, edits inside this block are overwritten"
END = "# END mutualbackup"

MIN_QUOTA = 10 * 1024**3
"""The smallest storage quota of a replica line (see :func:`replica_quota`)."""
QUOTA_FACTOR = 2
"""A replica's quota is this many times its size (room to grow)."""


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

_ID = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{4,32}\Z")


def replica_quota(size: int, capacity: int) -> int:
    """The storage quota of one replica: twice its size (room to grow), at least 10 GiB, at most the host."""
    return min(capacity, max(MIN_QUOTA, QUOTA_FACTOR * size))


def serve_command(borg: str, repository: str, quota: int | str) -> str:
    """The forced command of an ``authorized_keys`` line, as the host's shell will run it."""
    return shlex.join(
        [borg, "serve", "--restrict-to-repository", repository, "--append-only", "--storage-quota", str(quota)]
    )


def forced_command_line(command: str, public_key: str, comment: str, *, options: str = "restrict") -> str:
    """``command="COMMAND",OPTIONS TYPE BASE64 COMMENT``: the one place a command is put in quotes.

    Inside ``command="…"`` OpenSSH treats only ``\\"`` specially, so double quotes of the
    (already shell-quoted) command are escaped and nothing else. A control character in any
    part (a newline would start another, unrestricted line) is a ValueError.
    """
    for part in (command, public_key, comment, options):
        check_line(part)
    key_type, key_data = public_key.split()[:2]
    escaped = command.replace('"', '\\"')
    return f'command="{escaped}",{options} {key_type} {key_data} {comment}'


def authorized_keys_line(borg: str, repository: str, quota: int, public_key: str, comment: str) -> str:
    """One line that lets ``public_key`` reach only ``repository``, append-only, within ``quota`` bytes."""
    check_line(borg)
    check_line(repository)
    return forced_command_line(serve_command(borg, repository, quota), public_key, comment)


def new_restore_id(now: dt.datetime, token: str) -> str:
    """``YYYYMMDDTHHMMSSZ-TOKEN``: when it was made (UTC) and a random hex token."""
    if not re.fullmatch(r"[0-9a-f]{4,32}", token):
        raise ValueError(f"the token must be 4 to 32 lowercase hex digits, got {token!r}")
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{token}"


def restore_comment(source: str, restore_id: str) -> str:
    return f"{RESTORE_COMMENT_PREFIX}{source}:{restore_id}"


def restore_line(borg: str, repository: str, public_key: str, source: str, restore_id: str) -> str:
    """The temporary line letting a restore key read ``repository``.

    Same forced command as a replica line (one repository, append-only) with the smallest
    quota borg accepts, ``restrict``, and ``expiry-time`` so that sshd itself refuses the key
    once :data:`RESTORE_LINE_LIFETIME` has passed, even if the coordinator died before
    removing the line. A control character in any part is a ValueError.
    """
    for part in (borg, repository, source, restore_id):
        check_line(part)
    created = restore_id_time(restore_id)
    if created is None:
        raise ValueError(f"not a restore id: {restore_id!r}")
    expires = created + RESTORE_LINE_LIFETIME
    return forced_command_line(serve_command(borg, repository, RESTORE_QUOTA), public_key,
                               restore_comment(source, restore_id),
                               options=f'restrict,expiry-time="{expires:%Y%m%d%H%M%S}Z"')


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


def render_block(lines: Sequence[str]) -> list[str]:
    return [BEGIN, *lines, END] if lines else []


class DamagedBlock(OperationFailed):
    """The BEGIN/END markers of an authorized_keys file are not exactly one ordered pair."""


def _block_bounds(parts: list[str]) -> tuple[int, int] | None:
    """Indexes of the BEGIN and END lines, None when the file has no block.

    Raises DamagedBlock when the markers are not exactly one ordered pair: guessing
    could leave old forced-command lines active, or swallow a member's own keys.
    """
    begins = [i for i, line in enumerate(parts) if line == BEGIN]
    ends = [i for i, line in enumerate(parts) if line == END]
    if not begins and not ends:
        return None
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return begins[0], ends[0]
    raise DamagedBlock(
        f"the mutualbackup block is damaged ({len(begins)} BEGIN and {len(ends)} END marker lines, "
        "which must be exactly one pair in that order): fix the file by hand; nothing was changed"
    )


def replace_block(text: str, lines: Sequence[str]) -> str:
    """``text`` with its managed block replaced by ``lines`` (block added at the end when absent).

    Lines outside the block are kept byte for byte (only ``\n`` separates lines, so
    CRLF or unusual characters survive). An empty ``lines`` removes the block.
    Raises DamagedBlock when the markers are broken.
    """
    parts = text.split("\n")
    bounds = _block_bounds(parts)
    block = render_block(lines)
    if bounds is not None:
        start, end = bounds
        return "\n".join(parts[:start] + block + parts[end + 1 :])
    if not block:
        return text
    prefix = text if not text or text.endswith("\n") else text + "\n"
    return prefix + "\n".join(block) + "\n"


def managed_lines(text: str) -> list[str]:
    """The lines inside the managed block of an authorized_keys file (DamagedBlock when broken)."""
    parts = text.split("\n")
    bounds = _block_bounds(parts)
    return [] if bounds is None else parts[bounds[0] + 1 : bounds[1]]
