"""borg's exit codes (``BORG_EXIT_CODES=modern``): one classification and one table of hints.

Every caller asks :func:`classify_exit` (or :func:`succeeded`) rather than comparing codes.
"""

from __future__ import annotations

from mutualbackup.borg.authorized_keys import MIN_QUOTA, QUOTA_FACTOR


def classify_exit(code: int) -> str:
    """``success``, ``warning`` (archive written, something to look at), ``retry`` or ``error``.

    -1 is what the transport reports for a lost connection or a timeout.
    """
    if code == 0:
        return "success"
    if code == 1 or 100 <= code <= 107:  # borg 1.4's warnings; 124-127 come from timeout or the shell
        return "warning"
    if code in (-1, 73, 74, 80, 81, 87):
        return "retry"
    return "error"


def succeeded(code: int) -> bool:
    """borg did what was asked: success, or a warning (an archive was written; something to look at)."""
    return classify_exit(code) in ("success", "warning")


CHECKPOINT_MINUTES = 30
"""borg create's default ``--checkpoint-interval`` (1800 s), which the coordinator keeps."""


UNREACHABLE = (255, 80, 81, 87)
"""borg exit codes meaning the repository's host could not be reached (or the
connection to it broke): a restore may try the next replica."""


REPO_KEY_MISSING = 44
ARCHIVE_DOES_NOT_EXIST = 31  # borg 1.4, BORG_EXIT_CODES=modern: Archive.DoesNotExist
"""borg's RepoKeyNotFoundError: the repository's own key is gone (``--recovery`` imports the exported one)."""


EXIT_HINTS: dict[int, str] = {
    -1: "the connection was lost or the command timed out; the next attempt resumes (nothing stored is sent twice)",
    2: "borg reported an error; see its message above",
    13: "the repository does not exist: run `mutualbackup apply`",
    14: "the host's disk is full: free space there or move the replica",
    15: "the repository does not exist: run `mutualbackup apply`",
    20: (f"the storage quota of this replica is exhausted: what this run wrote was not committed (a `.checkpoint` "
         f"archive may remain from a backup that ran over {CHECKPOINT_MINUTES} minutes) and earlier archives are intact. "
         f"Raise the source's `estimate` (the quota is {QUOTA_FACTOR} times the larger of it and the measured size, "
         f"at least {MIN_QUOTA // 1024**3} GiB) and run `mutualbackup apply`; when the quota is already the host's "
         f"whole `capacity`, raise that or move the replica"),
    50: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    51: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    52: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    53: "the passphrase does not open this repository: check WORKDIR/passphrase on the source",
    62: "the source's borg cache is newer than the repository (was it rolled back?): investigate before going on",
    63: "the source's borg cache is newer than the repository (was it rolled back?): investigate before going on",
    64: "the repository's security data changed (was it replaced?): investigate before going on",
    73: "the repository is locked by another borg; retried later",
    74: "the repository is locked by another borg; retried later",
    80: "the connection to the host was closed (host down or sshd restarted?); retried later",
    81: "the connection to the host broke; retried later",
    83: "the host refused this repository path: re-run `mutualbackup apply`",
    87: "the connection to the host broke; retried later",
    124: "the command timed out on the node",
    126: "borg is not executable on the node: check the inventory's `borg:` path",
    127: "borg was not found on the node: install borg 1.4 or fix the inventory's `borg:` path",
    31: "that archive does not exist in this repository: see `mutualbackup archives SOURCE`",
    44: "the repository's own key is missing: restore with --recovery FILE (it holds an exported copy)",
    90: "data integrity error: the repository is damaged on the host",
    91: "data integrity error: the repository is damaged on the host",
    92: "data integrity error: the repository is damaged on the host",
    255: "ssh failed: is the host up, and does its host key match the one pinned in the inventory?",
}


def exit_hint(code: int) -> str:
    if code in EXIT_HINTS:
        return EXIT_HINTS[code]
    if code > 128:
        return f"borg was killed by signal {code - 128}"
    return "see borg's message above"
