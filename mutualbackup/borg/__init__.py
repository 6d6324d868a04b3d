"""Everything about borg, in one layer: where things are (``repository``), its environment
(``environment``), its command lines (``argv``), its exit codes (``exits``), its output
(``output``), the ``authorized_keys`` lines that confine a key to a repository (``authorized_keys``)
and what a host reads of a repository's files without a key (``repository_files``).

Pure: nothing here starts a process. The names are re-exported here, so callers write
``borg.create_argv(...)``."""

from __future__ import annotations

from mutualbackup.borg.repository import (  # noqa: F401
    KEY_FILE,
    PASSPHRASE_FILE,
    KNOWN_HOSTS_FILE,
    BASE_DIR,
    SourcePaths,
    repository_path,
    repository_url,
    repository_url_for,
    url_of,
    known_hosts_name,
    known_hosts_line,
    archive_name,
    CHECKPOINT_SUFFIX,
    archive_glob,
    is_checkpoint,
    archive_path,
    path_pattern,
)
from mutualbackup.borg.environment import (  # noqa: F401
    base_env,
    client_env,
    host_env,
    ssh_command,
    ssh_words,
)
from mutualbackup.borg.argv import (  # noqa: F401
    LOCK_WAIT,
    init_argv,
    create_argv,
    list_argv,
    info_argv,
    extract_argv,
    CATALOGUE_FORMAT,
    HASH_FORMAT,
    catalogue_argv,
    hashes_argv,
    key_export_argv,
    key_import_argv,
    prune_argv,
    check_argv,
    compact_argv,
    break_lock_argv,
)
from mutualbackup.borg.output import (  # noqa: F401
    ArchiveStats,
    parse_create_json,
    ArchiveEntry,
    parse_list_json,
    parse_info_repository_bytes,
    BorgLog,
    UNREADABLE_PREFIX,
    parse_log,
    Item,
    parse_items,
    Entry,
    parse_catalogue,
    mode_bits,
    CreateProgress,
    ExtractProgress,
    parse_key_export,
    error_lines,
)
from mutualbackup.borg.exits import (  # noqa: F401
    classify_exit,
    succeeded,
    CHECKPOINT_MINUTES,
    UNREACHABLE,
    REPO_KEY_MISSING,
    ARCHIVE_DOES_NOT_EXIST,
    EXIT_HINTS,
    exit_hint,
)
from mutualbackup.borg.authorized_keys import (  # noqa: F401
    DamagedBlock,
    managed_lines,
    render_block,
    replace_block,
    BEGIN,
    END,
    MIN_QUOTA,
    QUOTA_FACTOR,
    RESTORE_COMMENT_PREFIX,
    RESTORE_LINE_LIFETIME,
    RESTORE_QUOTA,
    replica_quota,
    serve_command,
    forced_command_line,
    authorized_keys_line,
    new_restore_id,
    restore_comment,
    restore_line,
    restore_id_time,
    RestoreLine,
    parse_restore_line,
    is_stale_restore_line,
    live_restore_lines,
    with_restore_line,
)
from mutualbackup.borg.repository_files import (  # noqa: F401
    LockVerdict,
    judge_lock,
    REPOSITORY_MISSING,
    REPOSITORY_NOT_BORG,
    repository_facts_argv,
    RepositoryFacts,
    parse_repository_facts,
    lock_listing_argv,
    LockHolder,
    parse_lock_listing,
    transactions_argv,
    Transaction,
    parse_transactions,
)
