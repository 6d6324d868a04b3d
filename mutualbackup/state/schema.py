"""The tables of the coordinator's SQLite state (see :mod:`mutualbackup.state.history`)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,              -- backup, check, repo-check, prune, compact, drill, restore
    source TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    ended REAL,
    result TEXT NOT NULL,            -- running, success, warning, failure, interrupted
    exit_code INTEGER,
    archive TEXT,
    original_bytes INTEGER,
    compressed_bytes INTEGER,
    deduplicated_bytes INTEGER,
    repository_bytes INTEGER,
    nfiles INTEGER,
    error TEXT,
    pid INTEGER,
    detail TEXT,                     -- JSON: anything else worth keeping
    owner TEXT                       -- the process that runs it: PID:START (see process_identity); NULL in old rows
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (kind, source, target, started);
-- the few runs in progress (metrics: jobs running, and where the incremental totals stop)
CREATE INDEX IF NOT EXISTS runs_running ON runs (id) WHERE result = 'running';
CREATE TABLE IF NOT EXISTS replicas (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    position INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE IF NOT EXISTS archives (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    name TEXT NOT NULL,
    created REAL NOT NULL,           -- the archive's own time (UTC epoch)
    seen REAL NOT NULL,              -- when the coordinator first saw it
    pruned REAL,                     -- when the coordinator's prune removed it
    archive_id TEXT,                 -- borg's archive id when first seen (NULL: not known yet)
    PRIMARY KEY (source, target, name)
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (   -- replicas being moved, make before break (plan/moves.py, jobs/moves.py)
    source TEXT NOT NULL,
    old TEXT NOT NULL,               -- given up once the new replica is healthy
    new TEXT NOT NULL,
    reason TEXT NOT NULL,            -- left, draining, unreachable, full
    started REAL NOT NULL,
    PRIMARY KEY (source, old)
);
CREATE TABLE IF NOT EXISTS orphans ( -- repositories given up by a move: never deleted by the coordinator
    source TEXT NOT NULL,
    host TEXT NOT NULL,
    bytes INTEGER,                   -- its last measured size
    released REAL NOT NULL,
    PRIMARY KEY (source, host)
);
"""
