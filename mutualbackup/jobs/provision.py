"""``mutualbackup apply``: make the world match the plan, idempotently.

For each source: its own SSH key and passphrase, generated *on the source* (the
passphrase never leaves it), and a known_hosts file pinning its replica hosts.
For each host: one forced-command line per replica inside a managed block of its
``authorized_keys`` (every other line untouched), and the parent directory of
the repositories. Then ``borg init`` of each new repository, run from the source.
A second run finds everything in place and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed
from mutualbackup.inventory.model import Node
from mutualbackup.remote.transport import Transport, resolve_path


@dataclass
class ApplyReport:
    changes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def quota_size(source: Node, sizes: Mapping[str, int]) -> int:
    """The size a replica's quota is made for: the larger of the measured size (``sizes``) and ``estimate``.

    Unlike placement (measured size, else estimate), the estimate still counts once
    a size was measured: a member who expects the source to grow raises its
    estimate, and the next ``apply`` gives every replica room for it.
    """
    assert source.backup is not None
    return max(sizes.get(source.name, 0), source.backup.estimate or 0)


def apply(ctx: Context, *, say: Callable[[str], None] = print) -> ApplyReport:
    """Provision every source and host of the placement. Failures are collected, not raised.

    Three passes: the sources (key, passphrase, pinned hosts), the hosts (their lines), then
    ``borg init`` of each new repository from its source; the placement that exists is recorded.
    """
    report = ApplyReport()
    public_keys: dict[str, str] = {}
    paths: dict[str, borg.SourcePaths] = {}
    for source in ctx.federation.sources():
        try:
            with ctx.session(source) as transport:
                public_keys[source.name], paths[source.name] = _prepare_source(
                    ctx, transport, source, ctx.placement.replicas.get(source.name, ()), report
                )
        except MutualBackupError as exc:
            report.failures.append(f"{source.name}: {exc}")
    sizes = ctx.history.repository_sizes()
    for host in ctx.federation.hosts():
        try:
            with ctx.session(host) as transport:
                _prepare_host(ctx, transport, host, _replica_lines(ctx, host, public_keys, sizes), public_keys, report)
        except MutualBackupError as exc:
            report.failures.append(f"{host.name}: {exc}")
    previous = ctx.history.placement()
    recorded: dict[str, tuple[str, ...]] = {}
    for source in ctx.federation.sources():
        if source.name not in paths:  # not reached: what existed stays recorded
            recorded[source.name] = tuple(previous.get(source.name, ()))
            continue
        recorded[source.name] = _init_repositories(ctx, source, paths[source.name], previous.get(source.name, ()), report)
    ctx.history.set_placement(recorded)
    return report


def _replica_lines(ctx: Context, host: Node, public_keys: Mapping[str, str], sizes: Mapping[str, int]) -> list[str]:
    """The forced-command lines ``host`` should hold for the sources reached (whose public keys are known)."""
    assert host.storage is not None
    lines = []
    for source_name, targets in sorted(ctx.placement.replicas.items()):
        if host.name not in targets or source_name not in public_keys:
            continue
        source = ctx.federation.node(source_name)
        quota = borg.replica_quota(quota_size(source, sizes), host.storage.capacity)
        lines.append(borg.authorized_keys_line(host.borg, borg.repository_path(source, host), quota,
                                               public_keys[source_name], f"mutualbackup:{source_name}"))
    return lines


def _init_repositories(ctx: Context, source: Node, paths: borg.SourcePaths, previous: Sequence[str],
                       report: ApplyReport) -> tuple[str, ...]:
    """``borg init`` of each planned repository of ``source`` that is new; the replicas that exist now."""
    targets = ctx.placement.replicas.get(source.name, ())
    ok: list[str] = []
    with ctx.session(source) as transport:
        for target in targets:
            try:
                _init_repository(transport, source, ctx.federation.node(target), paths, report)
                ok.append(target)
            except MutualBackupError as exc:
                report.failures.append(f"{source.name} → {target}: {exc}")
                if target in previous:
                    ok.append(target)  # it existed before: a host down today must not orphan it
    for gone in previous:
        if gone not in targets:
            report.notes.append(
                f"{source.name} no longer has a replica on {gone}: its repository there is kept; "
                "delete it by hand once you are sure"
            )
    return tuple(ok)


def _prepare_source(
    ctx: Context, transport: Transport, source: Node, targets: Sequence[str], report: ApplyReport
) -> tuple[str, borg.SourcePaths]:
    paths = ctx.source_paths(transport, source)
    _check(transport, ("mkdir", "-p", "-m", "700", "--", paths.workdir), f"cannot create {paths.workdir}")
    if transport.read_file(paths.key + ".pub") is None:
        _check(
            transport,
            ("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mutualbackup:{source.name}", "-f", paths.key),
            "cannot generate the source's SSH key",
        )
        report.changes.append(f"+ key         {source.name}")
    public_key = (transport.read_file(paths.key + ".pub") or b"").decode().strip()
    if not re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [\x20-\x7e]*)?", public_key):
        raise OperationFailed(
            f"the public key {paths.key}.pub on {source.name} is not one ed25519 key on one line; "
            "move it away and run `mutualbackup apply` again to generate a new one"
        )
    # The passphrase is generated on the source and never read back: the shell
    # script below only sees its path as "$1".
    generated = transport.run(
        (
            "sh",
            "-c",
            # ln creates the final name only if it is absent, so two concurrent applies can
            # never replace a passphrase that a repository already uses.
            'umask 077; if [ -e "$1" ]; then [ -s "$1" ] && exit 3; echo "$1 exists but is empty: remove it" >&2; exit 4; fi;'
            ' t="$1.new.$$"; head -c 48 /dev/urandom | base64 | tr -d "\\n" > "$t"'
            ' && { ln "$t" "$1" 2>/dev/null || { rm -f "$t"; exit 3; }; } && rm -f "$t"',
            "sh",
            paths.passphrase,
        )
    )
    if generated.exit_code == 0:
        report.changes.append(f"+ passphrase  {source.name} (on the source only, mode 0600)")
    elif generated.exit_code != 3:
        raise OperationFailed(f"cannot create the passphrase file on {source.name}: {generated.stderr_tail()}")
    hosts = [ctx.federation.node(t) for t in targets]
    known = "".join(borg.known_hosts_line(h) + "\n" for h in sorted(hosts, key=lambda h: h.name)).encode()
    if transport.read_file(paths.known_hosts) != known:
        transport.write_file(paths.known_hosts, known, 0o600)
        report.changes.append(f"~ known_hosts {source.name} ({len(hosts)} pinned host key(s))")
    return public_key, paths


def _prepare_host(
    ctx: Context,
    transport: Transport,
    host: Node,
    lines: list[str],
    public_keys: Mapping[str, str],
    report: ApplyReport,
) -> None:
    assert host.storage is not None
    path = resolve_path(host.authorized_keys, transport)
    current = (transport.read_file(path) or b"").decode("utf-8", errors="surrogateescape")
    # A source we could not reach keeps its existing line: better stale than locked out.
    reached = {f"mutualbackup:{name}" for name in public_keys}
    for line in borg.managed_lines(current):
        comment = line.rsplit(" ", 1)[-1]
        if comment not in reached and comment.startswith("mutualbackup:") and comment[13:] in ctx.placement.replicas:
            if host.name in ctx.placement.replicas[comment[13:]]:
                lines.append(line)
    lines.sort(key=lambda line: line.rsplit(" ", 1)[-1])
    # Temporary restore lines (restore.py) stay while a restore may still use them; expired ones go.
    restoring = borg.live_restore_lines(borg.managed_lines(current), dt.datetime.now(dt.timezone.utc))
    wanted = borg.replace_block(current, lines + restoring)
    if wanted != current:
        transport.write_file(path, wanted.encode("utf-8", errors="surrogateescape"), 0o600)
        report.changes.append(f"~ authorized_keys {host.name} ({len(lines)} replica line(s))")
    for member in sorted({line.rsplit(" ", 1)[-1][13:].split("/")[0] for line in lines}):
        _check(
            transport,
            ("mkdir", "-p", "-m", "700", "--", posixpath.join(host.storage.path, member)),
            f"cannot create the storage directory on {host.name}",
        )


def _init_repository(transport: Transport, source: Node, host: Node, paths: borg.SourcePaths, report: ApplyReport) -> None:
    url = borg.repository_url(source, host)
    listed = transport.run(borg.list_argv(source.borg, url) + ("--short",), env=borg.client_env(paths), timeout=120)
    if borg.succeeded(listed.exit_code):
        return
    if listed.exit_code not in (13, 15, 2):
        raise OperationFailed(
            f"cannot open the repository on {host.name} (borg exit {listed.exit_code}: {borg.exit_hint(listed.exit_code)})\n"
            f"{listed.stderr_tail()}"
        )
    result = transport.run(borg.init_argv(source.borg, url), env=borg.client_env(paths), timeout=300)
    if not borg.succeeded(result.exit_code):
        raise OperationFailed(
            f"borg init of {url} failed (exit {result.exit_code}: {borg.exit_hint(result.exit_code)})\n{result.stderr_tail()}"
        )
    report.changes.append(f"+ repository  {source.name} → {host.name}")


def _check(transport: Transport, argv: Sequence[str], what: str) -> None:
    result = transport.run(argv, timeout=60)
    if not result.ok:
        raise OperationFailed(f"{what} on {transport.node_name}: {result.stderr_tail()}")
