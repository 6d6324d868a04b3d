"""``mutualbackup apply``: make the world match the plan, idempotently.

For each source: its own SSH key and passphrase, generated *on the source* (the
passphrase never leaves it), and a known_hosts file pinning its replica hosts.
For each host: one forced-command line per replica inside a managed block of its
``authorized_keys`` (every other line untouched), and the parent directory of
the repositories. Then ``borg init`` of each new repository, run from the source.
A second run finds everything in place and changes nothing.

With an empty state (the coordinator lost its disk), the hosts are asked first which
repositories they hold (:func:`adopt`): placement then starts from where the data is, each
found repository is adopted as it is (no ``borg init``, no upload again), and one run per
replica is rebuilt from the repository's size and last write, so that status and metrics
have something to say until the next backup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.context import Context
from mutualbackup.errors import MutualBackupError, OperationFailed
from mutualbackup.inventory.model import Node
from mutualbackup.node.requests import host_ref
from mutualbackup.remote.transport import Transport, reply_result


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


def apply(ctx: Context, *, on_step: Callable[[str], None] | None = None) -> ApplyReport:
    """Provision every source and host of the placement. Failures are collected, not raised.

    Three passes: the sources (key, passphrase, pinned hosts), the hosts (their lines), then
    ``borg init`` of each new repository from its source; the placement that exists is recorded.
    ``on_step`` hears what is being done (an operator's terminal).
    """
    step = on_step or (lambda _text: None)
    report = ApplyReport()
    if not ctx.history.placement():
        step("asking the hosts which repositories they hold")
        adopt(ctx, report)
    targets = _targets(ctx, report)
    public_keys: dict[str, str] = {}
    sources, hosts = ctx.federation.sources(), ctx.federation.hosts()
    for number, source in enumerate(sources, 1):
        step(f"apply: preparing {source.name} ({number} of {len(sources)} sources)")
        try:
            with ctx.session(source) as transport:
                public_keys[source.name] = _prepare_source(ctx, transport, source, targets.get(source.name, ()), report)
        except MutualBackupError as exc:
            report.failures.append(f"{source.name}: {exc}")
    sizes = ctx.history.repository_sizes()
    for number, host in enumerate(hosts, 1):
        step(f"apply: the replica lines of {host.name} ({number} of {len(hosts)} hosts)")
        try:
            with ctx.session(host) as transport:
                _prepare_host(transport, host, _replicas_of(ctx, targets, host, public_keys, sizes), report)
        except MutualBackupError as exc:
            report.failures.append(f"{host.name}: {exc}")
    previous = ctx.history.placement()
    recorded: dict[str, tuple[str, ...]] = {}
    for number, source in enumerate(sources, 1):
        step(f"apply: the repositories of {source.name} ({number} of {len(sources)} sources)")
        if source.name not in public_keys:  # not reached: what existed stays recorded
            recorded[source.name] = tuple(previous.get(source.name, ()))
            continue
        recorded[source.name] = _init_repositories(ctx, source, targets.get(source.name, ()), previous.get(source.name, ()),
                                                   report)
    ctx.history.set_placement(recorded)
    return report


def _targets(ctx: Context, report: ApplyReport) -> dict[str, tuple[str, ...]]:
    """The hosts each source's replicas are on once ``apply`` is done: the placement, except that a
    replica which stopped being valid (its host draining, full or down) is not replaced here but moved
    by the daemon, make before break — apply keeps it and records the move; the new replica comes
    with the move, under the daemon's limit on moves at a time."""
    from mutualbackup.plan.moves import hosts_down, plan_moves

    history, federation = ctx.history, ctx.federation
    recorded = history.placement()
    if not recorded:
        return dict(ctx.placement.replicas)
    moving = {(m["source"], m["old"]): m["new"] for m in history.moves()}
    contact, failed = history.host_contacts()
    down = hosts_down(federation, contact, failed, time.time())
    placement, wanted = plan_moves(federation, recorded, moving, history.repository_sizes(), down)
    for move in wanted:
        history.start_move(move.source, move.old, move.new, move.reason)
        report.changes.append(f"~ moving      {move.source}: {move.old} → {move.new} ({move.reason}); the daemon makes "
                              f"the new replica, and gives up the one on {move.old} once the new one is healthy")
    hosts = {h.name for h in federation.hosts()}
    targets = {}
    for source, chosen in placement.replicas.items():
        leaving = [(old, new) for (s, old), new in moving.items() if s == source]
        leaving += [(m.old, m.new) for m in wanted if m.source == source]
        not_yet = {new for _old, new in leaving if new not in recorded.get(source, ())}
        kept_old = [old for old, _new in leaving if old in hosts and old not in chosen]
        keep = [h for h in chosen if h not in not_yet] + kept_old
        held = recorded.get(source, ())
        node = federation.node(source)
        assert node.backup is not None
        for host in held:  # no valid host to move it to (the source is reported unplaceable): it stays
            if len(keep) < node.backup.replicas and host in hosts and host not in keep and (
                    host in down or federation.node(host).storage.draining):  # type: ignore[union-attr]
                keep.append(host)
        targets[source] = (*(h for h in held if h in keep), *(h for h in keep if h not in held))  # recorded order first
    return targets


def _replicas_of(ctx: Context, targets: Mapping[str, Sequence[str]], host: Node, public_keys: Mapping[str, str],
                 sizes: Mapping[str, int]) -> list[dict]:
    """The replicas ``host`` holds: each source with its key (None when it could not be reached: the host
    keeps the line it has) and its quota."""
    assert host.storage is not None
    replicas = []
    for source_name, hosts in sorted(targets.items()):
        if host.name not in hosts:
            continue
        source = ctx.federation.node(source_name)
        replicas.append({"source": source_name, "public_key": public_keys.get(source_name),
                         "quota": borg.replica_quota(quota_size(source, sizes), host.storage.capacity)})
    return replicas


def _init_repositories(ctx: Context, source: Node, targets: Sequence[str], previous: Sequence[str],
                       report: ApplyReport) -> tuple[str, ...]:
    """``borg init`` of each planned repository of ``source`` that is new; the replicas that exist now."""
    ok: list[str] = []
    with ctx.session(source) as transport:
        for target in targets:
            try:
                _init_repository(transport, source, ctx.federation.node(target), report)
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


def _prepare_source(ctx: Context, transport: Transport, source: Node, targets: Sequence[str], report: ApplyReport) -> str:
    """The source's key, passphrase and pinned hosts, made on the source; its public key."""
    hosts = [host_ref(ctx.federation.node(t)) for t in targets]
    reply = transport.request("prepare", {"hosts": hosts, "signed": ctx.signed(source.member)}, timeout=300)
    if not reply.ok:
        raise OperationFailed(reply.error or f"{source.name} could not be prepared")
    for change in reply.data.get("changes", []):
        if change == "key":
            report.changes.append(f"+ key         {source.name}")
        elif change == "passphrase":
            report.changes.append(f"+ passphrase  {source.name} (on the source only, mode 0600)")
        elif str(change).startswith("known_hosts"):
            report.changes.append(f"~ known_hosts {source.name} ({len(hosts)} pinned host key(s))")
    return str(reply.data["public_key"])


def _prepare_host(transport: Transport, host: Node, replicas: list[dict], report: ApplyReport) -> None:
    """The host's managed ``authorized_keys`` block: one line per replica (the host writes it)."""
    reply = transport.request("authorize", {"replicas": replicas}, timeout=300)
    if not reply.ok:
        raise OperationFailed(reply.error or f"{host.name} could not be authorized")
    if reply.data.get("changed"):
        report.changes.append(f"~ authorized_keys {host.name} ({reply.data.get('lines', 0)} replica line(s))")


def _init_repository(transport: Transport, source: Node, host: Node, report: ApplyReport) -> None:
    reply = transport.request("init", {"host": host_ref(host)}, timeout=600)
    if not reply.ok:
        raise OperationFailed(reply.error or f"{source.name} could not initialise its repository on {host.name}")
    if reply.data.get("created"):
        report.changes.append(f"+ repository  {source.name} → {host.name}")
        return
    for key, what in (("listed", "cannot open the repository on"), ("init", "borg init failed on")):
        if key in reply.data:
            result = reply_result(reply, key)
            raise OperationFailed(f"{what} {host.name} (borg exit {result.exit_code}: "
                                  f"{borg.exit_hint(result.exit_code)})\n{result.stderr_tail()}")


def adopt(ctx: Context, report: ApplyReport) -> None:
    """The replicas the hosts already hold, recorded as the placement to keep (an empty state: the
    coordinator's disk was lost); a host that cannot be asked is skipped, and says so."""
    from mutualbackup.plan.placement import place

    sources = {s.name: s for s in ctx.federation.sources()}
    found: dict[str, list[str]] = {}
    sizes: dict[tuple[str, str], tuple[int, float | None]] = {}
    for host in ctx.federation.hosts():
        try:
            with ctx.session(host) as transport:
                reply = transport.request("repositories", {}, timeout=900)
        except MutualBackupError as exc:
            report.failures.append(f"{host.name}: cannot list the repositories it holds: {exc}")
            continue
        if not reply.ok:
            report.failures.append(f"{host.name}: cannot list the repositories it holds: {reply.error}")
            continue
        for repository in reply.data.get("repositories", []):
            source = str(repository.get("source"))
            if source in sources:
                found.setdefault(source, []).append(host.name)
                sizes[(source, host.name)] = (int(repository.get("bytes") or 0), repository.get("last_write"))
    if not found:
        return
    measured = {source: max(sizes[(source, h)][0] for h in hosts) for source, hosts in found.items()}
    kept = place(ctx.federation, found, measured).replicas
    adopted = {source: tuple(h for h in hosts if h in kept.get(source, ())) for source, hosts in found.items()}
    ctx.history.set_placement({source: hosts for source, hosts in adopted.items() if hosts})
    for source, hosts in sorted(adopted.items()):
        for host in hosts:
            size, last_write = sizes[(source, host)]
            _rebuilt_run(ctx, source, host, size, last_write)
            report.changes.append(f"= adopted     {source} → {host} (its repository was there: {size} bytes)")
    ctx.reset_placement()


def _rebuilt_run(ctx: Context, source: str, host: str, size: int, last_write: float | None) -> None:
    """What the lost history can be rebuilt from: the repository's last write, as a successful backup."""
    if last_write is None:
        return
    run = ctx.history.start_run("backup", source, host, started=float(last_write))
    ctx.history.finish_run(run, "success", ended=float(last_write), repository_bytes=size,
                           detail={"rebuilt": "from the repository on the host, after the state was lost"})
