"""Requests about the repositories this node stores for other members (it is a host).

They run as the unprivileged login that owns the repositories and whose ``authorized_keys``
holds one forced-command line per replica. None of them needs a repository's key: the host
checks, measures, reads the transactions log of, and compacts ciphertext. A repository is
always STORAGE/MEMBER/NODE, the storage path being the node's own.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any, Mapping

from mutualbackup import borg
from mutualbackup.node.requests import (
    Args, Failed, Refused, Session, integer, number, repository_path, request, source_of,
)
from mutualbackup.node.source import result_data
from mutualbackup.node.system import pidfile_path

LIST_TIMEOUT = 900
_PUBLIC_KEY = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [\x20-\x7e]*)?")


def repository_of(session: Session, args: Args) -> tuple[str, str]:
    """(source name, its repository's path here); refused for this node's own member (a replica
    always lives on another member's host)."""
    source = source_of(args)
    if source.split("/")[0] == session.config.member:
        raise Refused(f"{source} is of this node's own member: its replicas live on other members' hosts")
    return source, repository_path(session.config, source)


def _host_env(session: Session) -> dict[str, str]:
    return borg.host_env(session.config.work)


def _pidfile(session: Session, source: str) -> str:
    return pidfile_path(session.config.work, f"repo/{source}")


@request("authorize", "host")
def authorize(session: Session, args: Args) -> Mapping[str, Any]:
    """Make the managed block of ``authorized_keys`` hold one line per replica, every other line untouched.

    Each replica is ``{source, public_key, quota}``; a replica without ``public_key`` keeps the line it
    has (its source could not be reached this time: better stale than locked out). Restore lines
    still within their lifetime stay.
    """
    replicas = args.get("replicas")
    if not isinstance(replicas, list):
        raise Refused("'replicas' must be a list")
    config = session.config
    current = (session.system.read(config.authorized_keys) or b"").decode("utf-8", errors="surrogateescape")
    try:
        existing = {line.rsplit(" ", 1)[-1]: line for line in borg.managed_lines(current)}
    except borg.DamagedBlock as exc:
        raise Failed(f"{config.authorized_keys}: {exc}") from None
    lines: list[str] = []
    for replica in replicas:
        if not isinstance(replica, dict):
            raise Refused("each replica must be {source, public_key, quota}")
        source, path = repository_of(session, replica)
        comment = f"mutualbackup:{source}"
        key = replica.get("public_key")
        if key is None:
            if comment in existing:
                lines.append(existing[comment])
            continue
        if not isinstance(key, str) or not _PUBLIC_KEY.fullmatch(key):
            raise Refused(f"the key of {source} is not an ed25519 public key")
        quota = integer(replica, "quota") or 0
        if quota < 1:
            raise Refused(f"the quota of {source} must be positive")
        lines.append(borg.authorized_keys_line(config.borg, path, quota, " ".join(key.split()[:2]), comment))
    lines.sort(key=lambda line: line.rsplit(" ", 1)[-1])
    restoring = borg.live_restore_lines(existing.values(), dt.datetime.now(dt.timezone.utc))
    wanted = borg.replace_block(current, lines + restoring)
    changed = wanted != current
    if changed:
        session.system.write(config.authorized_keys, wanted.encode("utf-8", errors="surrogateescape"), 0o600)
    for member in sorted({line.rsplit(" ", 1)[-1][len("mutualbackup:"):].split("/")[0] for line in lines}):
        session.system.makedirs(os.path.join(config.storage, member))
    return {"changed": changed, "lines": len(lines)}


@request("repo_facts", "host")
def repo_facts(session: Session, args: Args) -> Mapping[str, Any]:
    """Size and last write of the repository's segments (exit 3: missing; 4: not a borg repository)."""
    _name, path = repository_of(session, args)
    return result_data(session.system.run(borg.repository_facts_argv(path), timeout=LIST_TIMEOUT))


@request("repositories", "host")
def repositories(session: Session, args: Args) -> Mapping[str, Any]:
    """Every repository this host holds (STORAGE/MEMBER/NODE with a borg repository in it): its source, size
    and last write — what a coordinator that lost its state adopts instead of uploading everything again."""
    from mutualbackup.inventory.value_checks import check_slug

    storage, found = session.config.storage, []
    for member in sorted(_entries(session, storage)):
        for node in sorted(_entries(session, f"{storage}/{member}")):
            try:
                source = f"{check_slug(member)}/{check_slug(node)}"
            except ValueError:
                continue  # not a name the coordinator gives: not ours
            facts = session.system.run(borg.repository_facts_argv(repository_path(session.config, source)),
                                       timeout=LIST_TIMEOUT)
            if facts.ok and member != session.config.member:
                parsed = borg.parse_repository_facts(facts.stdout)
                found.append({"source": source, "bytes": parsed.bytes, "last_write": parsed.last_write})
    return {"repositories": found}


def _entries(session: Session, path: str) -> list[str]:
    try:
        return session.system.listdir(path)
    except OSError:
        return []


@request("repo_check", "host")
def repo_check(session: Session, args: Args) -> Mapping[str, Any]:
    """``borg check --repository-only`` on the host, without any key, supervised; the facts first."""
    source, path = repository_of(session, args)
    facts = session.system.run(borg.repository_facts_argv(path), timeout=LIST_TIMEOUT)
    if not facts.ok:
        return {"facts": result_data(facts)}
    checked = session.system.run(borg.check_argv(session.config.borg, path, repository_only=True),
                                 env=_host_env(session), timeout=number(args, "timeout") or 1.0,
                                 pidfile=_pidfile(session, source), run_id=integer(args, "run_id", optional=True))
    return {"facts": result_data(facts), "check": result_data(checked)}


@request("transactions", "host")
def transactions(session: Session, args: Args) -> Mapping[str, Any]:
    """The host's clock, then the repository's ``transactions`` log (every commit through an append-only key)."""
    _name, path = repository_of(session, args)
    return result_data(session.system.run(borg.transactions_argv(path), timeout=LIST_TIMEOUT))


@request("compact", "host")
def compact(session: Session, args: Args) -> Mapping[str, Any]:
    """``borg compact`` on the host (frees what prunes left), supervised; the facts before and after."""
    source, path = repository_of(session, args)
    before = session.system.run(borg.repository_facts_argv(path), timeout=LIST_TIMEOUT)
    if not before.ok:
        return {"before": result_data(before)}
    done = session.system.run(borg.compact_argv(session.config.borg, path), env=_host_env(session),
                              timeout=number(args, "timeout") or 1.0, pidfile=_pidfile(session, source),
                              run_id=integer(args, "run_id", optional=True))
    after = session.system.run(borg.repository_facts_argv(path), timeout=LIST_TIMEOUT)
    return {"before": result_data(before), "compact": result_data(done), "after": result_data(after)}


@request("unlock", "host")
def unlock(session: Session, args: Args) -> Mapping[str, Any]:
    """Break the repository's lock only when it is certainly stale: every holder is a process of this host
    (its full borg host id) and none of them is alive (zombies count as gone)."""
    _name, path = repository_of(session, args)
    listing = session.system.run(borg.lock_listing_argv(path), timeout=60)
    if listing.exit_code == borg.REPOSITORY_MISSING:
        return {"missing": True}
    if not listing.ok:
        raise Failed(f"lock listing exited {listing.exit_code}: {listing.stderr_tail(3)}")
    try:
        hostname, holders = borg.parse_lock_listing(listing.stdout)
    except ValueError as exc:
        raise Failed(str(exc)) from None
    if not holders:
        return {"locked": False}
    verdict = borg.judge_lock(hostname, holders, _alive(session, {h.pid for h in holders}))
    if not verdict.stale:
        return {"locked": True, "broken": False, "reason": verdict.reason}
    broken = session.system.run(borg.break_lock_argv(session.config.borg, path), env=_host_env(session), timeout=120)
    return {"locked": True, "broken": broken.ok, "reason": verdict.reason,
            "error": None if broken.ok else f"borg break-lock exited {broken.exit_code}: {broken.stderr_tail(3)}"}


def _alive(session: Session, pids: set[int]) -> set[int]:
    """Which of ``pids`` live here; when ``ps`` cannot tell, all of them (a lock is never broken on a guess)."""
    if not pids:
        return set()
    result = session.system.run(("ps", "-o", "pid=,stat=", "-p", ",".join(str(p) for p in sorted(pids))), timeout=60)
    if result.exit_code not in (0, 1):
        return set(pids)
    alive = set()
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit() and not words[1].startswith("Z"):
            alive.add(int(words[0]))
    return alive


def edit_block(session: Session, change) -> None:  # noqa: ANN001 - Callable[[list[str]], list[str]]
    """Replace the managed block of ``authorized_keys`` by ``change(its lines)``, every other line kept byte for byte."""
    path = session.config.authorized_keys
    current = (session.system.read(path) or b"").decode("utf-8", errors="surrogateescape")
    try:
        wanted = borg.replace_block(current, change(borg.managed_lines(current)))
    except borg.DamagedBlock as exc:
        raise Failed(f"{path}: {exc}") from None
    if wanted != current:
        session.system.write(path, wanted.encode("utf-8", errors="surrogateescape"), 0o600)


def remove_line(session: Session, line: str) -> None:
    """Remove the exact ``line`` wherever it is in ``authorized_keys`` (every other byte stays)."""
    path = session.config.authorized_keys
    current = session.system.read(path)
    if current is None:
        return
    parts = current.split(b"\n")
    kept = [part for part in parts if part != line.encode("utf-8", errors="surrogateescape")]
    if len(kept) != len(parts):
        session.system.write(path, b"\n".join(kept), 0o600)
