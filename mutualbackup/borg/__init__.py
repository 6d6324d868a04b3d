"""Everything about borg, in one layer: where things are (``repository``), its environment
(``environment``), its command lines (``argv``), its exit codes (``exits``), its output
(``output``), the ``authorized_keys`` lines that confine a key to a repository (``authorized_keys``)
and what a host reads of a repository's files without a key (``repository_files``).

Pure: nothing here starts a process. The names are re-exported here, so callers write
``borg.create_argv(...)``; each module is imported the first time one of its names is used (a node
answering a backup reads neither the repositories' files nor the ``authorized_keys`` lines)."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (node/preload.py)
if TYPE_CHECKING:
    from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "repository": (
        "KEY_FILE",
        "PASSPHRASE_FILE",
        "KNOWN_HOSTS_FILE",
        "BASE_DIR",
        "SourcePaths",
        "repository_path",
        "repository_url",
        "repository_url_for",
        "url_of",
        "known_hosts_name",
        "known_hosts_line",
        "archive_name",
        "CHECKPOINT_SUFFIX",
        "archive_glob",
        "is_checkpoint",
        "archive_path",
        "path_pattern",
    ),
    "environment": (
        "base_env",
        "client_env",
        "host_env",
        "ssh_command",
        "ssh_words",
    ),
    "argv": (
        "LOCK_WAIT",
        "init_argv",
        "create_argv",
        "list_argv",
        "info_argv",
        "extract_argv",
        "CATALOGUE_FORMAT",
        "HASH_FORMAT",
        "catalogue_argv",
        "hashes_argv",
        "key_export_argv",
        "key_import_argv",
        "prune_argv",
        "check_argv",
        "compact_argv",
        "break_lock_argv",
    ),
    "output": (
        "ArchiveStats",
        "parse_create_json",
        "ArchiveEntry",
        "parse_list_json",
        "parse_info_repository_bytes",
        "BorgLog",
        "UNREADABLE_PREFIX",
        "parse_log",
        "Item",
        "parse_items",
        "Entry",
        "parse_catalogue",
        "mode_bits",
        "CreateProgress",
        "ExtractProgress",
        "parse_key_export",
        "error_lines",
    ),
    "exits": (
        "classify_exit",
        "succeeded",
        "CHECKPOINT_MINUTES",
        "UNREACHABLE",
        "REPO_KEY_MISSING",
        "ARCHIVE_DOES_NOT_EXIST",
        "EXIT_HINTS",
        "exit_hint",
    ),
    "authorized_keys": (
        "DamagedBlock",
        "managed_lines",
        "render_block",
        "replace_block",
        "BEGIN",
        "END",
        "MIN_QUOTA",
        "QUOTA_FACTOR",
        "RESTORE_COMMENT_PREFIX",
        "RESTORE_LINE_LIFETIME",
        "RESTORE_QUOTA",
        "replica_quota",
        "serve_command",
        "forced_command_line",
        "authorized_keys_line",
        "new_restore_id",
        "restore_comment",
        "restore_line",
        "restore_id_time",
        "RestoreLine",
        "parse_restore_line",
        "is_stale_restore_line",
        "live_restore_lines",
        "with_restore_line",
    ),
    "repository_files": (
        "LockVerdict",
        "judge_lock",
        "REPOSITORY_MISSING",
        "REPOSITORY_NOT_BORG",
        "repository_facts_argv",
        "RepositoryFacts",
        "parse_repository_facts",
        "lock_listing_argv",
        "LockHolder",
        "parse_lock_listing",
        "transactions_argv",
        "Transaction",
        "parse_transactions",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
