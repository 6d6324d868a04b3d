"""One base exception for everything mutualbackup reports to a user.

Each subclass carries an exit code (SPEC.md: 1 an operation failed, 2 bad usage
or a bad inventory) and a message written for a tired operator: what failed,
where, and what to do next.
"""

from __future__ import annotations


class MutualBackupError(Exception):
    """Base of every error the command line turns into a message and an exit code."""

    exit_code = 1


class UsageError(MutualBackupError):
    """Bad arguments on the command line (exit 2)."""

    exit_code = 2


class InventoryError(MutualBackupError):
    """The inventory is invalid. ``problems`` are ``FILE:LINE: message`` strings (exit 2)."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class TransportError(MutualBackupError):
    """A node could not be reached, or refused us (unknown or changed host key...)."""


class HostKeyMismatch(TransportError):
    """The node presented a host key other than the one pinned in the inventory."""


class OperationFailed(MutualBackupError):
    """A backup, restore, check or provisioning step failed (exit 1)."""
