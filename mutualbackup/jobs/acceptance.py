"""``mutualbackup accept-deletion``: a member's admin accepts, signed, what the compaction guard refused.

The guard of promise 3 refuses to compact a repository whose archives vanished or were re-created, whose
live data shrank, or whose host logged writes the coordinator did not make — because compaction would free
that data for good. When the deletion was deliberate (a member removed an archive holding a secret), one of
the *source's member's* admins accepts exactly what the refusal listed: the statement names the source, the
host, the archives, the transactions and the live size, and is signed with the admin's SSH key
(``ssh-keygen -Y sign``, namespace ``mutualbackup-accept-deletion``) and verified against the admins of the
member's signed file. The coordinator's operator alone cannot accept: without an admin's key nothing is
recorded. What was accepted is recorded as a run (kind ``accept-deletion``, with the statement and its
signature for audit); the next compaction counts the accepted archives as deleted on purpose, takes the
accepted live size as its baseline and the accepted transactions as accounted for — and refuses again
anything beyond them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.inventory import signatures
from mutualbackup.inventory.model import Node
from mutualbackup.plan.compaction_rules import ACCEPTED as KIND
from mutualbackup.state.history import Run

NAMESPACE = "mutualbackup-accept-deletion"


@dataclass(frozen=True)
class Refusal:
    """The latest refused compaction of one replica, not accepted yet."""

    source: str
    host: str
    run: Run
    vanished: tuple[str, ...]
    replaced: tuple[str, ...]
    transactions: tuple[int, ...]
    live_bytes: int | None

    def statement(self, federation: str) -> str:
        """The text an admin signs: exactly what is accepted, nothing more."""
        def listed(items: Sequence[object]) -> str:
            return ", ".join(map(str, items)) or "none"
        return (f"mutualbackup accept-deletion\nfederation: {federation}\nsource: {self.source}\nhost: {self.host}\n"
                f"refused compaction: run {self.run.id} at {_iso(self.run.started)}\n"
                f"archives gone: {listed(self.vanished)}\narchives re-created: {listed(self.replaced)}\n"
                f"host transactions: {listed(self.transactions)}\nlive bytes: {self.live_bytes}\n")


def refusals(ctx: Context, source: Node, replica: str | None) -> list[Refusal]:
    """The replicas of ``source`` (or only ``replica``) whose latest compaction was refused, not yet accepted."""
    found = []
    for host in ctx.replicas_of(source.name) if replica is None else (replica,):
        compact = ctx.history.last_run("compact", source.name, host)
        detail = _detail(compact)
        if compact is None or not detail.get("refused") or accepted_after(ctx, source.name, host, compact):
            continue
        found.append(Refusal(source.name, host, compact, tuple(detail.get("vanished") or ()),
                             tuple(detail.get("replaced") or ()),
                             tuple(int(n) for n in detail.get("foreign_transactions") or ()),
                             detail.get("live_bytes")))
    return found


def accepted_after(ctx: Context, source: str, host: str, run: Run) -> bool:
    accepted = ctx.history.last_run(KIND, source, host, successful=True)
    return accepted is not None and (accepted.started, accepted.id) > (run.started, run.id)


def accept(ctx: Context, refusal: Refusal, *, key: str | None, agent_key: str | None,
           clock=time.time) -> str:  # noqa: ANN001 - Callable[[], float]
    """Sign the refusal's statement with an admin's key, verify it against the member's admins, and record
    it; returns the admin's name. Nothing is recorded when the signature is not one of theirs."""
    source = ctx.federation.node(refusal.source)
    member = ctx.federation.member(source.member)
    admins = {" ".join(a.key.split()[:2]): a.name for a in member.admins}
    if not admins:
        raise UsageError(f"member {member.name} names no admins in its file: nobody can accept a deletion for it")
    statement = refusal.statement(ctx.federation.name).encode()
    with tempfile.TemporaryDirectory(prefix="mutualbackup-accept-") as scratch:
        path = os.path.join(scratch, "statement")
        with open(path, "wb") as handle:
            handle.write(statement)
        try:
            signatures.sign(path, key, agent_key, namespace=NAMESPACE)
            with open(path + signatures.SIGNATURE_SUFFIX, "rb") as handle:
                signature = handle.read()
            fingerprint = signatures.verify(statement, signature, member.name, admins, namespace=NAMESPACE)
        except (signatures.SignatureError, OSError) as exc:
            raise OperationFailed(f"not accepted, nothing recorded: only one of {member.name}'s admins "
                                  f"({', '.join(sorted(admins.values()))}) can accept a deletion of its data: "
                                  f"{exc}") from None
    signer = next((name for public, name in admins.items() if signatures.fingerprint(public) == fingerprint), "?")
    run_id = ctx.history.start_run(KIND, refusal.source, refusal.host, started=clock())
    ctx.history.accept_deletion(refusal.source, refusal.host, refusal.vanished, refusal.replaced, now=clock())
    detail = {"accepted_run": refusal.run.id, "vanished": list(refusal.vanished), "replaced": list(refusal.replaced),
              "live_bytes": refusal.live_bytes, "signed_by": signer, "fingerprint": fingerprint,
              "statement": statement.decode(), "signature": signature.decode("ascii", "replace")}
    if refusal.transactions:
        detail["transactions_checked"] = max(refusal.transactions)
    ctx.history.finish_run(run_id, "success", detail=detail, ended=clock())
    return signer


def _detail(run: Run | None) -> dict:
    try:
        return json.loads(run.detail) if run is not None and run.detail else {}
    except ValueError:
        return {}


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
