"""The coordinator's memory: a SQLite file in the state directory.

What is in it: every run (backup, check, prune, compact, drill, restore) with its
start, end, result, borg exit code, archive sizes and the tail of the error; the
placement (which source has a replica on which host); the archives the
coordinator saw created and pruned; alerts. What is never in it: a passphrase
or a key.

Crash safety: WAL journal with ``synchronous=FULL``: a run is committed when it
starts (``running``) and when it ends, so a ``kill -9`` loses no completed run;
on start the daemon calls :meth:`History.mark_interrupted` for runs left
``running`` by a process that is gone.

Damage: the daemon keeps a consistent copy beside the file (:meth:`History.save_copy`, SQLite's
backup API, checked before it replaces the previous copy). A file SQLite cannot read (damaged
pages, not a database), or one truncated to nothing, is :class:`StateDamaged`: a message that says
what happened and the way back, never a traceback and never a silent fresh start.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from mutualbackup.errors import OperationFailed
from mutualbackup.state.processes import run_owner_alive, this_process
from mutualbackup.state.schema import SCHEMA
from mutualbackup.plan.due import PairSummary

FILENAME = "history.sqlite3"
COPY = FILENAME + ".copy"  # the daemon's last consistent copy (save_copy)
DAMAGE = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


class StateDamaged(OperationFailed):
    """The state database cannot be read; the message says how to get back to a working state."""


def damaged(path: Path, what: str) -> StateDamaged:
    """The error for a damaged state file at ``path``, with the way back (the daemon's copy, when there is one)."""
    copy = path.with_name(COPY)
    if copy.is_file():
        taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(copy.stat().st_mtime))
        way_back = (f"The daemon's last consistent copy is {copy} (taken {taken}). Stop the daemon, then put the "
                    f"copy in its place, keeping the damaged file aside:\n"
                    f"  mv {path} {path}.damaged && cp {copy} {path}\n"
                    "Runs recorded since the copy was taken are lost from the history (their archives are on the "
                    "hosts); `mutualbackup status` then works again.")
    else:
        way_back = (f"There is no copy of it ({copy} is missing: the daemon makes one). Stop the daemon and move the "
                    f"damaged file aside to start with an empty state:\n  mv {path} {path}.damaged\n"
                    "then run `mutualbackup apply`: the history starts again, the repositories on the hosts stay.")
    return StateDamaged(f"the state database {path} {what}; nothing was changed.\n{way_back}")


SUCCESSFUL = ("success", "warning")


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    source: str
    target: str
    started: float
    ended: float | None
    result: str
    exit_code: int | None
    archive: str | None
    original_bytes: int | None
    compressed_bytes: int | None
    deduplicated_bytes: int | None
    repository_bytes: int | None
    nfiles: int | None
    error: str | None
    pid: int | None
    detail: str | None
    owner: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.result in SUCCESSFUL

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class History:
    """One SQLite file; safe to share between the daemon's threads."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir) / FILENAME
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise damaged(self.path, "is empty (truncated to 0 bytes)")
        if not self.path.exists() and self.path.with_name(COPY).is_file():
            raise damaged(self.path, "is missing, while the daemon's copy of it is there")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") in DAMAGE:
                raise damaged(self.path, f"cannot be read ({exc})") from None
            raise OperationFailed(f"cannot open the state database {self.path}: {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            raise OperationFailed(f"cannot open the state database {self.path}: {exc}") from None
        self._lock = threading.RLock()
        self._placement_read: tuple[tuple[int, int], dict[str, tuple[str, ...]]] | None = None

    def _migrate(self) -> None:
        """Bring a database made by an older version up to :data:`SCHEMA` (additive, idempotent)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(archives)")}
        if "archive_id" not in columns:
            self._db.execute("ALTER TABLE archives ADD COLUMN archive_id TEXT")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "owner" not in columns:
            self._db.execute("ALTER TABLE runs ADD COLUMN owner TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._readable():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock, self._readable():
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def _readable(self) -> Iterator[None]:
        """SQLite's "malformed" or "not a database" as :class:`StateDamaged`."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") in DAMAGE:
                raise damaged(self.path, f"is damaged ({exc})") from None
            raise

    def save_copy(self) -> bool:
        """A consistent copy of the database beside it (SQLite's backup API), checked before it replaces the
        previous copy; False (the previous copy kept) when the database itself no longer reads whole."""
        copy, partial = self.path.with_name(COPY), self.path.with_name(COPY + ".tmp")
        partial.unlink(missing_ok=True)
        try:
            target = sqlite3.connect(partial)
            try:
                with self._lock, self._readable():
                    self._db.backup(target)
                checked = target.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                target.close()
        except (StateDamaged, sqlite3.DatabaseError):
            partial.unlink(missing_ok=True)
            return False
        if checked != "ok":
            partial.unlink(missing_ok=True)
            return False
        os.chmod(partial, 0o600)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, copy)
        return True

    # --- runs ---------------------------------------------------------------

    def start_run(self, kind: str, source: str, target: str = "", *, started: float | None = None) -> int:
        """Record a run as ``running`` (committed at once) and return its id."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO runs (kind, source, target, started, result, pid, owner) VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (kind, source, target, started if started is not None else time.time(), os.getpid(), this_process()),
            )
            return int(cursor.lastrowid or 0)

    def finish_run(
        self,
        run_id: int,
        result: str,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        ended: float | None = None,
        archive: str | None = None,
        original_bytes: int | None = None,
        compressed_bytes: int | None = None,
        deduplicated_bytes: int | None = None,
        repository_bytes: int | None = None,
        nfiles: int | None = None,
        detail: Mapping[str, object] | None = None,
    ) -> bool:
        """Record the end of a run that is still ``running``; False (nothing changed) when it no longer is
        (e.g. the daemon's shutdown already marked it ``interrupted``)."""
        with self._tx() as db:
            cursor = db.execute(
                """UPDATE runs SET ended = ?, result = ?, exit_code = ?, error = ?, archive = ?,
                   original_bytes = ?, compressed_bytes = ?, deduplicated_bytes = ?,
                   repository_bytes = ?, nfiles = ?, detail = ? WHERE id = ? AND result = 'running'""",
                (
                    ended if ended is not None else time.time(),
                    result,
                    exit_code,
                    error,
                    archive,
                    original_bytes,
                    compressed_bytes,
                    deduplicated_bytes,
                    repository_bytes,
                    nfiles,
                    json.dumps(detail, sort_keys=True) if detail else None,
                    run_id,
                ),
            )
            return cursor.rowcount > 0

    def set_detail(self, run_id: int, detail: Mapping[str, object]) -> None:
        """Record ``detail`` of a run that is still ``running`` (committed at once: it survives a crash)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET detail = ? WHERE id = ? AND result = 'running'",
                       (json.dumps(detail, sort_keys=True), run_id))

    def mark_interrupted(self, *, now: float | None = None) -> list[Run]:
        """Mark runs left ``running`` by a process that no longer exists; return them.

        A run belongs to a live process only when its recorded identity (pid *and* start time,
        :func:`process_identity`) is that of a live process: a container's daemon has the same pid
        at every start, so a pid alone is not enough. Runs of this very process are left alone.
        When a run ended cannot be known (the process died): its ``ended`` is the time of this
        call, and its detail says ``"end_uncertain": true`` (the compaction guard does not trust
        such an end, see :func:`guard.run_window`).
        """
        stale = [run for run in self.runs(result="running") if not run_owner_alive(run)]
        with self._tx() as db:
            for run in stale:
                detail = _loads(run.detail)
                detail["end_uncertain"] = True
                db.execute(
                    "UPDATE runs SET result = 'interrupted', ended = ?, error = ?, detail = ? WHERE id = ? AND result = 'running'",
                    (now or time.time(), "the coordinator stopped during this run (killed or crashed)",
                     json.dumps(detail, sort_keys=True), run.id),
                )
        return stale

    def runs(
        self,
        *,
        kind: str | None = None,
        source: str | None = None,
        target: str | None = None,
        result: str | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        """Runs matching every given field, newest first."""
        clauses, args = [], []
        for column, value in (("kind", kind), ("source", source), ("target", target), ("result", result)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY started DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Run(**dict(row)) for row in self._query(sql, args)]

    def last_run(self, kind: str, source: str, target: str = "", *, successful: bool = False) -> Run | None:
        sql = "SELECT * FROM runs WHERE kind = ? AND source = ? AND target = ? AND result != 'running'"
        if successful:
            sql += " AND result IN ('success', 'warning')"
        rows = self._query(sql + " ORDER BY started DESC, id DESC LIMIT 1", (kind, source, target))
        return Run(**dict(rows[0])) if rows else None

    def consecutive_failures(self, kind: str, source: str, target: str = "") -> int:
        """Finished runs that failed since the last success (interrupted ones are not attempts, as in
        :meth:`pair_summaries`)."""
        rows = self._query(
            """SELECT COUNT(*) FROM runs WHERE kind = ? AND source = ? AND target = ?
               AND result = 'failure'
               AND started > COALESCE((SELECT MAX(started) FROM runs WHERE kind = ? AND source = ?
                    AND target = ? AND result IN ('success', 'warning')), 0)""",
            (kind, source, target, kind, source, target),
        )
        return int(rows[0][0])

    def running(self, kind: str | None = None) -> list[Run]:
        return self.runs(kind=kind, result="running")

    def repository_sizes(self) -> dict[str, int]:
        """Per source, the largest measured repository size among its replicas (last backup)."""
        rows = self._query(
            """SELECT source, target, repository_bytes FROM runs r WHERE kind = 'backup'
               AND repository_bytes IS NOT NULL AND started = (SELECT MAX(started) FROM runs
               WHERE kind = 'backup' AND source = r.source AND target = r.target AND repository_bytes IS NOT NULL)"""
        )
        sizes: dict[str, int] = {}
        for row in rows:
            sizes[row["source"]] = max(sizes.get(row["source"], 0), int(row["repository_bytes"]))
        return sizes

    # --- placement ----------------------------------------------------------

    def placement(self) -> dict[str, tuple[str, ...]]:
        """The recorded placement: source -> hosts, in the order they were chosen (read again only when the
        database changed: the daemon asks at every tick)."""
        with self._lock:
            version = self._version()
            if self._placement_read is not None and self._placement_read[0] == version:
                return dict(self._placement_read[1])
            result: dict[str, list[str]] = {}
            for row in self._query("SELECT source, target FROM replicas ORDER BY source, position"):
                result.setdefault(row["source"], []).append(row["target"])
            placement = {source: tuple(hosts) for source, hosts in result.items()}
            self._placement_read = (version, placement)
            return dict(placement)

    def _version(self) -> tuple[int, int]:
        """Changes whenever the database does: another connection's commit (SQLite's ``data_version``), or one
        of this connection's own changes."""
        with self._readable():
            return int(self._db.execute("PRAGMA data_version").fetchone()[0]), self._db.total_changes

    # --- replica moves (make before break) and the repositories they gave up ------------------

    def moves(self) -> list[sqlite3.Row]:
        """The moves in progress: source, old, new, reason, started."""
        return self._query("SELECT * FROM moves ORDER BY started, source")

    def start_move(self, source: str, old: str, new: str, reason: str, *, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO moves (source, old, new, reason, started) VALUES (?, ?, ?, ?, ?)",
                       (source, old, new, reason, now or time.time()))

    def add_replica(self, source: str, host: str, *, now: float | None = None) -> None:
        """Record one more replica of ``source`` (a move's new one), after those it has."""
        placement = self.placement()
        if host not in placement.get(source, ()):
            self.set_placement({**placement, source: (*placement.get(source, ()), host)}, now=now)

    def end_move(self, source: str, old: str, *, size: int | None, now: float | None = None) -> None:
        """The move is done: ``old`` is no longer a replica of ``source``, and its repository an orphan."""
        placement = self.placement()
        kept = tuple(h for h in placement.get(source, ()) if h != old)
        self.set_placement({**placement, source: kept}, now=now)
        with self._tx() as db:
            db.execute("DELETE FROM moves WHERE source = ? AND old = ?", (source, old))
            db.execute("INSERT OR REPLACE INTO orphans (source, host, bytes, released) VALUES (?, ?, ?, ?)",
                       (source, old, size, now or time.time()))

    def orphans(self) -> list[sqlite3.Row]:
        """Repositories a move gave up (source, host, bytes, released): the owning members decide."""
        return self._query("SELECT * FROM orphans ORDER BY host, source")

    def host_contacts(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per host: the newest successful run on it, and the newest failed one (for ``host_down_after``)."""
        contact, failed = {}, {}
        for row in self._query("SELECT target, result, MAX(started) AS t FROM runs WHERE target != '' AND "
                               "kind IN ('backup', 'check', 'prune', 'compact') GROUP BY target, result"):
            if row["result"] in SUCCESSFUL:
                contact[row["target"]] = max(contact.get(row["target"], 0.0), row["t"])
            elif row["result"] == "failure":
                failed[row["target"]] = max(failed.get(row["target"], 0.0), row["t"])
        return contact, failed

    def set_placement(self, replicas: Mapping[str, Sequence[str]], *, now: float | None = None) -> None:
        """Replace the recorded placement; keeps ``created`` of replicas that stay."""
        old = {(r["source"], r["target"]): r["created"] for r in self._query("SELECT * FROM replicas")}
        with self._tx() as db:
            db.execute("DELETE FROM replicas")
            for source, hosts in replicas.items():
                for position, target in enumerate(hosts):
                    created = old.get((source, target), now or time.time())
                    db.execute(
                        "INSERT INTO replicas (source, target, position, created) VALUES (?, ?, ?, ?)",
                        (source, target, position, created),
                    )

    # --- archives and alerts (used by maintenance) -------------------------

    def record_archives(
        self, source: str, target: str, archives: Sequence[tuple[str, float] | tuple[str, float, str | None]],
        *, now: float | None = None,
    ) -> None:
        """Remember archives seen in a repository: (name, creation time[, borg archive id]).

        A known archive is unchanged, except that an id is filled in where none was recorded
        yet; a recorded id is never overwritten (a different id under the same name is a
        replaced archive, which the compaction guard must see).
        """
        with self._tx() as db:
            for entry in archives:
                name, created = entry[0], entry[1]
                archive_id = (entry[2] if len(entry) > 2 else None) or None  # type: ignore[misc]
                db.execute(
                    "INSERT OR IGNORE INTO archives (source, target, name, created, seen, archive_id) VALUES (?, ?, ?, ?, ?, ?)",
                    (source, target, name, created, now or time.time(), archive_id),
                )
                if archive_id is not None:
                    db.execute(
                        "UPDATE archives SET archive_id = ? WHERE source = ? AND target = ? AND name = ? AND archive_id IS NULL",
                        (archive_id, source, target, name),
                    )

    def mark_pruned(self, source: str, target: str, names: Sequence[str], *, now: float | None = None) -> None:
        with self._tx() as db:
            for name in names:
                db.execute(
                    "UPDATE archives SET pruned = ? WHERE source = ? AND target = ? AND name = ? AND pruned IS NULL",
                    (now or time.time(), source, target, name),
                )

    def accept_deletion(self, source: str, target: str, vanished: Sequence[str], replaced: Mapping[str, str | None],
                        *, now: float | None = None) -> None:
        """A member's admin accepted these deletions (``accept-deletion``): the archives gone count as pruned,
        and each one re-created is recorded with the id it was accepted with (a later re-creation is a new one)."""
        self.mark_pruned(source, target, vanished, now=now)
        with self._tx() as db:
            for name, archive_id in replaced.items():
                db.execute("UPDATE archives SET archive_id = ? WHERE source = ? AND target = ? AND name = ?",
                           (archive_id, source, target, name))

    def known_archives(self, source: str, target: str) -> dict[str, tuple[float, float | None]]:
        """name -> (created, pruned) for archives the coordinator has seen in this repository."""
        rows = self._query("SELECT name, created, pruned FROM archives WHERE source = ? AND target = ?", (source, target))
        return {row["name"]: (row["created"], row["pruned"]) for row in rows}

    def archive_ids(self, source: str, target: str) -> dict[str, str | None]:
        """name -> the borg archive id first recorded under that name (None when never known)."""
        rows = self._query("SELECT name, archive_id FROM archives WHERE source = ? AND target = ?", (source, target))
        return {row["name"]: row["archive_id"] for row in rows}

    def add_alert(self, source: str, target: str, kind: str, message: str, *, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO alerts (at, source, target, kind, message) VALUES (?, ?, ?, ?, ?)",
                (now or time.time(), source, target, kind, message),
            )

    def alerts(self, limit: int = 50) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM alerts ORDER BY at DESC LIMIT ?", (limit,))

    # --- scheduling and maintenance (the daemon) ---------------------------

    def pair_summaries(self, kind: str) -> dict[tuple[str, str], PairSummary]:
        """Per source x target, what the scheduler needs about runs of ``kind``, in two queries.

        Interrupted runs (the coordinator was stopped or killed) are not attempts:
        they neither count as failures nor delay the next attempt.
        """
        rows = self._query(
            """SELECT source, target,
                   MAX(CASE WHEN result IN ('success', 'warning') THEN started END) AS last_success,
                   MIN(CASE WHEN result IN ('success', 'warning') THEN started END) AS first_success,
                   MAX(CASE WHEN result IN ('success', 'warning', 'failure') THEN started END) AS last_attempt,
                   MAX(CASE WHEN result IN ('success', 'warning') THEN ended END) AS last_success_end
               FROM runs WHERE kind = ? GROUP BY source, target""",
            (kind,),
        )
        failures = {
            (r["source"], r["target"]): int(r["n"])
            for r in self._query(
                """SELECT source, target, COUNT(*) AS n FROM runs r WHERE kind = ? AND result = 'failure'
                   AND started > COALESCE((SELECT MAX(started) FROM runs WHERE kind = r.kind AND source = r.source
                        AND target = r.target AND result IN ('success', 'warning')), 0)
                   GROUP BY source, target""",
                (kind,),
            )
        }
        return {
            (r["source"], r["target"]): PairSummary(
                last_success=r["last_success"], first_success=r["first_success"], last_attempt=r["last_attempt"],
                last_success_end=r["last_success_end"], failures=failures.get((r["source"], r["target"]), 0),
            )
            for r in rows
        }

    def drills(self) -> dict[str, tuple[float | None, float | None, bool]]:
        """Per source: (start of its last successful drill, start of its last drill that ended in any way,
        whether it has a successful backup), for :func:`~mutualbackup.jobs.drill.drills_due`."""
        rows = self._query(
            """SELECT source,
                   MAX(CASE WHEN kind = 'drill' AND result IN ('success', 'warning') THEN started END) AS success,
                   MAX(CASE WHEN kind = 'drill' AND result != 'running' THEN started END) AS ended,
                   MAX(kind = 'backup' AND result IN ('success', 'warning')) AS backed_up
               FROM runs WHERE kind IN ('drill', 'backup') GROUP BY source""")
        return {r["source"]: (r["success"], r["ended"], bool(r["backed_up"])) for r in rows}

    def interrupt_own_runs(self, message: str, *, now: float | None = None) -> list[Run]:
        """Mark the runs this process left ``running`` as ``interrupted`` with ``message``; return them."""
        mine = [run for run in self.runs(result="running") if run.owner == this_process()]
        with self._tx() as db:
            for run in mine:
                db.execute(
                    "UPDATE runs SET result = 'interrupted', ended = ?, error = ? WHERE id = ? AND result = 'running'",
                    (now or time.time(), message, run.id),
                )
        return mine

    def run_by_id(self, run_id: int) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return Run(**dict(rows[0])) if rows else None

    # --- read-only snapshots (metrics, ledger) -------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Callable[..., list[sqlite3.Row]]]:
        """Several read queries on one consistent state: yields ``query(sql, args=())`` -> rows.

        One read transaction; writers of other connections are not blocked (WAL),
        writers of this object wait until the block ends.
        """
        with self._lock, self._readable():
            self._db.execute("BEGIN")
            try:
                yield lambda sql, args=(): self._query(sql, args)
            finally:
                self._db.execute("ROLLBACK")


def _loads(detail: str | None) -> dict:
    try:
        value = json.loads(detail) if detail else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


