"""Listing archives and restoring them.

Borg runs on the node that needs the files, which reaches the repository with
the source's key: plaintext never passes through the host or the coordinator.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Callable, Sequence

from . import borg
from .context import Context
from .errors import OperationFailed, UsageError
from .model import Node
from .transport import Transport


@dataclass(frozen=True)
class RestoreResult:
    source: str
    replica: str
    archive: str
    node: str
    directory: str
    dry_run: bool
    listed: tuple[str, ...]  # paths written (or that would be, with --dry-run)


def choose_replica(ctx: Context, source: Node, requested: str | None) -> list[Node]:
    """Replicas to try, best first: the requested one, else freshest successful backup first."""
    replicas = ctx.replicas_of(source.name)
    if not replicas:
        raise OperationFailed(f"{source.name} has no provisioned replica: run `mutualbackup apply` first")
    if requested is not None:
        if requested not in replicas:
            raise UsageError(f"{requested} holds no replica of {source.name} (replicas: {', '.join(replicas)})")
        return [ctx.node(requested)]

    def freshness(target: str) -> float:
        run = ctx.history.last_run("backup", source.name, target, successful=True)
        return run.started if run else 0.0

    return [ctx.node(t) for t in sorted(replicas, key=freshness, reverse=True)]


def list_archives(ctx: Context, source: Node, replica: str | None = None) -> tuple[Node, list[borg.ArchiveEntry]]:
    """The archives of ``source`` on the chosen replica (falls back to the next when one is down)."""
    errors = []
    for host in choose_replica(ctx, source, replica):
        transport = ctx.connect(source)
        try:
            paths = ctx.source_paths(transport, source)
            result = transport.run(
                borg.list_argv(source.borg, borg.repository_url(source, host)), env=borg.client_env(paths), timeout=600
            )
        finally:
            transport.close()
        if result.exit_code in (0, 1):
            return host, borg.parse_list_json(result.stdout)
        errors.append(f"{host.name}: borg list exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail(5)}")
    raise OperationFailed(f"cannot list the archives of {source.name}:\n" + "\n".join(errors))


def restore(
    ctx: Context,
    source: Node,
    destination: Node,
    directory: str,
    *,
    archive: str | None = None,
    paths: Sequence[str] = (),
    replica: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Extract ``archive`` (default: the latest) of ``source`` into ``directory`` on ``destination``."""
    if destination.name != source.name:
        raise UsageError(
            f"restoring {source.name} onto {destination.name} is not supported yet: restore onto {source.name} itself"
        )
    if not directory.startswith("/"):
        raise UsageError(f"the target directory must be absolute, got {directory!r}")
    host, archives = list_archives(ctx, source, replica)
    if not archives:
        raise OperationFailed(f"{source.name} has no archive on {host.name} yet: run `mutualbackup run {source.name}` first")
    if archive is None:
        archive = archives[-1].name
    elif archive not in {a.name for a in archives}:
        raise UsageError(f"no archive {archive!r} of {source.name} on {host.name}; see `mutualbackup archives {source.name}`")
    transport = ctx.connect(destination)
    try:
        if not dry_run:
            _prepare_target(transport, directory, force)
        source_paths = ctx.source_paths(transport, source)
        result = transport.run(
            borg.extract_argv(source.borg, borg.repository_url(source, host), archive, paths, dry_run=dry_run),
            env=borg.client_env(source_paths),
            cwd=directory if not dry_run else "/",
            timeout=24 * 3600,
            on_stderr_line=on_line,
        )
    finally:
        transport.close()
    run_id = ctx.history.start_run("restore", source.name, host.name)
    if result.exit_code not in (0, 1):
        error = f"borg extract exited {result.exit_code}: {borg.exit_hint(result.exit_code)}\n{result.stderr_tail()}"
        ctx.history.finish_run(run_id, "failure", exit_code=result.exit_code, error=error, archive=archive)
        raise OperationFailed(f"restore of {source.name} from {host.name} failed: {error}")
    ctx.history.finish_run(
        run_id, "success", exit_code=result.exit_code, archive=archive,
        detail={"to": f"{destination.name}:{directory}", "paths": list(paths), "dry_run": dry_run},
    )
    listed = tuple(line for line in result.stderr.decode("utf-8", "replace").splitlines() if line.strip()) if dry_run else ()
    return RestoreResult(source.name, host.name, archive, destination.name, directory, dry_run, listed)


def _prepare_target(transport: Transport, directory: str, force: bool) -> None:
    """Create ``directory``; refuse a non-empty one unless ``force``."""
    check = transport.run(
        ("sh", "-c", 'mkdir -p -- "$1" && [ -z "$(ls -A -- "$1")" ]', "sh", directory), timeout=60
    )
    if check.exit_code != 0:
        if check.stderr.strip():
            raise OperationFailed(f"cannot create {directory} on {transport.node_name}: {check.stderr_tail()}")
        if not force:
            raise UsageError(
                f"{transport.node_name}:{directory} is not empty; restore into a new directory, or add --force to write over it"
            )


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) or "/"
