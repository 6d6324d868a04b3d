"""A member's signed file is the only authority its nodes obey, seen from the coordinator (fake nodes, the real
daemon and jobs): a file edited on the coordinator's disk without its admin's signature, or a state that asks
for something else, is refused by the member's nodes, and the refusal shows in status, the log and an alert;
a file re-signed by its admin is used by the next run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from pathlib import Path

import pytest

from fake import Harness, make_federation, signed_again
from mutualbackup.inventory.model import Federation, Retention
from mutualbackup.report.status import compute_status

START = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp()
HOUR = 3600.0
VICTIM = "coop1/src0"


def with_backup(federation: Federation, source: str, **changes: object) -> Federation:
    """``federation`` as the coordinator would read it after ``source``'s backup: section was edited."""
    members = []
    for member in federation.members:
        nodes = tuple(dataclasses.replace(n, backup=dataclasses.replace(n.backup, **changes))
                      if n.name == source and n.backup is not None else n for n in member.nodes)
        members.append(dataclasses.replace(member, nodes=nodes))
    return dataclasses.replace(federation, members=tuple(members))


def edited_without_signing(federation: Federation, source: str, **changes: object) -> Federation:
    """The member file edited on the coordinator's disk, its old signature left beside it."""
    member = source.split("/")[0]
    signature = Path(federation.directory, "members", f"{member}.yml.sig")
    kept = signature.read_bytes()
    edited = signed_again(with_backup(federation, source, **changes))
    signature.write_bytes(kept)
    return edited


def harness(tmp_path: Path, federation: Federation) -> Harness:
    return Harness(federation, str(tmp_path / "state"), START)


@pytest.mark.parametrize("changes", [
    {"before": (f"touch /tmp/mutualbackup-pwned-{os.getpid()}",)},
    {"paths": ("/nonexistent",)},
], ids=["before", "paths"])
def test_a_member_file_edited_without_its_admins_signature_is_refused_by_its_nodes(
        tmp_path: Path, changes: dict, caplog: pytest.LogCaptureFixture) -> None:
    federation = edited_without_signing(make_federation(3, 1), VICTIM, **changes)
    h = harness(tmp_path, federation)
    with caplog.at_level(logging.ERROR, logger="mutualbackup"):
        h.run_until(START + 2 * HOUR)
    assert not [c for c in h.world.commands("create") if c.node == VICTIM]  # nothing ran on the victim
    assert not os.path.exists(f"/tmp/mutualbackup-pwned-{os.getpid()}")
    assert {c.node for c in h.world.commands("create")} == {"coop0/src0", "coop2/src0"}  # the others go on
    refused = [r for r in h.history.runs(kind="backup", source=VICTIM)]
    assert refused and {r.result for r in refused} == {"failure"}
    assert all("member file is refused" in (r.error or "") and "signature" in (r.error or "") for r in refused)
    rows = [r for r in compute_status(h.federation, h.placement, h.history, h.clock.time()) if r.source == VICTIM]
    assert rows and all("member file is refused" in (r.last_error or "") for r in rows)
    assert any("coop1/src0 refused the job" in record.getMessage() for record in caplog.records)
    alerts = [a for a in h.history.alerts() if a["kind"] == "member-file-refused"]
    assert alerts and {a["source"] for a in alerts} == {VICTIM}
    assert len(alerts) == 1  # one alert for the streak, however many retries


def test_a_forged_retention_in_the_coordinators_memory_prunes_nothing(tmp_path: Path) -> None:
    honest = make_federation(3, 1)
    forged = with_backup(honest, VICTIM, retention=Retention(daily=1))  # the file on disk still says daily: 7
    h = harness(tmp_path, forged)
    h.run_until(START + 2 * HOUR)
    assert [c for c in h.world.commands("create") if c.node == VICTIM]  # backups go on: what to back up agrees
    assert not [c for c in h.world.commands("prune") if c.node == VICTIM]
    prunes = h.history.runs(kind="prune", source=VICTIM)
    assert prunes and all("disagrees with coop1's signed file on retention" in (r.error or "") for r in prunes)
    assert all("--keep-daily=7" in c.argv for c in h.world.commands("prune"))


def test_a_file_re_signed_by_its_admin_is_what_the_next_backup_uses(tmp_path: Path) -> None:
    federation = make_federation(3, 1)
    h = harness(tmp_path, federation)
    h.run_until(START + 2 * HOUR)
    before = len(h.world.commands("create"))
    changed = signed_again(with_backup(federation, VICTIM, paths=("/etc", "/srv/new")))
    h.ctx.federation = changed
    h.federation = changed
    h.run_until(START + 28 * HOUR)
    later = [c for c in h.world.commands("create")[before:] if c.node == VICTIM]
    assert later and all("/srv/new" in c.argv for c in later)
    assert {r.result for r in h.history.runs(kind="backup", source=VICTIM)} == {"success"}
