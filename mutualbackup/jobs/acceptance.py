"""``mutualbackup accept-deletion``: a member's admin accepts, signed, what the compaction guard refused.

The guard of promise 3 refuses to compact a repository whose archives vanished or were re-created, whose
live data shrank, or whose host logged writes the coordinator did not make — because compaction would free
that data for good. When the deletion was deliberate (a member removed an archive holding a secret), one of
the *source's member's* admins accepts exactly what the refusal listed, in two steps that never bring the
admin's key to the coordinator (whoever holds the coordinator must not hold an admin's signing key or
agent: it would sign member files and open recovery kits with it):

1. ``accept-deletion SOURCE --replica HOST --statement FILE`` writes the statement: the federation, the
   source, the host, the refused run, the archives gone, those re-created (with the id each has now), the
   host's transactions and the live size, as JSON values (no name can forge a line);
2. the admin signs it on their own machine — ``ssh-keygen -Y sign -n mutualbackup-accept-deletion -f KEY FILE``;
3. ``accept-deletion SOURCE --replica HOST --signature FILE.sig`` rebuilds the statement from the same refusal
   (still the latest compaction), verifies the signature against the admins of the member's *signed* file,
   and records a run ``accept-deletion`` with the statement and its signature (for audit).

The next compaction counts the accepted archives as deleted on purpose (each re-created one with the id it
was accepted with), takes the accepted live size as its baseline and the accepted transactions as accounted
for — and refuses again anything beyond them. The guard runs on the coordinator: it protects members from a
stolen *source* key; a hostile coordinator could compact anyway (it asks the host's node to).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory import signatures
from mutualbackup.inventory.model import Node
from mutualbackup.plan.compaction_rules import ACCEPTED as KIND, run_detail, utc_text
from mutualbackup.state.history import Run

NAMESPACE = "mutualbackup-accept-deletion"


@dataclass(frozen=True)
class Refusal:
    """The latest refused compaction of one replica, not accepted yet."""

    source: str
    host: str
    run: Run
    vanished: tuple[str, ...]
    replaced: dict[str, str | None]  # name -> the borg id it has now
    transactions: tuple[int, ...]
    live_bytes: int | None

    def statement(self, federation: str) -> str:
        """The text an admin signs: exactly what is accepted, each value JSON (a name cannot forge a line)."""
        return (f"mutualbackup accept-deletion\nfederation: {json.dumps(federation)}\nsource: {json.dumps(self.source)}\n"
                f"host: {json.dumps(self.host)}\nrefused compaction: run {self.run.id} at {utc_text(self.run.started)}\n"
                f"archives gone: {json.dumps(list(self.vanished))}\n"
                f"archives re-created, with the id each has now: {json.dumps(self.replaced, sort_keys=True)}\n"
                f"host transactions: {json.dumps(list(self.transactions))}\nlive bytes: {json.dumps(self.live_bytes)}\n")


def refusal_of(ctx: Context, source: Node, replica: str | None) -> Refusal:
    """The one refused compaction to accept: of ``replica``, or the only one of ``source``'s replicas."""
    found = [r for host in (ctx.replicas_of(source.name) if replica is None else (replica,))
             if (r := _refusal(ctx, source.name, host)) is not None]
    if not found:
        raise UsageError(f"nothing to accept: no compaction of {source.name}{' on ' + replica if replica else ''} "
                         "is refused now (see `mutualbackup status`)")
    if len(found) > 1:
        raise UsageError(f"compactions of {source.name} are refused on {', '.join(r.host for r in found)}: each has "
                         "its own statement; name one with --replica HOST")
    return found[0]


def _refusal(ctx: Context, source: str, host: str) -> Refusal | None:
    compact = ctx.history.last_run("compact", source, host)
    detail = run_detail(compact) if compact is not None else {}
    if compact is None or not detail.get("refused") or accepted_after(ctx, source, host, compact):
        return None
    replaced = detail.get("replaced_ids") or {name: None for name in detail.get("replaced") or ()}
    return Refusal(source, host, compact, tuple(detail.get("vanished") or ()),
                   {str(k): (str(v) if v is not None else None) for k, v in replaced.items()},
                   tuple(int(n) for n in detail.get("foreign_transactions") or ()), detail.get("live_bytes"))


def accepted_after(ctx: Context, source: str, host: str, run: Run) -> bool:
    accepted = ctx.history.last_run(KIND, source, host, successful=True)
    return accepted is not None and (accepted.started, accepted.id) > (run.started, run.id)


def accept(ctx: Context, refusal: Refusal, signature: bytes, *, clock=time.time) -> str:  # noqa: ANN001
    """Verify ``signature`` of the refusal's statement against the admins of the member's signed file, and
    record the acceptance; returns the admin's name. Nothing is recorded otherwise."""
    source = ctx.federation.node(refusal.source)
    member = ctx.federation.member(source.member)
    unsigned = [p for p in signatures.member_signature_problems(ctx.federation) if member.where is not None
                and p.startswith(f"{member.where.file}:")]
    if unsigned:
        raise OperationFailed(f"not accepted, nothing recorded: {member.name}'s member file is not signed by its "
                              f"admins, so they cannot be told apart from anyone who edited it: {unsigned[0]}")
    admins = {" ".join(a.key.split()[:2]): a.name for a in member.admins}
    statement = refusal.statement(ctx.federation.name).encode()
    try:
        fingerprint = signatures.verify(statement, signature, member.name, admins, namespace=NAMESPACE)
    except signatures.SignatureError as exc:
        raise OperationFailed(f"not accepted, nothing recorded: only one of {member.name}'s admins "
                              f"({', '.join(sorted(admins.values()))}) can accept a deletion of its data, by signing "
                              f"the statement of this refusal: {exc}") from None
    latest = ctx.history.last_run("compact", refusal.source, refusal.host)
    if latest is None or latest.id != refusal.run.id:
        raise OperationFailed("not accepted, nothing recorded: another compaction ran since the statement was "
                              "written; write and sign the statement of the latest one")
    signer = next((name for public, name in admins.items() if signatures.fingerprint(public) == fingerprint), "?")
    run_id = ctx.history.start_run(KIND, refusal.source, refusal.host, started=clock())
    ctx.history.accept_deletion(refusal.source, refusal.host, refusal.vanished, refusal.replaced, now=clock())
    detail = {"accepted_run": refusal.run.id, "vanished": list(refusal.vanished), "replaced": refusal.replaced,
              "live_bytes": refusal.live_bytes, "signed_by": signer, "fingerprint": fingerprint,
              "statement": statement.decode(), "signature": signature.decode("ascii", "replace")}
    if refusal.transactions:
        detail["transactions_checked"] = max(refusal.transactions)
    ctx.history.finish_run(run_id, "success", detail=detail, ended=clock())
    return signer
